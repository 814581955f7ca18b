"""Multi-process training on one machine: 2 CPU processes of 4 simulated devices each (jax.distributed over
localhost, gloo collectives) train the tiny DeepSeekMoE with its routed experts split over the 8 devices of
both processes (mesh expert=8), checkpoint into one shared workdir, and resume: on 2 processes (the same
losses exactly) and on 1 process of 8 devices on another mesh (the checkpoint resharded; the same losses to
float32 rounding). ~100 s on 2 CPU cores: every launch compiles the model again, in each process.

The processes run `python -m tests.multihost_worker` (moejax.main with test-only knobs, see there). Their
documents are short and their shuffle window is one step's rows, so their data iterator states differ after
step 1 (as in any run longer than its first 1024 rows per process): a process resuming from another
process's state computes other losses. One test function, not several sharing a fixture: pytest-xdist
(`-n 2` in CI) would run a module fixture once per worker.
"""
import json
import os
import pathlib
import resource
import shutil
import socket
import subprocess
import sys
import sysconfig
import time

import numpy as np

from moejax import metrics as metrics_lib
from tests.tolerances import F32
from tests.conftest import FAST_COMPILE

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE1 = ROOT / "configs" / "deepseekmoe_table1.py"
STEPS, SAVE_EVERY = 4, 2
ROWS_PER_PROCESS = 4  # batch_size 8 over 2 processes


def make_corpus(root: pathlib.Path) -> None:
    """160 documents of 40 to 600 bytes of standard-library source: each process crosses documents every
    step (64-token rows, 4 per process)."""
    root.mkdir(parents=True)
    text = "".join(f.read_text() for f in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:4])
    start = 0
    for i in range(160):
        n = 40 + (i * 97) % 560
        (root / f"doc{i:03d}.txt").write_text(text[start:start + n])
        start += n


def _args(tmp, workdir, data=1, expert=8):
    """Tiny DeepSeekMoE (63 routed experts padded to 64 slots) on mesh data x expert (default expert=8: 8 slots
    per device, 32 per process); one layer, d 64, 8 x 64 tokens per step."""
    return ["-m", "tests.multihost_worker", f"--config={TABLE1}:method=deepseekmoe,scale=tiny", f"--workdir={workdir}",
            f"--config.mesh.data={data}", f"--config.mesh.expert={expert}", "--config.model.moe.pad_experts_to=8",
            "--config.data.source=text_dir", f"--config.data.text_dir={tmp / 'corpus'}",
            f"--config.data.tfds_data_dir={tmp / 'tfds'}", "--config.data.seq_len=64", "--config.data.batch_size=8",
            "--config.data.eval_steps=1", "--config.model.d_model=64", "--config.model.moe.d_ff=176", "--config.model.n_layers=1",
            f"--config.train.steps={STEPS}", "--config.train.warmup_steps=2", "--config.train.lr=0.003",
            "--config.train.log_every=1", "--config.train.eval_every=1000", f"--config.train.checkpoint_every={SAVE_EVERY}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(args, logdir, processes=2, devices=4, timeout=300, env=None) -> list[str]:
    """Run `python ARGS` as `processes` processes of `devices` CPU devices each (jax.distributed over localhost
    when processes > 1) and return each one's output. AssertionError with every process's output as soon as
    one exits with an error (the others are killed: a process whose peer died would wait for the distributed
    heartbeat timeout) or when the run exceeds `timeout` seconds."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
           "MOEJAX_TEST_SHUFFLE_WINDOW": str(ROWS_PER_PROCESS), **(env or {})}
    distributed = lambda i: [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
                             f"--process_id={i}"] if processes > 1 else []
    os.makedirs(logdir, exist_ok=True)
    logs = [open(os.path.join(logdir, f"process_{i}.log"), "w+") for i in range(processes)]
    t0, cpu0, failure = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN), None
    procs = [subprocess.Popen([sys.executable, *args, *distributed(i)], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    try:
        while failure is None and any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll()]
            if failed:
                failure = f"process {failed[0]} exited with status {procs[failed[0]].returncode}"
            elif time.time() - t0 > timeout:
                failure = f"timed out after {timeout} s"
            time.sleep(0.1)
        failed = [i for i, p in enumerate(procs) if p.poll()]
        if failure is None and failed:
            failure = f"process {failed[0]} exited with status {procs[failed[0]].returncode}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"[{processes} x {devices} devices: {time.time() - t0:.1f} s wall, "
          f"{cpu.ru_utime + cpu.ru_stime - cpu0.ru_utime - cpu0.ru_stime:.1f} s CPU]")
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if failure:
        shown = "\n".join(f"----- process {i} (exit status {p.returncode}) -----\n{out[-8000:]}"
                          for i, (p, out) in enumerate(zip(procs, outputs)))
        raise AssertionError(f"{failure}\n{shown}")
    return outputs


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if "loss" in r}


def saved_steps(workdir) -> list[int]:
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def copy_at_first_checkpoint(workdir, dest):
    """A copy of `workdir` as it was after step SAVE_EVERY: without the last checkpoint, metrics, events."""
    shutil.copytree(workdir, dest, ignore=lambda d, names: [n for n in names if n in (str(STEPS), "metrics.jsonl")
                                                            or n.startswith("events.out")])
    assert saved_steps(dest) == [SAVE_EVERY]


def test_two_processes_expert_parallel_train_checkpoint_resume(tmp_path):
    make_corpus(tmp_path / "corpus")

    # 1. Two processes train STEPS steps; both write their shards into the shared workdir.
    w = tmp_path / "w"
    out = launch(_args(tmp_path, w), tmp_path / "logs_train")
    assert f"{STEPS} steps, {STEPS * 8 * 64:,} tokens" in out[0] and "mesh {'data': 1, 'fsdp': 1, 'expert': 8" in out[0]
    reference = losses(w)  # metrics.jsonl: written by process 0 only, one row per step
    assert [r["step"] for r in metrics_lib.read_jsonl(w / "metrics.jsonl") if "loss" in r] == list(range(1, STEPS + 1))
    assert all(np.isfinite(v) for v in reference.values()), reference
    assert saved_steps(w) == [SAVE_EVERY, STEPS]
    for step in (SAVE_EVERY, STEPS):
        ckpt = w / "checkpoints" / str(step)
        # each process wrote its own array shards (process 1: its 32 of the 64 expert slots) ...
        assert (ckpt / "state" / "ocdbt.process_0").is_dir() and (ckpt / "state" / "ocdbt.process_1").is_dir()
        # ... and its own data iterator position, which differs from the other's (it reads other documents)
        data = [(ckpt / "data" / f"process_{i}-of-2.json").read_text() for i in (0, 1)]
        assert data[0] != data[1]

    # 2. Both processes resume from step SAVE_EVERY: the uninterrupted run's losses, exactly.
    r = tmp_path / "resume2"
    copy_at_first_checkpoint(w, r)
    out = launch(_args(tmp_path, r), tmp_path / "logs_resume2")
    assert f"resumed from step {SAVE_EVERY}" in out[0]
    resumed = losses(r)
    assert sorted(resumed) == list(range(SAVE_EVERY + 1, STEPS + 1))
    assert resumed == {s: reference[s] for s in resumed}
    assert saved_steps(r) == [SAVE_EVERY, STEPS]

    # 3. One process of 8 devices on mesh data=2 x expert=4 (each device now holds 16 expert slots written by
    # either process) restores the same checkpoint, resharded by orbax. It reads the rows of both processes
    # in process order (MOEJAX_TEST_EMULATE_PROCESSES=2, its iterator state made of the two saved states), so
    # it sees the same global batches: the same losses up to float32 rounding (other collectives, other
    # summation order).
    r = tmp_path / "resume1"
    copy_at_first_checkpoint(w, r)
    data = r / "checkpoints" / str(SAVE_EVERY) / "data"
    states = [json.loads((data / f"process_{i}-of-2.json").read_text()) for i in (0, 1)]
    (data / "process_0-of-1.json").write_text(json.dumps({"processes": states}))
    out = launch(_args(tmp_path, r, data=2, expert=4), tmp_path / "logs_resume1", processes=1, devices=8,
                 env={"MOEJAX_TEST_EMULATE_PROCESSES": "2"})
    assert f"resumed from step {SAVE_EVERY}" in out[0] and "mesh {'data': 2, 'fsdp': 1, 'expert': 4" in out[0]
    resumed = losses(r)
    assert sorted(resumed) == list(range(SAVE_EVERY + 1, STEPS + 1))
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)], [reference[s] for s in sorted(resumed)], **F32)
