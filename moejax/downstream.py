"""Downstream evaluation: multiple-choice tasks scored by log-likelihood, as lm-evaluation-harness scores
HellaSwag, PIQA and ARC (Gao et al. 2021; DeepSeekMoE Table 1 reports them beside the Pile loss), read from
local JSONL files (nothing is downloaded).

Each example is a context and choices; the model's score of a choice is log p(choice | context), summed over
the choice's tokens, where the tokens of the choice are those of encode(context + choice) after
encode(context) (lm-eval's split). acc: the best-scored choice is the label; acc_norm: the best score per
byte of the choice (lm-eval's acc_norm, length-normalised). Each accuracy comes with a 95% Wilson interval.

Formats (`read_task`, format 'auto' tells them by their keys), with lm-eval's prompts:
  hellaswag  {activity_label, ctx_a, ctx_b, endings, label}: "{activity_label}: {ctx_a} {Ctx_b}" -> " {ending}",
             text cleaned as lm-eval does ( [title] -> '. ', other [tags] dropped)
  piqa       {goal, sol1, sol2, label}: "Question: {goal}\\nAnswer:" -> " {sol}"
  arc        {question, choices: {text, label}, answerKey}: "Question: {question}\\nAnswer:" -> " {text}"
  generic    {context, choices, label}: context -> choice as given

Command line:
    python -m moejax.downstream --workdir=W --task=piqa:/data/piqa_valid.jsonl [--task=...] [--limit=N]
        [--json=FILE]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("auto", "generic", "hellaswag", "piqa", "arc")


@dataclasses.dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    label: int


def _clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing of WikiHow / ActivityNet text."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _example(row: dict, fmt: str) -> Example:
    if fmt == "hellaswag":
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        return Example(_clean(row["activity_label"] + ": " + ctx), tuple(" " + _clean(e) for e in row["endings"]),
                       int(row["label"]))
    if fmt == "piqa":
        return Example(f"Question: {row['goal']}\nAnswer:", (" " + row["sol1"], " " + row["sol2"]), int(row["label"]))
    if fmt == "arc":
        labels = list(row["choices"]["label"])
        return Example(f"Question: {row['question']}\nAnswer:", tuple(" " + t for t in row["choices"]["text"]),
                       labels.index(row["answerKey"]))
    return Example(row["context"], tuple(row["choices"]), int(row["label"]))


def _format_of(row: dict) -> str:
    for fmt, keys in (("hellaswag", ("ctx_a", "endings")), ("piqa", ("goal", "sol1")),
                      ("arc", ("question", "answerKey")), ("generic", ("context", "choices", "label"))):
        if all(k in row for k in keys):
            return fmt
    raise ValueError(f"a task row with keys {sorted(row)} matches no format; allowed: {FORMATS[1:]} (see "
                     f"moejax.downstream)")


def read_task(path: str, fmt: str = "auto", limit: int = 0) -> list[Example]:
    """The examples of a JSONL task file (the first `limit` if > 0). ValueError naming the file and line of a
    row that does not parse or whose label is not one of its choices."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is invalid; allowed: {FORMATS}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file {path} does not exist; allowed: a local JSONL file (one example a line)")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ex = _example(row, _format_of(row) if fmt == "auto" else fmt)
            except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}:{n} is not a {fmt} task row ({type(e).__name__}: {e})") from e
            if not 0 <= ex.label < len(ex.choices) or len(ex.choices) < 2:
                raise ValueError(f"{path}:{n} has label {ex.label} and {len(ex.choices)} choices; allowed: >= 2 "
                                 f"choices and 0 <= label < choices")
            out.append(ex)
            if limit and len(out) == limit:
                break
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n (Wilson 1927)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return ((centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n))


def _requests(examples, tokenizer, max_len: int, prefix):
    """(tokens, n_continuation) per (example, choice): prefix + encode(context + choice), cut on the left to
    max_len + 1 tokens; the last n_continuation tokens are the choice's."""
    out = []
    for ex in examples:
        ctx = list(tokenizer.encode(ex.context))
        for ch in ex.choices:
            whole = list(tokenizer.encode(ex.context + ch))
            n = len(whole) - len(ctx) if whole[:len(ctx)] == ctx else len(tokenizer.encode(ch))
            seq = (list(prefix) + whole)[-(max_len + 1):]
            out.append((seq, max(1, min(n, len(seq) - 1))))
    return out


def loglikelihoods(model, tokenizer, examples, *, batch_size: int = 16, max_len: int = 512, prefix=None) -> list:
    """[per example: np.ndarray of log p(choice | context) per choice] under `model` (a Transformer in
    evaluation mode). prefix: tokens before each context (default: the tokenizer's EOS, as documents follow
    an EOS in moejax's packed training data). Sequences are padded on the right to a power of two (>= 16)
    so that few programs compile; padding never reaches a scored position (attention is causal)."""
    reqs = _requests(examples, tokenizer, max_len, [tokenizer.eos_id] if prefix is None else prefix)
    forward = jax.jit(lambda t: jax.nn.log_softmax(model(t)[0], -1))
    scores = np.zeros(len(reqs))
    order = sorted(range(len(reqs)), key=lambda i: len(reqs[i][0]))  # similar lengths share a batch
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        L = max(16, 1 << (max(len(reqs[i][0]) for i in idx) - 2).bit_length())
        toks = np.zeros((batch_size, L + 1), np.int32)
        for row, i in enumerate(idx):
            toks[row, :len(reqs[i][0])] = reqs[i][0]
        logp = np.asarray(forward(jnp.asarray(toks[:, :-1])))  # [batch, L, V]
        for row, i in enumerate(idx):
            seq, n = reqs[i]
            pos = np.arange(len(seq) - 1 - n, len(seq) - 1)  # predictions of the last n tokens
            scores[i] = logp[row, pos, np.asarray(seq)[pos + 1]].sum()
    out, k = [], 0
    for ex in examples:
        out.append(scores[k:k + len(ex.choices)])
        k += len(ex.choices)
    return out


def accuracy(examples, scores) -> dict:
    """acc and acc_norm (score per UTF-8 byte of the choice) with 95% Wilson intervals, and n."""
    right = np.array([int(np.argmax(s)) == ex.label for ex, s in zip(examples, scores)])
    norm = np.array([int(np.argmax(s / np.array([max(len(c.encode()), 1) for c in ex.choices]))) == ex.label
                     for ex, s in zip(examples, scores)])
    n = len(examples)
    return {"acc": float(right.mean()) if n else 0.0, "acc_ci95": wilson(int(right.sum()), n),
            "acc_norm": float(norm.mean()) if n else 0.0, "acc_norm_ci95": wilson(int(norm.sum()), n), "n": n,
            "correct": right.astype(int).tolist()}


def evaluate(model, tokenizer, tasks: dict, *, limit: int = 0, batch_size: int = 16, max_len: int = 512) -> dict:
    """{task name: accuracy(...)} for tasks {name: JSONL path} (format told by the rows)."""
    out = {}
    for name, path in tasks.items():
        examples = read_task(path, limit=limit)
        out[name] = accuracy(examples, loglikelihoods(model, tokenizer, examples, batch_size=batch_size,
                                                       max_len=max_len))
    return out


def parse_tasks(specs) -> dict:
    """['name:path', ...] -> {name: path} (ValueError naming a spec without ':')."""
    tasks = {}
    for spec in specs:
        name, sep, path = spec.partition(":")
        if not sep or not name or not path:
            raise ValueError(f"task {spec!r} is invalid; allowed: NAME:PATH.jsonl (e.g. piqa:/data/piqa.jsonl)")
        tasks[name] = os.path.expanduser(path)
    return tasks


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m moejax.downstream", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--task", action="append", required=True, help="NAME:PATH.jsonl (repeatable)")
    ap.add_argument("--limit", type=int, default=0, help="first N examples of each task (0 = all)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_len", type=int, default=512)
    ap.add_argument("--step", type=int, default=None)
    ap.add_argument("--json", default="", help="also write the results to this file")
    a = ap.parse_args(argv)
    from moejax.checkpoint import load_checkpoint
    from moejax.generate import for_inference

    try:
        tasks = parse_tasks(a.task)
        ck = load_checkpoint(a.workdir, step=a.step)
        res = evaluate(for_inference(ck), ck.tokenizer, tasks, limit=a.limit, batch_size=a.batch_size,
                       max_len=a.max_len)
    except (ValueError, FileNotFoundError) as e:
        ap.exit(2, f"moejax.downstream: error: {e}\n")
    print(f"{'task':12s} {'n':>6s} {'acc':>7s} {'95% CI':>15s} {'acc_norm':>9s} {'95% CI':>15s}")
    for name, r in res.items():
        ci = lambda c: f"[{c[0]:.3f}, {c[1]:.3f}]"
        print(f"{name:12s} {r['n']:6d} {r['acc']:7.3f} {ci(r['acc_ci95']):>15s} {r['acc_norm']:9.3f} "
              f"{ci(r['acc_norm_ci95']):>15s}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"workdir": os.path.abspath(a.workdir), "step": ck.step, "tasks": res}, f, indent=1)


if __name__ == "__main__":
    main()
