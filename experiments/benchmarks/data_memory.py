"""Peak resident memory of the input pipeline: build + train_iterator + N batches, each case in its own process.

Run:  python3 -m experiments.benchmarks.data_memory [--json FILE] [--quick] [--cases stdlib/byte,...]

What is measured: a fresh Python process per case builds the corpus into an empty temporary tfds_data_dir
(`data._builder`), makes `data.train_iterator` (process 0 of 1) and takes N batches of 16 x 2048 tokens;
ru_maxrss (the process's peak resident set) is read after the imports, the build, the iterator's creation
and the batches, so each column is the peak up to that stage. A second fresh process then repeats the case
on the corpus it built ('peak, corpus prepared': the pipeline without the build, as a resumed run sees it).
Corpora: 'stdlib' (the interpreter's standard library, ~700 files) and 'line100' (a text_dir holding one
100 MB single-line file of space-separated Python-like words with some non-ASCII ones, plus one small file
for the validation split). Tokenizers:
'byte' and the packaged 'pypi_spm8k' SentencePiece model. Byte rows take 3200 batches (105M tokens: the
whole 100 MB document and into its next epoch; 3+ epochs of stdlib); SentencePiece rows 300 (encoding
runs at ~1.5 MB/s on one core). `read_ahead` is the documents grain reads ahead (data._read_options).
A watchdog stops a case at --limit_mib (a regression must not take a shared machine's memory).
--quick: a 10 MB file and 30 batches per case (~40 s).
Goal (issue 14): under 1 GB for each case.
Expected (2-core x86_64 CPU, 24 GB, Python 3.11.7; results/data_memory_cpu.json): peaks of 0.3-0.8 GB,
most of it the ~0.25 GB of the imports (jax, tensorflow_datasets, grain); ~2 min for the full run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from experiments.benchmarks import common

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ_LEN, BATCH = 2048, 16
GOAL_MIB = 1e9 / 2**20  # 1 GB
CASES = {  # name: (corpus, tokenizer, batches)
    "stdlib/byte": ("stdlib", "byte", 3200),
    "stdlib/pypi_spm8k": ("stdlib", "pypi_spm8k", 300),
    "line100/byte": ("line100", "byte", 3200),
    "line100/pypi_spm8k": ("line100", "pypi_spm8k", 300),
}
LINE_MB, QUICK_LINE_MB, QUICK_BATCHES = 100, 10, 30
WORDS = [b"def", b"return", b"x", b"=", b"(self,", b"value):", b"42", b"#", "héllo".encode(), "日本".encode()]


def write_line_dir(root: str, megabytes: float) -> str:
    """A text_dir of one single-line file (megabytes x 1e6 bytes, space-separated WORDS drawn with numpy
    default_rng(0), written 1 MB at a time) and one small file that lands in the validation split."""
    os.makedirs(root)
    rng, n, done = np.random.default_rng(0), int(megabytes * 1e6), 0
    with open(os.path.join(root, "line.txt"), "wb") as f:
        while done < n:
            block = (b" ".join(rng.choice(WORDS, 200_000).tolist()) + b" ")[:n - done]
            f.write(block)
            done += len(block)
    with open(os.path.join(root, "small30.txt"), "w") as f:  # datasets.is_validation('small30.txt', 0.02)
        f.write("a small validation file " * 20)
    return root


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(spec: dict) -> dict:
    """Runs one case in this process (a fresh one): the peaks after each stage."""
    def watchdog():
        while _peak_mib() < spec["limit_mib"]:
            time.sleep(0.01)
        print(json.dumps({"over_limit_mib": spec["limit_mib"]}), flush=True)
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    from moejax import data  # the imports are part of the process's memory, measured first

    row = {"rss_imports_mib": _peak_mib()}
    kw = dict(source="text_dir", text_dir=spec["text_dir"]) if spec["text_dir"] else {}
    cfg = data.DataConfig(tfds_data_dir=spec["tfds_data_dir"], tokenizer=spec["tokenizer"], seq_len=SEQ_LEN,
                          batch_size=BATCH, **kw)
    t0 = time.perf_counter()
    builder = data._builder(cfg)
    row.update(build_s=time.perf_counter() - t0, rss_build_mib=_peak_mib(),
               read_ahead=data._read_options(builder, cfg.train_split).prefetch_buffer_size,
               train_documents=builder.info.splits[cfg.train_split].num_examples,
               train_mb=builder.info.splits[cfg.train_split].num_bytes / 1e6)
    it = data.train_iterator(cfg, data.get_tokenizer(cfg), process_index=0, process_count=1)
    row["rss_iterator_mib"] = _peak_mib()
    t0 = time.perf_counter()
    for _ in range(spec["batches"]):
        next(it)
    row.update(batches_s=time.perf_counter() - t0, rss_peak_mib=_peak_mib())
    return row


def run_case(name: str, batches: int, line_dir: str, limit_mib: int, tmp: str) -> dict:
    corpus, tokenizer, _ = CASES[name]
    spec = dict(text_dir=line_dir if corpus == "line100" else "", tokenizer=tokenizer, batches=batches,
                tfds_data_dir=tempfile.mkdtemp(dir=tmp), limit_mib=limit_mib)
    t0 = time.perf_counter()
    result = _spawn(spec)
    if "error" not in result:  # again in a fresh process, the corpus now prepared: the pipeline without the build
        again = _spawn(spec)
        result["rss_peak_prepared_mib"] = again.get("rss_peak_mib")
        result["error_prepared"] = again.get("error")
    return {"case": name, "corpus": corpus, "tokenizer": tokenizer, "batches": batches,
            "tokens": batches * BATCH * SEQ_LEN, "seq_len": SEQ_LEN, "batch_size": BATCH,
            "process_s": time.perf_counter() - t0, **result}


def _spawn(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "experiments.benchmarks.data_memory", "--child", json.dumps(spec)],
                          capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if "over_limit_mib" in result:
        return {"error": f"stopped at {result['over_limit_mib']} MiB"}
    if proc.returncode or "rss_peak_mib" not in result:
        result["error"] = proc.stderr[-2000:] or f"exit status {proc.returncode}"
    return result


def table(rows: list[dict]) -> str:
    f = lambda r, k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"
    lines = ["| case | train docs | train MB | read-ahead docs | batches | build s | batches s | MiB after imports "
             "| after build | after train_iterator | peak (after batches) | peak, corpus prepared | < 1 GB |",
             "|" + "---|" * 13]
    for r in rows:
        error = r.get("error") or r.get("error_prepared")
        ok = "error: " + error.splitlines()[-1] if error else (
            "yes" if max(r["rss_peak_mib"], r["rss_peak_prepared_mib"]) < GOAL_MIB else "no")
        lines.append(f"| {r['case']} | {f(r, 'train_documents', 'd')} | {f(r, 'train_mb', '.1f')} "
                     f"| {f(r, 'read_ahead', 'd')} | {r['batches']} | {f(r, 'build_s', '.1f')} "
                     f"| {f(r, 'batches_s', '.1f')} | {f(r, 'rss_imports_mib', '.0f')} "
                     f"| {f(r, 'rss_build_mib', '.0f')} "
                     f"| {f(r, 'rss_iterator_mib', '.0f')} | {f(r, 'rss_peak_mib', '.0f')} "
                     f"| {f(r, 'rss_peak_prepared_mib', '.0f')} | {ok} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
    p.add_argument("--quick", action="store_true",
                   help=f"a {QUICK_LINE_MB} MB file and {QUICK_BATCHES} batches per case (~40 s)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--limit_mib", type=int, default=4096, help="stop a case whose peak reaches this")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    names = [c for c in args.cases.split(",") if c]
    for name in names:
        if name not in CASES:
            raise SystemExit(f"--cases: {name!r} is invalid; allowed: {', '.join(CASES)}")
    print(common.machine_line(), flush=True)
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        line_dir = ""
        if any(CASES[n][0] == "line100" for n in names):
            line_dir = write_line_dir(os.path.join(tmp, "line100"), QUICK_LINE_MB if args.quick else LINE_MB)
        for name in names:
            rows.append(run_case(name, QUICK_BATCHES if args.quick else CASES[name][2], line_dir, args.limit_mib, tmp))
            r = rows[-1]
            print(f"  {name:20s} peak {r.get('rss_peak_mib', float('nan')):6.0f} MiB  {r['process_s']:5.1f} s"
                  + (f"  ERROR {r['error'][-300:]}" if r.get("error") else ""), flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    print(f"\n{time.perf_counter() - t0:.0f} s; load average at the end {load}\n")
    print(table(rows))
    if args.json:
        common.write_json(args.json, rows)


if __name__ == "__main__":
    main()
