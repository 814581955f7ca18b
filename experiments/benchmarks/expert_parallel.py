"""Expert parallelism: bytes each device sends per MoE layer (read from the compiled HLO) against the
minimum, and step time against the data-parallel-only run.

Run:  python3 -m experiments.benchmarks.expert_parallel [--json FILE] [--quick] [--repeats N] [--no-tpu]

Layers: the Table-1 'deepseekmoe' (1 shared + 63 routed experts of d_ff / 4, top-7, padded to 64 weight
slots with `pad_experts_to=8` so that 8 devices hold 8 slots each) and 'gshard' (16 experts of d_ff, top-2,
random second expert) MoE layers of configs/deepseekmoe_table1.py `moe_config`, at d 256, d_ff 688
(the 'small' scale), float32, each with dispatch 'dropless' (as in Table 1) and 'capacity' at capacity
factors 1.0 and 1.25. Batch 16 x 512 tokens: 2 sequences, T = 1024 tokens per device.
Meshes of 8 devices: data=8 (the baseline: experts replicated, no token exchange), expert=8, and
data=2 x expert=4. Parameters are placed by moejax.sharding (expert weights split over `expert`).

Bytes (per device, per MoE layer): the layer's forward (`MoE.__call__`) and its forward + backward
(value_and_grad of sum(y * ct) + stats.loss w.r.t. the parameters and x, the timed step) are compiled
and every collective in `compiled.as_text()` is read with its operand shapes, dtypes and group size g:
  all-to-all          sends operand bytes x (g - 1) / g (the 1/g addressed to itself stays);
  ragged-all-to-all   the static input buffer (upper bound: what it sends depends on the routing);
  all-gather          operand bytes x (g - 1);   reduce-scatter  operand bytes x (g - 1) / g;
  all-reduce          2 x bytes x (g - 1) / g (ring);   collective-permute  operand bytes.
'exchange' is the floating-point all-to-all / ragged-all-to-all traffic (token rows there and back);
integer collectives are routing 'metadata'; floating 'all-reduce' is the gradient sum of replicated
parameters (and psums); 'other' is any other floating collective (on CPU: the router logits, which
XLA:CPU all-gathers for jax.lax.top_k).
The minimum per direction is T K d x 4 bytes x (1 - 1/D) for T tokens per device, K routed picks and an
expert axis of D devices (uniform routing: 1/D of the picks stay on the device): forward = dispatch +
combine = 2 of them, forward + backward = 4. 'routed' counts the rows this routing really sends
(random normal inputs, the layer's initial router, training-mode routing key, picks to experts on other
devices, after capacity drops), which is what a ragged all-to-all puts on the wire; 'wire' is the HLO
bytes with every ragged-all-to-all replaced by its routed rows.

Platforms: CPU (8 simulated devices, XLA_FLAGS=--xla_force_host_platform_device_count=8; dropless uses
moejax.dispatch.dense_ragged_all_to_all, a dense all_to_all of padded chunks) and TPU v5p:2x2x2 (8 chips)
compiled ahead of time through libtpu (dropless uses XLA's ragged-all-to-all; compiled, never run).

Step time (CPU only): the jitted forward + backward on each mesh, round-robin over the 3 meshes of a
layer (1 warm-up each, then `--repeats` rounds, the first mesh rotating), median ms and the median over
rounds of t(mesh) / t(data=8) of the same round. The 8 simulated devices share the machine's cores, so
these ratios measure compute and copying overheads of each mesh's program, not a network.

Steps whose compiled temp memory over the 8 devices exceeds --max-run-gib (default: half of MemAvailable)
are compiled but not run (the largest at the default shape, deepseekmoe dropless expert=8, needs 8 x 0.66
GiB). --quick: tiny shapes (d 32, d_ff 64, 16 x 64 tokens), dropless and capacity 1.25, 1 timed
round, CPU only. Expected (2-core x86_64, 24 GB, JAX 0.10.2, load average 2-5 from other jobs; results in
README.md): full run 6.5 min (TPU compiles 7-16 s each), --seq 128 --no-tpu --dispatch dropless 1.5 min,
--quick 3 min (under load 7-10), the smoke test (--quick --methods gshard --meshes 'data=8;expert=8') 25-60 s.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import statistics
import sys
import time

N_DEVICES = 8
if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={N_DEVICES}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from experiments.benchmarks import common  # noqa: E402
from configs import deepseekmoe_table1 as table1  # noqa: E402
from moejax import dispatch, moe, sharding  # noqa: E402
from moejax import model_config  # noqa: E402

MiB = 2.0 ** 20
TPU_TOPOLOGY = ("v5p:2x2x2", "v5p-8")  # (topology name, TPU_ACCELERATOR_TYPE)
MESHES = {"data=8": dict(data=8), "expert=8": dict(data=1, expert=8), "data=2 x expert=4": dict(data=2, expert=4)}
METHODS = ("deepseekmoe", "gshard")


@dataclasses.dataclass(frozen=True)
class Shape:
    d: int
    d_ff: int
    batch: int
    seq: int


FULL = Shape(d=256, d_ff=688, batch=16, seq=512)
QUICK = Shape(d=32, d_ff=64, batch=16, seq=64)


def variants(quick: bool) -> list[tuple[str, str, float | None]]:
    """(method, dispatch, capacity factor) of every layer benchmarked."""
    disp = [("dropless", None)] + [("capacity", cf) for cf in ((1.25,) if quick else (1.0, 1.25))]
    return [(m, d, cf) for m in METHODS for d, cf in disp]


def layer_config(method: str, disp: str, cf: float | None, shape: Shape) -> model_config.MoEConfig:
    """The Table-1 MoE layer with `disp` dispatch; routed experts padded to a multiple of 8 weight slots."""
    c = table1.moe_config(method, shape.d, shape.d_ff)
    extra = dict(capacity_factor=cf) if disp == "capacity" else {}
    return dataclasses.replace(c, dispatch=disp, pad_experts_to=N_DEVICES, **extra)


# ----- reading collectives from compiled HLO ---------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f(?:16|32|64)|c64|c128|f8e\w+)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "all-reduce", "reduce-scatter",
               "collective-permute")


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(n) for n in dims.split(",") if n)) for dt, dims in _ARRAY.findall(type_text)]


def _nbytes(arrays) -> int:
    return sum(_DTYPE_BYTES.get(dt, 1) * math.prod(dims) for dt, dims in arrays)


def _operands(args: str) -> list[str]:
    """Names of the operands in the text after 'opcode(' up to the matching ')'."""
    depth, end = 1, len(args)
    for i, ch in enumerate(args):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            end = i
            break
    return re.findall(r"%([\w.\-]+)", args[:end])


def _group_size(line: str, n_devices: int) -> int:
    """Devices per replica group of a collective (all of them if the groups are not given)."""
    m = re.search(r"replica_groups=\{(\{[\d,]*\})", line)
    if m:
        return max(1, len([v for v in m.group(1).strip("{}").split(",") if v]))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)  # iota groups [n_groups, group_size]
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)  # mesh['axis_0'=8,...] {'axis_0'}
    if m:
        sizes = dict((k.strip("' "), int(v)) for k, v in (kv.split("=") for kv in m.group(1).split(",")))
        return math.prod(sizes[a.strip("' ")] for a in m.group(2).split(",") if a.strip())
    return n_devices


def collectives(hlo: str, n_devices: int) -> list[dict]:
    """Every collective of a compiled HLO module with the bytes one device sends (see the module docstring).
    Async pairs count once (at -start). in_loop marks collectives inside while-loop bodies or conditions
    (counted once, though they run once per iteration)."""
    types, loops, lines = {}, set(), []
    comp = None
    for line in hlo.splitlines():
        mc = _COMP.match(line)
        if mc and "=" not in line.split("{")[0]:
            comp = mc.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, type_text, opcode, rest = m.groups()
        types[name] = type_text
        loops.update(re.findall(r"(?:body|condition)=%([\w.\-]+)", line))
        lines.append((name, type_text, opcode, rest, line, comp))
    ops = []
    for name, type_text, opcode, rest, line, comp in lines:
        if opcode.endswith("-done"):
            continue
        op = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
        if op not in COLLECTIVES:
            continue
        operands = [_arrays(types.get(o, "")) for o in _operands(rest)]
        if not all(operands):  # an operand not found: fall back on the result type
            operands = [_arrays(type_text)]
        g = _group_size(line, n_devices)
        if op == "ragged-all-to-all":
            arrays = operands[0]
            sent = _nbytes(arrays)  # static input buffer: an upper bound
        else:
            arrays = [a for arr in operands for a in arr]
            b = _nbytes(arrays)
            sent = {"all-to-all": b * (g - 1) / g, "all-gather": b * (g - 1), "reduce-scatter": b * (g - 1) / g,
                    "all-reduce": 2 * b * (g - 1) / g, "collective-permute": b}[op]
        dtype = arrays[0][0] if arrays else "?"
        kind = ("metadata" if not (dtype.startswith(("f", "bf", "c"))) else
                "exchange" if op in ("all-to-all", "ragged-all-to-all") else
                "all-reduce" if op in ("all-reduce", "reduce-scatter") else "other")
        rows = arrays[0][1][0] if op == "ragged-all-to-all" and arrays and arrays[0][1] else 0
        ops.append(dict(name=name, op=op, kind=kind, dtype=dtype, shapes=[list(s) for _, s in arrays], group=g,
                        bytes=float(sent), ragged_rows=rows, row_bytes=_nbytes(arrays) / rows if rows else 0.0,
                        in_loop=comp in loops))
    return ops


def summarize(ops: list[dict], routed_rows: float) -> dict:
    """Bytes per kind; 'wire' = exchange bytes with every ragged-all-to-all sending `routed_rows` rows."""
    by = {k: sum(o["bytes"] for o in ops if o["kind"] == k) for k in ("exchange", "metadata", "all-reduce", "other")}
    wire = sum(routed_rows * o["row_bytes"] if o["op"] == "ragged-all-to-all" else o["bytes"]
               for o in ops if o["kind"] == "exchange")
    dtypes = sorted({o["dtype"] for o in ops if o["kind"] == "exchange"})
    return dict(by, wire=wire, n_ops=len(ops), n_in_loop=sum(o["in_loop"] for o in ops),
                ops=sorted({o["op"] for o in ops if o["kind"] == "exchange"}), exchange_dtypes=dtypes)


# ----- the layer, its step and its routing ----------------------------------------------------------


def _loss_fn(graphdef):
    def loss(params, x, ct, key):
        y, stats = nnx.merge(graphdef, params)(x, key=key, train=True)
        return jnp.sum(y * ct) + stats.loss

    return loss


def _forward_fn(graphdef):
    def forward(params, x, key):
        y, stats = nnx.merge(graphdef, params)(x, key=key, train=True)
        return y, stats.loss

    return forward


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def compile_layer(config: model_config.MoEConfig, shape: Shape, mesh, keep_going: bool = False) -> dict:
    """Forward and forward + backward of the layer compiled for `mesh` (from abstract inputs). With
    keep_going, a forward + backward that fails to trace or compile is recorded as step_error."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: moe.MoE(config, rngs=nnx.Rngs(0))))
    out = dict(graphdef=graphdef, step=None, step_error=None)
    with sharding.use(mesh):
        out["p_shard"] = p_shard = sharding.state_shardings(params, mesh)
        x = jax.ShapeDtypeStruct((shape.batch, shape.seq, shape.d), jnp.float32,
                                 sharding=sharding.batch_sharding(mesh, 3))
        key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
        ps = _abstract(params, p_shard)
        t0 = time.perf_counter()
        out["fwd"] = jax.jit(_forward_fn(graphdef)).lower(ps, x, key).compile()
        try:
            out["step"] = jax.jit(jax.value_and_grad(_loss_fn(graphdef), argnums=(0, 1))).lower(ps, x, x, key).compile()
        except Exception as e:  # noqa: BLE001 - recorded in the row (TPU rows), re-raised otherwise
            if not keep_going:
                raise
            out["step_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        out["compile_s"] = time.perf_counter() - t0
    return out


def inputs(shape: Shape):
    kx, kc = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (shape.batch, shape.seq, shape.d), jnp.float32)
    ct = jax.random.normal(kc, x.shape, jnp.float32) / shape.d ** 0.5
    return x, ct, jax.random.PRNGKey(2)


def routing_of(config: model_config.MoEConfig, x, key) -> tuple[np.ndarray, np.ndarray]:
    """(expert ids [B, S, K], kept [B, S, K]) of the layer's initial router on x [B, S, d] in training mode,
    by the public `MoE.route`: what the layer hands its dispatch; kept = unmasked and, with capacity
    dispatch, within capacity."""
    r = moe.MoE(config, rngs=nnx.Rngs(0)).route(x, key=key, train=True)
    B, S = x.shape[:2]
    ids, kept = np.asarray(r.expert_ids).reshape(B, S, -1), np.asarray(r.mask).reshape(B, S, -1)
    if config.dispatch == "capacity":
        B, S, K = ids.shape
        C = dispatch.capacity(S, K, config.n_experts, config.capacity_factor)
        E = config.n_slots
        plan = jax.vmap(lambda i, m: dispatch.capacity_plan(i, m, E, C))(jnp.asarray(ids), jnp.asarray(kept))
        kept = kept & (np.asarray(plan.slot).transpose(0, 2, 1) < E * C)  # slot [B, K, S]
    return ids, kept


def routed_remote_rows(ids: np.ndarray, kept: np.ndarray, n_slots: int, data: int, D: int) -> dict:
    """Rows each device sends to other devices of its expert group, per direction, for batch shard i =
    sequences [i b, (i + 1) b) on expert-axis position i % D (batch split over (data, fsdp, expert))."""
    if D == 1:
        return dict(mean=0.0, max=0.0, dispatch=[0] * data, back=[0] * data)
    B = ids.shape[0]
    n = data * D
    owner = ids // (n_slots // D)  # [B, S, K] expert-axis position holding each pick's expert
    b = B // n
    # to[i, j]: kept picks of batch shard i for experts held at expert position j
    to = np.array([[int(((owner[i * b:(i + 1) * b] == j) & kept[i * b:(i + 1) * b]).sum()) for j in range(D)]
                   for i in range(n)])
    send = [int(to[i].sum() - to[i, i % D]) for i in range(n)]
    back = [int(sum(to[a * D + jj, i % D] for jj in range(D) if jj != i % D)) for a in range(data)
            for i in range(a * D, (a + 1) * D)]
    return dict(mean=float(np.mean(send)), max=float(max(max(send), max(back))), dispatch=send, back=back)


def minimum_bytes(config: model_config.MoEConfig, shape: Shape, D: int, bytes_per_element: int = 4) -> float:
    """T K d x bytes x (1 - 1/D): one direction of one exchange, per device."""
    T = shape.batch * shape.seq // N_DEVICES
    return T * config.top_k * shape.d * bytes_per_element * (1 - 1 / D)


# ----- rows ------------------------------------------------------------------------------------------


def _once(fn, *args) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def bytes_row(platform: str, method: str, disp: str, cf, mesh_name: str, config, shape: Shape, compiled: dict,
              routed: dict) -> dict:
    m = MESHES[mesh_name]
    D = m.get("expert", 1)
    nan = float("nan")
    fwd = summarize(collectives(compiled["fwd"].as_text(), N_DEVICES), routed["mean"])
    step = compiled["step"]
    both = (summarize(collectives(step.as_text(), N_DEVICES), routed["mean"]) if step is not None else
            dict(exchange=nan, metadata=nan, wire=nan, other=nan, ops=[], exchange_dtypes=[], n_ops=0, n_in_loop=0,
                 **{"all-reduce": nan}))
    mn = minimum_bytes(config, shape, D)
    ratio = lambda a, b: a / b if b else nan
    ma = (step if step is not None else compiled["fwd"]).memory_analysis()
    return dict(
        platform=platform, method=method, dispatch=disp, cf=cf, mesh=mesh_name, data=m.get("data", 1), expert=D,
        d=shape.d, d_ff=shape.d_ff, batch=shape.batch, seq=shape.seq,
        tokens_per_device=shape.batch * shape.seq // N_DEVICES, n_experts=config.n_experts, n_slots=config.n_slots,
        top_k=config.top_k, expert_width=config.expert_width,
        min_fwd_mib=2 * mn / MiB, min_fwd_bwd_mib=4 * mn / MiB,
        hlo_fwd_mib=fwd["exchange"] / MiB, hlo_fwd_bwd_mib=both["exchange"] / MiB,
        hlo_vs_min_fwd=ratio(fwd["exchange"], 2 * mn), hlo_vs_min_fwd_bwd=ratio(both["exchange"], 4 * mn),
        wire_fwd_mib=fwd["wire"] / MiB, wire_fwd_bwd_mib=both["wire"] / MiB,
        wire_vs_min_fwd=ratio(fwd["wire"], 2 * mn),
        routed_fwd_mib=2 * routed["mean"] * shape.d * 4 / MiB, routed_rows_mean=routed["mean"],
        routed_rows_max=routed["max"], routed_vs_min_fwd=ratio(2 * routed["mean"] * shape.d * 4, 2 * mn),
        metadata_fwd_mib=fwd["metadata"] / MiB, metadata_fwd_bwd_mib=both["metadata"] / MiB,
        allreduce_fwd_mib=fwd["all-reduce"] / MiB, allreduce_fwd_bwd_mib=both["all-reduce"] / MiB,
        other_fwd_mib=fwd["other"] / MiB, other_fwd_bwd_mib=both["other"] / MiB,
        exchange_ops=fwd["ops"], exchange_dtypes=sorted(set(fwd["exchange_dtypes"]) | set(both["exchange_dtypes"])),
        collectives_fwd=fwd["n_ops"], collectives_fwd_bwd=both["n_ops"],
        collectives_in_loops=fwd["n_in_loop"] + both["n_in_loop"], fwd_bwd_error=compiled["step_error"],
        temp_mib=ma.temp_size_in_bytes / MiB if ma is not None else nan, temp_of="fwd+bwd" if step else "fwd",
        compile_s=compiled["compile_s"], step_ms=nan, ratio_vs_data=nan, times_ms=[], cpu_ms=nan,
        runs="compiled only",
    )


def run_layer(method, disp, cf, shape: Shape, meshes, repeats: int, max_run_mib: float, tpu_devices,
              log) -> list[dict]:
    """CPU rows (bytes + round-robin step times) and, with tpu_devices, TPU rows (bytes) of one layer. A
    mesh whose step needs more than max_run_mib of temp memory (all 8 simulated devices) is not run."""
    config = layer_config(method, disp, cf, shape)
    x, ct, key = inputs(shape)
    ids, kept = routing_of(config, x, key)
    rows, runs = [], []
    for name in meshes:
        m = MESHES[name]
        mesh = sharding.make_mesh(sharding.MeshConfig(**m), devices=jax.devices()[:N_DEVICES])
        routed = routed_remote_rows(ids, kept, config.n_slots, m.get("data", 1), m.get("expert", 1))
        c = compile_layer(config, shape, mesh)
        row = bytes_row("cpu", method, disp, cf, name, config, shape, c, routed)
        log(f"  cpu {name:18s} compiled in {c['compile_s']:.1f} s; exchange fwd {row['hlo_fwd_mib']:.2f} MiB "
            f"(min {row['min_fwd_mib']:.2f}, x{row['hlo_vs_min_fwd']:.2f}), fwd+bwd {row['hlo_fwd_bwd_mib']:.2f} MiB, "
            f"grad all-reduce {row['allreduce_fwd_bwd_mib']:.2f} MiB, temp {row['temp_mib']:.0f} MiB per device")
        rows.append(row)
        if N_DEVICES * row["temp_mib"] > max_run_mib:
            row["runs"] = (f"not run: temp {N_DEVICES} x {row['temp_mib'] / 1024:.2f} GiB > --max-run-gib "
                           f"{max_run_mib / 1024:.1f}")
            log(f"  cpu {name:18s} {row['runs']}")
            continue
        _, params = nnx.split(moe.MoE(config, rngs=nnx.Rngs(0)))
        batch = sharding.batch_sharding(mesh, 3)
        args = (jax.device_put(params, c["p_shard"]), jax.device_put(x, batch), jax.device_put(ct, batch),
                jax.device_put(key, NamedSharding(mesh, P())))
        _once(c["step"], *args)  # warm-up
        runs.append((row, c["step"], args, [], []))
    for r in range(repeats):  # round-robin, the first mesh rotating
        for i in range(len(runs)):
            _, fn, args, wall, cpu_ms = runs[(r + i) % len(runs)]
            w, c_ms = _once(fn, *args)
            wall.append(w)
            cpu_ms.append(c_ms)
    base = next((wall for row, _, _, wall, _ in runs if row["mesh"] == "data=8"), None)
    for row, _, _, wall, cpu_ms in runs:
        row.update(step_ms=statistics.median(wall), times_ms=wall, cpu_ms=statistics.median(cpu_ms),
                   ratio_vs_data=statistics.median(w / b for w, b in zip(wall, base)) if base else float("nan"),
                   runs=f"1 warm-up + {repeats} timed, round-robin over the meshes")
        log(f"  cpu {row['mesh']:18s} {row['step_ms']:8.1f} ms  x{row['ratio_vs_data']:.2f} vs data=8")
    for name in meshes if tpu_devices else ():
        m = MESHES[name]
        mesh = sharding.make_mesh(sharding.MeshConfig(**m), devices=tpu_devices)
        routed = routed_remote_rows(ids, kept, config.n_slots, m.get("data", 1), m.get("expert", 1))
        c = compile_layer(config, shape, mesh, keep_going=True)
        row = bytes_row("tpu", method, disp, cf, name, config, shape, c, routed)
        row["runs"] = f"compiled only ({TPU_TOPOLOGY[0]} ahead of time)"
        rows.append(row)
        log(f"  tpu {name:18s} compiled in {c['compile_s']:.1f} s; exchange fwd {row['hlo_fwd_mib']:.2f} MiB "
            f"({'/'.join(row['exchange_dtypes']) or '-'}; min {row['min_fwd_mib']:.2f}, x{row['hlo_vs_min_fwd']:.2f}), "
            f"on the wire {row['wire_fwd_mib']:.2f} MiB (x{row['wire_vs_min_fwd']:.2f})"
            + (f"; fwd+bwd failed: {row['fwd_bwd_error'][:200]}" if row["fwd_bwd_error"] else ""))
    return rows


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def tpu_devices(log=print):
    """The 8 devices of a TPU v5p:2x2x2 topology for ahead-of-time compilation, or None (no libtpu).
    ALLOW_MULTIPLE_LIBTPU_LOAD lets this compile-only use of libtpu run beside another process holding it."""
    try:
        from jax.experimental import topologies

        with _env(TPU_ACCELERATOR_TYPE=TPU_TOPOLOGY[1], TPU_WORKER_HOSTNAMES="localhost",
                  ALLOW_MULTIPLE_LIBTPU_LOAD="1"):
            return list(topologies.get_topology_desc(TPU_TOPOLOGY[0], "tpu").devices)
    except Exception as e:  # noqa: BLE001 - any libtpu failure means: no TPU rows
        log(f"TPU rows skipped: {TPU_TOPOLOGY[0]} topology unavailable ({type(e).__name__}: {str(e)[:200]})")
        return None


def run(quick: bool, repeats: int, tpu: bool, methods=METHODS, dispatches=("dropless", "capacity"),
        meshes=tuple(MESHES), max_run_gib: float | None = None, seq: int | None = None, log=print) -> list[dict]:
    """Every row; steps needing more temp memory than max_run_gib (default: half the memory available at
    the start) over the 8 simulated devices are compiled but not run."""
    if len(jax.devices()) < N_DEVICES or jax.default_backend() != "cpu":
        raise SystemExit(f"needs {N_DEVICES} CPU devices: set XLA_FLAGS=--xla_force_host_platform_device_count="
                         f"{N_DEVICES} before jax is imported (found {jax.devices()})")
    for name, allowed, given in (("methods", METHODS, methods), ("dispatch", ("dropless", "capacity"), dispatches),
                                 ("meshes", tuple(MESHES), meshes)):
        if set(given) - set(allowed):
            raise SystemExit(f"--{name}: {sorted(set(given) - set(allowed))} is invalid; allowed: {allowed}")
    max_run_mib = max_run_gib * 1024 if max_run_gib is not None else 0.5 * common.available_mib()
    shape = QUICK if quick else FULL
    shape = dataclasses.replace(shape, seq=seq) if seq else shape
    devices = tpu_devices(log) if tpu else None
    rows = []
    for method, disp, cf in variants(quick):
        if method in methods and disp in dispatches:
            log(f"{method} {disp}" + (f" cf {cf}" if cf else "") + f" {shape}")
            rows.extend(run_layer(method, disp, cf, shape, meshes, repeats, max_run_mib, devices, log))
    return rows


def _f(v, fmt="{:.2f}", unit=""):
    return "-" if v is None or v != v else fmt.format(v) + unit


def table(rows: list[dict]) -> str:
    lines = ["| platform | method | dispatch | mesh | exchange fwd MiB (HLO) | min fwd MiB | HLO / min "
             "| on the wire fwd MiB (/ min) | exchange fwd+bwd MiB (HLO) | HLO / min | grad all-reduce MiB "
             "| other MiB | step ms | vs data=8 |", "|" + "---|" * 14]
    for r in rows:
        disp = r["dispatch"] + (f" cf {r['cf']}" if r["cf"] else "")
        ragged = "ragged-all-to-all" in r["exchange_ops"]
        wire = f"{r['wire_fwd_mib']:.2f} ({_f(r['wire_vs_min_fwd'], unit='x')})" if ragged else "= HLO"
        if not r["expert"] > 1:
            wire = "-"
        dt = "" if r["exchange_dtypes"] in ([], ["f32"]) else f" ({'/'.join(r['exchange_dtypes'])})"
        step = _f(r["step_ms"], "{:.0f}") if r["runs"].startswith("1 warm") else (
            "not run" if r["runs"].startswith("not run") else "-")
        if r["fwd_bwd_error"]:  # see the row's fwd_bwd_error
            both = "| fails to trace | - | - | -"
        else:
            other = r["other_fwd_bwd_mib"] + r["metadata_fwd_bwd_mib"]
            both = (f"| {_f(r['hlo_fwd_bwd_mib'])} | {_f(r['hlo_vs_min_fwd_bwd'], unit='x')} "
                    f"| {_f(r['allreduce_fwd_bwd_mib'])} | {_f(other)}")
        lines.append(
            f"| {r['platform']} | {r['method']} | {disp} | {r['mesh']} | {r['hlo_fwd_mib']:.2f}{dt} "
            f"| {r['min_fwd_mib']:.2f} | {_f(r['hlo_vs_min_fwd'], unit='x')} | {wire} {both} "
            f"| {step} | {_f(r['ratio_vs_data'], unit='x')} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 round, CPU only (smoke test)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per layer (default 5; 1 with --quick)")
    p.add_argument("--tpu", action=argparse.BooleanOptionalAction, default=None,
                   help="also compile for TPU v5p:2x2x2 ahead of time (default: on, off with --quick)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated Table-1 methods")
    p.add_argument("--dispatch", default="dropless,capacity", help="comma-separated dispatch modes")
    p.add_argument("--meshes", default=";".join(MESHES), help=f"';'-separated meshes from {tuple(MESHES)}")
    p.add_argument("--seq", type=int, default=None, help="override the sequence length (default 512; 64 with --quick)")
    p.add_argument("--max-run-gib", type=float, default=None,
                   help="compile but do not run steps needing more temp memory over the 8 devices "
                        "(default: half of MemAvailable)")
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    tpu = (not args.quick) if args.tpu is None else args.tpu
    print(common.machine_line(), flush=True)
    t0 = time.perf_counter()
    rows = run(args.quick, repeats, tpu, tuple(args.methods.split(",")), tuple(args.dispatch.split(",")),
               tuple(args.meshes.split(";")), args.max_run_gib, args.seq, log=lambda s: print(s, flush=True))
    print(f"\n{len(rows)} rows in {time.perf_counter() - t0:.0f} s\n")
    print(table(rows))
    if args.json:
        common.write_json(args.json, rows)


if __name__ == "__main__":
    main()
