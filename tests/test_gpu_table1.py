"""experiments/deepseekmoe/gpu_table1.py, the one-command GPU run of Table 1, end to end on CPU with --smoke (2
steps of a 1-layer model per method): it trains the five methods, writes results, report, summary and the
machine record, and packs them into the flat files the device tool brings back. 60 s on 2 idle CPU cores
(85 s with XLA:CPU's fusion emitters, which the GPU machine's jaxlib uses; tests/conftest.py LEGACY_EMITTERS)."""
import json
import os
import pathlib
import subprocess
import sys
import tarfile

from tests.conftest import LEGACY_EMITTERS

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("dense", "hash", "switch", "gshard", "deepseekmoe")


def test_smoke_run_writes_results_report_and_pack(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "XLA_FLAGS": LEGACY_EMITTERS}  # one CPU device, as on the GPU machine
    p = subprocess.run([sys.executable, "-m", "experiments.deepseekmoe.gpu_table1", "--smoke", f"--out={out}",
                        f"--work={work}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    files = set(os.listdir(out))
    assert {"gpu_table1.tar.gz", "summary.md", "log.txt", "env.json"} <= files <= {
        "gpu_table1.tar.gz", "summary.md", "log.txt", "env.json", "nvidia-smi.txt"}
    assert all((out / f).is_file() for f in files), "flat files only: the device tool brings back 2 folders deep"
    env_json = json.loads((out / "env.json").read_text())
    assert env_json["jax_backend"] == "cpu" and not env_json["import_errors"] and env_json["packages"]["jax"]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# table1 at scale gpu: 5 of 5 runs finished")
    assert all(f"| {m} |" in summary for m in METHODS) and "## Report" in summary
    with tarfile.open(out / "gpu_table1.tar.gz") as tar:
        names = set(tar.getnames())
        suite = json.load(tar.extractfile("table1_gpu/suite.json"))
    assert {f"table1_gpu/results/{m}-seed0.json" for m in METHODS} <= names
    assert {"table1_gpu/report/tables.md", "table1_gpu/summary.md", "table1_gpu/env.json"} <= names
    assert not any("checkpoints" in n or "tfevents" in n for n in names)
    assert (suite["suite"], suite["scale"], suite["set"]["train.steps"]) == ("table1", "gpu", 2)
