"""Pallas grouped matmul (pallas_kernels.gmm, tgmm) against jax.lax.ragged_dot and a dense matmul of the
same useful FLOPs, at MoE expert shapes.

Run:  python3 -m experiments.benchmarks.gmm [--json FILE] [--smoke] [--repeats N] [--allow-cpu]
                                             [--models NAME,...] [--tokens T,...]

Cases (bfloat16 inputs and outputs, float32 accumulation): the two expert matmuls of a SwiGLU MoE layer
over its T K dispatched rows sorted by expert (m = T K rows, G = E groups):
  w_in:   rows [m, d] x [E, d, 2f] -> [m, 2f]      w_down: rows [m, f] x [E, f, d] -> [m, d]
  deepseekmoe-16b: d 2048, f 1408, E 64, top-6;    mixtral-8x7b: d 4096, f 14336, E 8, top-2;
at T = 16384 and 65536 tokens, each with two group-size distributions:
  balanced: every expert gets T K / E rows;
  zipf1.2:  each token picks K distinct experts, expert i (0-based) with weight (i + 1)^-1.2 (Gumbel top-K,
            i.e. drawing without replacement; numpy default_rng(0)). The sizes sum to T K and no expert
            gets more than T rows. deepseekmoe: 0.91 T rows (9.7x the mean) down to 0.016 T; mixtral:
            0.71 T (2.8x the mean) down to 0.085 T.
Operations, each one jitted call, with its useful FLOPs (only the sum(group_sizes) = m rows count):
  fwd      lhs [m, k] x rhs[group] [k, n] -> [m, n]             2 m k n
           pallas: gmm;  ragged_dot: jax.lax.ragged_dot;  dense: lhs @ rhs[0] ([m, k] x [k, n])
  wgrad    per-group lhs^T ct -> [G, k, n]                      2 m k n
           pallas: tgmm;  ragged_dot: its vjp w.r.t. rhs;  dense: lhs^T @ ct ([k, m] x [m, n])
  fwd+bwd  value_and_grad of sum(out * ct) w.r.t. lhs and rhs  6 m k n
           pallas: gmm (backward: gmm + tgmm);  ragged_dot;  dense
TFLOP/s = useful FLOPs / median wall time of --repeats calls (default 10). The machine may be shared: all
calls of a case are compiled, run once each (the check below), then timed round-robin (`common.round_robin`:
one warm-up each, then rounds calling each once). 'vs dense' = TFLOP/s / the dense TFLOP/s of the same
operation in the same case (1.0: as fast as one dense matmul doing the same useful work).

Check: before timing, every Pallas result (fwd output, wgrad, both fwd+bwd gradients) is compared with
ragged_dot's: max |pallas - ragged_dot| / max |ragged_dot| must be <= 3e-2 (bfloat16) or 5e-3 (float32,
which GPUs may run as TF32); otherwise RuntimeError. The error is in each Pallas row ('max_rel_err').
Memory: a case whose inputs, or a call whose compiled output + temp memory (`memory_analysis()`), exceed
90% of the free memory (`common.available_mib`: device memory stats on GPU and TPU) is skipped with a note,
as is a call that fails with RESOURCE_EXHAUSTED.

--smoke: float32, m 256, k 128, n 256, 4 groups: sizes (160, 0, 64, 32) (one empty group) and zipf1.2 for
T 128, top-2; 2 repeats. On CPU Pallas runs the TPU kernels in interpret mode (a few seconds). Without
--smoke the benchmark refuses to run on CPU (timing interpreted kernels means nothing) unless --allow-cpu.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from experiments.benchmarks import common

MiB = 2.0 ** 20
ZIPF_S = 1.2
SEED = 0
OPS = ("fwd", "wgrad", "fwd+bwd")
IMPLS = ("dense", "pallas", "ragged_dot")  # dense first: the baseline
FLOPS_FACTOR = {"fwd": 1, "wgrad": 1, "fwd+bwd": 3}  # x 2 m k n
TOLERANCE = {"bfloat16": 3e-2, "float32": 5e-3}  # max |pallas - ragged_dot| / max |ragged_dot|


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    d: int
    f: int
    E: int
    K: int


MODELS = (Model("deepseekmoe-16b", d=2048, f=1408, E=64, K=6), Model("mixtral-8x7b", d=4096, f=14336, E=8, K=2))
TOKENS = (16384, 65536)


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    matmul: str
    T: int
    K: int
    groups: str
    sizes: tuple[int, ...]  # [G] rows per group
    m: int
    k: int
    n: int
    dtype: str

    @property
    def useful_flops(self) -> float:
        """2 sum(group_sizes) k n: one matmul of the rows that belong to a group."""
        return 2.0 * sum(self.sizes) * self.k * self.n


def group_sizes(dist: str, T: int, E: int, K: int) -> tuple[int, ...]:
    """[E] rows per expert for T tokens routed to K experts each, by the distributions of the docstring."""
    if dist == "balanced":
        q, r = divmod(T * K, E)
        return tuple(q + (i < r) for i in range(E))
    if dist != f"zipf{ZIPF_S}":
        raise ValueError(f"dist={dist!r}; allowed: 'balanced', 'zipf{ZIPF_S}'")
    rng = np.random.default_rng(SEED)
    keys = -ZIPF_S * np.log(np.arange(1, E + 1)) + rng.gumbel(size=(T, E))  # [T, E]
    picks = np.argpartition(-keys, K - 1, axis=1)[:, :K]  # [T, K]: K distinct experts per token
    return tuple(int(c) for c in np.bincount(picks.ravel(), minlength=E))


def cases(smoke: bool, models=MODELS, tokens=TOKENS) -> list[Case]:
    """The --smoke cases ([256, 128] x [4, 128, 256], float32), or every model x matmul x T x distribution."""
    if smoke:
        zipf = f"zipf{ZIPF_S}"
        return [Case("smoke", "tiny", 128, 2, g, s, 256, 128, 256, "float32")
                for g, s in (("one empty", (160, 0, 64, 32)), (zipf, group_sizes(zipf, 128, 4, 2)))]
    out = []
    for mdl in models:
        for T in tokens:
            for dist in ("balanced", f"zipf{ZIPF_S}"):
                sizes = group_sizes(dist, T, mdl.E, mdl.K)
                for matmul, k, n in (("w_in", mdl.d, 2 * mdl.f), ("w_down", mdl.f, mdl.d)):
                    out.append(Case(mdl.name, matmul, T, mdl.K, dist, sizes, T * mdl.K, k, n, "bfloat16"))
    return out


# ----- the calls ------------------------------------------------------------------------------------


def _loss(mm):
    """sum(mm(x, w, *rest) * ct) in float32, for value_and_grad w.r.t. x and w."""
    def loss(x, w, ct, *rest):
        return jnp.sum((mm(x, w, *rest) * ct).astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1))


def _ragged_wgrad(x, w, ct, gs):
    return jax.vjp(lambda w: jax.lax.ragged_dot(x, w, gs), w)[1](ct)[0]


def calls(lhs, rhs, ct, w, gs) -> dict[tuple[str, str], tuple]:
    """(impl, op) -> (jitted fn, args). lhs [m, k], rhs [G, k, n], ct [m, n], w = rhs[0] [k, n], gs [G]."""
    gmm, rdot = pallas_kernels.gmm, jax.lax.ragged_dot
    return {
        ("dense", "fwd"): (jax.jit(jnp.matmul), (lhs, w)),
        ("dense", "wgrad"): (jax.jit(lambda x, g: x.T @ g), (lhs, ct)),
        ("dense", "fwd+bwd"): (jax.jit(_loss(jnp.matmul)), (lhs, w, ct)),
        ("pallas", "fwd"): (jax.jit(gmm), (lhs, rhs, gs)),
        ("pallas", "wgrad"): (jax.jit(pallas_kernels.tgmm), (lhs, ct, gs)),
        ("pallas", "fwd+bwd"): (jax.jit(_loss(gmm)), (lhs, rhs, ct, gs)),
        ("ragged_dot", "fwd"): (jax.jit(rdot), (lhs, rhs, gs)),
        ("ragged_dot", "wgrad"): (jax.jit(_ragged_wgrad), (lhs, rhs, ct, gs)),
        ("ragged_dot", "fwd+bwd"): (jax.jit(_loss(rdot)), (lhs, rhs, ct, gs)),
    }


@jax.jit
def _rel_err(a, b):
    """max |a - b| / max |b| over the leaves (a fwd+bwd result: (loss, (d lhs, d rhs)); the loss is skipped)."""
    if isinstance(a, tuple):
        a, b = a[1], b[1]
    errs = [jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))) /
            jnp.maximum(jnp.max(jnp.abs(y.astype(jnp.float32))), 1e-30)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return jnp.max(jnp.stack(errs))


def _is_oom(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def inputs(case: Case):
    """(lhs [m, k], rhs [G, k, n], ct [m, n], w = rhs[0] [k, n], group_sizes [G] int32), rhs scaled by k^-1/2."""
    dt = jnp.dtype(case.dtype)
    k1, k2, k3 = jax.random.split(jax.random.key(SEED), 3)
    lhs = jax.random.normal(k1, (case.m, case.k), dt)
    rhs = jax.random.normal(k2, (len(case.sizes), case.k, case.n), dt) * jnp.asarray(case.k ** -0.5, dt)
    ct = jax.random.normal(k3, (case.m, case.n), dt)
    return lhs, rhs, ct, rhs[0], jnp.asarray(case.sizes, jnp.int32)


def input_mib(case: Case) -> float:
    G, m, k, n = len(case.sizes), case.m, case.k, case.n
    return (m * k + G * k * n + m * n + k * n) * jnp.dtype(case.dtype).itemsize / MiB


# ----- one case -------------------------------------------------------------------------------------


def measure(case: Case, repeats: int, log) -> list[dict]:
    """The rows of one case: every (impl, op) compiled, run once (the Pallas results checked against
    ragged_dot), then timed round-robin; skipped with a note where memory does not suffice."""
    dev = jax.devices()[0]
    base = dict(device=dev.device_kind, platform=jax.default_backend(), jax=jax.__version__, model=case.model,
                matmul=case.matmul, T=case.T, K=case.K, G=len(case.sizes), m=case.m, k=case.k, n=case.n,
                dtype=case.dtype, groups=case.groups, group_sizes=list(case.sizes), max_group=max(case.sizes),
                min_group=min(case.sizes), repeats=repeats)
    rows = {(impl, op): dict(base, impl=impl, op=op, useful_tflop=case.useful_flops * FLOPS_FACTOR[op] / 1e12,
                             time_ms=float("nan"), times_ms=[], tflops=float("nan"), vs_dense=float("nan"),
                             max_rel_err=None, compile_ms=float("nan"), mem_mib=float("nan"), note="")
            for op in OPS for impl in IMPLS}
    free = common.available_mib()
    if input_mib(case) > 0.9 * free:
        for r in rows.values():
            r["note"] = f"skipped: inputs need {input_mib(case):.1f} MiB, {free:.1f} MiB free"
        log(f"  {rows['dense', 'fwd']['note']}")
        return list(rows.values())

    fns = calls(*inputs(case))
    compiled = {}
    for key, (fn, args) in fns.items():
        r = rows[key]
        try:
            t0 = time.perf_counter()
            c = fn.lower(*args).compile()
            r["compile_ms"] = (time.perf_counter() - t0) * 1e3
        except Exception as e:  # noqa: BLE001 - TPU reports HBM overflow at compile time
            if not _is_oom(e):
                raise
            r["note"] = f"skipped: compile ran out of memory ({str(e).splitlines()[0][:120]})"
            continue
        ma = c.memory_analysis()
        if ma is not None:
            r["mem_mib"] = (ma.output_size_in_bytes + ma.temp_size_in_bytes) / MiB
        free = common.available_mib()
        if r["mem_mib"] > 0.9 * free:
            r["note"] = f"skipped: output + temp {r['mem_mib']:.1f} MiB, {free:.1f} MiB free"
            continue
        compiled[key] = (c, args)

    for op in OPS:  # run each once; Pallas checked against ragged_dot
        results = {}
        for impl in IMPLS:
            if (impl, op) not in compiled:
                continue
            c, args = compiled[impl, op]
            try:
                out = jax.block_until_ready(c(*args))
            except Exception as e:  # noqa: BLE001
                if not _is_oom(e):
                    raise
                rows[impl, op]["note"] = "skipped: RESOURCE_EXHAUSTED when run"
                del compiled[impl, op]
                continue
            if impl != "dense":
                results[impl] = out
            del out
        if len(results) == 2:
            err = float(_rel_err(results["pallas"], results["ragged_dot"]))
            rows["pallas", op]["max_rel_err"] = err
            if not err <= TOLERANCE[case.dtype]:
                raise RuntimeError(f"{case.model} {case.matmul} T={case.T} {case.groups} {op}: Pallas differs from "
                                   f"ragged_dot by {err:.2e} (relative to max |ragged_dot|) > {TOLERANCE[case.dtype]}")
        elif ("pallas", op) in compiled:
            rows["pallas", op]["note"] = "unchecked: ragged_dot did not run"
        del results

    keys = list(compiled)
    times = common.round_robin([compiled[k] for k in keys], repeats)
    for key, ts in zip(keys, times):
        wall = [t for t, _ in ts]
        r = rows[key]
        r.update(times_ms=wall, time_ms=statistics.median(wall))
        r["tflops"] = r["useful_tflop"] / (r["time_ms"] / 1e3)
    for (impl, op), r in rows.items():
        r["vs_dense"] = r["tflops"] / rows["dense", op]["tflops"]
        err = "" if r["max_rel_err"] is None else f"  err {r['max_rel_err']:.1e}"
        log(f"  {op:8s} {impl:10s} {r['time_ms']:9.3f} ms  {r['tflops']:8.3f} TFLOP/s  {r['vs_dense']:5.2f}x dense"
            f"{err}  (compile {r['compile_ms']:.0f} ms) {r['note']}")
    return list(rows.values())


def run(smoke: bool, repeats: int, models=MODELS, tokens=TOKENS, log=print) -> list[dict]:
    rows = []
    for case in cases(smoke, models, tokens):
        log(f"{case.model} {case.matmul} T={case.T} [{case.m}, {case.k}] x [{len(case.sizes)}, {case.k}, {case.n}] "
            f"{case.dtype}, groups {case.groups}: max {max(case.sizes)}, min {min(case.sizes)} rows")
        rows.extend(measure(case, repeats, log))
    return rows


def _f(v, fmt):
    return "-" if v is None or v != v else fmt.format(v)


def table(rows: list[dict]) -> str:
    head = (f"device: {rows[0]['device']} ({rows[0]['platform']}), jax {rows[0]['jax']}\n\n" if rows else "")
    lines = ["| model | matmul | T | m, k, n | groups (max / min rows) | op | impl | ms | TFLOP/s | vs dense "
             "| max rel err | note |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['model']} | {r['matmul']} | {r['T']} | {r['m']}, {r['k']}, {r['n']} | {r['groups']} "
                     f"({r['max_group']} / {r['min_group']}) | {r['op']} | {r['impl']} | {_f(r['time_ms'], '{:.3f}')} "
                     f"| {_f(r['tflops'], '{:.3g}')} | {_f(r['vs_dense'], '{:.2f}x')} "
                     f"| {_f(r['max_rel_err'], '{:.1e}')} | {r['note']} |")
    return head + "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
    p.add_argument("--smoke", action="store_true", help="tiny float32 shapes, 2 repeats, checked (CPU: interpreted)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 10; 2 with --smoke)")
    p.add_argument("--allow-cpu", action="store_true", help="time the full shapes on CPU (interpreted Pallas)")
    p.add_argument("--models", default=",".join(m.name for m in MODELS), help="comma-separated models")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts T")
    args = p.parse_args(argv)
    if jax.default_backend() == "cpu" and not (args.smoke or args.allow_cpu):
        raise SystemExit("gmm benchmark: jax's backend is cpu, where Pallas runs its kernels in interpret mode; "
                         "timing them means nothing. Run it on a GPU or TPU, use --smoke for a checked smoke "
                         "run, or pass --allow-cpu to time the interpreted kernels anyway.")
    by_name = {m.name: m for m in MODELS}
    models = [by_name[n] for n in args.models.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    repeats = args.repeats or (2 if args.smoke else 10)
    dev = jax.devices()[0]
    print(common.machine_line(), flush=True)
    print(f"device {dev.device_kind}, platform {jax.default_backend()}", flush=True)
    t0 = time.perf_counter()
    rows = run(args.smoke, repeats, models, tokens, log=lambda s: print(s, flush=True))
    print(f"\n{len(rows)} rows in {time.perf_counter() - t0:.1f} s\n")
    print(table(rows))
    if args.json:
        common.write_json(args.json, rows)


if __name__ == "__main__":
    main()
