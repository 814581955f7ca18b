"""Tokenizers: UTF-8 bytes (the default), SentencePiece (`train_sentencepiece`; its command line is
`python -m moejax.train_tokenizer`) and Hugging Face tokenizer.json files (published models).

Every tokenizer has `vocab_size` (padded to a multiple of 128), `eos_id`, `encode(text) -> int32 [n]`,
`decode(ids) -> str` and `token_bytes`: float32 [vocab_size], the number of UTF-8 bytes of text each id
stands for (0 for EOS, padding and unused ids), so bits per byte = sum(nll) / (ln 2 * sum(token_bytes[targets])).
`encode_chunks(text, chunk_bytes)` yields int32 arrays whose concatenation is exactly `encode(text)`, each from
about chunk_bytes of text, so a long document is never held as tokens all at once: the byte tokenizer cuts
anywhere; SentencePiece cuts only just before a space that follows a non-space, where no piece can span the
cut (`cuts_at_spaces`; a document without such spaces is encoded whole).
"""
from __future__ import annotations

import io
import json
import os
import re
from typing import Iterable, Iterator, Protocol

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

VOCAB_MULTIPLE = 128


def padded(n: int) -> int:
    """n rounded up to a multiple of VOCAB_MULTIPLE (embedding tables shard evenly)."""
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _text(text: str | bytes) -> str:
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    token_bytes: np.ndarray  # [vocab_size] float32

    def encode(self, text: str | bytes) -> np.ndarray: ...

    def encode_chunks(self, text: str | bytes, chunk_bytes: int) -> Iterator[np.ndarray]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes, 256 is EOS, 257..383 are unused (vocab 384)."""

    eos_id = 256
    vocab_size = padded(257)

    def __init__(self):
        self.token_bytes = np.zeros(self.vocab_size, np.float32)
        self.token_bytes[:256] = 1.0

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, np.uint8).astype(np.int32)  # [n]

    def encode_chunks(self, text: str | bytes, chunk_bytes: int) -> Iterator[np.ndarray]:
        data = memoryview(text.encode("utf-8") if isinstance(text, str) else text)
        for i in range(0, len(data), chunk_bytes):
            yield np.frombuffer(data[i:i + chunk_bytes], np.uint8).astype(np.int32)  # [<= chunk_bytes]

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model file; ids >= the model's piece count (vocab padding) decode to nothing.

    token_bytes counts a piece's surface text ('▁' = one space) and 1 for byte-fallback pieces. Models
    trained with add_dummy_prefix (not ours) count one extra byte per text for the prefix.
    """

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self._load(f.read())

    def _load(self, proto: bytes):
        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self.n_pieces = self._sp.get_piece_size()
        self.vocab_size = padded(self.n_pieces)
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError("SentencePiece model has no EOS piece (train it with eos_id >= 0)")
        self.cuts_at_spaces = _cuts_at_spaces(proto)
        self.token_bytes = np.zeros(self.vocab_size, np.float32)
        for i in range(self.n_pieces):
            if self._sp.is_byte(i):
                self.token_bytes[i] = 1.0
            elif not (self._sp.is_control(i) or self._sp.is_unknown(i) or self._sp.is_unused(i)):
                self.token_bytes[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))

    def __getstate__(self):  # picklable for grain worker processes
        return {"proto": self._proto}

    def __setstate__(self, state):
        self._load(state["proto"])

    def encode(self, text: str | bytes) -> np.ndarray:
        return np.asarray(self._sp.encode(_text(text)), np.int32)  # [n]

    def encode_chunks(self, text: str | bytes, chunk_bytes: int) -> Iterator[np.ndarray]:
        if not self.cuts_at_spaces:
            yield self.encode(text)
            return
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        start = 0
        while start < len(data):
            cut = _SPACE_AFTER_NON_SPACE.search(data, start + chunk_bytes)  # ASCII: never inside a character
            end = cut.start() if cut else len(data)
            yield self.encode(data[start:end])
            start = end

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1) if i < self.n_pieces])


class HFTokenizer:
    """A Hugging Face tokenizer.json (the `tokenizers` package), as published models ship it. EOS: the
    `eos_token` of tokenizer_config.json beside the file, else the first added special token named like an
    end of text. Ids >= the tokenizer's size (the model's vocabulary padding) decode to nothing.

    token_bytes: a byte-level BPE token (GPT-2's byte-to-unicode alphabet: Llama 3, Qwen, OLMoE, DeepSeek)
    counts its bytes; a SentencePiece-style one ('▁' for a space, '<0xNN>' byte fallback: Mixtral) its surface
    text; special tokens 0. encode_chunks cuts just before a space that follows a non-whitespace character,
    only for byte-level tokenizers without a normaliser or prefix space (the pre-tokeniser splits there: such a
    space starts a pre-token), else it encodes each document whole.
    """

    def __init__(self, path: str):
        config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        eos = None
        if os.path.isfile(config):
            with open(config) as f:
                eos = json.load(f).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
        with open(path) as f:
            self._load(f.read(), eos)

    def _load(self, text: str, eos: str | None):
        from tokenizers import Tokenizer as _Tokenizer

        self._json, self._eos = text, eos
        self._tok = _Tokenizer.from_str(text)
        spec = json.loads(text)
        self.n_tokens = self._tok.get_vocab_size(with_added_tokens=True)
        self.vocab_size = padded(self.n_tokens)
        special = {t["id"]: t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
        if eos is None:
            eos = next((c for c in special.values() if re.search(r"end.?of.?(text|sentence)|^</s>$|^<\|endoftext", c,
                                                                 re.I)), None)
        self.eos_id = self._tok.token_to_id(eos) if eos is not None else None
        if self.eos_id is None:
            raise ValueError(f"tokenizer has no EOS token ({eos!r}); allowed: a tokenizer.json with "
                             f"tokenizer_config.json naming eos_token beside it")
        byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(
            spec.get("decoder"))
        prefix = '"add_prefix_space": true' in json.dumps(spec.get("pre_tokenizer"))  # a space before each text
        self.cuts_at_spaces = byte_level and not prefix and not spec.get("normalizer")
        inverse = {c: b for b, c in _bytes_to_unicode().items()}
        self.token_bytes = np.zeros(self.vocab_size, np.float32)
        for i in range(self.n_tokens):
            piece = self._tok.id_to_token(i)
            if i in special or piece is None:
                continue
            if byte_level and all(c in inverse for c in piece):
                self.token_bytes[i] = len(piece)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                self.token_bytes[i] = 1.0
            else:
                self.token_bytes[i] = len(piece.replace("\u2581", " ").encode("utf-8"))

    def __getstate__(self):  # picklable for grain worker processes
        return {"json": self._json, "eos": self._eos}

    def __setstate__(self, state):
        self._load(state["json"], state["eos"])

    def encode(self, text: str | bytes) -> np.ndarray:
        return np.asarray(self._tok.encode(_text(text), add_special_tokens=False).ids, np.int32)  # [n]

    def encode_chunks(self, text: str | bytes, chunk_bytes: int) -> Iterator[np.ndarray]:
        text = _text(text)
        if not self.cuts_at_spaces:
            yield self.encode(text)
            return
        start = 0
        while start < len(text):  # about chunk_bytes characters a chunk
            cut = _SPACE_AFTER_TEXT.search(text, start + chunk_bytes)
            end = cut.start() if cut else len(text)
            yield self.encode(text[start:end])
            start = end

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1) if i < self.n_tokens],
                                skip_special_tokens=False)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: byte -> a printable character (Radford et al. 2019, encoder.py)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


_SPACE_AFTER_NON_SPACE = re.compile(rb"(?<! ) ")
# A space after a non-whitespace character: GPT-2-style pre-tokenisers (Llama 3, Qwen, OLMoE, DeepSeek) never
# put the two in one pre-token (a space after a newline can be: "\n   " is one whitespace run).
_SPACE_AFTER_TEXT = re.compile(r"(?<=\S) ")


def _cuts_at_spaces(proto: bytes) -> bool:
    """True if text cut just before a space that follows a non-space encodes, piece by piece, to the same ids
    as whole: a BPE model whose normalizer only escapes spaces as '▁' (identity rule, no dummy prefix, spaces
    kept) and none of whose pieces has '▁' after another character (trained with split_by_whitespace, as
    `train_sentencepiece` does). Then no piece spans such a cut, and BPE merges on either side never
    interact. Unigram models are excluded: Viterbi scores summed from a different start can round apart."""
    m = sentencepiece_model_pb2.ModelProto.FromString(proto)
    n = m.normalizer_spec
    return (m.trainer_spec.model_type == m.trainer_spec.BPE and n.name == "identity" and not n.precompiled_charsmap
            and n.escape_whitespaces and not n.add_dummy_prefix and not n.remove_extra_whitespaces
            and not m.trainer_spec.treat_whitespace_as_suffix
            and all("\u2581" not in p.piece.lstrip("\u2581") for p in m.pieces))


def _chunks(texts: Iterable[str | bytes], max_bytes: int, max_chunk_bytes: int):
    """Documents cut at line ends into pieces of at most max_chunk_bytes UTF-8 bytes (SentencePiece
    skips longer 'sentences'); newlines stay inside pieces. Stops after max_bytes in all."""
    total = 0
    for text in texts:
        chunk, size = [], 0
        for line in _text(text).splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if size + n > max_chunk_bytes and chunk:
                yield "".join(chunk)
                chunk, size = [], 0
            if n > max_chunk_bytes:  # one very long line: skip it
                continue
            chunk.append(line)
            size += n
            total += n
        if chunk:
            yield "".join(chunk)
        if total >= max_bytes:
            return


def train_sentencepiece(texts: Iterable[str | bytes], output: str, vocab_size: int = 8192, *,
                        model_type: str = "bpe", max_bytes: int = 200_000_000,
                        max_chunk_bytes: int = 4096, num_threads: int = 0) -> SentencePieceTokenizer:
    """Trains a SentencePiece model on texts (first max_bytes), writes it to `output` and returns it.

    Text is kept exactly (identity normalisation, no dummy prefix, whitespace-only pieces allowed) and
    unseen characters fall back to bytes, so decode(encode(s)) == s for any string without U+2581 '▁'
    (SentencePiece's space marker, which decodes as a space). Ids: 0 unknown,
    1 EOS, then 256 byte pieces, then learned pieces; vocab_size counts them all (before padding).
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_chunks(texts, max_bytes, max_chunk_bytes), model_writer=model,
        vocab_size=vocab_size, model_type=model_type, byte_fallback=True, character_coverage=0.9995,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=max_chunk_bytes,
        unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, hard_vocab_limit=False,
        num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
    with open(output, "wb") as f:
        f.write(model.getvalue())
    return SentencePieceTokenizer(output)
