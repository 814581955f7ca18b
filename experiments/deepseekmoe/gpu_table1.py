"""One command for one GPU: train the five Table-1 methods (suite `table1`) at scale `gpu`, one seed, and write
the results, the report, the hardware and software it ran on, and each run's wall time.

  python3 -m experiments.deepseekmoe.gpu_table1 --out=$OUT --wheels=.whl     # on the GPU machine
  python3 -m experiments.deepseekmoe.gpu_table1 --smoke --out=/tmp/smoke     # anywhere: 2 steps of a 1-layer model

experiments/deepseekmoe/README.md gives the exact `device` call (an H200 lent for a session) and how to commit
what it brings back. Scale `gpu` (configs/deepseekmoe_table1.py) is sized for the five runs to take under
8 minutes together on one H100 or H200, compiles included.

Steps, each timed:
  1. --wheels DIR: install its wheels (WHEELS below: packages moejax needs that the machine lacks; fetch them
     beforehand with --download_wheels=DIR) with pip --no-index --no-deps into WORK/site, first on PYTHONPATH.
  2. Record the machine: `nvidia-smi` (nvidia-smi.txt; absent on CPU) and, from a child Python, its version,
     JAX's devices and the versions of the packages moejax imports (env.json). Fails here, in seconds, if
     moejax's training, data or report modules do not import.
  3. python -m experiments.deepseekmoe.run --suite=table1 --scale=gpu --seeds=1 --workdir=WORK/table1_gpu
     [--set=...], output to the console and log.txt. At --budget_s seconds after the start of this command it
     gets SIGTERM: the current run checkpoints and stops (run.py), so the command returns in time with the runs
     that finished (SIGKILL 60 s later if it has not stopped). If not every run finished, the report is
     written for those that did.
  4. summary.md: per run its wall time, the part of it that is not training steps (compiling, evaluation,
     checkpoints, data setup), tokens/s and MFU (model FLOPs / the device's peak, moejax.metrics.PEAK_FLOPS;
     medians over log windows), validation loss; then the totals, the machine and the report's tables.
  5. Pack WORK/table1_gpu (suite.json, results/, report/, each run's metrics.jsonl and config.json, no
     checkpoints or TensorBoard files) with summary.md, log.txt, env.json and nvidia-smi.txt into
     --out/gpu_table1.tar.gz, and copy those four beside it: 5 flat files in --out.
Exit status: 0 when every run finished and the report was written, 1 otherwise (the files are written anyway).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE, SCALE, NAME = "table1", "gpu", "table1_gpu"
# --smoke: 2 steps of a 1-layer model on 4 x 64 tokens, one validation batch (the whole path in < 60 s on CPU)
SMOKE = ("train.steps=2,train.warmup_steps=1,train.eval_every=2,train.checkpoint_every=2,train.log_every=1,"
         "data.batch_size=4,data.seq_len=64,data.eval_steps=1,data.final_eval_steps=1,model.n_layers=1")
# Packages moejax needs that the GPU machine's Python 3.12 lacks (experiments/deepseekmoe/README.md), pinned;
# --download_wheels fetches them. tensorflow-metadata 1.17.2: its generated code (protobuf 4.25) imports under
# any protobuf runtime >= 4.25 (1.21's needs >= 6.31). promise has no wheel on PyPI: built from its sdist.
WHEELS = ("array-record==0.8.6", "dm-tree==0.1.10", "docstring-parser==0.18.0", "googleapis-common-protos==1.76.0",
          "grain==0.2.18", "immutabledict==4.3.1", "ml_collections==1.1.0", "portpicker==1.6.0",
          "simple-parsing==0.1.9", "tensorboardX==2.6.5", "tensorflow-datasets==4.9.10",
          "tensorflow-metadata==1.17.2", "termcolor==3.3.0", "toml==0.10.2")
SDISTS = ("promise==2.3",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# What env.json records: the modules moejax and the report import (distribution names differ for some)
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "ml_collections", "grain",
            "tensorflow_datasets", "array_record", "sentencepiece", "tensorboardX", "matplotlib", "absl",
            "google.protobuf")
ENV_PROBE = r"""
import importlib, json, platform, sys
out = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
       "packages": {}, "import_errors": {}}
for name in %r + ("moejax.train", "moejax.data", "experiments.deepseekmoe.report"):
    try:
        m = importlib.import_module(name)
        if not name.startswith(("moejax", "experiments")):
            out["packages"][name] = getattr(m, "__version__", "?")
    except Exception as e:
        out["import_errors"][name] = f"{type(e).__name__}: {e}"
import jax
out["jax_backend"] = jax.default_backend()
out["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
print(json.dumps(out))
""" % (PACKAGES,)


class Log:
    """Prints and appends to log.txt, each line prefixed with the seconds since the start."""

    def __init__(self, path: str):
        self.start = time.time()
        self.file = open(path, "a")

    def __call__(self, text: str = "") -> None:
        for line in text.splitlines() or [""]:
            line = f"[{time.time() - self.start:6.1f}s] {line}"
            print(line, flush=True)
            self.file.write(line + "\n")
        self.file.flush()


def download_wheels(folder: str) -> None:
    """Fetch WHEELS for CPython 3.12 on x86-64 Linux (the GPU machine) and build SDISTS, into `folder`."""
    pip = [sys.executable, "-m", "pip"]
    tags = [x for p in PLATFORMS for x in ("--platform", p)]
    subprocess.run(pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                          "--implementation", "cp", *tags, "-d", folder, *WHEELS], check=True)
    subprocess.run(pip + ["wheel", "--no-deps", "-w", folder, *SDISTS], check=True)
    names = sorted(os.listdir(folder))
    size = sum(os.path.getsize(os.path.join(folder, n)) for n in names)
    print(f"{folder}: {len(names)} wheels, {size / 2**20:.1f} MiB")


def install_wheels(wheels: str, site: str, log: Log) -> None:
    files = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    if not files:
        raise SystemExit(f"gpu_table1: error: --wheels={wheels!r} holds no .whl files; allowed: the folder the "
                         f"README's pip download command fills")
    t = time.time()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", site, *files], check=True)
    log(f"installed {len(files)} wheels into {site} in {time.time() - t:.1f} s")


def record_machine(out: str, env: dict, log: Log) -> dict:
    smi = shutil.which("nvidia-smi")
    if smi:
        text = subprocess.run([smi], capture_output=True, text=True).stdout
        query = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                "--format=csv,noheader"], capture_output=True, text=True).stdout
        with open(os.path.join(out, "nvidia-smi.txt"), "w") as f:
            f.write(text + "\n" + query)
        log(f"nvidia-smi: {query.strip()}")
    probe = subprocess.run([sys.executable, "-c", ENV_PROBE], capture_output=True, text=True, env=env, cwd=REPO)
    if probe.returncode != 0:
        log(probe.stderr)
        raise SystemExit("gpu_table1: error: the environment probe failed (above); nothing was trained")
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    info["nvidia_smi"] = query.strip() if smi else None
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(info, f, indent=1)
    log(f"python {info['python']}, jax backend {info['jax_backend']}, devices {info['devices']}")
    log("packages: " + ", ".join(f"{k} {v}" for k, v in info["packages"].items()))
    if info["import_errors"]:
        raise SystemExit(f"gpu_table1: error: cannot import {info['import_errors']}; carry the missing packages as "
                         f"wheels (--wheels, README)")
    return info


def run_suite(work: str, extra_set: str, env: dict, deadline: float, log: Log) -> int:
    """The suite in a child process, killed gently at `deadline` (time.time()); its return code."""
    cmd = [sys.executable, "-m", "experiments.deepseekmoe.run", f"--suite={SUITE}", f"--scale={SCALE}", "--seeds=1",
           f"--workdir={work}"] + ([f"--set={extra_set}"] if extra_set else [])
    log("$ " + " ".join(cmd))
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                             bufsize=1)

    def guard():
        if child.poll() is None and time.time() < deadline:
            time.sleep(max(0.0, deadline - time.time()))
        if child.poll() is None:
            log("budget reached: SIGTERM (the current run checkpoints and stops)")
            child.send_signal(signal.SIGTERM)
            time.sleep(60)
            if child.poll() is None:
                log("still running 60 s after SIGTERM: SIGKILL")
                child.kill()

    threading.Thread(target=guard, daemon=True).start()
    for line in child.stdout:
        log(line.rstrip("\n"))
    return child.wait()


def median_mfu(run_dir: str) -> float | None:
    """The median over log windows of the MFU the trainer logs (metrics.jsonl; absent where the peak is unknown)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        values = sorted(row["mfu"] for row in map(json.loads, filter(str.strip, f)) if row.get("mfu"))
    return values[len(values) // 2] if values else None


def summarise(work: str, total_s: float, info: dict) -> tuple[str, int]:
    """summary.md's text and the number of finished runs."""
    rows, train_sum, wall_sum = [], 0.0, 0.0
    for path in sorted(glob.glob(os.path.join(work, "results", "*.json"))):
        with open(path) as f:
            r = json.load(f)
        speed = r["curves"].get("tokens_per_s")
        train_s = r["tokens"] / speed if speed else float("nan")
        mfu = median_mfu(os.path.join(work, "runs", r["variant"], f"seed{r['seed']}"))
        mfu = f"{100 * mfu:.1f}%" if mfu else "-"
        rows.append(f"| {r['variant']} | {r['wall_s']:.0f} | {train_s:.0f} | {r['train_wall_s'] - train_s:.0f} | "
                    f"{r['steps']} | {r['tokens'] / 1e6:.1f}M | {speed or 0:,.0f} | {r['flops_per_token'] / 1e6:.1f} | "
                    f"{mfu} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} |")
        train_sum, wall_sum = train_sum + train_s, wall_sum + r["wall_s"]
    suite_json = os.path.join(work, "suite.json")
    meta = json.load(open(suite_json)) if os.path.exists(suite_json) else {}
    lines = [f"# {SUITE} at scale {SCALE}: {len(rows)} of 5 runs finished", "",
             f"Machine: {info.get('nvidia_smi') or info.get('devices')}; Python {info.get('python')}; "
             f"jax {info['packages'].get('jax')}, jaxlib {info['packages'].get('jaxlib')}, flax "
             f"{info['packages'].get('flax')}, optax {info['packages'].get('optax')}; devices {info.get('devices')}.",
             f"Commit {meta.get('commit', '?')}; --set {meta.get('set', {})}; whole command {total_s:.0f} s.", "",
             "wall: the run (results' wall_s); steps: tokens / tokens/s; other: train_wall_s - steps (compiling the "
             "train and eval steps, evaluations, checkpoints, data setup); tokens/s and MFU (tokens/s x model FLOPs "
             "per token / the device's peak, moejax.metrics.PEAK_FLOPS): medians over log windows.", "",
             "| method | wall s | steps s | other s | steps | tokens | tokens/s | MFLOP/token | MFU | val loss | "
             "bits/byte |", "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
             f"Sum of the runs' wall time {wall_sum:.0f} s, of which training steps {train_sum:.0f} s."]
    tables = os.path.join(work, "report", "tables.md")
    if os.path.exists(tables):
        lines += ["", "## Report (report/tables.md)", "", open(tables).read()]
    return "\n".join(lines) + "\n", len(rows)


def pack(work: str, out: str, extra: list[str]) -> str:
    """work (no checkpoints or TensorBoard events) and the `extra` files -> out/gpu_table1.tar.gz."""
    def keep(info: tarfile.TarInfo):
        parts = info.name.split("/")
        if "checkpoints" in parts or parts[-1].startswith("events.out.tfevents"):
            return None
        return info

    path = os.path.join(out, "gpu_table1.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        if os.path.isdir(work):
            tar.add(work, arcname=NAME, filter=keep)
        for f in extra:
            if os.path.exists(f):
                tar.add(f, arcname=f"{NAME}/{os.path.basename(f)}")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=os.path.expanduser, help="folder for the 5 output files (created)")
    p.add_argument("--download_wheels", default="", help="only fetch the wheels the GPU machine needs into this "
                   "folder (run it where pip reaches PyPI, before the device call)")
    p.add_argument("--work", default="/tmp/moejax_gpu_table1", help="scratch folder: wheels' site, the suite's "
                   "workdir (WORK/table1_gpu; an existing one is resumed)")
    p.add_argument("--wheels", default="", type=os.path.expanduser, help="folder of wheels to install first (the device call's .whl)")
    p.add_argument("--smoke", action="store_true", help=f"a 2-step run of a 1-layer model ({SMOKE})")
    p.add_argument("--budget_s", type=float, default=480.0, help="SIGTERM the suite this many seconds after the "
                   "start (the device call's limit is 600 s)")
    p.add_argument("--set", default="", help="further config overrides for every run, as run.py's --set")
    a = p.parse_args(argv)
    if a.download_wheels:
        download_wheels(a.download_wheels)
        return 0
    if not a.out:
        p.error("--out is required")
    start = time.time()
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.work, exist_ok=True)
    log = Log(os.path.join(a.out, "log.txt"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if a.smoke:  # XLA compiles the 5 small steps about 30% faster; speed is not measured here
        env.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    site = None
    if a.wheels:
        site = os.path.join(a.work, "site")
        install_wheels(a.wheels, site, log)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (site, env.get("PYTHONPATH", "")) if x)
    info = record_machine(a.out, env, log)
    extra_set = ",".join(x for x in (SMOKE if a.smoke else "", a.set) if x)
    work = os.path.join(a.work, NAME)
    code = run_suite(work, extra_set, env, start + a.budget_s, log)
    log(f"suite exit status {code}")
    report_ok = os.path.exists(os.path.join(work, "report", "tables.md"))
    if not report_ok and os.path.exists(os.path.join(work, "suite.json")):
        done = subprocess.run([sys.executable, "-m", "experiments.deepseekmoe.report", f"--workdir={work}"],
                              capture_output=True, text=True, env=env, cwd=REPO)
        log(f"report of the finished runs: exit status {done.returncode} {done.stdout.strip()} {done.stderr[-2000:]}")
    summary, finished = summarise(work, time.time() - start, info)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(summary)
    log(summary)
    extra = [os.path.join(a.out, n) for n in ("summary.md", "log.txt", "env.json", "nvidia-smi.txt")]
    log(f"packed {pack(work, a.out, extra)} ({time.time() - start:.0f} s in all)")
    return 0 if code == 0 and finished == 5 and report_ok else 1


if __name__ == "__main__":
    sys.exit(main())
