"""Compile the full training step ahead of time for a TPU topology, on any machine (libtpu, no TPU needed),
and report per-chip memory and FLOPs per step.

  python -m moejax.aot --config=configs/deepseekmoe_16b.py --topology=v5p:4x4x4 \\
      [--mesh=fsdp=16,expert=4] [--config.train.grad_accum=8] [--json=report.json]

What is compiled is exactly what `moejax.train.Trainer` runs: `Trainer.lower_train_step` (forward, backward
over train.grad_accum micro-batches in a lax.scan, AdamW update, aux-free bias update) on the global batch
[data.batch_size, data.seq_len], with parameters, optimiser state and batch sharded over the mesh
(config.mesh, or --mesh: named axes, the unnamed ones 1 except data = the remaining devices). Routed experts
use the TPU backends ('auto' picks the Pallas grouped matmul; dropless expert parallelism uses ragged_all_to_all).

Memory (per chip, from the compiled executable's memory analysis): arguments (state + batch), outputs,
temporaries, aliased (the donated state reused for the new state); total = arguments + outputs + temporaries
- aliased, compared with the chip's HBM (HBM_GIB). FLOPs: the compiler's count for one chip, corrected for
the micro-batch scan (XLA counts a loop body once: see `compile_report`), next to the analytic model FLOPs
(moejax.metrics.flops_per_token: 6 N_active + attention, no rematerialisation).

Bad input (unknown topology, a mesh that does not match the chip count, a batch the mesh and grad_accum do
not divide, experts the expert axis does not divide, a config key the config does not have) and a step
that does not fit in HBM end with a one-line error and exit status 1.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

GIB = 2**30
# HBM per chip, GiB, from Google Cloud's TPU pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e: 32, 16,
# 95 and 32 GB), keyed by the device_kind libtpu reports. The TPU compiler's own limit differs a little
# (its out-of-memory errors give 15.75 GiB usable on v5e, 95.74 GiB on v5p); it refuses to compile a step
# whose buffers exceed that, else `fits` compares the compiled step's total with this table.
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
KNOWN_EXAMPLES = ("v5p:4x4x4", "v5e:2x2", "v4:2x2x1", "v6e:2x2")


class CompileError(RuntimeError):
    """Tracing or compiling the train step failed (a moejax or XLA problem, or a step far beyond HBM)."""


def topology_devices(topology: str) -> list:
    """The devices of a TPU topology such as 'v5p:4x4x4' (libtpu's description; no TPU needed)."""
    from jax.experimental import topologies

    if not re.fullmatch(r"[a-zA-Z0-9_ ]+[:=_][0-9]+(x[0-9]+)*", topology or ""):
        raise ValueError(f"--topology={topology!r} is invalid; allowed: GENERATION:SHAPE, e.g. "
                         f"{', '.join(KNOWN_EXAMPLES)}")
    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as e:  # libtpu raises JaxRuntimeError (INVALID_ARGUMENT) for names it does not know
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--topology={topology!r} is not a TPU topology libtpu knows ({detail}); allowed: e.g. "
                         f"{', '.join(KNOWN_EXAMPLES)}") from e


def hbm_bytes(devices) -> int:
    """HBM per device: the chip's HBM (HBM_GIB) shared by the devices on one chip (v4: 2 cores = 2 devices
    per chip in a topology description). ValueError for a device kind not in HBM_GIB."""
    kind = devices[0].device_kind
    if kind not in HBM_GIB:
        raise ValueError(f"no HBM size known for device kind {kind!r}; known: {tuple(HBM_GIB)}")
    return HBM_GIB[kind] * GIB // _devices_per_chip(devices)


def _devices_per_chip(devices) -> int:
    return max(1, len(devices) // len({tuple(d.coords) for d in devices}))


def parse_mesh(text: str | None) -> dict | None:
    """'data=4,expert=16' -> {'data': 4, 'expert': 16}; None for None or ''."""
    from moejax import sharding

    if not text:
        return None
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in sharding.MESH_AXES or not re.fullmatch(r"-?[0-9]+", value.strip()):
            raise ValueError(f"--mesh={text!r} is invalid; allowed: comma-separated AXIS=SIZE with AXIS in "
                             f"{sharding.MESH_AXES} and SIZE an integer (-1: the remaining devices)")
        out[name] = int(value)
    return out


def mesh_config(run_mesh, override: dict | None):
    """The MeshConfig: the config's, or `override`'s axes with unnamed axes 1 but data -1 (the remaining
    devices) unless another axis is -1."""
    from moejax import sharding

    if not override:
        return run_mesh
    base = {"data": 1 if -1 in override.values() else -1, "fsdp": 1, "expert": 1, "tensor": 1}
    return sharding.MeshConfig(**{**base, **override})


def vocab_size(run) -> int:
    """config.model.vocab_size if > 0, else the tokenizer's (no data is read)."""
    from moejax import tokenizer as tokenizer_lib

    if run.vocab_size:
        return run.vocab_size
    if run.data.tokenizer == "byte":
        return tokenizer_lib.ByteTokenizer.vocab_size
    path = os.path.expanduser(run.data.tokenizer)
    if not os.path.isfile(path):
        raise ValueError(f"config.data.tokenizer={run.data.tokenizer!r} does not exist and config.model.vocab_size is "
                         f"0; pass --config.model.vocab_size=N (the tokenizer's vocabulary) to compile without it")
    return tokenizer_lib.SentencePieceTokenizer(path).vocab_size


def compile_report(config, topology: str, mesh_override: dict | None = None, return_compiled: bool = False):
    """Compile one training step of experiment `config` (moejax.config layout) for TPU `topology` and
    return its report (memory per chip in bytes, FLOPs per step).

    FLOPs: XLA's cost analysis counts the body of a loop once, whatever its trip count (checked in
    tests/test_aot.py: grad_accum 1 and 2 at the same micro-batch give the same count). The train step runs
    forward + backward in a lax.scan over grad_accum micro-batches, so flops_per_chip = grad_accum x the
    compiler's count; this counts the optimiser update (outside the scan, ~10 FLOPs per parameter on this
    chip's shard) grad_accum times, negligible against 6 N_active FLOPs per token. flops_per_chip includes
    what rematerialisation recomputes and every row of the static MoE dispatch buffers (padding, and under
    expert parallelism the receive buffer of D x the rows); model_flops_per_chip (analytic, moejax.metrics:
    6 N_active + 12 L d S per token) counts neither. compile_s: tracing, lowering and compiling.
    return_compiled: (report, the compiled step) for callers that read more of it (its cost analysis).
    With model.scan_layers the compiler counts the scanned layer once, not once per layer, so the FLOPs
    fields are None (compile with model.scan_layers=False to count them); memory is unaffected.
    """
    from moejax import config as config_lib
    from moejax import metrics
    from moejax import sharding
    from moejax import train as train_lib

    devices = topology_devices(topology)
    run = config_lib.to_typed(config)
    mcfg = mesh_config(run.mesh, mesh_override)
    mesh = sharding.make_mesh(mcfg, devices)  # ValueError if the axes do not multiply to len(devices)
    batch, seq_len, accum = run.data.batch_size, run.data.seq_len, run.train.grad_accum
    sharding.require_batch(batch, mesh, accum)
    model_config = run.model_config(vocab_size(run))
    trainer = train_lib.Trainer(model_config, run.train, run.seed, mesh)  # ValueError: experts vs expert axis

    start = time.perf_counter()
    try:
        compiled = trainer.lower_train_step(batch, seq_len).compile()
    except Exception as e:  # not a config error: keep the traceback (main re-raises all but out-of-HBM)
        raise CompileError(f"compiling the train step for {topology} failed: {e}") from e
    compile_s = time.perf_counter() - start

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n = len(devices)
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    temps, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
    total = args + outs + temps - alias
    hbm = hbm_bytes(devices)
    scanned = model_config.scan_layers and model_config.n_layers > model_config.first_k_dense
    compiler_flops = None if scanned else float(cost.get("flops", 0.0))
    params = metrics.active_params(model_config)
    model_flops = metrics.flops_per_token(model_config, seq_len) * batch * seq_len
    report = {
        "topology": topology,
        "device_kind": devices[0].device_kind,
        "chips": n // _devices_per_chip(devices),
        "devices": n,
        "mesh": dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
        "batch": batch,
        "seq_len": seq_len,
        "grad_accum": accum,
        "remat": model_config.remat,
        "argument_bytes": int(args),
        "output_bytes": int(outs),
        "temp_bytes": int(temps),
        "alias_bytes": int(alias),
        "total_bytes": int(total),
        "hbm_bytes": int(hbm),
        "fits": bool(total <= hbm),
        "scan_layers": bool(scanned),
        "compiler_flops_per_chip": compiler_flops,
        "flops_per_chip": None if scanned else compiler_flops * accum,
        "flops_total": None if scanned else compiler_flops * accum * n,
        "model_flops_per_chip": model_flops / n,
        "model_flops_total": model_flops,
        "active_params": sum(params.values()),
        "compile_s": compile_s,
    }
    return (report, compiled) if return_compiled else report


def format_report(r: dict) -> str:
    """The report as a few aligned lines (GiB, TFLOPs)."""
    g = lambda b: f"{b / GIB:.2f} GiB"
    mesh = ", ".join(f"{k}={v}" for k, v in r["mesh"].items())
    per = "device" if r["devices"] != r["chips"] else "chip"
    return "\n".join([
        f"{r['topology']}: {r['chips']} x {r['device_kind']} ({r['devices']} devices), mesh ({mesh})",
        f"step: batch {r['batch']} x {r['seq_len']} tokens, grad_accum {r['grad_accum']}, remat {r['remat']}, "
        f"compiled in {r['compile_s']:.1f} s",
        f"memory per {per}: arguments {g(r['argument_bytes'])}, outputs {g(r['output_bytes'])}, temporaries "
        f"{g(r['temp_bytes'])}, aliased {g(r['alias_bytes'])}",
        f"  total {g(r['total_bytes'])} of {g(r['hbm_bytes'])} HBM: {'fits' if r['fits'] else 'DOES NOT FIT'}",
        (f"FLOPs per step: {r['flops_per_chip'] / 1e12:.1f} TFLOPs per {per}, {r['flops_total'] / 1e15:.2f} PFLOPs "
         f"total as compiled (grad_accum x the compiler's count)" if r["flops_per_chip"] is not None else
         "FLOPs as compiled: not counted with model.scan_layers (the compiler counts a scanned layer once; "
         "--config.model.scan_layers=False counts them)")
        + f"; model 6N + attention {r['model_flops_per_chip'] / 1e12:.1f} TFLOPs per {per}",
    ])


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    if not f["verbosity"].present:  # jax logs at INFO that the (absent) local TPU did not initialise
        logging.set_verbosity(logging.WARNING)
    if f.json:  # before the compile, which can take minutes
        where = os.path.dirname(os.path.abspath(f.json))
        if not os.path.isdir(where) or not os.access(where, os.W_OK):
            sys.exit(f"moejax: error: --json={f.json}: {where} is not a directory you can write to; allowed: a "
                     f"file path in an existing writable directory")
    try:
        r = compile_report(f.config, f.topology, parse_mesh(f.mesh))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"moejax: error: {e}")
    except CompileError as e:  # the TPU compiler rejects a step far beyond HBM (RESOURCE_EXHAUSTED)
        if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
            raise
        text = str(e.__cause__ or e)
        first = next((l.strip() for l in text.splitlines() if "memory" in l.lower()), text.splitlines()[0])
        sys.exit(f"moejax: error: the step does not fit in HBM on {f.topology} (compiler: {first})")
    print(format_report(r))
    if f.json:
        with open(f.json, "w") as out:
            json.dump(r, out, indent=1)
    if not r["fits"]:
        sys.exit(f"moejax: error: the step needs {r['total_bytes'] / GIB:.2f} GiB per device but a "
                 f"{r['device_kind']} device has {r['hbm_bytes'] / GIB:.2f} GiB of HBM; raise train.grad_accum, set "
                 f"model.remat=True, or split parameters over more devices (--mesh=fsdp=...)")


def run():
    config_flags.DEFINE_config_file("config", None, "Experiment config file, optionally :arg.")
    flags.DEFINE_string("topology", None, f"TPU topology, e.g. {', '.join(KNOWN_EXAMPLES)}.")
    flags.DEFINE_string("mesh", None, "Mesh axes AXIS=SIZE,... (default: config.mesh); unnamed axes are 1, data "
                        "the remaining devices.")
    flags.DEFINE_string("json", None, "Write the report as JSON to this file.")
    flags.mark_flags_as_required(["config", "topology"])
    from moejax import config as config_lib

    app.run(main, flags_parser=config_lib.parse_cli_flags)


if __name__ == "__main__":
    run()
