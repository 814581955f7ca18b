"""Tables, paired statistics and figures from a results directory of experiments/deepseekmoe/run.py, and the
generated parts of RESULTS.md.

  python -m experiments.deepseekmoe.report --workdir=experiments/deepseekmoe/results/table1 [--out=DIR]
  python -m experiments.deepseekmoe.report --results-md      # regenerate RESULTS.md's generated blocks
  python -m experiments.deepseekmoe.report --results-md --check   # exit 1 if RESULTS.md is out of date

Writes to DIR (default WORKDIR/report):
  tables.md, tables.tex   one row per variant (per variant and budget for the token sweep): validation loss
                          (nats/token) mean ± sample standard deviation over seeds, the paper's number where it
                          publishes one, parameters (total, active), training FLOPs per token and wall time per
                          run; balancing adds MaxVio (validation: global and per batch; training batches),
                          olmoe tokens/s; specialisation adds the evaluation-time ablations. Captions state the
                          number of validation tokens. LaTeX uses booktabs. Then every claim of the suite
                          (suites.Claim: the paper's ordering and the others) checked on paired seeds.
  loss_curves.{png,pdf}   training and validation loss against steps, mean over seeds (band: min..max)
  expert_load.{png,pdf}   validation expert load per layer (share of assignments; mean over seeds)
  max_vio.{png,pdf}       MaxVio of each logged training batch (mean over layers and seeds)
  disabled_top.{png,pdf}  specialisation: loss against the share of each token's top routed experts disabled
  active_experts.{png,pdf} specialisation: loss against the number of active routed experts
  token_sweep.{png,pdf}   tokens: loss against training tokens, and each claim's paired difference with its
                          95% interval against tokens

Paired statistics: seed s trains every variant with the same initialisation seed and data order, so a claim
"A < B" is checked on the per-seed differences d_s = B_s - A_s (positive: the claim held in seed s). With n
seeds, mean d and sample standard deviation s_d, the 95% confidence interval is d ± t_{0.975, n-1} s_d / sqrt(n)
(Student t, n - 1 degrees of freedom). Verdict: `holds` if the interval lies above 0, `reversed` if below,
`inconclusive` if it covers 0 (always with one seed). The seeds vary initialisation and data order only: the
validation sample is the same in every run, so its own sampling error is not in the interval.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re
import sys

import numpy as np

from experiments.deepseekmoe import suites

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
RESULTS_DIR = os.path.join(HERE, "results")


def load_results(workdir: str) -> tuple[dict, list[dict]]:
    """(suite.json, [results/*.json]) of a results directory; FileNotFoundError if it is not one."""
    path = os.path.join(workdir, "suite.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--workdir={workdir} has no suite.json; allowed: a results directory written by "
                                f"python -m experiments.deepseekmoe.run")
    with open(path) as f:
        meta = json.load(f)
    results = []
    for p in sorted(glob.glob(os.path.join(workdir, "results", "*.json"))):
        with open(p) as f:
            results.append(json.load(f))
    return meta, results


def _stats(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None], float)
    if not v.size:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")  # no spread from one seed


# ------------------------------------------------------------------ paired statistics


@dataclasses.dataclass(frozen=True)
class Paired:
    """Per-seed differences d_s = higher_s - lower_s of a claim "lower < higher" and their 95% t interval."""

    seeds: tuple[int, ...]
    diffs: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def held(self) -> int:
        return int(sum(d > 0 for d in self.diffs))

    @property
    def mean(self) -> float:
        return float(np.mean(self.diffs))

    @property
    def interval(self) -> tuple[float, float]:
        """mean ± t_{0.975, n-1} s / sqrt(n); (nan, nan) for one seed."""
        if self.n < 2:
            return float("nan"), float("nan")
        from scipy import stats

        half = stats.t.ppf(0.975, self.n - 1) * np.std(self.diffs, ddof=1) / np.sqrt(self.n)
        return self.mean - half, self.mean + half

    @property
    def verdict(self) -> str:
        lo, hi = self.interval
        return "holds" if lo > 0 else "reversed" if hi < 0 else "inconclusive"  # nan compares False


def paired(lower: dict[int, float], higher: dict[int, float]) -> Paired | None:
    """Paired differences over the seeds both sides have (None if they share none)."""
    seeds = tuple(sorted(set(lower) & set(higher)))
    return Paired(seeds, tuple(float(higher[s] - lower[s]) for s in seeds)) if seeds else None


def metric(r: dict, name: str, ev: str = "") -> float | None:
    """One number of a run: its validation loss (or, with `ev`, that of its evaluation-time ablation `ev`),
    'max_vio_global' / 'max_vio_batch' (validation MaxVio, mean over layers), or 'rise@EVAL' (the loss
    ablation EVAL adds over the trained model). Evaluation names are aligned across expert counts
    (`_eval_key`: 'disable_top=1/16'). None where the run lacks it."""
    evals = {}
    if "evals" in r:
        E = r["config"]["model"]["moe"]["n_experts"]
        evals = {_eval_key(k, E): v["val_loss"] for k, v in r["evals"].items()}
    if name.startswith("rise@"):
        key = name.split("@", 1)[1]
        return evals[key] - r["val_loss"] if key in evals else None
    if ev:
        return evals.get(ev) if name == "val_loss" else None
    if name == "val_loss":
        return r["val_loss"]
    if name in ("max_vio_global", "max_vio_batch"):
        key = {"max_vio_global": "val_max_vio", "max_vio_batch": "val_max_vio_batch"}[name]
        return float(np.mean(r[key])) if key in r else None
    kind, _, task = name.partition("@")
    if kind in ("acc", "acc_norm") and task:
        return r.get("downstream", {}).get(task, {}).get(kind)
    raise ValueError(f"metric {name!r} is invalid; allowed: val_loss, max_vio_global, max_vio_batch, rise@EVAL, "
                     f"acc@TASK, acc_norm@TASK")


METRIC_LABELS = {"val_loss": "val loss", "max_vio_global": "MaxVio (val, global)",
                 "max_vio_batch": "MaxVio (val, per batch)"}


def _budget(r: dict) -> int | None:
    return r.get("budget_steps")


def per_seed(results: list[dict], side: str, name: str, budget: int | None = None) -> dict[int, float]:
    """{seed: metric} of claim side 'variant' or 'variant@eval' over the runs of one budget."""
    variant, _, ev = side.partition("@")
    out = {}
    for r in results:
        if r["variant"] == variant and _budget(r) == budget:
            v = metric(r, name, ev)
            if v is not None:
                out[r["seed"]] = v
    return out


def check_claims(suite: suites.Suite, results: list[dict]) -> list[dict]:
    """Every claim of the suite (per budget for a token sweep) that both sides have seeds for:
    {'claim', 'budget', 'paired'}."""
    out = []
    budgets = sorted({_budget(r) for r in results}, key=lambda b: b or 0)
    for budget in budgets:
        for c in suite.all_claims():
            p = paired(per_seed(results, c.lower, c.metric, budget), per_seed(results, c.higher, c.metric, budget))
            if p:
                out.append({"claim": c, "budget": budget, "paired": p})
    return out


def _side_label(suite: suites.Suite, side: str) -> str:
    variant, _, ev = side.partition("@")
    label = next((r.label for r in suite.rows if r.variant == variant), variant)
    return f"{label}, {_eval_label(ev)}" if ev else label


def claim_text(suite: suites.Suite, c: suites.Claim) -> str:
    """'DeepSeekMoE < GShard' (val loss), or with another metric 'A < B in MaxVio (val, global)'."""
    if c.metric.startswith("rise@"):
        ev = _eval_label(c.metric.split("@", 1)[1])
        return f"loss rise with {ev}: {_side_label(suite, c.lower)} < {_side_label(suite, c.higher)}"
    what = "" if c.metric == "val_loss" else f" in {METRIC_LABELS.get(c.metric, c.metric)}"
    return f"{_side_label(suite, c.lower)} < {_side_label(suite, c.higher)}{what}"


def _signed(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


def claims_table(suite: suites.Suite, checked: list[dict], tokens_per_step: int | None = None) -> str:
    """Markdown: one row per checked claim with its paired difference, 95% interval and verdict."""
    if not checked:
        return ""
    sweep = any(x["budget"] for x in checked)
    headers = ["claim", *(["tokens"] if sweep else []), "source", "held in", "difference", "95% CI",
               "per seed", "verdict"]
    cells = []
    for x in checked:
        c, p = x["claim"], x["paired"]
        lo, hi = p.interval
        ci = "-" if p.n < 2 else f"[{_signed(lo)}, {_signed(hi)}]"
        cells.append([claim_text(suite, c), *([_tokens(x["budget"] * tokens_per_step)] if sweep else []), c.source,
                      f"{p.held} of {p.n} seed{'s' * (p.n > 1)}", _signed(p.mean), ci, ", ".join(_signed(d) for d in p.diffs),
                      f"**{p.verdict}**"])
    note = ("Difference: the right side's minus the left side's value, mean over seeds (positive: the claim held); "
            "95% CI: Student t with n − 1 degrees of freedom over the paired seeds; verdict `holds` / `reversed` "
            "when the interval excludes 0, else `inconclusive`.")
    return markdown(headers, cells) + "\n\n" + note


def tokens_per_step(results: list[dict]) -> int:
    """Training tokens per step of a suite's runs (batch_size x seq_len of the first; 0 without runs)."""
    return results[0]["config"]["data"]["batch_size"] * results[0]["config"]["data"]["seq_len"] if results else 0


def _tokens(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


# ------------------------------------------------------------------ tables


def summarise(suite: suites.Suite, results: list[dict]) -> list[dict]:
    """One dict per variant of the suite that has results (per variant and budget for a token sweep), in the
    suite's order (budget by budget)."""
    by = collections.defaultdict(list)
    for r in results:
        by[r["variant"], _budget(r)].append(r)
    rows = []
    for budget in sorted({_budget(r) for r in results}, key=lambda b: b or 0):
        for row in suite.rows:
            rs = sorted(by.get((row.variant, budget), []), key=lambda r: r["seed"])
            if rs:
                rows.append(_summary(row, rs, budget))
    return rows


def _summary(row: suites.Row, rs: list[dict], budget: int | None) -> dict:
    c = rs[0]["config"]
    out = {"variant": row.variant, "label": row.label, "paper": row.paper, "seeds": [r["seed"] for r in rs],
           "budget": budget, "tokens": rs[0].get("tokens"),
           "val_loss": _stats(r["val_loss"] for r in rs), "per_seed": {r["seed"]: r["val_loss"] for r in rs},
           "val_tokens": sorted({val_tokens(r) for r in rs}),
           "params_total": rs[0]["params_total"], "params_active": rs[0]["params_active"],
           "flops_per_token": rs[0]["flops_per_token"], "wall_s": sum(r["wall_s"] for r in rs),
           "tokens_per_s": _stats(r["curves"].get("tokens_per_s") for r in rs),
           "tokens_per_step": c["data"]["batch_size"] * c["data"]["seq_len"]}
    if "val_max_vio" in rs[0]:
        out["max_vio_global"] = _stats(np.mean(r["val_max_vio"]) for r in rs)
        out["max_vio_batch"] = _stats(np.mean(r["val_max_vio_batch"]) for r in rs)
    if "max_vio" in rs[0]["curves"]:  # each logged training batch, mean over layers and steps
        out["max_vio_train"] = _stats(np.mean(r["curves"]["max_vio"]) for r in rs)
    if rs[0].get("init_gate_mass"):
        out["init_gate_mass"] = _stats(np.mean(r["init_gate_mass"]) for r in rs)
    tasks = sorted({t for r in rs for t in r.get("downstream", {})})
    if tasks:  # downstream accuracies (moejax.downstream), mean over the seeds that have them
        out["downstream"] = {f"{t} {k}": _stats(r["downstream"][t][k] for r in rs if t in r.get("downstream", {}))
                             for t in tasks for k in ("acc", "acc_norm")}
    if "evals" in rs[0]:
        E = c["model"]["moe"]["n_experts"]
        names = {_eval_key(n, E): n for n in rs[0]["evals"]}
        out["evals"] = {k: _stats(r["evals"][n]["val_loss"] for r in rs if n in r["evals"]) for k, n in names.items()}
    return out


def val_tokens(r: dict) -> int:
    """The number of validation targets behind a run's val_loss: recorded since the evaluation grew; older
    runs evaluated eval_steps full batches (their validation split was larger than that)."""
    if "val_tokens" in r:
        return int(r["val_tokens"])
    d = r["config"]["data"]
    return d["eval_steps"] * d["batch_size"] * d["seq_len"]


def _eval_key(name: str, n_experts: int) -> str:
    """'disable_top=r' -> 'disable_top=i/16' (r / E rounded to sixteenths), so models with different E align."""
    if name.startswith("disable_top="):
        return f"disable_top={round(16 * int(name.split('=')[1]) / n_experts)}/16"
    return name


def _pm(ms, digits=3) -> str:
    m, s = ms
    return "-" if np.isnan(m) else f"{m:.{digits}f}" + ("" if np.isnan(s) else f" ± {s:.{digits}f}")


def _millions(n) -> str:
    return f"{n / 1e6:.2f}M"


def columns(suite: suites.Suite, rows: list[dict]) -> list[tuple[str, callable]]:
    """(header, row -> cell text) of the suite's main table."""
    cols = [("variant", lambda r: r["label"])]
    if any(r["budget"] for r in rows):
        cols.append(("tokens", lambda r: _tokens(r["tokens"])))
    cols += [("seeds", lambda r: str(len(r["seeds"]))), ("val loss", lambda r: _pm(r["val_loss"]))]
    if any(r["paper"] is not None for r in rows):
        cols.append(("paper", lambda r: "-" if r["paper"] is None else f"{r['paper']:.3f}"))
    cols += [("params", lambda r: _millions(r["params_total"])), ("active", lambda r: _millions(r["params_active"])),
             ("GFLOPs/token", lambda r: f"{r['flops_per_token'] / 1e9:.4f}"),
             ("wall s/run", lambda r: f"{r['wall_s'] / len(r['seeds']):.0f}")]
    if any("init_gate_mass" in r for r in rows) and suite.name == "gate_scale":
        cols.append(("routed gate mass at init", lambda r: _pm(r.get("init_gate_mass", (np.nan, np.nan)), 2)))
    if suite.name == "balancing":
        nan = (np.nan, np.nan)
        cols += [("MaxVio val global", lambda r: _pm(r.get("max_vio_global", nan), 2)),
                 ("MaxVio val batch", lambda r: _pm(r.get("max_vio_batch", nan), 2)),
                 ("MaxVio train batch", lambda r: _pm(r.get("max_vio_train", nan), 2))]
    if suite.name == "olmoe":
        cols.append(("tokens/s", lambda r: _pm(r["tokens_per_s"], 0)))
    names = sorted({n for r in rows for n in r.get("downstream", {})})
    cols += [(n, lambda r, n=n: _pm(r.get("downstream", {}).get(n, (np.nan, np.nan)))) for n in names]
    return cols


def eval_columns(rows: list[dict]) -> list[str]:
    names = []
    for r in rows:
        names += [n for n in r.get("evals", {}) if n not in names]
    kind = lambda n: ("disable_top", "no_shared", "top_k").index(n.split("=")[0]) if n.split("=")[0] in (
        "disable_top", "no_shared", "top_k") else 3
    return sorted(names, key=lambda n: (kind(n), n))


def markdown(headers: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("−", "$-$"), ("x1.", r"$\times$1."), ("x4", r"$\times$4"),
                 ("x16", r"$\times$16"), ("x 2.5", r"$\times$ 2.5"), ("x 4.3", r"$\times$ 4.3"), ("**", "")):
        s = s.replace(a, b)
    return s


def latex(headers: list[str], cells: list[list[str]], caption: str, label: str) -> str:
    """A booktabs table."""
    spec = "l" + "r" * (len(headers) - 1)
    body = [" & ".join(_tex(c) for c in row) + r" \\" for row in cells]
    return "\n".join([r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                      " & ".join(_tex(h) for h in headers) + r" \\", r"\midrule", *body, r"\bottomrule",
                      r"\end{tabular}", rf"\caption{{{_tex(caption)}}}", rf"\label{{{label}}}", r"\end{table}"])


def _count(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:,}" if lo == hi else f"{lo:,} to {hi:,}"


def caption(suite: suites.Suite, meta: dict, rows: list[dict]) -> str:
    n_val = _count([t for r in rows for t in r["val_tokens"]])
    title = suite.title if suite.title.endswith(("?", ".")) else suite.title + "."
    text = (f"{title} Scale {meta['scale']}; validation loss in nats/token on {n_val} held-out tokens, "
            f"mean ± sample standard deviation over seeds. {suite.paper_note}").strip()
    if suite.name == "balancing":
        text += (" MaxVio (Wang et al. 2024, eq. 7; mean over layers): of the load over all validation batches "
                 "(global), of each validation batch, and of each logged training batch (averaged).")
    return text


def tables(suite: suites.Suite, meta: dict, rows: list[dict], results: list[dict] | None = None
           ) -> tuple[str, str]:
    """(markdown, LaTeX) of the suite's tables; with `results`, the claims checked on paired seeds."""
    cols = columns(suite, rows)
    headers, cells = [h for h, _ in cols], [[f(r) for _, f in cols] for r in rows]
    cap = caption(suite, meta, rows)
    md = [f"### {suite.title}", "", markdown(headers, cells), "", cap]
    tex = [latex(headers, cells, cap, f"tab:{suite.name}")]
    names = eval_columns(rows)
    if names:
        eheaders = ["evaluation"] + [r["label"] for r in rows]
        ecells = [[_eval_label(n)] + [_pm(r.get("evals", {}).get(n, (np.nan, np.nan))) for r in rows]
                  for n in ["trained"] + names]
        for row in ecells[1:]:
            paper = [suites.PAPER_EVALS.get((r["variant"], n)) for r in rows for n in [_eval_name(row[0], names)]]
            if any(p is not None for p in paper):
                row[0] += " (paper: " + ", ".join(f"{p:.3f}" for p in paper if p is not None) + ")"
        for r, col in zip(rows, range(1, len(eheaders))):
            ecells[0][col] = _pm(r["val_loss"])
        ecap = ("Evaluation-time ablations of the trained models (DeepSeekMoE sec. 4.5): validation loss with each "
                "token's top r routed experts disabled, without the shared expert (one more routed expert active "
                "instead), and with fewer routed experts active.")
        md += ["", markdown(eheaders, ecells), "", ecap]
        tex.append(latex(eheaders, ecells, ecap, f"tab:{suite.name}_evals"))
    if results:
        checked = check_claims(suite, results)
        if checked:
            md += ["", "Claims, checked on paired seeds:", "", claims_table(suite, checked, rows[0]["tokens_per_step"])]
    return "\n".join(md) + "\n", "\n\n".join(tex) + "\n"


def _eval_label(name: str) -> str:
    if name == "trained":
        return "as trained"
    if name == "no_shared":
        return "no shared expert, +1 routed"
    key, _, value = name.partition("=")
    return {"disable_top": f"top {value} of routed disabled", "top_k": f"{value} routed active"}.get(key, name)


def _eval_name(label: str, names: list[str]) -> str:
    return next((n for n in names if _eval_label(n) == label), "")


# ------------------------------------------------------------------ figures


def _by_variant(results):
    by = collections.defaultdict(list)
    for r in results:
        by[r["variant"]].append(r)
    return by


def _save(fig, out: str, name: str) -> list[str]:
    paths = [os.path.join(out, f"{name}.{ext}") for ext in ("png", "pdf")]
    for p in paths:  # no creation date in the PDFs: regenerating an unchanged figure leaves the file unchanged
        fig.savefig(p, bbox_inches="tight", dpi=150, metadata={"CreationDate": None} if p.endswith(".pdf") else None)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def _band(ax, xs, ys, label):
    """Mean line and min..max band over seeds; curves are cut to the shortest."""
    n = min(len(y) for y in ys)
    y = np.asarray([y[:n] for y in ys], float)
    line, = ax.plot(xs[:n], y.mean(0), label=label)
    if len(ys) > 1:
        ax.fill_between(xs[:n], y.min(0), y.max(0), color=line.get_color(), alpha=0.2)


def _smooth(y, w: int) -> np.ndarray:
    """Trailing mean over the last w points (fewer at the start)."""
    c = np.cumsum(np.concatenate([[0.0], np.asarray(y, float)]))
    i = np.arange(1, len(y) + 1)
    return (c[i] - c[np.maximum(i - w, 0)]) / np.minimum(i, w)


def _periodic(r: dict) -> tuple[list, list]:
    """A run's periodic validation points: the last one is left out when the final evaluation read a different
    sample (data.final_eval_steps), whose loss is not comparable with the periodic ones."""
    c, d = r["curves"], r["config"]["data"]
    xs, ys = list(c["val_step"]), list(c["val_loss"])
    if d.get("final_eval_steps", 0) not in (0, d["eval_steps"]) and xs and xs[-1] == r["config"]["train"]["steps"]:
        xs, ys = xs[:-1], ys[:-1]
    return xs, ys


def plot_loss_curves(suite, results, out):
    """Training loss (trailing mean over 1/50 of the logged points) and validation loss against steps; lines
    are the periodic evaluations, dots at the last step the final one when it read a larger sample."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    by = _by_variant(results)
    finals, sizes = [], set()
    for i, row in enumerate(suite.rows):
        rs = by.get(row.variant)
        if not rs:
            continue
        w = max(1, len(rs[0]["curves"]["loss"]) // 50)
        _band(a, rs[0]["curves"]["step"], [_smooth(r["curves"]["loss"], w) for r in rs], row.label)
        periodic = [_periodic(r) for r in rs]
        d = rs[0]["config"]["data"]
        sizes.add(("periodic", d["eval_steps"] * d["batch_size"] * d["seq_len"]))
        if periodic[0][0]:
            _band(b, periodic[0][0], [ys for _, ys in periodic], row.label)
        if len(periodic[0][0]) < len(rs[0]["curves"]["val_step"]):  # the final evaluation: mean, min..max
            color = b.get_lines()[-1].get_color() if periodic[0][0] else None
            v = np.asarray([r["val_loss"] for r in rs], float)
            x = rs[0]["config"]["train"]["steps"] * (1 + 0.012 * (i - (len(suite.rows) - 1) / 2))  # apart
            b.errorbar([x], [v.mean()], yerr=[[v.mean() - v.min()], [v.max() - v.mean()]], fmt="o", color=color,
                       capsize=3, label=None if periodic[0][0] else row.label)
            finals.append(v.mean())
            sizes.add(("final", val_tokens(rs[0])))
    a.set(xlabel="step", ylabel="training loss (incl. balance losses)", title="training (trailing mean)")
    note = ", ".join(f"{k} {n:,} tokens" for k, n in sorted(sizes, reverse=True))
    b.set(xlabel="step", ylabel="validation loss (nats/token)",
          title="validation" + (f"\nlines: periodic, dots: final ({note})" if finals else ""))
    for ax, skip in ((a, 1), (b, 0)):  # the first steps' training loss (~5.5) would flatten the differences
        ax.grid(alpha=0.3)
        ys = [y for ln in ax.get_lines() for y in ln.get_ydata()[skip:]] + finals
        if ys:
            lo = min(ys)
            ax.set_ylim(lo - 0.05, min(max(ys), lo + 2.5) + 0.05)
    b.legend(fontsize=8)
    return _save(fig, out, "loss_curves")


def plot_expert_load(suite, results, out):
    import matplotlib.pyplot as plt

    by = _by_variant(results)
    rows = [row for row in suite.rows if by.get(row.variant) and "val_load" in by[row.variant][0]]
    if not rows:
        return []
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 1.2 + 0.9 * len(rows) * 2), squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        load = np.mean([r["val_load"] for r in by[row.variant]], 0)  # [L, E]
        E = load.shape[1]
        im = ax.imshow(load * E, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, float((load * E).max())),
                       interpolation="nearest")
        ax.set(title=f"{row.label}: expert load x E (1 = uniform)", ylabel="layer", xlabel="routed expert")
        ax.set_yticks(range(load.shape[0]))
        fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    return _save(fig, out, "expert_load")


def _finish(fig, ax, out: str, name: str, **labels) -> list[str]:
    ax.set(**labels)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out, name)


def _errorbar(ax, x, y, label):
    """y [seeds, points]: mean with standard-deviation bars over seeds."""
    y = np.asarray(y, float)
    ax.errorbar(x, y.mean(0), yerr=y.std(0, ddof=1) if len(y) > 1 else None, marker="o", capsize=3, label=label)


def plot_max_vio(suite, results, out):
    import matplotlib.pyplot as plt

    by = _by_variant(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in suite.rows:
        rs = by.get(row.variant)
        if rs and "max_vio" in rs[0]["curves"]:
            _band(ax, rs[0]["curves"]["step"], [np.mean(r["curves"]["max_vio"], -1) for r in rs], row.label)
    if not ax.get_lines():
        plt.close(fig)
        return []
    return _finish(fig, ax, out, "max_vio", xlabel="step", ylabel="MaxVio of the training batch (mean over layers)",
                   yscale="log")


def plot_specialisation(suite, results, out):
    """Fig. 4 (loss against the share of each token's top routed experts disabled) and Fig. 5 (loss against
    the routed experts active at evaluation) of DeepSeekMoE, for the rows with evaluation-time ablations."""
    import matplotlib.pyplot as plt

    by = _by_variant(results)
    rows = [row for row in suite.rows if by.get(row.variant) and "evals" in by[row.variant][0]]
    if not rows:
        return []
    loss = lambda r, n: r["val_loss"] if n == "trained" else r["evals"][n]["val_loss"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        rs = by[row.variant]
        E = rs[0]["config"]["model"]["moe"]["n_experts"]
        names = ["trained"] + [n for n in rs[0]["evals"] if n.startswith("disable_top=")]
        x = [0.0] + [int(n.split("=")[1]) / E for n in names[1:]]
        _errorbar(ax, x, [[loss(r, n) for n in names] for r in rs], row.label)
    paths = _finish(fig, ax, out, "disabled_top", xlabel="share of routed experts disabled (each token's top ones)",
                    ylabel="validation loss (nats/token)")
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        rs = by[row.variant]
        K = rs[0]["config"]["model"]["moe"]["top_k"]
        names = [f"top_k={k}" for k in range(1, K) if f"top_k={k}" in rs[0]["evals"]] + ["trained"]
        if len(names) == 1:  # no fewer-experts evaluations (e.g. GShard's fixed top-2): a reference line
            ax.axhline(np.mean([r["val_loss"] for r in rs]), ls="--", color="gray", label=f"{row.label} (as trained)")
        else:
            _errorbar(ax, list(range(1, len(names))) + [K], [[loss(r, n) for n in names] for r in rs], row.label)
    return paths + _finish(fig, ax, out, "active_experts", xlabel="routed experts active at evaluation",
                           ylabel="validation loss (nats/token)")




def plot_token_sweep(suite, results, out):
    """Validation loss against training tokens (mean and standard deviation over seeds, log x), and each
    claim's paired difference with its 95% interval against tokens."""
    import matplotlib.pyplot as plt

    rows = summarise(suite, results)
    if len({r["budget"] for r in rows}) < 2:
        return []
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for row in suite.rows:
        mine = [r for r in rows if r["variant"] == row.variant]
        if mine:
            a.errorbar([r["tokens"] for r in mine], [r["val_loss"][0] for r in mine],
                       yerr=[0 if np.isnan(r["val_loss"][1]) else r["val_loss"][1] for r in mine],
                       marker="o", capsize=3, label=row.label)
    a.set(xscale="log", xlabel="training tokens", ylabel="validation loss (nats/token)", title="loss")
    tps = rows[0]["tokens_per_step"]
    checked = collections.defaultdict(list)
    for x in check_claims(suite, results):
        checked[x["claim"]].append(x)
    for i, (c, xs) in enumerate(checked.items()):
        t = np.asarray([x["budget"] * tps for x in xs], float) * (1 + 0.04 * (i - 1))  # side by side
        m = np.asarray([x["paired"].mean for x in xs])
        ci = np.asarray([x["paired"].interval for x in xs])
        err = np.where(np.isnan(ci), 0, np.abs(ci - m[:, None])).T
        b.errorbar(t, m, yerr=err, marker="o", capsize=3, label=claim_text(suite, c))
    b.axhline(0, color="gray", lw=1)
    b.set(xscale="log", xlabel="training tokens", ylabel="paired difference (> 0: claim holds)",
          title="claims, 95% t intervals")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out, "token_sweep")


def sweep_sentences(suite: suites.Suite, results: list[dict]) -> str:
    """For each claim of a token sweep, where along the budgets it holds (generated, so that the text says
    no more than the intervals)."""
    by = collections.defaultdict(list)
    for x in check_claims(suite, results):
        by[x["claim"]].append(x)
    tps = tokens_per_step(results)
    lines = []
    for c, xs in by.items():
        xs = sorted(xs, key=lambda x: x["budget"])
        tok = lambda x: _tokens(x["budget"] * tps)
        held_from = next((i for i in range(len(xs)) if all(x["paired"].verdict == "holds" for x in xs[i:])), None)
        last = xs[-1]["paired"]
        lo, hi = last.interval
        at_last = (f"{_signed(last.mean)} [{_signed(lo)}, {_signed(hi)}], {last.n} seeds" if last.n > 1
                   else f"{_signed(last.mean)}, 1 seed")
        if held_from is not None:
            text = f"holds from {tok(xs[held_from])} tokens on (up to {tok(xs[-1])}: {at_last})"
        else:
            held = [tok(x) for x in xs if x["paired"].verdict == "holds"]
            largest = "largest budget" + (" trained so far" if xs[-1]["budget"] < max(b.steps for b in suite.budgets)
                                          else "")
            text = (f"does not hold at the {largest}, {tok(xs[-1])} tokens: {last.verdict} ({at_last})"
                    + (f"; it holds at {', '.join(held)}" if held else ""))
        lines.append(f"- {claim_text(suite, c)}: {text}.")
    return "\n".join(lines)


def write_report(workdir: str, out: str | None = None) -> str:
    """Write the tables and figures of a results directory; returns the output directory."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    meta, results = load_results(workdir)
    suite = suites.get_suite(meta["suite"])
    out = out or os.path.join(workdir, "report")
    os.makedirs(out, exist_ok=True)
    md, tex = tables(suite, meta, summarise(suite, results), results)
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "tables.tex"), "w") as f:
        f.write(tex)
    if results:
        largest = max((_budget(r) or 0) for r in results)
        final = [r for r in results if (_budget(r) or 0) == largest]  # curves of the longest runs
        for plot in (plot_loss_curves, plot_expert_load, plot_max_vio, plot_specialisation):
            plot(suite, final, out)
        plot_token_sweep(suite, results, out)
    return out


# ------------------------------------------------------------------ RESULTS.md

BLOCK = re.compile(r"<!-- BEGIN GENERATED: (\S+) -->\n.*?<!-- END GENERATED: \1 -->", re.S)
FIGURES = (("loss_curves", "loss curves"), ("token_sweep", "token sweep"), ("expert_load", "expert load"),
           ("max_vio", "MaxVio during training"), ("disabled_top", "disabled top experts"),
           ("active_experts", "active experts"))
LEFTOVERS = re.compile(r"ANALYSIS_|TODO|TBD|FIXME|XXX|<!-- (BEGIN|END) GENERATED")


def results_block(name: str, results_dir: str = RESULTS_DIR, loaded: tuple | None = None) -> str:
    """The generated markdown of results/NAME: tables, claims, figure links (token sweep: its sentences).
    loaded: its (suite.json, results) already read, else they are read here."""
    workdir = os.path.join(results_dir, name)
    meta, results = loaded or load_results(workdir)
    suite = suites.get_suite(meta["suite"])
    md, _ = tables(suite, meta, summarise(suite, results), results)
    runs = f"{len(results)} run" + ("s" if len(results) != 1 else "")
    overrides = f", overrides `{meta['set']}`" if meta.get("set") else ""
    parts = [f"Results: `results/{name}/results/` ({runs}; suite `{meta['suite']}`, scale `{meta['scale']}`"
             f"{overrides}).", "", md.strip()]
    if suite.budgets:
        parts += ["", "Where each claim holds along the token budgets:", "", sweep_sentences(suite, results)]
    figs = [f"![{alt}](results/{name}/report/{fig}.png)" for fig, alt in FIGURES
            if os.path.exists(os.path.join(workdir, "report", f"{fig}.png"))]
    if figs:
        parts += ["", "\n".join(figs)]
    return "\n".join(parts)


def summary_block(names: list[str], results_dir: str = RESULTS_DIR, loaded: dict | None = None) -> str:
    """One row per claim of every results directory named in RESULTS.md, with its verdict. loaded: name ->
    (suite.json, results) already read (regenerate's), else they are read here."""
    cells = []
    for name in names:
        meta, results = (loaded or {}).get(name) or load_results(os.path.join(results_dir, name))
        suite = suites.get_suite(meta["suite"])
        tps = tokens_per_step(results)
        for x in check_claims(suite, results):
            p, lo_hi = x["paired"], x["paired"].interval
            where = name + (f" @ {_tokens(x['budget'] * tps)}" if x["budget"] else "")
            ci = "-" if p.n < 2 else f"[{_signed(lo_hi[0])}, {_signed(lo_hi[1])}]"
            cells.append([claim_text(suite, x["claim"]), x["claim"].source, where, f"{p.held} of {p.n}",
                          _signed(p.mean), ci, f"**{p.verdict}**"])
    return markdown(["claim", "source", "results", "held in (seeds)", "difference", "95% CI", "verdict"], cells)


def regenerate(text: str, results_dir: str = RESULTS_DIR) -> str:
    """`text` (RESULTS.md) with every generated block rebuilt from the results files; 'summary' last, over the
    directories of the other blocks."""
    names = [m.group(1) for m in BLOCK.finditer(text) if m.group(1) != "summary"]
    loaded = {n: load_results(os.path.join(results_dir, n)) for n in names}
    content = {n: results_block(n, results_dir, loaded[n]) for n in names}
    content["summary"] = summary_block(names, results_dir, loaded)

    def fill(m):
        name = m.group(1)
        if name not in content:
            raise ValueError(f"RESULTS.md has a generated block {name!r} of no results directory")
        return f"<!-- BEGIN GENERATED: {name} -->\n{content[name]}\n<!-- END GENERATED: {name} -->"

    return BLOCK.sub(fill, text)


def leftovers(text: str) -> list[str]:
    """Lines outside the generated blocks that look like template leftovers (ANALYSIS_, TODO, unmatched markers)."""
    return [line for line in BLOCK.sub("", text).splitlines() if LEFTOVERS.search(line)]


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=os.path.expanduser, help="results directory of experiments.deepseekmoe.run")
    parser.add_argument("--out", default=None, type=os.path.expanduser, help="output directory (default: WORKDIR/report)")
    parser.add_argument("--results-md", action="store_true", help="regenerate the generated blocks of RESULTS.md")
    parser.add_argument("--check", action="store_true", help="with --results-md: only check, exit 1 if stale")
    args = parser.parse_args(argv)
    try:
        if args.results_md:
            with open(RESULTS_MD) as f:
                text = f.read()
            new = regenerate(text)
            if args.check:
                bad = leftovers(new)
                if new != text or bad:
                    sys.exit(f"experiments.deepseekmoe.report: error: {RESULTS_MD} is "
                             + ("out of date (run --results-md)" if new != text else f"holding leftovers: {bad}"))
                print(f"{RESULTS_MD}: up to date")
                return
            with open(RESULTS_MD, "w") as f:
                f.write(new)
            print(RESULTS_MD)
        elif args.workdir:
            print(write_report(args.workdir, args.out))
        else:
            parser.error("give --workdir or --results-md")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"experiments.deepseekmoe.report: error: {e}")


if __name__ == "__main__":
    main()
