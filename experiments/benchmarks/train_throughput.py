"""Training throughput (tokens/s) of the DeepSeekMoE Table-1 methods against dense baselines.

Run:  python3 -m experiments.benchmarks.train_throughput [--json FILE] [--quick] [--repeats N]
                                                         [--scales tiny,small] [--methods dense,gshard,...]
                                                         [--data synthetic|stdlib]

What is timed: one call of the jitted `moejax.train.Trainer.train_step` (forward + backward, AdamW with
clipping, aux-free bias update where configured: none of the Table-1 methods uses it) on a global batch
of the config's shape, float32, as the executable `Trainer.train_step.lower(...).compile()` (the same
program the training loop runs; the state is donated and carried from call to call). Data loading is
excluded. Batches (--data):
  synthetic (default)  random byte tokens (uniform in [0, 256), vocabulary 384 as the byte tokenizer), one
                       document per row, every target weighted, the same batch every step (the model
                       memorises it, and its routing drifts off balance as it does);
  stdlib               the Table-1 tiny/small runs' own training batches (moejax.data: the stdlib corpus,
                       byte tokens, packed documents), read before timing; step i of every row takes batch i.
The JSON's loss_last only shows the run stayed finite; max_vio holds each timed step's per-batch MaxVio of every
routed layer (the train step's own metric, balance.max_violation: max load / mean load - 1), as the routing
decides how much of a dropless 'einsum' step runs in its overflow loop. Every method dispatches dropless
(configs/deepseekmoe_table1.py); on CPU the default expert backend, dropless 'einsum', loops over the
assignments past ceil(T K / E) rows of their expert, so step time depends on the routing.

Rows per scale (configs/deepseekmoe_table1.py SCALES; every FFN replaced, no dense first layer):
  dense        the standard FFN of width d_ff                  active FFN 1x
  dense2x      a dense FFN of width 2 d_ff (baseline of equal active parameters for the 2x rows)  2x
  hash         16 experts, top-1 by token-id hash              1x
  switch       16 experts, softmax top-1                       1x
  gshard       16 experts, top-2                               2x
  deepseekmoe  1 shared + 63 routed experts of d_ff/4, top-7   2x
`--methods gshard@blocked,...` adds rows of a method on another expert backend (moejax.experts.BACKENDS; the
default is 'auto'), with its tokens/s ratio to the same method's default row, round by round
(`ratios_vs_default_backend` in the JSON).
Each row reports total parameters, active parameters (metrics.active_params: attention, FFN, router and
the unembedding, which with tied embeddings is the embedding matrix, so it is counted once), training
FLOPs per token (metrics.flops_per_token, 6 N_active + 12 L d S), the median step time, tokens/s, model
FLOP/s (tokens/s x FLOPs/token), and
two ratios of tokens/s, both taken per round and then the median over rounds: (a) against the dense row
of the same scale, (b) against the dense row of equal active FFN parameters (dense for 1x rows, dense2x
for 2x rows). Within a scale, steps run round-robin over the rows (one step of each row per round, the
starting row rotating), so load from other processes on a shared machine hits all rows of a round
alike. Each row is compiled once, then warmed up with 1 step. Memory: XLA's compiled temp allocation
(`memory_analysis().temp_size_in_bytes`) and argument size (state + batch) of the step.

Timed steps per row: 20 at tiny (16 x 128 tokens); 5 at small (32 x 512 tokens), whose MoE steps take
3-8 s each on 2 idle cores (up to 15 s under load), so small-scale medians are of 5 steps; --repeats N
sets both. --quick: tiny scale only, 3 steps per row.
Expected (2-core x86_64 CPU, 24 GB, JAX 0.10.2; results/train_throughput_cpu*.json): tiny dense 65-105 ms/step,
MoE rows 90-280 ms; small dense 3-4 s/step, MoE rows 3.3-9.3 s (the machine's speed varied by 35% between
days); full run 4-6 min, --quick ~25 s (mostly compilation, 1-4 s per row).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common
from configs import deepseekmoe_table1 as table1
from experiments.deepseekmoe import report
from moejax import config as config_lib
from moejax import data as data_lib
from moejax import experts
from moejax import metrics
from moejax import model as model_lib
from moejax import model_config as mc_lib
from moejax import train

MiB = 2.0 ** 20
VOCAB = 384  # byte tokenizer: 256 bytes + special tokens
ROWS = ("dense", "dense2x", "hash", "switch", "gshard", "deepseekmoe")
DEFAULT_REPEATS = {"tiny": 20, "small": 5}
QUICK_REPEATS = 3


@dataclasses.dataclass(frozen=True)
class Scale:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    seq_len: int
    batch: int
    steps: int
    warmup: int
    lr: float


def scales() -> dict[str, Scale]:
    return {name: Scale(name, *s[:9]) for name, s in table1.SCALES.items()}


def model_config(method: str, s: Scale) -> model_lib.ModelConfig:
    """The Table-1 model of `method` at scale s; 'dense2x' is the dense model with FFN width 2 d_ff;
    'METHOD@BACKEND' is METHOD with its experts on moejax.experts backend BACKEND."""
    method, _, backend = method.partition("@")
    ffn = mc_lib.dense(s.d_model, 2 * s.d_ff) if method == "dense2x" else table1.moe_config(method, s.d_model, s.d_ff)
    if backend:
        ffn = dataclasses.replace(ffn, backend=backend)
    return model_lib.ModelConfig(vocab_size=VOCAB, d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads,
                                 moe=ffn, max_len=s.seq_len)


def rows_for(methods) -> list[str]:
    """Rows to run, in ROWS order: the methods asked for plus the dense baselines their ratios need; a row
    'METHOD@BACKEND' (an MoE method on another expert backend) also brings METHOD and follows it."""
    methods = set(methods) | {"dense"}
    variants = {m for m in methods if "@" in m}
    methods = (methods - variants) | {m.partition("@")[0] for m in variants}
    if methods & {"gshard", "deepseekmoe"}:
        methods.add("dense2x")
    unknown = methods - set(ROWS)
    bad = sorted(m for m in variants if m.partition("@")[0] in ("dense", "dense2x")
                 or m.partition("@")[2] not in experts.BACKENDS)
    if unknown or bad:
        raise ValueError(f"methods {sorted(unknown) + bad} are invalid; allowed: {ROWS}, or an MoE method "
                         f"@ a backend in {tuple(experts.BACKENDS)}")
    return [r for m in ROWS if m in methods for r in [m] + sorted(v for v in variants if v.startswith(m + "@"))]


DATA = ("synthetic", "stdlib")


def stdlib_batches(s: Scale, n: int, tfds_data_dir: str = "") -> list[dict]:
    """The first n training batches of the Table-1 tiny/small runs' data at scale s (stdlib, byte tokens;
    the corpus is built in tfds_data_dir on first use, '' = the tfds default, as training does)."""
    cfg = data_lib.DataConfig(source="stdlib", seq_len=s.seq_len, batch_size=s.batch, tfds_data_dir=tfds_data_dir)
    it = data_lib.train_iterator(cfg, data_lib.get_tokenizer(cfg))
    return [{k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(n)]


def synthetic_batch(s: Scale, seed: int = 0) -> dict:
    """A [B, S] batch of random byte tokens: one document per row, every target weighted."""
    tok = np.random.default_rng(seed).integers(0, 256, (s.batch, s.seq_len + 1))
    return dict(inputs=jnp.asarray(tok[:, :-1], jnp.int32), targets=jnp.asarray(tok[:, 1:], jnp.int32),
                segment_ids=jnp.ones((s.batch, s.seq_len), jnp.int32),
                positions=jnp.broadcast_to(jnp.arange(s.seq_len, dtype=jnp.int32), (s.batch, s.seq_len)),
                weights=jnp.ones((s.batch, s.seq_len), jnp.float32))


def n_params(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def _once(compiled, state, batch, step: int):
    """(new state, the step's metrics, wall ms, process CPU ms: user + sys over all threads) of one train step."""
    c0, t0 = time.process_time(), time.perf_counter()
    state, out = compiled(state, batch, jnp.asarray(step, jnp.int32))
    jax.block_until_ready((state, out))
    return state, out, (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


class _Row:
    """One method at one scale: its compiled step, its (donated, carried) state and its timings."""

    def __init__(self, method: str, s: Scale, batches: list[dict], log):
        self.method, self.scale, self.batches = method, s, batches  # step i takes batches[i]
        self.config = model_config(method, s)
        t = config_lib.TrainConfig(steps=s.steps, warmup_steps=s.warmup, lr=s.lr)
        self.trainer = train.Trainer(self.config, t, seed=0)
        self.state = self.trainer.init()
        t0 = time.perf_counter()
        self.compiled = self.trainer.lower_train_step(s.batch, s.seq_len).compile()
        self.compile_s = time.perf_counter() - t0
        self.step, self.wall, self.cpu, self.max_vio = 0, [], [], []
        t0 = time.perf_counter()
        self.run(record=False)  # warm-up
        log(f"  {method:12s} compiled in {self.compile_s:.1f} s, warm-up step {time.perf_counter() - t0:.2f} s")

    def run(self, record: bool = True) -> None:
        self.state, out, wall, cpu = _once(self.compiled, self.state, self.batches[self.step], self.step)
        self.loss = out["loss"]
        self.step += 1
        if record:
            self.wall.append(wall)
            self.cpu.append(cpu)
            if "max_vio" in out:  # per routed layer, the step's own batch (outside the timing)
                self.max_vio.append([round(v, 4) for v in np.asarray(out["max_vio"], np.float64).tolist()])

    def ffn_active(self) -> float:
        return metrics.active_params(self.config)["ffn"]

    def result(self) -> dict:
        s, ma = self.scale, self.compiled.memory_analysis()
        active = metrics.active_params(self.config)
        embed = 0 if self.config.tie_embeddings else s.d_model * VOCAB  # tied: counted as the unembedding
        flops = metrics.flops_per_token(self.config, s.seq_len)
        tokens = s.batch * s.seq_len
        ms = statistics.median(self.wall)
        f = self.config.moe
        return dict(
            method=self.method, scale=s.name, n_layers=s.n_layers, d_model=s.d_model, d_ff=s.d_ff,
            n_experts=f.n_experts, top_k=f.top_k, n_shared=f.n_shared, expert_width=f.expert_width,
            batch=s.batch, seq_len=s.seq_len, tokens_per_step=tokens,
            params_total=n_params(self.state["params"]), params_active=int(sum(active.values()) + embed),
            params_active_ffn=int(active["ffn"]), flops_per_token=flops,
            step_ms=ms, times_ms=self.wall, cpu_ms=statistics.median(self.cpu), tokens_per_s=tokens / ms * 1e3,
            model_gflops_per_s=tokens / ms * 1e3 * flops / 1e9, compile_s=self.compile_s,
            temp_mib=ma.temp_size_in_bytes / MiB if ma is not None else float("nan"),
            args_mib=ma.argument_size_in_bytes / MiB if ma is not None else float("nan"),
            loss_last=float(self.loss), max_vio=self.max_vio,
            runs=f"compile + 1 warm-up + {len(self.wall)} timed, round-robin",
        )


def _median_ratio(base: _Row, row: _Row) -> float:
    """Median over rounds of tokens/s(row) / tokens/s(base) = base step time / row step time."""
    return statistics.median(b / r for b, r in zip(base.wall, row.wall))


def run_scale(s: Scale, methods, repeats: int, log=print, data: str = "synthetic") -> list[dict]:
    """Rows of one scale: every row compiled and warmed up, then `repeats` rounds of one step per row."""
    log(f"scale {s}, data {data}")
    batches = stdlib_batches(s, 1 + repeats) if data == "stdlib" else [synthetic_batch(s)] * (1 + repeats)
    rows = [_Row(m, s, batches, log) for m in rows_for(methods)]
    t0 = time.perf_counter()
    for r in range(repeats):
        for i in range(len(rows)):
            rows[(r + i) % len(rows)].run()
    log(f"  {repeats} rounds in {time.perf_counter() - t0:.1f} s")
    by_name = {row.method: row for row in rows}
    by_ffn = {row.ffn_active(): row for row in rows if row.method in ("dense", "dense2x")}
    out = []
    for row in rows:
        res = row.result()
        base = by_ffn.get(row.ffn_active())
        res.update(data=data, ffn_active_x=row.ffn_active() / by_name["dense"].ffn_active(),
                   ratio_vs_dense=_median_ratio(by_name["dense"], row),
                   equal_active_baseline=base.method if base else None,
                   ratio_vs_equal_active=_median_ratio(base, row) if base else float("nan"))
        if "@" in row.method:  # against the same method on its default backend, round by round
            default = by_name[row.method.partition("@")[0]]
            res.update(ratios_vs_default_backend=[b / r for b, r in zip(default.wall, row.wall)],
                       ratio_vs_default_backend=_median_ratio(default, row))
        log(f"  {row.method:12s} {res['step_ms']:9.1f} ms/step  {res['tokens_per_s']:9.0f} tokens/s  "
            f"x{res['ratio_vs_dense']:.2f} vs dense, "
            f"x{res['ratio_vs_equal_active']:.2f} vs {res['equal_active_baseline']}"
            f"  temp {res['temp_mib']:.0f} MiB  loss {res['loss_last']:.2f}")
        out.append(res)
    return out


def run(quick: bool, repeats: int | None = None, scale_names=None, methods=ROWS, log=print,
        data: str = "synthetic") -> list[dict]:
    all_scales = scales()
    names = scale_names or (("tiny",) if quick else ("tiny", "small"))
    out = []
    for name in names:
        n = repeats or (QUICK_REPEATS if quick else DEFAULT_REPEATS[name])
        out.extend(run_scale(all_scales[name], methods, n, log, data))
    return out


def _m(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def ratio_interval(base_ms: list[float], row_ms: list[float]) -> str:
    """Per-round tokens/s ratios row / base (= base ms / row ms, the rounds paired): their mean and 95%
    interval, mean ± t_{0.975, n-1} s / sqrt(n); '-' with fewer than 2 rounds."""
    r = tuple(b / m for b, m in zip(base_ms, row_ms))
    if len(r) < 2:
        return "-"
    p = report.Paired(seeds=tuple(range(len(r))), diffs=r)  # the results record's t interval, rounds as seeds
    lo, hi = p.interval
    return f"{p.mean:.2f} [{lo:.2f}, {hi:.2f}]"


def table(rows: list[dict]) -> str:
    """Markdown table of the rows (also `--table FILE` from a saved JSON). The bracketed columns are per-round
    means with 95% intervals (`ratio_interval`); 'vs default backend' only for METHOD@BACKEND rows."""
    lines = ["| scale | method | params | active | active FFN | MFLOP/token | ms/step | tokens/s | model GFLOP/s "
             "| vs dense | vs equal-active dense | per round [95%] | vs default backend [95%] | temp MiB |",
             "|" + "---|" * 14]
    by = {(r["scale"], r["method"]): r for r in rows}
    for r in rows:
        eq = r["ratio_vs_equal_active"]
        base = by.get((r["scale"], r["equal_active_baseline"]))
        ci = ratio_interval(base["times_ms"], r["times_ms"]) if base else "-"
        eq = f"{eq:.2f}x ({r['equal_active_baseline']})" if eq == eq else "-"
        default = by.get((r["scale"], r["method"].partition("@")[0])) if "@" in r["method"] else None
        vs_default = ratio_interval(default["times_ms"], r["times_ms"]) if default else "-"
        lines.append(
            f"| {r['scale']} | {r['method']} | {_m(r['params_total'])} | {_m(r['params_active'])} "
            f"| {r['ffn_active_x']:.0f}x | {r['flops_per_token'] / 1e6:.1f} | {r['step_ms']:.0f} "
            f"| {r['tokens_per_s']:.0f} | {r['model_gflops_per_s']:.0f} | {r['ratio_vs_dense']:.2f}x | {eq} "
            f"| {ci} | {vs_default} | {r['temp_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
    p.add_argument("--quick", action="store_true", help=f"tiny scale, {QUICK_REPEATS} steps per row (< 30 s)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed steps per row (default {DEFAULT_REPEATS}; {QUICK_REPEATS} with --quick)")
    p.add_argument("--scales", default=None, help="comma-separated scales (default tiny,small; tiny with --quick)")
    p.add_argument("--methods", default=",".join(ROWS),
                   help="comma-separated rows; dense (and dense2x for gshard/deepseekmoe) are always added")
    p.add_argument("--data", choices=DATA, default="synthetic",
                   help="synthetic: one batch of random bytes; stdlib: the Table-1 runs' batches")
    p.add_argument("--table", metavar="FILE", help="print the table of a saved JSON and exit (runs nothing)")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.load(open(args.table))))
        return
    known = scales()
    names = tuple(args.scales.split(",")) if args.scales else None
    for name in names or ():
        if name not in known or name == "paper":
            raise SystemExit(f"--scales: {name!r} is invalid; allowed: tiny, small")
    methods = tuple(m for m in args.methods.split(",") if m)
    rows_for(methods)  # validate before compiling anything
    print(common.machine_line(), flush=True)
    t0 = time.perf_counter()
    rows = run(args.quick, args.repeats, names, methods, log=lambda s: print(s, flush=True), data=args.data)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    print(f"\n{time.perf_counter() - t0:.0f} s; load average at the end {load}\n")
    print(table(rows))
    if args.json:
        common.write_json(args.json, rows)


if __name__ == "__main__":
    main()
