"""Data pipeline: tokenizers, packing, determinism and resumption, host sharding, splits, tfds sources and
the error messages for bad configs (each names the field and its value)."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from sentencepiece import sentencepiece_model_pb2

from moejax import data, datasets, tokenizer, train_tokenizer
from moejax.data import DataConfig

VAL = 0.25  # validation fraction of the test corpora


def write_corpus(root, n_files=40, seed=0):
    """n_files text files in nested directories (lengths 1..600 chars, some non-ASCII), plus files the
    text_dir builder must skip: hidden, empty, binary, __pycache__."""
    rng = np.random.default_rng(seed)
    words = ["def", "return", "x", "=", "(", ")", "\n", "    ", "héllo", "wörld", "日本", "✓", "# note", "42"]
    for i in range(n_files):
        path = root / f"dir{i % 3}" / f"sub{i % 2}" / f"file{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        n = int(rng.integers(1, 120))
        path.write_text(f"doc {i}: " + " ".join(rng.choice(words, n)), encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden")
    (root / "empty.txt").write_text("")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02" * 10)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.txt").write_text("cache")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(DataConfig over a 40-file text_dir, its cache dir already built)."""
    root = write_corpus(tmp_path_factory.mktemp("corpus"))
    cfg = DataConfig(source="text_dir", text_dir=str(root), tfds_data_dir=str(tmp_path_factory.mktemp("tfds")),
                     val_fraction=VAL, seq_len=16, batch_size=4, eval_steps=3)
    data._builder(cfg)
    return cfg


def split_docs(stream, eos):
    """Documents (tuples of ids, EOS dropped) of a target stream that ends each document with EOS."""
    cuts = np.flatnonzero(stream == eos)
    return [tuple(d[:-1]) for d in np.split(stream, cuts + 1)[:-1]]


def weighted_targets(rows):
    return np.concatenate([r["targets"][r["weights"] > 0] for r in rows])


def take(it, n):
    return [next(it) for _ in range(n)]


def same(xs, ys):
    return len(xs) == len(ys) and all(np.array_equal(x[k], y[k]) for x, y in zip(xs, ys) for k in data.FEATURES)


SPM_TEXTS = ["def f(x):\n    return  x  + 1  # héllo wörld\n\n\tclass A:  pass", "  leading and trailing  ",
             "nospaces" * 9, "日本語 ✓ 🙂 \n \n  ", "a", " "]  # SentencePiece cuts before ' ' after a non-space


# ------------------------------------------------------------------ tokenizers


def test_byte_tokenizer():
    tok = tokenizer.ByteTokenizer()
    text = "héllo wörld ✓ 日本\n\tend"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and tok.vocab_size == 384 and tok.eos_id == 256
    assert tok.decode(ids) == text
    assert tok.decode(np.append(ids, tok.eos_id)) == text  # EOS decodes to nothing
    assert np.array_equal(tok.encode(text.encode("utf-8")), ids)
    assert tok.token_bytes.shape == (384,) and tok.token_bytes.dtype == np.float32
    assert tok.token_bytes[:256].tolist() == [1.0] * 256 and not tok.token_bytes[256:].any()
    assert tok.token_bytes[ids].sum() == len(text.encode("utf-8"))


def test_sentencepiece_trained_by_the_module_command(corpus, tmp_path):
    path = str(tmp_path / "tiny.model")
    train_tokenizer.main(["--source=text_dir", f"--text_dir={corpus.text_dir}", f"--tfds_data_dir={corpus.tfds_data_dir}",
                          f"--val_fraction={VAL}", "--vocab_size=300", f"--output={path}"])
    tok = data.get_tokenizer(DataConfig(tokenizer=path))
    assert tok.vocab_size == 384 and tok.vocab_size % 128 == 0 and 0 <= tok.eos_id < tok.n_pieces
    for text in ["doc 7: def héllo(x) = 42\n    return wörld", "unseen: Ωμέγα ∑ 🙂 zebra\n\n\tq"]:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and tok.decode(ids) == text  # byte fallback covers unseen characters
        assert tok.token_bytes[ids].sum() == len(tok.decode(ids).encode("utf-8"))
    assert tok.token_bytes[tok.eos_id] == 0 and not tok.token_bytes[tok.n_pieces:].any()
    assert len(tok.encode("def return héllo")) < len("def return héllo".encode())  # it learned merges
    assert tok.cuts_at_spaces and all(np.array_equal(np.concatenate(list(tok.encode_chunks(t, 3))), tok.encode(t))
                                      for t in SPM_TEXTS)
    clone = pickle.loads(pickle.dumps(tok))  # grain worker processes receive it pickled
    assert np.array_equal(clone.encode(text), tok.encode(text)) and np.array_equal(clone.token_bytes, tok.token_bytes)


@pytest.fixture(scope="module")
def spm():
    return data.get_tokenizer(DataConfig(tokenizer="pypi_spm8k"))


def test_encode_chunks_concatenate_to_encode(spm, tmp_path):
    rng = np.random.default_rng(0)
    alphabet = [*b" \n\t  ab(x)=1", *"é日🙂".encode(), 0xff, 0xe6, 0x80]  # and bytes that are not UTF-8
    texts = [*SPM_TEXTS, *(bytes(rng.choice(alphabet, rng.integers(1, 200))) for _ in range(100))]
    assert spm.cuts_at_spaces  # BPE, identity normalizer, no dummy prefix, '▁' only at the start of pieces
    proto = sentencepiece_model_pb2.ModelProto.FromString(spm.__getstate__()["proto"])
    proto.normalizer_spec.add_dummy_prefix = True  # then a cut would add a '▁': such models encode whole
    (tmp_path / "prefix.model").write_bytes(proto.SerializeToString())
    prefixed = tokenizer.SentencePieceTokenizer(str(tmp_path / "prefix.model"))
    assert not prefixed.cuts_at_spaces
    for tok in (tokenizer.ByteTokenizer(), spm, prefixed):
        for i, text in enumerate(texts):
            chunk_bytes = 1 + i % 11
            chunks = list(tok.encode_chunks(text, chunk_bytes))
            assert all(c.dtype == np.int32 for c in chunks)
            assert np.array_equal(np.concatenate(chunks), tok.encode(text)), (text, chunk_bytes)
            if tok is spm and b" x " in (text if isinstance(text, bytes) else text.encode()):
                assert len(chunks) > 1  # it did cut
    assert len(list(prefixed.encode_chunks(SPM_TEXTS[0], 4))) == 1


def _hf_tokenizer(tmp_path, kind: str) -> str:
    """A small BPE tokenizer.json trained here with the `tokenizers` package: 'byte_level' (GPT-2's
    alphabet, as Llama 3 / Qwen / OLMoE / DeepSeek ship) or 'metaspace' (SentencePiece-style, as Mixtral);
    tokenizer_config.json names its EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=kind == "metaspace", unk_token=None))
    if kind == "byte_level":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    text = open(data.__file__).read()
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)] + SPM_TEXTS, trainer)
    d = tmp_path / kind
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return str(d / "tokenizer.json")


def test_hugging_face_tokenizer_json(tmp_path):
    """A byte-level tokenizer.json: lossless, token_bytes sum to the text's bytes, EOS from tokenizer_config,
    picklable, and its chunked encoding (cut before a space after a non-space) equals the whole; a
    SentencePiece-style one encodes each document whole."""
    texts = [*SPM_TEXTS, open(tokenizer.__file__).read()[:3000], "x" * 50 + " y  z\n\t é日🙂 end"]
    byte_level = data.get_tokenizer(DataConfig(tokenizer=_hf_tokenizer(tmp_path, "byte_level")))
    assert byte_level.eos_id == 0 and byte_level.vocab_size % 128 == 0 and byte_level.cuts_at_spaces
    again = pickle.loads(pickle.dumps(byte_level))
    for text in texts:
        ids = byte_level.encode(text)
        assert byte_level.decode(ids) == text and np.array_equal(again.encode(text), ids)
        assert byte_level.token_bytes[ids].sum() == len(text.encode())
        for chunk_bytes in (1, 7, 64):
            chunks = list(byte_level.encode_chunks(text, chunk_bytes))
            assert np.array_equal(np.concatenate(chunks), ids), (text[:40], chunk_bytes)
    assert len(list(byte_level.encode_chunks(texts[-2], 64))) > 10  # it did cut
    metaspace = data.get_tokenizer(DataConfig(tokenizer=_hf_tokenizer(tmp_path, "metaspace")))
    assert not metaspace.cuts_at_spaces and len(list(metaspace.encode_chunks(texts[-2], 64))) == 1
    ids = metaspace.encode("def f(x): return x")
    assert metaspace.decode(ids) == "def f(x): return x" and metaspace.token_bytes[ids].sum() >= 18
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        data.get_tokenizer(DataConfig(tokenizer=str(tmp_path / "bad.json")))


# ------------------------------------------------------------------ packing


def packer(docs, seq_len, tok=tokenizer.ByteTokenizer(), chunk_bytes=data.CHUNK_BYTES):
    return data.PackIterDataset(grain.MapDataset.source([{"text": d} for d in docs]).to_iter_dataset(), tok, "text",
                                seq_len, chunk_bytes)


def pack(docs, seq_len, tok=tokenizer.ByteTokenizer(), chunk_bytes=data.CHUNK_BYTES):
    return list(packer(docs, seq_len, tok, chunk_bytes))


def reference_rows(docs, seq_len, tok):
    """The packing of moejax.data's docstring, written out: every document tokenized whole, its (input,
    target) pairs [EOS, t_1..t_n] / [t_1..t_n, EOS] concatenated with the others' and cut into rows."""
    pairs = []  # (document, input, target)
    for i, d in enumerate(docs):
        s = [tok.eos_id, *tok.encode(d).tolist(), tok.eos_id]
        pairs += [(i, a, b) for a, b in zip(s[:-1], s[1:])]
    rows = []
    for lo in range(0, len(pairs), seq_len):
        row = {k: np.zeros(seq_len, np.int32) for k in data.FEATURES[:4]}
        segment, previous = 0, None
        for j, (doc, a, b) in enumerate(pairs[lo:lo + seq_len]):
            segment, position = (segment, position + 1) if doc == previous else (segment + 1, 0)
            previous = doc
            for k, v in zip(data.FEATURES[:4], (a, b, segment, position)):
                row[k][j] = v
        row["weights"] = (row["segment_ids"] > 0).astype(np.float32)
        rows.append(row)
    return rows


def test_packing_by_hand():
    E = 256
    rows = pack(["ab", "cde", "f"], 4)
    a, b, c, d, e, f = (ord(ch) for ch in "abcdef")
    expect = [  # inputs, targets, segment_ids, positions, weights
        ([E, a, b, E], [a, b, E, c], [1, 1, 1, 2], [0, 1, 2, 0], [1, 1, 1, 1]),
        ([c, d, e, E], [d, e, E, f], [1, 1, 1, 2], [0, 1, 2, 0], [1, 1, 1, 1]),
        ([f, 0, 0, 0], [E, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]),
    ]
    assert len(rows) == len(expect)
    for row, want in zip(rows, expect):
        for k, v in zip(data.FEATURES, want):
            assert row[k].tolist() == v, (k, row[k], v)
            assert row[k].dtype == (np.float32 if k == "weights" else np.int32)


def test_packing_targets_are_next_tokens_of_the_same_document():
    docs = ["x" * n + str(n) for n in (1, 5, 17, 3, 40, 2)]
    rows = pack(docs, 8)
    inputs = np.concatenate([r["inputs"][r["weights"] > 0] for r in rows])
    targets = weighted_targets(rows)
    ref_in = [t for i, d in enumerate(docs) for t in [256, *d.encode()]]
    ref_tg = [t for d in docs for t in [*d.encode(), 256]]
    assert inputs.tolist() == ref_in and targets.tolist() == ref_tg
    for r in rows:  # inside a piece, each target is the next input
        same = (r["segment_ids"][1:] == r["segment_ids"][:-1]) & (r["segment_ids"][1:] > 0)
        assert np.array_equal(r["targets"][:-1][same], r["inputs"][1:][same])
        starts = np.flatnonzero(np.diff(r["segment_ids"], prepend=0) != 0)
        assert all(r["positions"][s] == 0 for s in starts)


@pytest.mark.parametrize("chunk_bytes", [3, 1 << 20])  # documents cut into chunks, or each in one
def test_pack_state_resumes_at_every_row(chunk_bytes):
    docs = ["x" * n + str(n) for n in (1, 5, 17, 3, 40, 2)]
    packed = packer(docs, 8, chunk_bytes=chunk_bytes)
    rows, it = list(packed), iter(packed)
    assert same(rows, reference_rows(docs, 8, tokenizer.ByteTokenizer()))
    for k in range(len(rows) + 1):  # rows 4-9 cut the 42-byte document: states inside it
        resumed = iter(packed)
        resumed.set_state(json.loads(json.dumps(it.get_state())))
        assert same(list(resumed), rows[k:]), k
        if k < len(rows):
            next(it)


@pytest.mark.parametrize("chunk_bytes", [1, 4, 16, 1 << 20])
@pytest.mark.parametrize("seq_len", [3, 16])
def test_chunked_packing_matches_whole_documents(spm, chunk_bytes, seq_len):
    """Documents shorter and longer than chunk_bytes (and rows): the same rows as tokenizing each one whole."""
    docs = ["x" * n + str(n) for n in (1, 5, 17, 3, 40, 2)] + SPM_TEXTS + [""]  # "": one pair, EOS -> EOS
    for tok in (tokenizer.ByteTokenizer(), spm):
        assert same(pack(docs, seq_len, tok, chunk_bytes), reference_rows(docs, seq_len, tok)), tok


def test_epoch_has_every_token_once(corpus):
    tok = data.get_tokenizer(corpus)
    want = np.concatenate([np.append(tok.encode(t), tok.eos_id) for t in data.documents(corpus)])
    rows = list(data.packed_rows(corpus, tok, shuffle=False, num_epochs=1))
    assert np.array_equal(weighted_targets(rows), want)
    shuffled = list(data.packed_rows(corpus, tok, shuffle=True, num_epochs=1))
    got = weighted_targets(shuffled)
    assert not np.array_equal(got, want) and np.array_equal(np.sort(got), np.sort(want))


# ------------------------------------------------------------------ determinism and resumption


def test_batches_contract_and_determinism(corpus):
    tok = data.get_tokenizer(corpus)
    first = take(data.train_iterator(corpus, tok, process_index=0, process_count=1), 6)
    for b in first:
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
            k: ((4, 16), np.float32 if k == "weights" else np.int32) for k in data.FEATURES}
    assert same(take(data.train_iterator(corpus, tok, process_index=0, process_count=1), 6), first)
    other = DataConfig(**{**corpus.__dict__, "shuffle_seed": 1})
    assert not same(take(data.train_iterator(other, tok, process_index=0, process_count=1), 6), first)


@pytest.mark.parametrize("steps", [0, 5, 300])  # 300 batches of 4 rows: past the first shuffle window
def test_resume_from_state(corpus, steps):
    tok = data.get_tokenizer(corpus)
    it = data.train_iterator(corpus, tok, process_index=0, process_count=1)
    take(it, steps)
    state = json.loads(json.dumps(it.get_state()))  # as saved by orbax JsonSave
    ahead = take(it, 8)
    resumed = data.train_iterator(corpus, tok, process_index=0, process_count=1)
    resumed.set_state(state)
    assert same(take(resumed, 8), ahead)


def long_line_dir(root, n_bytes):
    """A text_dir of one single-line file of n_bytes in train and one small file in validation (val 0.02)."""
    root.mkdir()
    line = "def f(x): return x + 42  # héllo ".encode()
    (root / "long.txt").write_bytes((line * (n_bytes // len(line) + 1))[:n_bytes])
    (root / "small30.txt").write_text("a small validation file " * 20)
    assert not datasets.is_validation("long.txt", 0.02) and datasets.is_validation("small30.txt", 0.02)
    return root


def test_resume_inside_a_long_document(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 1000)
    cfg = DataConfig(source="text_dir", text_dir=str(long_line_dir(tmp_path / "c", 40_000)),
                     tfds_data_dir=str(tmp_path / "tfds"), seq_len=16, batch_size=4)
    tok = data.get_tokenizer(cfg)
    it = data.train_iterator(cfg, tok, process_index=0, process_count=1)
    take(it, 300)  # 1200 rows: the second shuffle window, 16384 tokens into the document
    state = json.loads(json.dumps(it.get_state()))
    assert state["parent_window_start_state"]["offset"] == 1024 * 16  # inside the document, past 16 chunks
    ahead = take(it, 8)
    resumed = data.train_iterator(cfg, tok, process_index=0, process_count=1)
    resumed.set_state(state)
    assert same(take(resumed, 8), ahead)
    assert all(b["weights"].all() for b in ahead)


MEMORY_CHILD = """
import sys, threading, time
def peak_mib():  # VmHWM: this process's own peak; ru_maxrss would include the parent's at the fork (Linux
    # carries it across exec), e.g. a test worker that imported torch
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmHWM:"))
def watchdog():  # a regression must not take the shared machine's memory: stop at twice the bound
    while peak_mib() < 2 * 2**10:
        time.sleep(0.01)
    print("over 2 GiB", flush=True)
    import os; os._exit(3)
threading.Thread(target=watchdog, daemon=True).start()
from moejax import data
cfg = data.DataConfig(source="text_dir", text_dir=sys.argv[1], tfds_data_dir=sys.argv[2], seq_len=2048,
                      batch_size=16)
it = data.train_iterator(cfg, data.get_tokenizer(cfg), process_index=0, process_count=1)
for _ in range(int(sys.argv[3])):
    next(it)
print(peak_mib())
"""


def test_long_single_line_file_in_bounded_memory(tmp_path):
    """A 20 MB single-line file: build, then batches through the end of the document and into its next
    epoch, under 1 GB resident (before chunked streaming and a bounded read-ahead: 500 read-ahead copies
    of its 160 MB of int32 inputs and targets). The peak is measured by the benchmark data_memory.py."""
    n_bytes = 20_000_000
    root = long_line_dir(tmp_path / "c", n_bytes)
    steps = n_bytes // (2048 * 16) + 20
    child = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(root), str(tmp_path / "tfds"), str(steps)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stdout + child.stderr[-3000:]
    peak_mib = int(child.stdout.split()[-1])
    assert peak_mib * 2**20 < 1e9, peak_mib


# ------------------------------------------------------------------ corpus identity


def test_corpus_identity(tmp_path, corpus, tiny_tfds):
    ident = data.corpus_identity(corpus)
    assert json.loads(json.dumps(ident)) == ident == data.corpus_identity(corpus)
    assert {k: v for k, v in ident.items() if k != "content_sha256"} == {
        "source": "text_dir", "builder": "moejax_text_dir", "version": "1.1.0", "config": None}
    want = datasets.text_files.ContentHash()  # a function of the files' paths and contents only
    for split, files in datasets.split_files(datasets.text_dir_files(corpus.text_dir), VAL).items():
        for p in files:
            want.update(split, p, datasets.text_files.read_text(corpus.text_dir, p))
    assert ident["content_sha256"] == want.hexdigest()
    # The same files elsewhere (another path, new mtimes, another tfds dir): another cache key, the same corpus.
    copy = tmp_path / "copy"
    shutil.copytree(corpus.text_dir, copy, copy_function=shutil.copy)
    moved = DataConfig(**{**corpus.__dict__, "text_dir": str(copy), "tfds_data_dir": str(tmp_path / "tfds")})
    assert data._builder(moved).builder_config.name != data._builder(corpus).builder_config.name
    assert data.corpus_identity(moved) == ident
    edited = copy / "dir1" / "sub1" / "file01.txt"
    edited.write_text(edited.read_text() + "!")
    assert data.corpus_identity(moved)["content_sha256"] != ident["content_sha256"]
    # A tfds dataset records no content hash: its builder and split sizes stand in.
    t = data.corpus_identity(tiny_tfds)
    assert json.loads(json.dumps(t)) == t and set(t) == {"source", "builder", "version", "config", "splits"}
    assert (t["builder"], t["version"], t["config"]) == ("tiny_lines", "1.0.0", None)
    assert {k: v["num_examples"] for k, v in t["splits"].items()} == {"train": 30, "test": 6}
    assert all(v["num_bytes"] > 0 for v in t["splits"].values())


# ------------------------------------------------------------------ hosts


def test_hosts_get_disjoint_documents_covering_the_split(corpus):
    tok = data.get_tokenizer(corpus)

    def docs(index, count):
        rows = data.packed_rows(corpus, tok, shuffle=False, num_epochs=1, process_index=index, process_count=count)
        return split_docs(weighted_targets(list(rows)), tok.eos_id)

    everything, host0, host1 = docs(0, 1), docs(0, 2), docs(1, 2)
    assert len(set(everything)) == len(everything) > 10  # documents are distinct
    assert not set(host0) & set(host1)
    assert sorted(host0 + host1) == sorted(everything)
    batch = next(data.train_iterator(corpus, tok, process_index=1, process_count=2))
    assert batch["inputs"].shape == (2, 16)  # per-host batch = batch_size // process_count


def test_eval_batches_fixed_and_independent_of_process_count(corpus):
    tok = data.get_tokenizer(corpus)
    ev = data.eval_batches(corpus, tok, process_index=0, process_count=1)
    assert same(data.eval_batches(corpus, tok, process_index=0, process_count=1), ev)
    assert len(ev) == corpus.eval_steps and all(b["inputs"].shape == (4, 16) for b in ev)
    halves = [data.eval_batches(corpus, tok, process_index=i, process_count=2) for i in (0, 1)]
    glued = [{k: np.concatenate([h0[k], h1[k]]) for k in data.FEATURES} for h0, h1 in zip(*halves)]
    assert same(glued, ev)
    # A split smaller than eval_steps batches: all of it, then padding with weights 0.
    big = DataConfig(**{**corpus.__dict__, "eval_steps": 1000})
    allv = data.eval_batches(big, tok, process_index=0, process_count=1)
    want = np.concatenate([np.append(tok.encode(t), tok.eos_id) for t in data.documents(big, "eval_split")])
    assert np.array_equal(weighted_targets([{k: b[k][i] for k in b} for b in allv for i in range(4)]), want)
    n_rows = -(-len(want) // 16)  # inputs and targets both have one token per target
    assert len(allv) == -(-n_rows // 4) < 1000
    # The final evaluation: the first final_eval_steps batches (0: eval_steps); the periodic one's rows are
    # spread evenly over the final rows (rows 0, 2, 4, 6 of 8 here), not the first batch.
    final = DataConfig(**{**corpus.__dict__, "eval_steps": 1, "final_eval_steps": 2})
    assert same(data.eval_batches(final, tok, final=True), ev[:2])
    rows = [{k: b[k][i] for k in data.FEATURES} for b in ev[:2] for i in range(4)]  # 8 rows of 4-row batches
    spread = [{k: np.stack([r[k] for r in rows[::2]]) for k in data.FEATURES}]
    assert same(data.eval_batches(final, tok), spread) and not same(spread, ev[:1])
    halves = [data.eval_batches(final, tok, process_index=i, process_count=2) for i in (0, 1)]
    assert same([{k: np.concatenate([halves[0][0][k], halves[1][0][k]]) for k in data.FEATURES}], spread)
    assert same(data.eval_batches(corpus, tok, final=True), ev)  # final_eval_steps 0
    # final_eval_steps below eval_steps: the periodic evaluation keeps its first eval_steps batches
    fewer = DataConfig(**{**corpus.__dict__, "final_eval_steps": 1})
    assert same(data.eval_batches(fewer, tok), ev) and same(data.eval_batches(fewer, tok, final=True), ev[:1])


# ------------------------------------------------------------------ splits


def test_text_dir_splits_by_path(corpus):
    builder = data._builder(corpus)
    paths = {s: [builder.as_data_source(s)[i]["path"].decode() for i in range(builder.info.splits[s].num_examples)]
             for s in ("train", "validation")}
    files = datasets.text_dir_files(corpus.text_dir)
    assert len(files) == 40  # hidden, empty, binary and __pycache__ files skipped
    assert not set(paths["train"]) & set(paths["validation"]) and sorted(sum(paths.values(), [])) == files
    assert sorted(paths["validation"]) == [p for p in files if datasets.is_validation(p, VAL)]


def test_building_a_text_dir_leaves_no_temporary_directory(tmp_path, monkeypatch):
    """tfds made an empty temporary directory for every unprepared builder and kept it (text_files.LocalDatasetInfo)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    root = write_corpus(tmp_path / "c", n_files=5)
    builder = data._builder(DataConfig(source="text_dir", text_dir=str(root), tfds_data_dir=str(tmp_path / "tfds"),
                                       val_fraction=0.5))
    assert builder.is_prepared() and sum(builder.info.splits[s].num_examples for s in ("train", "validation")) == 5
    assert os.listdir(scratch) == []


def test_text_dir_cache_key_changes_with_files(tmp_path):
    root = write_corpus(tmp_path / "c", n_files=5)
    name = datasets.text_dir_config(str(root), VAL).name
    assert datasets.text_dir_config(str(root), VAL).name == name
    assert datasets.text_dir_config(str(root), 0.5).name != name
    edited = root / "dir0" / "sub0" / "file00.txt"
    stat = edited.stat()
    edited.write_text(edited.read_text().upper())  # same size, new content and mtime
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert datasets.text_dir_config(str(root), VAL).name != name
    edited_name = datasets.text_dir_config(str(root), VAL).name
    (root / "dir0" / "new.txt").write_text("new file")
    assert datasets.text_dir_config(str(root), VAL).name not in (name, edited_name)


def test_stdlib_split_and_build(tmp_path):
    files = datasets.stdlib_files()
    assert len(files) > 100 and "os.py" in files and not any("/test/" in f or f.startswith("test/") for f in files)
    split = datasets.split_files(files, 0.02)
    assert not set(split["train"]) & set(split["validation"]) and len(split["validation"]) > 0
    assert sorted(split["train"] + split["validation"]) == files
    # The split is a fixed function of the path (sha256), the same on every machine.
    assert datasets.is_validation("sched.py", 0.02) and not datasets.is_validation("os.py", 0.02)
    cfg = DataConfig(tfds_data_dir=str(tmp_path))
    builder = data._builder(cfg)
    assert builder.info.splits["train"].num_examples == len(split["train"])
    val_paths = {builder.as_data_source("validation")[i]["path"].decode() for i in range(len(split["validation"]))}
    assert val_paths == set(split["validation"])
    assert next(data.train_iterator(cfg, data.get_tokenizer(cfg), process_index=0, process_count=1))["weights"].all()
    ident = data.corpus_identity(cfg)
    assert ident["config"] == builder.builder_config.name and len(ident["content_sha256"]) == 64


# ------------------------------------------------------------------ tfds datasets


class TinyLines(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A prepared tfds dataset whose text lives under 'body'; not registered, so tfds finds it on disk."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # see moejax/datasets/text_files.py

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"body": tfds.features.Text(), "id": tfds.features.Scalar(dtype=np.int32)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 30), "test": self._generate_examples(30, 36)}

    def _generate_examples(self, lo, hi):
        for i in range(lo, hi):
            yield i, {"body": f"line {i}: ünïcode", "id": i}


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_tfds"))
    TinyLines(data_dir=d, file_format="array_record").download_and_prepare()
    return DataConfig(source="tfds", tfds_name="tiny_lines", tfds_data_dir=d, text_key="body", eval_split="test",
                      seq_len=8, batch_size=2, eval_steps=100)


def test_prepared_tfds_dataset(tiny_tfds):
    tok = data.get_tokenizer(tiny_tfds)
    rows = list(data.packed_rows(tiny_tfds, tok, shuffle=False, num_epochs=1))
    assert sorted(tok.decode(d) for d in split_docs(weighted_targets(rows), tok.eos_id)) == sorted(
        f"line {i}: ünïcode" for i in range(30))
    assert next(data.train_iterator(tiny_tfds, tok, process_index=0, process_count=1))["inputs"].shape == (2, 8)
    ev = data.eval_batches(tiny_tfds, tok, process_index=0, process_count=1)
    docs = split_docs(weighted_targets([{k: b[k][i] for k in b} for b in ev for i in range(2)]), tok.eos_id)
    assert sorted(tok.decode(d) for d in docs) == sorted(f"line {i}: ünïcode" for i in range(30, 36))


# ------------------------------------------------------------------ bad input


def run(cfg, process_count=1):
    data.get_tokenizer(cfg)
    data.train_iterator(cfg, tokenizer.ByteTokenizer(), process_index=0, process_count=process_count)
    data.eval_batches(cfg, tokenizer.ByteTokenizer(), process_index=0, process_count=process_count)


def test_bad_configs_name_field_and_value(tmp_path, corpus, tiny_tfds):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "blob.bin").write_bytes(b"\x00" * 20)
    (empty / ".hidden").write_text("x")
    two = tmp_path / "two_files"
    two.mkdir()
    for name in ("a.txt", "b.txt"):  # both land in train at val_fraction 0.02
        assert not datasets.is_validation(name, 0.02)
        (two / name).write_text("some text")
    tfrecord = tmp_path / "tfrecord"  # the tiny dataset, relabelled as written in tfrecord format
    shutil.copytree(tiny_tfds.tfds_data_dir, tfrecord)
    info_path = tfrecord / "tiny_lines" / "1.0.0" / "dataset_info.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "fileFormat": "tfrecord"}))
    tdir = dict(source="text_dir", text_dir=corpus.text_dir, tfds_data_dir=corpus.tfds_data_dir, val_fraction=VAL)
    tfds_cfg = {**tiny_tfds.__dict__}
    cases = [  # (config kwargs, process_count, field, value, error, fragments of the message)
        (dict(source="text_dir"), 1, "text_dir", "", ValueError, ["source='text_dir'"]),
        (dict(source="text_dir", text_dir=str(tmp_path / "nope")), 1, "text_dir", str(tmp_path / "nope"),
         FileNotFoundError, ["not found"]),
        (dict(source="text_dir", text_dir=str(empty), tfds_data_dir=str(tmp_path)), 1, "text_dir", str(empty),
         ValueError, ["none found"]),
        (dict(source="text_dir", text_dir=str(two), tfds_data_dir=str(tmp_path)), 1, "val_fraction", 0.02,
         ValueError, ["validation would be empty"]),
        (dict(source="wikipedia"), 1, "source", "wikipedia", ValueError, ["stdlib", "text_dir", "tfds"]),
        (dict(source="tfds", tfds_name="lm1bb", tfds_data_dir=str(tmp_path)), 1, "tfds_name", "lm1bb", ValueError,
         ["unknown dataset", "'lm1b'"]),
        (dict(source="tfds", tfds_name="lm1b", tfds_data_dir=str(tmp_path)), 1, "tfds_name", "lm1b",
         FileNotFoundError, ["not prepared", "tfds build lm1b --file_format=array_record"]),
        ({**tfds_cfg, "tfds_data_dir": str(tfrecord)}, 1, "tfds_name", "tiny_lines", ValueError,
         ["array_record", "tfds convert_format"]),
        ({**tfds_cfg, "text_key": "text"}, 1, "text_key", "text", ValueError, ["'body'", "'id'"]),
        ({**tfds_cfg, "eval_split": "validation"}, 1, "eval_split", "validation", ValueError, ["'train'", "'test'"]),
        ({**tdir, "train_split": "training"}, 1, "train_split", "training", ValueError, ["'train'", "'validation'"]),
        (dict(tokenizer=str(tmp_path / "missing.model")), 1, "tokenizer", str(tmp_path / "missing.model"),
         FileNotFoundError, ["python -m moejax.train_tokenizer"]),
        (dict(seq_len=1), 1, "seq_len", 1, ValueError, [">= 2"]),
        (dict(batch_size=6, tfds_data_dir=corpus.tfds_data_dir), 4, "batch_size", 6, ValueError,
         ["process_count=4"]),
        (dict(val_fraction=0.0), 1, "val_fraction", 0.0, ValueError, ["0 < val_fraction < 1"]),
        (dict(tfds_name="lm1b"), 1, "tfds_name", "lm1b", ValueError, ["source='tfds'"]),
        (dict(text_key="body"), 1, "text_key", "body", ValueError, ["source='tfds'"]),
        (dict(eval_split="train"), 1, "eval_split", "train", ValueError, ["other than train_split"]),
    ]
    for kwargs, count, field, value, error, fragments in cases:
        with pytest.raises(error) as e:
            run(DataConfig(**kwargs), count)
        msg = str(e.value)
        for part in [f"DataConfig.{field}={value!r}", *fragments]:
            assert part in msg, (kwargs, part, msg)


