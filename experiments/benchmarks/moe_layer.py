"""MoE layer speed and memory against a dense SwiGLU FFN of the same active width (K * f).

Run:  python3 -m experiments.benchmarks.moe_layer [--json FILE] [--quick] [--dtype {float32,bfloat16}]

For each shape, dispatch mode and expert backend this times one jitted forward + backward step of
`moejax.moe.MoE` (loss = sum(y * ct) + stats.loss, gradients w.r.t. x and every parameter, functional
split/merge) and divides it by the same step of a dense SwiGLU FFN of width K * f (`model_config.dense`) on the
same tokens. The machine may be shared, so each row's runs alternate call by call with dense runs, and
the ratio is median(row) / median(those dense runs); each step is compiled once, then warmed up once.
The JSON rows also hold process CPU time (user + sys, all threads) and its ratio, which load from other
processes disturbs less than wall time (but which hides differences in parallelism).
Rows take the median of `--repeats` runs; 'ragged_dot' (whose CPU lowering multiplies every row by
every expert) gets 1 warm-up + 1 timed run. Memory is XLA's compiled temp allocation
(`memory_analysis().temp_size_in_bytes`) of the same step at T and at 4 T tokens (compiled, never
run). A step whose temp memory exceeds --max-run-gib (default: half the free memory, `common.available_mib`:
the device's on GPU and TPU, MemAvailable on CPU) is not run.

Expert backends: 'einsum', 'blocked' and 'ragged_dot' everywhere (dropless 'einsum': the capacity part of the
buffer by batched einsum, the assignments past C = ceil(T K / E) rows of their expert in a loop; the row
records that overflow's fraction of the assignments); dropless 'pallas' (the Pallas grouped
matmul, pallas_kernels.gmm) only where jax.default_backend() is not 'cpu' (on CPU Pallas interprets its
kernels, so timing it there means nothing; experiments/benchmarks/gmm.py times the kernels alone).

Shapes (float32 by default; --dtype bfloat16 makes x and the cotangent bfloat16, so the layer's expert
matmuls run in bfloat16 while parameters and router math stay float32; the loss is summed in float32):
  a  OLMoE-like fine-grained: T = 4096 (B=4, S=1024), d=512, E=64, K=8, f=128 (active width 1024).
  b  Mixtral-like:            T = 4096 (B=4, S=1024), d=512, E=8,  K=2, f=512 (active width 1024),
                              gates renormalised over the K picks.
Routers are softmax top-K with all loss coefficients 0, so timings are of dispatch + experts + combine.
Expected (2-core CPU, 24 GB, JAX 0.10.2): dense ~130 ms at T=4096; full run ~4 min (shape a's ragged_dot
rows need ~16 GiB temp and are compiled only), --quick < 60 s.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.benchmarks import common
from moejax import dispatch as dispatch_lib, moe
from moejax import model_config

MiB = 2.0 ** 20


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    B: int
    S: int
    d: int
    E: int
    K: int
    f: int
    normalize: bool = False

    @property
    def T(self) -> int:
        return self.B * self.S


FULL_SHAPES = (
    Shape("a: E64 K8 f128", B=4, S=1024, d=512, E=64, K=8, f=128),
    Shape("b: E8 K2 f512", B=4, S=1024, d=512, E=8, K=2, f=512, normalize=True),
)
QUICK_SHAPES = (
    Shape("a: E16 K4 f32 (quick)", B=2, S=128, d=64, E=16, K=4, f=32),
    Shape("b: E4 K2 f64 (quick)", B=2, S=128, d=64, E=4, K=2, f=64, normalize=True),
)


def variants(quick: bool) -> list[tuple[str, str, dict]]:
    """(dispatch, backend, extra MoEConfig fields) for every benchmarked combination; --quick keeps one
    capacity factor and one block size (every backend and dispatch path still runs)."""
    out = []
    for backend in ("einsum", "blocked", "ragged_dot"):
        for cf in ((1.25,) if quick else (1.0, 1.25)):
            out.append(("capacity", backend, dict(capacity_factor=cf)))
    for block in ((16,) if quick else (64, 128, 256)):
        out.append(("dropless", "blocked", dict(block_size=block)))
    out.append(("dropless", "ragged_dot", {}))
    out.append(("dropless", "einsum", {}))  # capacity rows by einsum + the overflow loop (the CPU default)
    if jax.default_backend() != "cpu":  # Pallas only interprets on CPU
        out.append(("dropless", "pallas", {}))
    return out


def overflow_fraction(config: model_config.MoEConfig, x: jax.Array) -> float:
    """Fraction of the layer's assignments past C = ceil(T K / E) rows of their expert (run by dropless
    'einsum' in its overflow loop), for the router as make_step initialises it (seed 0) on x [B, S, d]."""
    r = moe.MoE(config, rngs=nnx.Rngs(0)).route(x)
    counts = np.bincount(np.asarray(r.expert_ids)[np.asarray(r.mask)], minlength=config.n_experts)
    C = dispatch_lib.capacity(counts.sum() // config.top_k, config.top_k, config.n_experts, 1.0)
    return float(np.maximum(counts - C, 0).sum() / counts.sum())


def make_step(config: model_config.MoEConfig, seed: int = 0):
    """(jitted value_and_grad step(params, x, ct), params): the functional split/merge train-step style."""
    graphdef, params = nnx.split(moe.MoE(config, rngs=nnx.Rngs(seed)))

    def loss(params, x, ct):
        y, stats = nnx.merge(graphdef, params)(x)
        return jnp.sum((y * ct).astype(jnp.float32)) + stats.loss

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def inputs(shape: Shape, dtype=jnp.float32):
    """(x, ct) [B, S, d] in dtype."""
    T = shape.T
    kx, kc = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (shape.B, T // shape.B, shape.d), jnp.float32)
    ct = jax.random.normal(kc, x.shape, jnp.float32) / shape.d ** 0.5
    return x.astype(dtype), ct.astype(dtype)


def compile_step(step, params, shape: Shape, T: int, dtype=jnp.float32):
    """Compiled executable of the step at T tokens (inputs given as shape specs, nothing runs)."""
    spec = jax.ShapeDtypeStruct((shape.B, T // shape.B, shape.d), dtype)
    return step.lower(params, spec, spec).compile()


def temp_mib(compiled) -> float:
    ma = compiled.memory_analysis()
    return ma.temp_size_in_bytes / MiB if ma is not None else float("nan")


def time_paired(fn, baseline, args, base_args, repeats: int):
    """(wall, cpu) ms lists of fn and of the dense baseline, alternating call by call after one warm-up
    of each (`common.round_robin`), so that load from other processes hits both sides of the ratio alike."""
    ts, bs = common.round_robin([(fn, args), (baseline, base_args)], repeats)
    return [t for t, _ in ts], [c for _, c in ts], [t for t, _ in bs], [c for _, c in bs]


def config_for(shape: Shape, dispatch: str | None, backend: str | None, extra: dict) -> model_config.MoEConfig:
    if dispatch is None:
        return model_config.dense(shape.d, shape.K * shape.f)
    return model_config.MoEConfig(shape.d, shape.f, n_experts=shape.E, top_k=shape.K, normalize=shape.normalize,
                         dispatch=dispatch, backend=backend, **extra)


def measure(shape: Shape, dispatch, backend, extra, dense, repeats: int, max_run_mib: float, log,
            dtype=jnp.float32) -> dict:
    """One row. dense: (compiled dense step, its args), run alternately with this row's step."""
    step, params = make_step(config_for(shape, dispatch, backend, extra))
    x, ct = inputs(shape, dtype)
    t0 = time.perf_counter()
    compiled = compile_step(step, params, shape, shape.T, dtype)
    compile_ms = (time.perf_counter() - t0) * 1e3
    big_T = 4 * shape.T
    row = dict(
        shape=shape.name, T=shape.T, d=shape.d, E=shape.E, K=shape.K, f=shape.f, dtype=jnp.dtype(dtype).name,
        dispatch=dispatch or "dense", backend=backend or "swiglu",
        cf=extra.get("capacity_factor"), block=extra.get("block_size"), compile_ms=compile_ms,
        temp_mib=temp_mib(compiled), temp_mib_big=temp_mib(compile_step(step, params, shape, big_T, dtype)),
        T_big=big_T,
    )
    if dispatch == "dropless" and backend == "einsum":
        row["overflow_fraction"] = overflow_fraction(config_for(shape, dispatch, backend, extra), x)
    reps = 1 if backend == "ragged_dot" else repeats
    if row["temp_mib"] > max_run_mib:
        row.update(time_ms=float("nan"), dense_ms=float("nan"), ratio_vs_dense=float("nan"), times_ms=[],
                   dense_times_ms=[], cpu_ms=float("nan"), dense_cpu_ms=float("nan"), cpu_ratio_vs_dense=float("nan"),
                   runs=f"not run: temp {row['temp_mib'] / 1024:.1f} GiB > --max-run-gib {max_run_mib / 1024:.1f}")
    else:
        args = (params, x, ct)
        ts, cs, bs, bcs = time_paired(compiled, dense[0], args, dense[1], reps)
        row.update(time_ms=statistics.median(ts), dense_ms=statistics.median(bs), times_ms=ts, dense_times_ms=bs,
                   cpu_ms=statistics.median(cs), dense_cpu_ms=statistics.median(bcs),
                   cpu_ratio_vs_dense=statistics.median(cs) / statistics.median(bcs),
                   runs=f"1 warm-up + {reps} timed" + (" (ragged_dot: CPU lowering is dense over experts)"
                                                       if backend == "ragged_dot" else ""))
        row["ratio_vs_dense"] = row["time_ms"] / row["dense_ms"]
    over = f" overflow {row['overflow_fraction']:.3f}" if "overflow_fraction" in row else ""
    log(f"  {row['dispatch']:8s} {row['backend']:10s} cf={row['cf']} block={row['block']}{over}: "
        f"{row['time_ms']:9.1f} ms vs dense {row['dense_ms']:7.1f} ms = {row['ratio_vs_dense']:6.2f}x "
        f"(cpu-time ratio {row['cpu_ratio_vs_dense']:5.2f}x)  "
        f"({row['runs']}; compile {compile_ms:.0f} ms)  temp {row['temp_mib']:.1f} / {row['temp_mib_big']:.1f} MiB")
    return row


def run(quick: bool, repeats: int, max_run_gib: float | None = None, log=print, dtype=jnp.float32) -> list[dict]:
    """All rows, x and ct in dtype. Every MoE row's ratio is against dense runs interleaved with its own
    runs; the dense row itself is the median of all those dense runs. Steps whose compiled temp memory
    exceeds max_run_gib (default: half the memory available at start) are compiled but not run."""
    max_run_mib = max_run_gib * 1024 if max_run_gib is not None else 0.5 * common.available_mib()
    rows = []
    for shape in (QUICK_SHAPES if quick else FULL_SHAPES):
        log(f"shape {shape}")
        dstep, dparams = make_step(config_for(shape, None, None, {}))
        dx, dct = inputs(shape, dtype)
        dcompiled = compile_step(dstep, dparams, shape, shape.T, dtype)
        dense = (dcompiled, (dparams, dx, dct))
        shape_rows = [measure(shape, dsp, be, extra, dense, repeats, max_run_mib, log, dtype)
                      for dsp, be, extra in variants(quick)]
        all_dense = [t for r in shape_rows for t in r["dense_times_ms"]]
        if not all_dense:  # every MoE row was skipped: time the dense step on its own
            _, _, all_dense, cpus = time_paired(dcompiled, dcompiled, dense[1], dense[1], repeats)
            for r in shape_rows:
                r["dense_cpu_ms"] = statistics.median(cpus)
        dense_ms = statistics.median(all_dense)
        rows.append(dict(
            shape=shape.name, T=shape.T, d=shape.d, E=shape.E, K=shape.K, f=shape.f, dtype=jnp.dtype(dtype).name,
            dispatch="dense",
            backend="swiglu", cf=None, block=None, time_ms=dense_ms, dense_ms=dense_ms, ratio_vs_dense=1.0,
            times_ms=all_dense, dense_times_ms=all_dense, cpu_ratio_vs_dense=1.0,
            cpu_ms=statistics.median([r["dense_cpu_ms"] for r in shape_rows if r["dense_cpu_ms"] == r["dense_cpu_ms"]]),
            runs=f"{len(all_dense)} dense runs interleaved with the rows below "
            f"(min {min(all_dense):.1f}, max {max(all_dense):.1f})",
            temp_mib=temp_mib(dcompiled),
            temp_mib_big=temp_mib(compile_step(dstep, dparams, shape, 4 * shape.T, dtype)),
            T_big=4 * shape.T))
        rows.extend(shape_rows)
    return rows


def table(rows: list[dict]) -> str:
    big = rows[0]["T_big"] if rows else 0
    small = rows[0]["T"] if rows else 0
    head = (f"| shape | dispatch | backend | cf/block | time ms | ratio vs dense | temp MiB @{small} "
            f"| temp MiB @{big} | runs |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        knob = f"cf {r['cf']}" if r["cf"] is not None else (f"block {r['block']}" if r["block"] else "-")
        ran = r["time_ms"] is not None and r["time_ms"] == r["time_ms"]  # not NaN (null in a saved JSON)
        t = f"{r['time_ms']:.1f}" if ran else "-"
        ratio = f"{r['ratio_vs_dense']:.2f}x" if ran else "-"
        lines.append(f"| {r['shape']} | {r['dispatch']} | {r['backend']} | {knob} | {t} | {ratio} "
                     f"| {r['temp_mib']:.1f} | {r['temp_mib_big']:.1f} | {r['runs']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
    p.add_argument("--quick", action="store_true", help="tiny shapes and 1 repeat (smoke test, < 60 s)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 7; 1 with --quick)")
    p.add_argument("--max-run-gib", type=float, default=None,
                   help="compile but do not run steps needing more temp memory (default: half the free memory)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of x and the cotangent, hence of the expert matmuls (parameters stay float32)")
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 7)
    print(common.machine_line(), f"dtype {args.dtype}", flush=True)
    rows = run(args.quick, repeats, args.max_run_gib, log=lambda s: print(s, flush=True), dtype=jnp.dtype(args.dtype))
    print()
    print(table(rows))
    if args.json:
        common.write_json(args.json, rows)


if __name__ == "__main__":
    main()
