"""A big, bit-reproducible text corpus: the Python sources and docs of a pinned list of PyPI wheels.

`DISTRIBUTIONS` (read from pypi_corpus.tsv) pins 151 pure-Python wheels (py3-none-any; MIT, BSD, Apache-2.0,
PSF, ISC, and MPL-2.0 for hypothesis and tqdm) by name, version, file name and sha256. Anyone with pip and PyPI rebuilds the same
documents, bit for bit:

    python -m moejax.datasets.pypi_corpus --download_dir=~/moejax_pypi_wheels [--tfds_data_dir=DIR]

It runs `pip download --no-deps --only-binary=:all: --require-hashes` for the wheels not already in the
download dir with the right hash (125 MB; pip checks each sha256, and wheels run no build step), checks
every sha256 again before reading an archive, writes array_record files (66 MB) into the tfds data dir
(default ~/tensorflow_datasets), reads them back to check the content hash and prints each split's
documents and bytes: 39 s on 2 CPU cores (download 24 s on a fast link, build 9 s, check 4 s; 0.5 GB of
memory). Training reads it with `DataConfig(source='pypi')`, which never downloads or builds it.

Documents: one per file of a wheel, in the order of their path '<name>-<version>/<path in the wheel>' (e.g.
'sympy-1.14.0/sympy/core/basic.py'): the files ending in .py .pyi .pyx .pxd .rst .md .txt and each
*.dist-info/METADATA (the package's README), skipping empty files, files over MAX_FILE_BYTES (1 MiB: 3
files), files with a NUL byte or not valid UTF-8 (none today; skipped rather than repaired, so every
document is a file's exact text), and files whose bytes equal an earlier document's (428 vendored copies,
2.2 MB: the first in path order stays, so no copy is in both splits). Features {'text', 'path'}.

Split by distribution: all of a distribution goes to 'validation' when `is_validation(name, VAL_FRACTION)`
(the sha256 of its name, not of its version, so a version bump does not move it), else to 'train'. No
package is in both splits, so the near-copies inside a package (sync/async twins, tests next to their code)
cannot leak from train into validation, which measures packages never seen in training. With
VAL_FRACTION = 0.1 it holds 15 distributions: mypy (37% of it, with its typeshed stubs), pyglet, sphinx,
ipython, trio, neo4j, gunicorn, boltons, bandit, ipykernel, attrs, mistune, prettytable, sortedcontainers,
pycodestyle.

Sizes: train 16,674 documents, 225.56 MB of UTF-8 text; validation 2,230 documents, 26.06 MB. The largest
distribution, sympy, is 10.4% of the text. Left out: generated API clients (kubernetes, twilio, stripe,
openai, elasticsearch, plotly), model zoos of copied code (transformers alone would be 54 MB, diffusers),
data more than code (faker, tensorflow-datasets, wcwidth), a second vendored typeshed (jedi), copyleft
(pylint, astroid, psycopg), and for size pyomo, awscli and tensorboard.

Content hash `CONTENT_SHA256`: each split's sha256 over its documents in path order, each as path, NUL, text
(UTF-8), NUL (no path or text holds a NUL byte), then the sha256 of the text
'train <train digest>\\nvalidation <validation digest>\\n'. The builder computes it while writing and fails,
leaving no prepared dataset, if it differs from the pinned value; metadata.json records it with each split's
documents, bytes and sha256, and the config name holds its first 16 hex digits. Two builds give the same
documents in the same storage order, but not byte-identical array_record files: tfds serializes each
example's two features in a per-process order (a protobuf map).

`TOKENIZER_8K` (pypi_spm8k.model, installed with moejax) is the 8K SentencePiece model of `moejax.tokenizer`
trained on all of the train split (78 s and 3.3 GB on 2 CPU cores; training twice gives the same file),
sha256 dae9b9ffa73ad9c5b7dd9dfea5f50fa0822e8cebb248d5040f06da120fcd469b: 3.31 bytes per token on the
validation split (for `DataConfig(source='pypi', tokenizer=TOKENIZER_8K)`).

    python -m moejax.train_tokenizer --source=pypi --vocab_size=8192 --max_bytes=250000000 --output=pypi_spm8k.model
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Iterable, Iterator, NamedTuple

import tensorflow_datasets as tfds

from moejax.datasets.text_files import SPLITS, ContentHash, LocalDatasetInfo, is_validation

VAL_FRACTION = 0.1
TEXT_SUFFIXES = (".py", ".pyi", ".pyx", ".pxd", ".rst", ".md", ".txt")
MAX_FILE_BYTES = 1 << 20
DOWNLOAD_DIR = "~/moejax_pypi_wheels"
TOKENIZER_8K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pypi_spm8k.model")
CONTENT_SHA256 = "994d9b678d131c1c9a5c17559af9d385de4214b15c9d60866f12948c754ed5f3"


class Dist(NamedTuple):
    """A pinned wheel: canonical PyPI name (lower case, '-'), version, wheel file name, sha256 of the file."""

    name: str
    version: str
    filename: str
    sha256: str


DISTRIBUTIONS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pypi_corpus.tsv")


def _read_distributions(path: str = DISTRIBUTIONS_FILE) -> tuple[Dist, ...]:
    """The pinned wheels of pypi_corpus.tsv (name, version, wheel, sha256, licence per line; sorted by name)."""
    with open(path) as f:
        return tuple(Dist(*line.rstrip("\n").split("\t")[:4]) for line in f if line.strip() and line[0] != "#")


DISTRIBUTIONS = _read_distributions()


def build_command(data_dir: str | None = None) -> str:
    """The shell command that downloads and builds the corpus (into data_dir, else the tfds default)."""
    return (f"python -m moejax.datasets.pypi_corpus --download_dir={DOWNLOAD_DIR}"
            + (f" --tfds_data_dir={data_dir}" if data_dir else ""))


def split_of(dist: Dist) -> str:
    return "validation" if is_validation(dist.name, VAL_FRACTION) else "train"


def read_archive(download_dir: str, dist: Dist) -> bytes:
    """The bytes of dist's wheel in download_dir, after checking their sha256 (one-line errors)."""
    path = os.path.join(os.path.expanduser(download_dir), dist.filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; download the pinned wheels with `{build_command()}`")
    with open(path, "rb") as f:
        data = f.read()
    found = hashlib.sha256(data).hexdigest()
    if found != dist.sha256:
        raise ValueError(f"{path}: sha256 {found}, expected {dist.sha256} (delete it and run `{build_command()}`)")
    return data


def _is_text(name: str) -> bool:
    return name.endswith(TEXT_SUFFIXES) or (name.endswith("/METADATA") and name.count("/") == 1
                                            and name.split("/")[0].endswith(".dist-info"))


def documents(download_dir: str, dists: Iterable[Dist] | None = None) -> Iterator[tuple[str, str, str]]:
    """(split, path, text) of every document of the wheels, in path order (see the module docstring)."""
    seen = set()  # sha256 of the documents so far
    for dist in sorted(DISTRIBUTIONS if dists is None else dists, key=lambda d: f"{d.name}-{d.version}/"):
        split, prefix = split_of(dist), f"{dist.name}-{dist.version}/"
        with zipfile.ZipFile(io.BytesIO(read_archive(download_dir, dist))) as wheel:
            for info in sorted(wheel.infolist(), key=lambda i: i.filename):
                if info.is_dir() or not _is_text(info.filename) or not 0 < info.file_size <= MAX_FILE_BYTES:
                    continue
                data = wheel.read(info)
                digest = hashlib.sha256(data).digest()
                if b"\0" in data or digest in seen:
                    continue
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                seen.add(digest)
                yield split, prefix + info.filename, text


@dataclasses.dataclass
class PypiConfig(tfds.core.BuilderConfig):
    """The pinned wheels and the content hash their documents must have."""

    dists: tuple[Dist, ...] = dataclasses.field(default=(), repr=False)
    content_sha256: str = ""


def pypi_config() -> PypiConfig:
    """The config of the pinned corpus (`DISTRIBUTIONS`, `CONTENT_SHA256`), named after its content hash."""
    return PypiConfig(name=f"content-{CONTENT_SHA256[:16]}", dists=tuple(DISTRIBUTIONS),
                      content_sha256=CONTENT_SHA256,
                      description=(f"Text files of {len(DISTRIBUTIONS)} pinned PyPI wheels "
                                   f"(moejax.datasets.pypi_corpus); content sha256 {CONTENT_SHA256}"))


class MoejaxPypi(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The pinned PyPI corpus, built from the wheels in the manual dir (the download dir)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One example per text file of the pinned wheels; split by distribution."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download and build with `{build_command()}`."
    code_path = None  # no checksums file next to the code (see text_files._TextFilesBuilder)

    def _info(self) -> tfds.core.DatasetInfo:
        return LocalDatasetInfo(
            builder=self, description=self.builder_config.description, metadata=tfds.core.MetadataDict(),
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        for dist in self.builder_config.dists:  # every archive present and intact before anything is written
            read_archive(root, dist)
        self._hash = ContentHash()
        return {split: self._generate_examples(root, split) for split in SPLITS}

    def _generate_examples(self, root, split):
        for s, path, text in documents(root, self.builder_config.dists):
            if s == split:
                self._hash.update(s, path, text)
                yield path, {"text": text, "path": path}

    def _download_and_prepare(self, dl_manager, download_config):
        super()._download_and_prepare(dl_manager, download_config)
        found, expected = self._hash.hexdigest(), self.builder_config.content_sha256
        if found != expected:  # raised inside tfds' incomplete dir: nothing prepared is left behind
            raise ValueError(f"PyPI corpus content sha256 {found}, expected {expected}: the documents differ from "
                             "the pinned build (changed wheels or extraction code); no dataset was written")
        self.info.metadata.update(self._hash.metadata())


def pypi_builder(data_dir: str | None = None) -> MoejaxPypi:
    """The builder of the pinned corpus in data_dir (None: the tfds default); it may not be prepared yet."""
    return MoejaxPypi(config=pypi_config(), data_dir=os.path.expanduser(data_dir) if data_dir else None,
                      file_format="array_record")


def download(download_dir: str = DOWNLOAD_DIR, dists: Iterable[Dist] | None = None) -> list[Dist]:
    """pip-downloads the pinned wheels not already in download_dir with their sha256; returns those fetched."""
    download_dir = os.path.expanduser(download_dir)
    dists = DISTRIBUTIONS if dists is None else tuple(dists)
    missing = []
    for dist in dists:
        try:
            read_archive(download_dir, dist)
        except (FileNotFoundError, ValueError):
            missing.append(dist)
    if missing:
        os.makedirs(download_dir, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            requirements = os.path.join(tmp, "requirements.txt")
            with open(requirements, "w") as f:
                f.writelines(f"{d.name}=={d.version} --hash=sha256:{d.sha256}\n" for d in missing)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
                   "--ignore-requires-python", "--disable-pip-version-check", "-q", "-r", requirements,
                   "-d", download_dir]
            if subprocess.run(cmd).returncode:
                raise RuntimeError(f"`{' '.join(cmd)}` failed for {len(missing)} wheels (pip's error above)")
    for dist in dists:
        read_archive(download_dir, dist)
    return missing


def build(download_dir: str = DOWNLOAD_DIR, data_dir: str | None = None) -> MoejaxPypi:
    """Builds the corpus from the wheels in download_dir into data_dir (if not built yet); returns its builder."""
    builder = pypi_builder(data_dir)
    if not builder.is_prepared():
        manual_dir = os.path.expanduser(download_dir)
        for dist in builder.builder_config.dists:  # one-line errors before tfds looks at the directory
            read_archive(manual_dir, dist)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def verify(builder: MoejaxPypi) -> ContentHash:
    """The content hash of the prepared dataset as read back from its files."""
    content = ContentHash()
    for split in SPLITS:
        source = builder.as_data_source(split=split)
        paths = [source[i]["path"] for i in range(len(source))]
        for i in sorted(range(len(source)), key=paths.__getitem__):
            content.update(split, paths[i].decode("utf-8"), source[i]["text"])
    return content


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--download_dir", default=DOWNLOAD_DIR, help="where the wheels are (or are downloaded to)")
    p.add_argument("--tfds_data_dir", default="", help="'' = $TFDS_DATA_DIR, else ~/tensorflow_datasets")
    a = p.parse_args(argv)
    t0 = time.time()
    fetched = download(a.download_dir)
    t1 = time.time()
    builder = build(a.download_dir, a.tfds_data_dir or None)
    t2 = time.time()
    content = verify(builder)
    t3 = time.time()
    for split in SPLITS:
        print(f"{split:10s} {content.docs[split]:7d} documents {content.bytes[split] / 1e6:8.2f} MB")
    ok = content.hexdigest() == CONTENT_SHA256
    print(f"content sha256 {content.hexdigest()} ({'matches' if ok else 'DIFFERS FROM'} the pinned value)\n"
          f"prepared in {builder.data_dir}\ndownload {t1 - t0:.0f} s ({len(fetched)} wheels fetched), "
          f"build {t2 - t1:.0f} s, verify {t3 - t2:.0f} s")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
