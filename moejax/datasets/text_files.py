"""tfds builders for text files on this machine: the Python standard library and any directory of text.

Each file is one document. A file goes to 'validation' when the hash of its relative path (POSIX
separators) falls below `val_fraction`, else to 'train' (`is_validation`): the split of a file depends on
its path only, so it is the same on every machine, and no file is in both splits.

- `MoejaxStdlib`: the *.py files of the running interpreter's standard library
  (`sysconfig.get_paths()['stdlib']`), skipping site-packages/dist-packages, test directories (test,
  tests, idle_test: Debian/Ubuntu ship them separately, so leaving them out keeps the corpus the same
  across installs), config-* and _sysconfigdata* (build-specific). Config name
  '<implementation><version>-val<fraction>-<hash of the file list>', e.g. 'cpython3.11.7-val0.02-1a2b3c4d':
  a build for one interpreter is never reused by another.
- `MoejaxTextDir`: every non-empty, non-hidden regular file under a directory (recursive) whose first
  8 KiB hold no NUL byte. Config name '<dir name>-val<fraction>-<hash>', the hash over the absolute path and
  every file's (relative path, size, mtime): a different directory or a changed file rebuilds.

Files are decoded as UTF-8 (undecodable bytes become U+FFFD); empty files are skipped. Both write
array_record files with features {'text': Text, 'path': Text (relative path)} and record the `ContentHash`
of what they stored in `info.metadata['content_sha256']` (moejax.data.corpus_identity).

A file is stored whole, as one document: building holds about 4.5x the largest file (a 100 MB single-line
file: 1.8 s, 450 MiB above the imports; experiments/benchmarks/data_memory.py), and tfds' shuffle buffer keeps
up to 1 GB of examples in memory before spilling to disk. moejax.data reads a document whole and tokenizes it
in chunks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import sysconfig

import tensorflow_datasets as tfds

SPLITS = ("train", "validation")
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
SNIFF_BYTES = 8192


def is_validation(relpath: str, val_fraction: float) -> bool:
    """True if the file at `relpath` belongs to the validation split (sha256 of the path < val_fraction)."""
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
    return h / 2.0**64 < val_fraction


def split_files(relpaths, val_fraction: float) -> dict[str, list[str]]:
    """{'train': [...], 'validation': [...]} by `is_validation`, each sorted."""
    out = {"train": [], "validation": []}
    for p in sorted(relpaths):
        out["validation" if is_validation(p, val_fraction) else "train"].append(p)
    return out


def _walk(root: str, keep_dir, keep_file) -> list[str]:
    """Relative POSIX paths of the files under root that pass keep_file, in directories that pass keep_dir."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if keep_dir(d))
        for name in filenames:
            path = os.path.join(dirpath, name)
            if keep_file(name, path):
                out.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return sorted(out)


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[str]:
    """Relative paths of the standard library's *.py files (see the module docstring for what is skipped)."""
    return _walk(
        stdlib_root(),
        keep_dir=lambda d: d not in STDLIB_SKIP_DIRS and not d.startswith("config-"),
        keep_file=lambda name, path: (name.endswith(".py") and not name.startswith("_sysconfigdata")
                                      and os.path.getsize(path) > 0))


def _is_text(name: str, path: str) -> bool:
    if name.startswith(".") or not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as f:
        return b"\0" not in f.read(SNIFF_BYTES)


def text_dir_files(root: str) -> list[str]:
    """Relative paths of the text files under root (non-hidden, non-empty, no NUL in the first 8 KiB)."""
    return _walk(root, keep_dir=lambda d: not d.startswith(".") and d != "__pycache__", keep_file=_is_text)


def read_text(root: str, relpath: str) -> bytes:
    """The file as UTF-8, undecodable bytes replaced by U+FFFD (valid files: their bytes, not copied)."""
    with open(os.path.join(root, relpath), "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace").encode("utf-8")


class ContentHash:
    """The content hash of documents fed split by split in path order, and each split's documents and bytes."""

    def __init__(self):
        self.sha = {s: hashlib.sha256() for s in SPLITS}
        self.docs, self.bytes = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)

    def update(self, split: str, path: str, text: str | bytes):
        data = text.encode("utf-8") if isinstance(text, str) else text
        self.sha[split].update(path.encode("utf-8") + b"\0")
        self.sha[split].update(data)
        self.sha[split].update(b"\0")
        self.docs[split] += 1
        self.bytes[split] += len(data)

    def hexdigest(self) -> str:
        return hashlib.sha256("".join(f"{s} {h.hexdigest()}\n" for s, h in self.sha.items()).encode()).hexdigest()

    def metadata(self) -> dict:
        return {"content_sha256": self.hexdigest(),
                **{s: {"documents": self.docs[s], "bytes": self.bytes[s], "sha256": self.sha[s].hexdigest()}
                   for s in SPLITS}}


def _digest(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:8]


@dataclasses.dataclass
class FilesConfig(tfds.core.BuilderConfig):
    """A directory, its file list (relative paths) and the validation fraction; the name is the cache key."""

    root: str = ""
    files: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    val_fraction: float = 0.02


def stdlib_config(val_fraction: float) -> FilesConfig:
    files = tuple(stdlib_files())
    v = sys.version_info
    name = f"{sys.implementation.name}{v.major}.{v.minor}.{v.micro}-val{val_fraction}-{_digest(files)}"
    return FilesConfig(name=name, root=stdlib_root(), files=files, val_fraction=val_fraction,
                       description=f"Python {sys.version.split()[0]} standard library, {len(files)} files")


def text_dir_config(root: str, val_fraction: float) -> FilesConfig:
    root = os.path.abspath(root)
    files = tuple(text_dir_files(root))
    stats = [(p, os.stat(os.path.join(root, p)).st_size, os.stat(os.path.join(root, p)).st_mtime_ns) for p in files]
    label = re.sub(r"[^\w]+", "_", os.path.basename(root.rstrip("/")))[:40] or "root"
    name = f"{label}-val{val_fraction}-{_digest(root, stats)}"
    return FilesConfig(name=name, root=root, files=files, val_fraction=val_fraction,
                       description=f"text files under {root}, {len(files)} files")


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """DatasetInfo of a dataset built from local files: tfds' builder looks for published metadata of an
    unprepared dataset on its GCS bucket (`initialize_from_bucket`), and on finding none leaves the empty
    temporary directory it made (one /tmp/tmp*tfds per build); moejax's datasets are never published there."""

    def initialize_from_bucket(self) -> None:
        pass


class _TextFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One example per file of `builder_config.files`, split by `is_validation`."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "One example per file; split by sha256 of the relative path.",
                     "1.1.0": "Same examples; records their content_sha256 in info.metadata."}
    # Nothing is downloaded, so there is no checksums file to find next to the code; tfds 4.9's lookup of
    # it imports `importlib_resources`, which it does not declare as a dependency.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return LocalDatasetInfo(
            builder=self, description=self.builder_config.description, metadata=tfds.core.MetadataDict(),
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        self._hash = ContentHash()
        return {split: self._generate_examples(cfg.root, split, files)
                for split, files in split_files(cfg.files, cfg.val_fraction).items()}

    def _generate_examples(self, root, split, files):
        for p in files:
            text = read_text(root, p)
            self._hash.update(split, p, text)
            yield p, {"text": text, "path": p}

    def _download_and_prepare(self, dl_manager, download_config):
        super()._download_and_prepare(dl_manager, download_config)
        self.info.metadata.update(self._hash.metadata())


class MoejaxStdlib(_TextFilesBuilder, skip_registration=True):
    """The running interpreter's standard library sources (see `stdlib_config`)."""


class MoejaxTextDir(_TextFilesBuilder, skip_registration=True):
    """A directory of text files (see `text_dir_config`)."""
