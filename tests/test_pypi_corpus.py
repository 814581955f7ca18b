"""The pinned PyPI corpus (moejax.datasets.pypi_corpus), offline: three tiny wheels made here stand in for the
pinned list. Documents, filters, dedup, split by distribution, the content hash (computed here from its
definition), archive and content errors, the never-download rule of DataConfig(source='pypi'), the real
pinned list's format."""
import hashlib
import os
import re
import shutil
import zipfile

import pytest

from moejax import data
from moejax.data import DataConfig
from moejax.datasets import pypi_corpus as pc

MAX = 64  # MAX_FILE_BYTES in these tests
VENDORED = b"def shared():\n    return 1\n"


def wheel(root, name, version, files, tag="py3-none-any"):
    """A wheel file holding `files` ({path: bytes}) and a dist-info with METADATA and RECORD; its Dist."""
    stem = f"{name.replace('-', '_')}-{version}"
    files = {**files, f"{stem}.dist-info/METADATA": f"Name: {name}\nVersion: {version}\n".encode(),
             f"{stem}.dist-info/RECORD": b"x,,\n"}
    path = root / f"{stem}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, b in files.items():
            z.writestr(p, b)
        z.writestr(zipfile.ZipInfo(f"{stem.split('-')[0]}/sub/"), b"")  # a directory entry
    return pc.Dist(name, version, path.name, hashlib.sha256(path.read_bytes()).hexdigest())


def h(name):
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2.0**64


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """(wheel dir, dists, expected [(split, path, text)] in path order) with the module pinned to them."""
    root = tmp_path / "wheels"
    root.mkdir()
    dists = (
        wheel(root, "alpha", "1.0", {
            "alpha/__init__.py": b"x = 1\n", "alpha/core.py": "s = 'h\u00e9llo \u65e5\u672c'\n".encode(),
            "alpha/vendored.py": VENDORED, "alpha/empty.py": b"", "alpha/big.py": b"#" * (MAX + 1),
            "alpha/nul.py": b"a\0b", "alpha/latin1.txt": "caf\u00e9".encode("latin-1"),
            "alpha/data.json": b"{}", "alpha/lib.so": b"\x7fELF", "README.md": b"# Alpha\n",
            "docs/guide.rst": b"Guide\n=====\n"}),
        wheel(root, "beta", "2.0", {"beta/_vendor/vendored.py": VENDORED, "beta/api.pyi": b"def f() -> int: ...\n",
                                    "beta/notes.txt": b"notes\n", "beta/fast.pyx": b"cdef int x\n"}),
        wheel(root, "gamma-lib", "0.1", {"gamma_lib/x.py": b"y = 2\n"}, tag="py2.py3-none-any"),
    )
    val = min(dists, key=lambda d: h(d.name))  # exactly this one in validation
    fraction = (h(val.name) + min(h(d.name) for d in dists if d is not val)) / 2
    split = {d.name: "validation" if d is val else "train" for d in dists}
    texts = {  # what must become documents (beta's vendored copy is alpha's: dropped)
        "alpha-1.0/README.md": "# Alpha\n", "alpha-1.0/alpha-1.0.dist-info/METADATA": "Name: alpha\nVersion: 1.0\n",
        "alpha-1.0/alpha/__init__.py": "x = 1\n", "alpha-1.0/alpha/core.py": "s = 'h\u00e9llo \u65e5\u672c'\n",
        "alpha-1.0/alpha/vendored.py": VENDORED.decode(), "alpha-1.0/docs/guide.rst": "Guide\n=====\n",
        "beta-2.0/beta-2.0.dist-info/METADATA": "Name: beta\nVersion: 2.0\n",
        "beta-2.0/beta/api.pyi": "def f() -> int: ...\n", "beta-2.0/beta/fast.pyx": "cdef int x\n",
        "beta-2.0/beta/notes.txt": "notes\n",
        "gamma-lib-0.1/gamma_lib-0.1.dist-info/METADATA": "Name: gamma-lib\nVersion: 0.1\n",
        "gamma-lib-0.1/gamma_lib/x.py": "y = 2\n",
    }
    expected = [(split[p.split("/")[0].rsplit("-", 1)[0]], p, t) for p, t in sorted(texts.items())]
    monkeypatch.setattr(pc, "DISTRIBUTIONS", dists)
    monkeypatch.setattr(pc, "VAL_FRACTION", fraction)
    monkeypatch.setattr(pc, "MAX_FILE_BYTES", MAX)
    monkeypatch.setattr(pc, "CONTENT_SHA256", content_sha256(expected))
    return root, dists, expected


def content_sha256(docs):
    """The content hash by its definition in the module docstring."""
    lines = ""
    for split in ("train", "validation"):
        sha = hashlib.sha256()
        for _, path, text in sorted(d for d in docs if d[0] == split):
            sha.update(path.encode() + b"\0" + text.encode() + b"\0")
        lines += f"{split} {sha.hexdigest()}\n"
    return hashlib.sha256(lines.encode()).hexdigest()


def read_back(builder):
    return sorted((split, e["path"].decode(), e["text"].decode())
                  for split in ("train", "validation") for e in builder.as_data_source(split=split))


def test_documents(corpus):
    root, dists, expected = corpus
    assert {s for s, _, _ in expected} == {"train", "validation"}
    assert list(pc.documents(str(root))) == expected
    assert list(pc.documents(str(root), dists[::-1])) == expected  # the order is the paths', not the list's


def test_build_twice_same_content(corpus, tmp_path):
    root, _, expected = corpus
    builds = [pc.build(str(root), str(tmp_path / f"tfds{i}")) for i in range(2)]
    for b in builds:
        assert b.is_prepared() and pc.CONTENT_SHA256[:16] in b.builder_config.name
        assert read_back(b) == expected
        meta = b.info.metadata
        assert meta["content_sha256"] == pc.CONTENT_SHA256 == pc.verify(b).hexdigest()
        for split in ("train", "validation"):
            docs = [t for s, _, t in expected if s == split]
            assert meta[split]["documents"] == len(docs) == b.info.splits[split].num_examples
            assert meta[split]["bytes"] == sum(len(t.encode()) for t in docs)
    reloaded = pc.pypi_builder(str(tmp_path / "tfds0"))  # a fresh builder reads the metadata back
    assert reloaded.is_prepared() and reloaded.info.metadata == builds[0].info.metadata
    cfg = DataConfig(source="pypi", tfds_data_dir=str(tmp_path / "tfds0"))
    assert sorted(data.documents(cfg, "eval_split")) == sorted(t.encode() for s, _, t in expected if s == "validation")


def test_content_hash_mismatch(corpus, tmp_path, monkeypatch):
    root, _, _ = corpus
    monkeypatch.setattr(pc, "CONTENT_SHA256", "f" * 64)
    with pytest.raises(ValueError) as e:
        pc.build(str(root), str(tmp_path / "tfds"))
    msg = str(e.value)
    assert "\n" not in msg and "f" * 64 in msg and content_sha256(corpus[2]) in msg
    assert not pc.pypi_builder(str(tmp_path / "tfds")).is_prepared()
    assert not [f for _, _, fs in os.walk(tmp_path / "tfds") for f in fs if f.endswith((".json", "array_record"))]


def test_archive_errors(corpus, tmp_path, monkeypatch):
    root, dists, _ = corpus
    bad = dists[1]._replace(sha256="0" * 64)
    monkeypatch.setattr(pc, "DISTRIBUTIONS", (dists[0], bad, dists[2]))
    for run in (lambda: list(pc.documents(str(root))), lambda: pc.build(str(root), str(tmp_path / "tfds"))):
        with pytest.raises(ValueError) as e:
            run()
        msg = str(e.value)
        assert "\n" not in msg and bad.filename in msg and "0" * 64 in msg and dists[1].sha256 in msg
    monkeypatch.setattr(pc, "DISTRIBUTIONS", dists)
    (root / dists[2].filename).unlink()
    for run in (lambda: list(pc.documents(str(root))), lambda: pc.build(str(root), str(tmp_path / "tfds"))):
        with pytest.raises(FileNotFoundError) as e:
            run()
        msg = str(e.value)
        assert "\n" not in msg and dists[2].filename in msg and "python -m moejax.datasets.pypi_corpus" in msg
    assert not pc.pypi_builder(str(tmp_path / "tfds")).is_prepared()


def test_download_fetches_only_what_is_missing(corpus, tmp_path, monkeypatch):
    root, dists, _ = corpus
    dest = tmp_path / "dl"
    dest.mkdir()
    shutil.copy(root / dists[0].filename, dest)  # intact: kept
    (dest / dists[1].filename).write_bytes(b"corrupt")  # wrong hash: fetched again
    calls = []

    def fake_pip(cmd):
        requirements = open(cmd[cmd.index("-r") + 1]).read().splitlines()
        calls.append((cmd, requirements))
        for d in dists[1:]:
            shutil.copy(root / d.filename, cmd[cmd.index("-d") + 1])
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(pc.subprocess, "run", fake_pip)
    assert pc.download(str(dest)) == list(dists[1:])
    (cmd, requirements), = calls
    assert {"download", "--no-deps", "--only-binary=:all:", "--require-hashes"} <= set(cmd)
    assert requirements == [f"{d.name}=={d.version} --hash=sha256:{d.sha256}" for d in dists[1:]]
    assert pc.download(str(dest)) == [] and len(calls) == 1  # all present: pip is not run


def test_dataconfig(corpus, tmp_path):
    DataConfig(source="pypi")
    for kwargs, field, fragment in [
        (dict(val_fraction=0.1), "val_fraction", "source='pypi': it has its own splits"),
        (dict(tfds_name="lm1b"), "tfds_name", "unless source='tfds'"),
        (dict(text_key="body"), "text_key", "'text' unless source='tfds'"),
        (dict(text_dir=str(tmp_path)), "text_dir", "unless source='text_dir'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(fragment)) as e:
            DataConfig(source="pypi", **kwargs)
        assert f"DataConfig.{field}=" in str(e.value)
    cfg = DataConfig(source="pypi", tfds_data_dir=str(tmp_path / "empty"))
    for run in (lambda: data._builder(cfg), lambda: data.documents(cfg)):
        with pytest.raises(FileNotFoundError) as e:
            run()
        msg = str(e.value)
        assert "\n" not in msg and "DataConfig.tfds_data_dir=" in msg and (
            f"`python -m moejax.datasets.pypi_corpus --download_dir=~/moejax_pypi_wheels "
            f"--tfds_data_dir={tmp_path / 'empty'}`") in msg
    assert not (tmp_path / "empty").exists()  # nothing was built or downloaded


def test_pinned_list():
    dists = pc.DISTRIBUTIONS
    names = [d.name for d in dists]
    assert len(dists) >= 100 and names == sorted(names) and len(set(names)) == len(names)
    assert len({d.filename for d in dists}) == len(dists)
    assert re.fullmatch(r"[0-9a-f]{64}", pc.CONTENT_SHA256)
    for d in dists:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", d.name), d
        assert re.fullmatch(r"[0-9a-f]{64}", d.sha256), d
        assert re.fullmatch(rf"{re.escape(d.name.replace('-', '_'))}-{re.escape(d.version)}-"
                            r"(py3|py2\.py3)-none-any\.whl", d.filename, re.IGNORECASE), d
    assert pc.pypi_config().name == f"content-{pc.CONTENT_SHA256[:16]}"
    split = [pc.split_of(d) for d in dists]  # by the name's hash only: a new version stays in its split
    assert split == ["validation" if h(d.name) < pc.VAL_FRACTION else "train" for d in dists]
    assert split == [pc.split_of(d._replace(version="0", filename="x.whl")) for d in dists]
    assert 5 <= split.count("validation") <= 30


def test_committed_tokenizer():
    from moejax.tokenizer import SentencePieceTokenizer

    with open(pc.TOKENIZER_8K, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() in pc.__doc__  # the docstring names the committed file
    tok = SentencePieceTokenizer(pc.TOKENIZER_8K)
    text = "def f(x):\n    return x ** 2  # h\u00e9llo\n"
    assert tok.n_pieces == tok.vocab_size == 8192 and tok.decode(tok.encode(text)) == text
