"""The MoE layer and training step on TPU, by the XLA:TPU compiler's own estimate (nothing runs on a TPU).

Run:  python3 -m experiments.benchmarks.tpu_estimate [--json FILE] [--quick] [--step] [--gens v5p,v5e,v6e]

Each row compiles, ahead of time through libtpu for one chip of a TPU generation, a jitted forward +
backward step (loss = sum(y * ct) + balance loss, gradients w.r.t. x and every parameter) of one
`moejax.moe.MoE` layer (routed experts only) or of the dense SwiGLU FFN of the same FLOPs (width K f, the
baseline of every ratio), and reads:
- est ms: `compiled.cost_analysis()["optimal_seconds"]`, the compiler's time estimate. It is usable on
  v5p; on v5e and v6e it is often negative (printed as n/a). A Pallas kernel's share of it is only what
  the kernel's `pl.CostEstimate` declares.
- GB accessed: cost_analysis "bytes accessed" (what the estimate charges to memory traffic);
- temp MiB: memory_analysis().temp_size_in_bytes;
- TFLOP/s: the step's useful FLOPs (6 x 2 x (n d f) x T K for the experts, 6 x 2 x d E x T for the
  router: forward 2, backward 4) / est seconds, and the same over the chip's bf16 peak (MFU).
--attention adds the causal attention sublayer (moejax.attention, HEADS per shape, packed-document segment
ids) forward + backward: XLA's attention with one block of queries and with model.attention_chunk 1024, and
the Pallas flash attention (model.attention_kernel='flash'; the ratio column is then to one block; TFLOP/s
count the lower triangle's scores only).
--step adds the whole DeepSeekMoE-16B training step (configs/deepseekmoe_16b.py, layers unrolled so that
the compiler counts each) on v5p:4x4x4 through moejax.aot (compile 8-12 min and ~13 GiB on 2 CPU cores):
estimated step seconds (XLA counts the grad_accum scan body once, so the estimate is grad_accum x the
count, like aot's FLOPs) and MFU = analytic model FLOPs per chip (6 N + attention) / (est seconds x peak).

Shapes (bf16 activations, float32 parameters cast to bf16 in the layer, as training runs them):
  16b      DeepSeekMoE-16B-like: T 8192 (B 2 x S 4096), d 2048, E 64, K 6, f 1408, softmax top-6.
  mixtral  Mixtral-like:         T 8192 (B 2 x S 4096), d 4096, E 8,  K 2, f 14336, top-2 renormalised.
Variants: the backend 'auto' picks on TPU ('pallas'), and 'ragged_dot' (XLA's own grouped matmul).
The compiles take 0.5-3 min each on 2 CPU cores; --quick compiles one small shape on v5p (T 256, d 256,
E 16, K 4, f 128) in ~30 s.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.benchmarks import common
from experiments.benchmarks.moe_layer import Shape  # name, B, S, d, E, K, f, normalize; T = B S
from moejax import moe
from moejax import model_config
from moejax import sharding

GIB = 2.0**30
MiB = 2.0**20
TOPOLOGY = {"v5p": "v5p:2x2x1", "v5e": "v5e:2x2", "v6e": "v6e:2x2"}  # one chip of each is compiled for
PEAK_BF16_TFLOPS = {"v5p": 459.0, "v5e": 197.0, "v6e": 918.0}  # per chip (Google Cloud TPU pages)


SHAPES = (
    Shape("16b", B=2, S=4096, d=2048, E=64, K=6, f=1408),
    Shape("mixtral", B=2, S=4096, d=4096, E=8, K=2, f=14336, normalize=True),
)
QUICK_SHAPES = (Shape("16b-quick", B=1, S=256, d=256, E=16, K=4, f=128),)
VARIANTS = ("auto", "ragged_dot")
HEADS = {"16b": (16, 16), "mixtral": (32, 8), "16b-quick": (2, 2)}  # (query heads, key/value heads) per shape


def layer_config(shape: Shape, backend: str | None) -> model_config.MoEConfig:
    """backend None: the dense SwiGLU FFN of width K f (same FLOPs as the K routed experts)."""
    if backend is None:
        return model_config.dense(shape.d, shape.K * shape.f)
    return model_config.MoEConfig(shape.d, shape.f, n_experts=shape.E, top_k=shape.K, normalize=shape.normalize,
                         aux_loss_coef=0.001, backend=backend)


def useful_flops(shape: Shape, dense: bool) -> float:
    """Forward + backward FLOPs the step must do: 3 matmuls d x f per (token, pick), x 2 (multiply-add)
    x 3 (forward, input and weight gradients), plus the router's d x E per token (MoE only)."""
    flops = 6 * 3 * shape.d * shape.f * shape.K * shape.T
    return flops if dense else flops + 6 * shape.d * shape.E * shape.T


def one_chip(gen: str):
    """A mesh of one chip of TPU generation `gen` (libtpu's topology description; no TPU needed)."""
    from moejax import aot

    devices = aot.topology_devices(TOPOLOGY[gen])
    return sharding.make_mesh(sharding.MeshConfig(), devices[:1])


def estimate(compiled, flops: float, peak_tflops: float) -> dict:
    """The compiler's numbers for one compiled program (see the module docstring)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    seconds = float(cost.get("optimal_seconds", float("nan")))
    if not seconds > 0:  # negative or missing: no usable estimate (most v5e programs)
        seconds = float("nan")
    tflops = flops / seconds / 1e12
    return {"est_ms": seconds * 1e3, "bytes_accessed_gb": float(cost.get("bytes accessed", float("nan"))) / 1e9,
            "temp_mib": compiled.memory_analysis().temp_size_in_bytes / MiB,
            "flops": flops, "tflops": tflops, "mfu": tflops / peak_tflops}


def compile_layer(config: model_config.MoEConfig, shape: Shape, mesh):
    """The layer's forward + backward step compiled for `mesh` from abstract inputs (bf16 x and ct)."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: moe.MoE(config, rngs=nnx.Rngs(0))))

    def loss(params, x, ct):
        y, stats = nnx.merge(graphdef, params)(x)
        return jnp.sum((y * ct).astype(jnp.float32)) + stats.loss

    with sharding.use(mesh):
        p_shard = sharding.state_shardings(params, mesh)
        ps = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, p_shard)
        x = jax.ShapeDtypeStruct((shape.B, shape.S, shape.d), jnp.bfloat16, sharding=sharding.batch_sharding(mesh, 3))
        with jax.default_matmul_precision("default"):
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(ps, x, x).compile()


def layer_rows(gens, shapes, variants, log=print) -> list[dict]:
    rows = []
    for gen in gens:
        mesh = one_chip(gen)
        for shape in shapes:
            base = None
            for backend in (None, *variants):
                t0 = time.perf_counter()
                compiled = compile_layer(layer_config(shape, backend), shape, mesh)
                row = {"gen": gen, "shape": shape.name, "variant": backend or "dense", "T": shape.T, "d": shape.d,
                       "E": shape.E, "K": shape.K, "f": shape.f,
                       **estimate(compiled, useful_flops(shape, backend is None), PEAK_BF16_TFLOPS[gen]),
                       "compile_s": time.perf_counter() - t0}
                del compiled
                base = row if backend is None else base
                row["ratio_to_dense"] = row["est_ms"] / base["est_ms"]
                rows.append(row)
                log(format_row(row))
    return rows


def attention_flops(shape: Shape) -> float:
    """Forward + backward FLOPs of causal attention's useful work: the q, k, v, o projections and the scores
    and weighted values of the lower triangle (S^2 / 2 pairs per head), x 3 (forward, two gradients)."""
    H, G = HEADS[shape.name]
    h = shape.d // H
    proj = 2 * shape.T * shape.d * h * (2 * H + 2 * G)
    core = 2 * 2 * shape.B * shape.S**2 / 2 * H * h
    return 3 * (proj + core)


def attention_rows(gens, shapes, log=print) -> list[dict]:
    """The attention sublayer (moejax.attention.Attention, causal over segment ids, bf16) forward + backward
    at each shape's B, S, d and HEADS: XLA's with one block of queries and with model.attention_chunk 1024
    (the default; S / 4 for a shorter S), and the flash kernels; ratio to one block."""
    from moejax import attention as attention_lib

    rows = []
    for gen in gens:
        mesh = one_chip(gen)
        for shape in shapes:
            base = None
            # one block of queries; the default's (quick: 4 blocks); the flash kernels
            for chunk, kernel in ((0, "xla"), (min(1024, shape.S // 4), "xla"), (0, "flash")):
                H, G = HEADS[shape.name]
                cfg = model_config.ModelConfig(1, shape.d, 1, H, model_config.dense(shape.d, shape.f),
                                               n_kv_heads=G, attention_chunk=chunk, attention_kernel=kernel,
                                               max_len=shape.S)
                graphdef, params = nnx.split(nnx.eval_shape(lambda: attention_lib.make(cfg, nnx.Rngs(0))))

                def loss(params, x, segment_ids):
                    positions = jnp.broadcast_to(jnp.arange(shape.S), (shape.B, shape.S))
                    y = nnx.merge(graphdef, params)(x, positions, segment_ids)
                    return jnp.sum(y.astype(jnp.float32))

                t0 = time.perf_counter()
                x = jax.ShapeDtypeStruct((shape.B, shape.S, shape.d), jnp.bfloat16)
                seg = jax.ShapeDtypeStruct((shape.B, shape.S), jnp.int32)
                with sharding.use(mesh), jax.default_matmul_precision("default"):
                    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x, seg).compile()
                variant = "attention flash" if kernel == "flash" else f"attention chunk={chunk}"
                row = {"gen": gen, "shape": shape.name, "variant": variant, "T": shape.T,
                       "d": shape.d, "heads": H, "kv_heads": G,
                       **estimate(compiled, attention_flops(shape), PEAK_BF16_TFLOPS[gen]),
                       "compile_s": time.perf_counter() - t0}
                del compiled
                base = base or row
                row["ratio_to_dense"] = row["est_ms"] / base["est_ms"]  # here: to one block of queries
                rows.append(row)
                log(format_row(row))
    return rows


def step_row(log=print) -> dict:
    """The DeepSeekMoE-16B training step on v5p:4x4x4 (configs/deepseekmoe_16b.py), its layers unrolled
    (model.scan_layers=False): XLA's cost analysis counts a scanned layer once."""
    from configs import deepseekmoe_16b
    from moejax import aot

    t0 = time.perf_counter()
    c = deepseekmoe_16b.get_config()
    c.model.scan_layers = False
    with jax.default_matmul_precision("default"):
        report, compiled = aot.compile_report(c, "v5p:4x4x4", return_compiled=True)
    accum = report["grad_accum"]
    est = estimate(compiled, report["model_flops_per_chip"] / accum, PEAK_BF16_TFLOPS["v5p"])
    row = {"gen": "v5p:4x4x4", "shape": "deepseekmoe_16b step", "variant": "auto", "grad_accum": accum,
           "est_step_s": est["est_ms"] * accum / 1e3, "mfu": est["mfu"], "tflops": est["tflops"],
           "bytes_accessed_gb": est["bytes_accessed_gb"] * accum, "temp_mib": est["temp_mib"],
           "total_gib": report["total_bytes"] / GIB, "compile_s": time.perf_counter() - t0}
    log(f"DeepSeekMoE-16B step on v5p:4x4x4: est {row['est_step_s']:.2f} s per step ({accum} micro-batches), "
        f"{row['tflops']:.0f} TFLOP/s per chip, MFU {row['mfu']:.1%}, {row['total_gib']:.1f} GiB per chip")
    return row


def format_row(r: dict) -> str:
    return (f"| {r['gen']} | {r['shape']} | {r['variant']} | {r['est_ms']:.2f} | {r['ratio_to_dense']:.2f}x | "
            f"{r['bytes_accessed_gb']:.1f} | {r['temp_mib']:.0f} | {r['tflops']:.0f} | {r['mfu']:.0%} |")


HEADER = ("| TPU (1 chip) | shape | variant | est ms | / dense | GB accessed | temp MiB | TFLOP/s | MFU |\n"
          "|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=os.path.expanduser, help="write the rows as JSON to this file")
    p.add_argument("--quick", action="store_true", help="one small shape on v5p (smoke test)")
    p.add_argument("--step", action="store_true", help="also the DeepSeekMoE-16B step on v5p:4x4x4 (~12 min)")
    p.add_argument("--attention", action="store_true",
                   help="also the attention sublayer per shape and model.attention_chunk (ratio: to one block)")
    p.add_argument("--gens", default="v5p,v5e,v6e", help=f"comma-separated, from {tuple(TOPOLOGY)}")
    p.add_argument("--shapes", default=",".join(s.name for s in SHAPES), help="comma-separated shape names")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated expert backends")
    a = p.parse_args(argv)
    gens = ["v5p"] if a.quick else a.gens.split(",")
    for g in gens:
        if g not in TOPOLOGY:
            p.error(f"--gens: {g!r} is not one of {tuple(TOPOLOGY)}")
    shapes = QUICK_SHAPES if a.quick else [s for s in SHAPES if s.name in a.shapes.split(",")]
    if not shapes:
        p.error(f"--shapes={a.shapes!r} names none of {tuple(s.name for s in SHAPES)}")
    print(common.machine_line())
    print(HEADER)
    rows = layer_rows(gens, shapes, a.variants.split(","))
    if a.attention:
        rows += attention_rows(gens, shapes)
    if a.step:
        rows.append(step_row())
    if a.json:
        common.write_json(a.json, rows)


if __name__ == "__main__":
    main()
