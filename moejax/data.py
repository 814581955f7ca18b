"""Data: tfds array_record sources read with grain, tokenized, packed into rows, shuffled, sharded per host, batched.

Sources (`DataConfig.source`), all read with `tfds` data sources (no TensorFlow):
  'stdlib'    the running interpreter's standard library *.py files (moejax.datasets.MoejaxStdlib): no
              download; built on first use (~0.2 s) into `tfds_data_dir`, one build per interpreter version.
  'text_dir'  every text file under `text_dir` (moejax.datasets.MoejaxTextDir), rebuilt when files change.
  'tfds'      a tfds dataset already prepared in array_record format (`tfds_name`, `tfds_data_dir`,
              `text_key`, `train_split`, `eval_split`), e.g. lm1b or c4 on a TPU VM disk or bucket.
  'pypi'      ~250 MB of Python sources and docs from 151 pinned PyPI wheels (moejax.datasets.pypi_corpus),
              bit-reproducible, with its own split by distribution; built once with `python -m
              moejax.datasets.pypi_corpus --download_dir=~/moejax_pypi_wheels`, never downloaded in training.
For 'stdlib' and 'text_dir' a file goes to 'validation' when the hash of its relative path is below
`val_fraction`. `tfds_data_dir=''` means the tfds default ($TFDS_DATA_DIR, else ~/tensorflow_datasets).

Packing (concatenate, then split): a document's tokens t_1..t_n become inputs [EOS, t_1, ..., t_n] and
targets [t_1, ..., t_n, EOS] (EOS also opens a document), so every token and the closing EOS is a target
exactly once, predicted from its own document. These pairs are concatenated and cut into rows of seq_len;
a document that does not fit continues at the start of the next row. In a row, `segment_ids` number the
pieces 1, 2, ... (0 = padding) and `positions` restart at 0 at each piece. No target crosses a piece
boundary, so `weights` is 1.0 on every token and 0.0 only on padding (the end of a finite split).

  doc 'ab', doc 'cde', seq_len 4 ->  inputs  [EOS a b EOS] [c d e 0]    segment_ids [1 1 1 2] [1 1 1 0]
                                     targets [a b EOS c]   [d e EOS 0]  positions   [0 1 2 0] [0 1 2 0]

Memory: a split's documents are read ahead in grain threads, as many as hold READ_AHEAD_BYTES at its mean
document size (0 to 500), and each is tokenized and packed CHUNK_BYTES of text at a time
(`Tokenizer.encode_chunks`, whose chunks concatenate to exactly the whole document's tokens), so the pipeline
holds a few documents' text and one chunk's tokens, never a long document's tokens at once.
Tokenization runs where packing runs (the iterator's process, or grain workers with worker_count > 0), not in
the read threads; on stdlib that measured as fast with bytes, and 2x as fast with SentencePiece, as
tokenizing in 16 threads (which contend for the GIL). experiments/benchmarks/data_memory.py measures the peak.

Batches (numpy, per host, B = batch_size // process_count, S = seq_len): inputs, targets, segment_ids,
positions int32 [B, S]; weights float32 [B, S].

Training order: host i takes every process_count-th document from i; its documents are shuffled every
epoch (grain index shuffle, seed shuffle_seed + epoch), packed, and the rows shuffled again within
windows of SHUFFLE_WINDOW rows; it repeats forever. Same config, seed and process_count -> the same
batches on any machine. `it.get_state()` is a small JSON-serialisable dict; `it.set_state(state)` resumes
exactly. The final evaluation of a run (the reported validation loss) takes the first final_eval_steps
(0: eval_steps) batches' rows of the unshuffled eval split (fewer if the split is smaller; the last batch
padded with weights 0), the same for any process_count; each host gets its slice of every batch. The
periodic evaluations take eval_steps batches of rows spread evenly over those final rows (rows
i * n_final // n for i < n; the first eval_steps batches if final_eval_steps is not larger), so they stay
cheap yet sample the same text as the reported number: the first rows alone come from the first few files
of the split and can sit far from the split's mean.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import os
from typing import Any, Iterator

import grain
import jax
from absl import flags
import numpy as np
import tensorflow_datasets as tfds

from moejax import datasets
from moejax.datasets import pypi_corpus  # not in datasets/__init__: `python -m` runs it
from moejax.model_config import require_for
from moejax.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer

SOURCES = ("stdlib", "text_dir", "tfds", "pypi")
SHUFFLE_WINDOW = 1024  # rows
CHUNK_BYTES = 1 << 20  # text tokenized at a time (Tokenizer.encode_chunks)
READ_AHEAD_BYTES = 64 << 20  # documents read ahead hold about this much at the split's mean document size
FEATURES = ("inputs", "targets", "segment_ids", "positions", "weights")

_require = require_for("DataConfig")


def _fail(field: str, value: Any, allowed: str, error=ValueError):
    raise error(f"DataConfig.{field}={value!r} is invalid; allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where documents come from, how they are tokenized and packed, and the batch per step.

    source: one of SOURCES (see the module docstring); text_dir for 'text_dir'; tfds_name (e.g. 'lm1b',
    'c4/en:3.1.0') and text_key for 'tfds'; tfds_data_dir: where tfds datasets live and where 'stdlib' /
    'text_dir' builds are cached ('' = tfds default). tokenizer: 'byte', a SentencePiece .model path or a
    Hugging Face tokenizer.json path.
    batch_size: global sequences per step, split evenly over processes. eval_steps: validation batches of
    each periodic evaluation; final_eval_steps: of the final one (0 = eval_steps; a large number = the
    whole split).
    val_fraction: share of files in validation for 'stdlib' / 'text_dir'. worker_count: grain worker
    processes (0 = in the training process).
    """

    source: str = "stdlib"
    text_dir: str = ""
    tfds_name: str = ""
    tfds_data_dir: str = ""
    text_key: str = "text"
    train_split: str = "train"
    eval_split: str = "validation"
    tokenizer: str = "byte"
    seq_len: int = 128
    batch_size: int = 8
    shuffle_seed: int = 0
    eval_steps: int = 8
    final_eval_steps: int = 0
    val_fraction: float = 0.02
    worker_count: int = 0

    def __post_init__(self):
        _require(self.source in SOURCES, "source", self.source, str(SOURCES))
        if self.source == "text_dir":
            _require(bool(self.text_dir), "text_dir", self.text_dir, "a directory of text files with source='text_dir'")
        else:
            _require(self.text_dir == "", "text_dir", self.text_dir, "'' unless source='text_dir'")
        if self.source == "tfds":
            _require(bool(self.tfds_name), "tfds_name", self.tfds_name, "a tfds dataset name with source='tfds'")
        else:
            _require(self.tfds_name == "", "tfds_name", self.tfds_name, "'' unless source='tfds'")
            _require(self.text_key == "text", "text_key", self.text_key,
                     "'text' unless source='tfds' (the stdlib, text_dir and pypi builders store documents there)")
        if self.source in ("tfds", "pypi"):
            _require(self.val_fraction == DataConfig.val_fraction, "val_fraction", self.val_fraction,
                     f"{DataConfig.val_fraction} (unused) with source={self.source!r}: it has its own splits")
        else:
            _require(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "0 < val_fraction < 1")
        _require(bool(self.text_key), "text_key", self.text_key, "a feature name")
        for field in ("train_split", "eval_split"):
            _require(bool(getattr(self, field)), field, getattr(self, field), "a split name")
        _require(self.eval_split != self.train_split, "eval_split", self.eval_split,
                 f"a split other than train_split={self.train_split!r}")
        _require(bool(self.tokenizer), "tokenizer", self.tokenizer, "'byte' or the path of a SentencePiece model")
        _require(self.seq_len >= 2, "seq_len", self.seq_len, "an integer >= 2")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _require(self.eval_steps >= 1, "eval_steps", self.eval_steps, "an integer >= 1")
        _require(self.final_eval_steps >= 0, "final_eval_steps", self.final_eval_steps,
                 "an integer >= 0 (0 = eval_steps)")
        _require(0 <= self.shuffle_seed < 2**32, "shuffle_seed", self.shuffle_seed, "an integer in [0, 2**32)")
        _require(self.worker_count >= 0, "worker_count", self.worker_count, "an integer >= 0 (0 = in-process)")


# SentencePiece models shipped with moejax, by name (data.tokenizer=NAME): the same file on every machine.
PACKAGED_TOKENIZERS = {"pypi_spm8k": pypi_corpus.TOKENIZER_8K}


def get_tokenizer(cfg: DataConfig) -> Tokenizer:
    """ByteTokenizer for 'byte', a packaged model for a name in PACKAGED_TOKENIZERS, else the SentencePiece
    model at the path cfg.tokenizer."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    path = PACKAGED_TOKENIZERS.get(cfg.tokenizer) or os.path.expanduser(cfg.tokenizer)
    if not os.path.isfile(path):
        _fail("tokenizer", cfg.tokenizer, f"'byte', one of {tuple(PACKAGED_TOKENIZERS)}, an existing "
              "SentencePiece .model file (train one with `python -m moejax.train_tokenizer --output=FILE.model`) "
              "or a Hugging Face tokenizer.json (not found)", FileNotFoundError)
    if path.endswith(".json"):
        try:
            return HFTokenizer(path)
        except Exception as e:  # the tokenizers package raises its own exception type for a bad file
            _fail("tokenizer", cfg.tokenizer, f"a Hugging Face tokenizer.json with an EOS token ({e})")
    try:
        return SentencePieceTokenizer(path)
    except (RuntimeError, ValueError) as e:
        _fail("tokenizer", cfg.tokenizer, f"a SentencePiece model with an EOS piece ({e})")


# ------------------------------------------------------------------ sources


def _data_dir(cfg: DataConfig) -> str | None:
    return os.path.expanduser(cfg.tfds_data_dir) if cfg.tfds_data_dir else None


def _files_builder(cfg: DataConfig):
    """The stdlib / text_dir builder for cfg, built into tfds_data_dir if it is not there yet."""
    if cfg.source == "stdlib":
        cls, config, where = datasets.MoejaxStdlib, datasets.stdlib_config(cfg.val_fraction), "the standard library"
    else:
        root = os.path.expanduser(cfg.text_dir)
        if not os.path.isdir(root):
            _fail("text_dir", cfg.text_dir, "an existing directory of text files (not found)", FileNotFoundError)
        cls, config, where = datasets.MoejaxTextDir, datasets.text_dir_config(root, cfg.val_fraction), "text_dir"
        if not config.files:
            _fail("text_dir", cfg.text_dir, "a directory with at least one non-empty text file (none found)")
    for split, files in datasets.split_files(config.files, cfg.val_fraction).items():
        if not files:
            _fail("val_fraction", cfg.val_fraction, f"a fraction that leaves the {split} split of the "
                  f"{len(config.files)} files of {where} non-empty ({split} would be empty)")
    builder = cls(config=config, data_dir=_data_dir(cfg), file_format="array_record")
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except OSError:  # another process finished the same build first
            builder = cls(config=config, data_dir=_data_dir(cfg), file_format="array_record")
            if not builder.is_prepared():
                raise
    return builder


def _tfds_builder(cfg: DataConfig):
    """The prepared tfds dataset named by cfg.tfds_name, with its text_key feature checked."""
    name, data_dir = cfg.tfds_name, _data_dir(cfg)
    where = data_dir or f"the tfds default data dir {tfds.core.constants.DATA_DIR}"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(name.split("/")[0].split(":")[0], known, n=5)
        _fail("tfds_name", name, f"a tfds dataset registered in tensorflow_datasets or prepared in {where} "
              f"(unknown dataset: it is neither; close registered names: {close})")
    except Exception as e:  # bad config or version: tfds explains
        _fail("tfds_name", name, f"a tfds dataset name like 'lm1b' or 'c4/en:3.1.0' (tfds: {e})")
    if not builder.is_prepared():
        _fail("tfds_name", name, f"a dataset prepared in {where} (not prepared there; prepare it with "
              f"`tfds build {name} --file_format=array_record{f' --data_dir={data_dir}' if data_dir else ''}` or "
              f"tfds.builder({name!r}, data_dir={data_dir!r}, file_format='array_record').download_and_prepare())",
              FileNotFoundError)
    fmt = builder.info.file_format
    if fmt != tfds.core.file_adapters.FileFormat.ARRAY_RECORD:
        _fail("tfds_name", name, f"a dataset prepared in array_record format (it is {getattr(fmt, 'value', fmt)}; "
              f"convert it with `tfds convert_format --dataset_version_dir={builder.data_dir} "
              "--out_file_format=array_record`)")
    features = list(builder.info.features.keys())
    _require(cfg.text_key in features, "text_key", cfg.text_key, f"a feature of {name}: {features}")
    return builder


def _pypi_builder(cfg: DataConfig):
    """The pinned PyPI corpus prepared in tfds_data_dir; it is built by its own command, never here."""
    builder = pypi_corpus.pypi_builder(_data_dir(cfg))
    if not builder.is_prepared():
        where = _data_dir(cfg) or f"the tfds default data dir {tfds.core.constants.DATA_DIR}"
        _fail("tfds_data_dir", cfg.tfds_data_dir, f"a tfds data dir where the PyPI corpus is prepared (it is not "
              f"prepared in {where}; build it with `{pypi_corpus.build_command(_data_dir(cfg))}`)",
              FileNotFoundError)
    return builder


def _builder(cfg: DataConfig):
    if cfg.source == "pypi":
        return _pypi_builder(cfg)
    return _tfds_builder(cfg) if cfg.source == "tfds" else _files_builder(cfg)


def _source(cfg: DataConfig, builder, field: str):
    """The random-access data source of split getattr(cfg, field) ('train_split' or 'eval_split')."""
    split = getattr(cfg, field)
    splits = list(builder.info.splits.keys())
    _require(split.split("[")[0] in splits, field, split, f"a split of {builder.name}: {splits}")
    return builder.as_data_source(split=split)


def _read_options(builder, split: str) -> grain.ReadOptions:
    """grain's read-ahead: as many documents as hold READ_AHEAD_BYTES at the split's mean size (tfds num_bytes /
    num_examples), at most grain's default 500, read by up to grain's default 16 threads; none (documents read
    when needed) if the mean is larger."""
    info = builder.info.splits[split.split("[")[0]]
    mean = info.num_bytes / max(info.num_examples, 1)  # 0 if unrecorded: grain's defaults
    ahead = int(min(READ_AHEAD_BYTES // max(mean, 1), 500))
    return grain.ReadOptions(num_threads=min(ahead, 16), prefetch_buffer_size=ahead)


def corpus_identity(cfg: DataConfig) -> dict[str, Any]:
    """What names the corpus cfg reads, the same on every machine and in every process: {'source', 'builder',
    'version', 'config', and 'content_sha256' (the hash of every stored document and its path, split by split,
    recorded when the corpus was built) or, for 'tfds' (no content hash), 'splits': {split: {'num_examples',
    'num_bytes'}} from builder.info}. Reads no documents. For 'text_dir', config is None: its name hashes the
    absolute path and file mtimes, which differ between copies of the same files."""
    builder = _builder(cfg)
    ident = {"source": cfg.source, "builder": builder.name, "version": str(builder.version),
             "config": None if cfg.source == "text_dir" else getattr(builder.builder_config, "name", None)}
    if cfg.source == "tfds":
        ident["splits"] = {name: {"num_examples": int(s.num_examples), "num_bytes": int(s.num_bytes)}
                           for name, s in sorted(builder.info.splits.items())}
    else:
        ident["content_sha256"] = builder.info.metadata["content_sha256"]
    return ident


def documents(cfg: DataConfig, field: str = "train_split") -> Iterator[bytes]:
    """The text of every document of split getattr(cfg, field), in storage order."""
    source = _source(cfg, _builder(cfg), field)
    return (source[i][cfg.text_key] for i in range(len(source)))


# ------------------------------------------------------------------ tokenize and pack


class PackIterDataset(grain.IterDataset):
    """Tokenizes documents (examples with the text at text_key) and cuts them into rows of seq_len (module
    docstring), about chunk_bytes of text at a time: a document's tokens are never all in memory.

    The iterator's state is the parent's state before the document being cut plus the number of its pairs
    already cut: restoring re-reads that one document and skips them.
    """

    def __init__(self, parent: grain.IterDataset, tokenizer: Tokenizer, text_key: str, seq_len: int,
                 chunk_bytes: int = CHUNK_BYTES):
        super().__init__(parent)
        self.tokenizer, self.text_key, self.seq_len, self.chunk_bytes = tokenizer, text_key, seq_len, chunk_bytes

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self)


class _PackIterator(grain.DatasetIterator):
    """Cuts each document's stream [EOS, t_1..t_n, EOS]: inputs s[j:j + take], targets s[j + 1:j + take + 1]."""

    def __init__(self, parent: grain.DatasetIterator, pack: PackIterDataset):
        super().__init__(parent)
        self.pack = pack
        self._close()

    def _close(self):
        # The open document: the parent's state before it, the rest of its stream s as token chunks (None once
        # all read), _buf = s[_offset:] as read so far (int32 [m], m >= 2 while open; None: no document open),
        # _offset = its pairs already cut.
        self._doc_state, self._chunks, self._buf, self._offset = None, None, None, 0

    def _read(self, n: int):
        """Reads chunks until _buf holds n tokens or the document's stream ends."""
        parts, size = [self._buf], len(self._buf)
        while size < n and self._chunks is not None:
            chunk = next(self._chunks, None)
            if chunk is None:
                self._chunks = None
            elif len(chunk):
                parts.append(chunk)
                size += len(chunk)
        if len(parts) > 1:
            self._buf = np.concatenate(parts)

    def _advance(self, n: int):
        """Drops n pairs of the open document; closes it when none are left."""
        self._buf, self._offset = self._buf[n:], self._offset + n
        self._read(2)
        if len(self._buf) < 2:
            self._close()

    def _open(self, skip: int = 0) -> bool:
        """Opens the parent's next document, its first `skip` pairs dropped; False at the parent's end."""
        state = copy.deepcopy(self._parent.get_state())
        try:
            example = next(self._parent)
        except StopIteration:
            return False
        p = self.pack
        eos = np.array([p.tokenizer.eos_id], np.int32)
        self._doc_state, self._buf, self._offset = state, eos, 0
        self._chunks = itertools.chain(p.tokenizer.encode_chunks(example[p.text_key], p.chunk_bytes), [eos])
        self._read(2)
        while skip and self._buf is not None:
            n = min(skip, len(self._buf) - 1)
            self._advance(n)
            skip -= n
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        S = self.pack.seq_len
        row = {k: np.zeros(S, np.int32) for k in FEATURES[:4]}
        n, segment = 0, 0
        while n < S:
            if self._buf is None and not self._open():
                break
            self._read(S - n + 1)
            take = min(S - n, len(self._buf) - 1)
            segment += 1
            row["inputs"][n:n + take] = self._buf[:take]
            row["targets"][n:n + take] = self._buf[1:take + 1]
            row["segment_ids"][n:n + take] = segment
            row["positions"][n:n + take] = np.arange(take)
            n += take
            self._advance(take)
        if n == 0:
            raise StopIteration
        row["weights"] = (row["segment_ids"] > 0).astype(np.float32)
        return row

    def get_state(self) -> dict[str, Any]:
        if self._buf is not None:
            return {"parent": copy.deepcopy(self._doc_state), "offset": self._offset}
        return {"parent": copy.deepcopy(self._parent.get_state()), "offset": 0}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._close()
        if state["offset"] and not (self._open(skip=state["offset"]) and self._buf is not None):
            raise ValueError(f"pack state {state}: no document with more than {state['offset']} pairs there")


# ------------------------------------------------------------------ pipelines


def _process(cfg: DataConfig, process_index, process_count) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"process_index={index} and process_count={count}: need 0 <= process_index < process_count")
    _require(cfg.batch_size % count == 0, "batch_size", cfg.batch_size, f"a multiple of process_count={count}")
    return index, count


def packed_rows(cfg: DataConfig, tokenizer: Tokenizer, *, split_field: str = "train_split", shuffle: bool = True,
                num_epochs: int | None = None, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Rows (dicts of [S] arrays) of this host's documents of a split: the stages before batching."""
    builder = _builder(cfg)
    source = _source(cfg, builder, split_field)
    docs = grain.MapDataset.source(source)[process_index::process_count]
    _require(len(docs) > 0, split_field, getattr(cfg, split_field),
             f"a split with at least process_count={process_count} documents (it has {len(source)})")
    if shuffle:
        docs = docs.shuffle(seed=cfg.shuffle_seed)  # reshuffled every epoch (seed + epoch)
    if num_epochs != 1:
        docs = docs.repeat(num_epochs)
    docs = docs.to_iter_dataset(_read_options(builder, getattr(cfg, split_field)))  # read in grain threads
    rows = PackIterDataset(docs, tokenizer, cfg.text_key, cfg.seq_len, CHUNK_BYTES)  # tokenized here, in chunks
    if shuffle:
        rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=SHUFFLE_WINDOW, seed=cfg.shuffle_seed)
    return rows


def train_iterator(cfg: DataConfig, tokenizer: Tokenizer, *, process_index: int | None = None,
                   process_count: int | None = None) -> grain.DatasetIterator:
    """Endless iterator of this host's training batches; get_state() / set_state(state) checkpoint it."""
    index, count = _process(cfg, process_index, process_count)
    rows = packed_rows(cfg, tokenizer, process_index=index, process_count=count)
    batches = rows.batch(cfg.batch_size // count, drop_remainder=True)
    if cfg.worker_count:
        if not flags.FLAGS.is_parsed():  # grain workers read absl flags; outside absl.app use their defaults
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return iter(batches)


def eval_sets(cfg: DataConfig, tokenizer: Tokenizer, *, process_index: int | None = None,
              process_count: int | None = None) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """(periodic, final): this host's slices of both evaluations' global batches (see eval_batches), from one
    read of the eval split."""
    index, count = _process(cfg, process_index, process_count)
    final_steps = cfg.final_eval_steps or cfg.eval_steps
    rows = packed_rows(cfg, tokenizer, split_field="eval_split", shuffle=False, num_epochs=1)
    rows = list(itertools.islice(rows, max(final_steps, cfg.eval_steps) * cfg.batch_size))
    n = cfg.eval_steps * cfg.batch_size
    periodic = [rows[i * len(rows) // n] for i in range(n)] if n < len(rows) else rows  # evenly spaced from row 0
    return (_host_batches(cfg, periodic, index, count),
            _host_batches(cfg, rows[:final_steps * cfg.batch_size], index, count))


def eval_batches(cfg: DataConfig, tokenizer: Tokenizer, *, final: bool = False, process_index: int | None = None,
                 process_count: int | None = None) -> list[dict[str, np.ndarray]]:
    """This host's slice of the final evaluation's global batches (the first final_eval_steps, 0: eval_steps,
    batches of the unshuffled eval split), or of the periodic evaluation's eval_steps batches: rows spread
    evenly over the final ones when those are more, else the first eval_steps batches."""
    return eval_sets(cfg, tokenizer, process_index=process_index, process_count=process_count)[int(final)]


def _host_batches(cfg: DataConfig, rows: list, index: int, count: int) -> list[dict[str, np.ndarray]]:
    """Global batches of `rows` (the last padded with weights 0), this host's slice of each."""
    n_batches = -(-len(rows) // cfg.batch_size)
    stacked = {k: np.stack([r[k] for r in rows]) for k in FEATURES}  # [N, S]
    per_host = cfg.batch_size // count
    out = []
    for b in range(n_batches):
        lo = b * cfg.batch_size + index * per_host
        batch = {k: v[lo:lo + per_host] for k, v in stacked.items()}
        pad = per_host - len(batch["inputs"])
        out.append({k: np.pad(v, ((0, pad), (0, 0))) for k, v in batch.items()} if pad else batch)
    return out
