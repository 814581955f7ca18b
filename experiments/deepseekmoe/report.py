"""Tables and figures from a results directory of experiments/deepseekmoe/run.py.

  python -m experiments.deepseekmoe.report --workdir=experiments/deepseekmoe/results/table1 [--out=DIR]

Writes to DIR (default WORKDIR/report):
  tables.md, tables.tex   one row per variant: validation loss (nats/token) mean +- standard deviation over
                          seeds, the paper's number where it publishes one, parameters (total, active),
                          training FLOPs per token and wall time per run; balancing adds MaxVio (validation:
                          global and per batch; training batches), olmoe tokens/s; specialisation adds the
                          evaluation-time ablations. LaTeX uses booktabs. tables.md ends with the paper's
                          ordering checked per seed, where the suite has one.
  loss_curves.{png,pdf}   training and validation loss against steps, mean over seeds (band: min..max)
  expert_load.{png,pdf}   validation expert load per layer (share of assignments; mean over seeds)
  max_vio.{png,pdf}       MaxVio of each logged training batch (mean over layers and seeds)
  disabled_top.{png,pdf}  specialisation: loss against the share of each token's top routed experts disabled
  active_experts.{png,pdf} specialisation: loss against the number of active routed experts
"""
from __future__ import annotations

import collections
import glob
import json
import os
import sys

import numpy as np

from experiments.deepseekmoe import suites


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


def summarise(suite: suites.Suite, results: list[dict]) -> list[dict]:
    """One dict per variant of the suite that has results, in the suite's order."""
    by = collections.defaultdict(list)
    for r in results:
        by[r["variant"]].append(r)
    rows = []
    for row in suite.rows:
        rs = sorted(by.get(row.variant, []), key=lambda r: r["seed"])
        if not rs:
            continue
        out = {"variant": row.variant, "label": row.label, "paper": row.paper, "seeds": [r["seed"] for r in rs],
               "val_loss": _stats(r["val_loss"] for r in rs), "per_seed": {r["seed"]: r["val_loss"] for r in rs},
               "params_total": rs[0]["params_total"], "params_active": rs[0]["params_active"],
               "flops_per_token": rs[0]["flops_per_token"], "wall_s": sum(r["wall_s"] for r in rs),
               "tokens_per_s": _stats(r["curves"].get("tokens_per_s") for r in rs)}
        if "val_max_vio" in rs[0]:
            out["max_vio_global"] = _stats(np.mean(r["val_max_vio"]) for r in rs)
            out["max_vio_batch"] = _stats(np.mean(r["val_max_vio_batch"]) for r in rs)
        if "max_vio" in rs[0]["curves"]:  # each logged training batch, mean over layers and steps
            out["max_vio_train"] = _stats(np.mean(r["curves"]["max_vio"]) for r in rs)
        if "evals" in rs[0]:
            E = rs[0]["config"]["model"]["moe"]["n_experts"]
            names = {_eval_key(n, E): n for n in rs[0]["evals"]}
            out["evals"] = {k: _stats(r["evals"][n]["val_loss"] for r in rs if n in r["evals"]) for k, n in names.items()}
        rows.append(out)
    return rows


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
    cols = [("variant", lambda r: r["label"]), ("seeds", lambda r: str(len(r["seeds"]))),
            ("val loss", lambda r: _pm(r["val_loss"]))]
    if any(r["paper"] is not None for r in rows):
        cols.append(("paper", lambda r: "-" if r["paper"] is None else f"{r['paper']:.3f}"))
    cols += [("params", lambda r: _millions(r["params_total"])), ("active", lambda r: _millions(r["params_active"])),
             ("GFLOPs/token", lambda r: f"{r['flops_per_token'] / 1e9:.4f}"),
             ("wall s/run", lambda r: f"{r['wall_s'] / len(r['seeds']):.0f}")]
    if suite.name == "balancing":
        nan = (np.nan, np.nan)
        cols += [("MaxVio val global", lambda r: _pm(r.get("max_vio_global", nan), 2)),
                 ("MaxVio val batch", lambda r: _pm(r.get("max_vio_batch", nan), 2)),
                 ("MaxVio train batch", lambda r: _pm(r.get("max_vio_train", nan), 2))]
    if suite.name == "olmoe":
        cols.append(("tokens/s", lambda r: _pm(r["tokens_per_s"], 0)))
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
                 ("±", r"$\pm$"), ("x1.", r"$\times$1."), ("x4", r"$\times$4"), ("x16", r"$\times$16")):
        s = s.replace(a, b)
    return s


def latex(headers: list[str], cells: list[list[str]], caption: str, label: str) -> str:
    """A booktabs table."""
    spec = "l" + "r" * (len(headers) - 1)
    body = [" & ".join(_tex(c) for c in row) + r" \\" for row in cells]
    return "\n".join([r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                      " & ".join(_tex(h) for h in headers) + r" \\", r"\midrule", *body, r"\bottomrule",
                      r"\end{tabular}", rf"\caption{{{_tex(caption)}}}", rf"\label{{{label}}}", r"\end{table}"])


def tables(suite: suites.Suite, meta: dict, rows: list[dict]) -> tuple[str, str]:
    """(markdown, LaTeX) of the suite's tables."""
    cols = columns(suite, rows)
    headers, cells = [h for h, _ in cols], [[f(r) for _, f in cols] for r in rows]
    caption = (f"{suite.title}. Scale {meta['scale']}; validation loss in nats/token, mean ± standard deviation "
               f"over seeds. {suite.paper_note}").strip()
    if suite.name == "balancing":
        caption += (" MaxVio (Wang et al. 2024, eq. 7; mean over layers): of the load over all validation batches "
                    "(global), of each validation batch, and of each logged training batch (averaged).")
    md = [f"### {suite.title}", "", markdown(headers, cells), "", caption]
    tex = [latex(headers, cells, caption, f"tab:{suite.name}")]
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
    order = ordering(suite, rows)
    if order:
        md += ["", "Paper's ordering (lower loss first), per seed:", "", order]
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


def ordering(suite: suites.Suite, rows: list[dict]) -> str:
    """Each adjacent pair of the paper's ordering: in how many seeds it held, and the mean difference."""
    by = {r["variant"]: r for r in rows}
    present = [v for v in suite.ordering if v in by]
    pairs = list(zip(present, present[1:]))
    lines = []
    for a, b in pairs:
        seeds = sorted(set(by[a]["per_seed"]) & set(by[b]["per_seed"]))
        diffs = np.asarray([by[b]["per_seed"][s] - by[a]["per_seed"][s] for s in seeds])
        held = int((diffs > 0).sum())
        spread = f" ± {diffs.std(ddof=1):.3f}" if diffs.size > 1 else ""
        verdict = "holds" if held == len(seeds) else ("reversed" if held == 0 else "mixed")
        lines.append(f"- {by[a]['label']} < {by[b]['label']}: {verdict} in {held}/{len(seeds)} seeds "
                     f"(loss difference {diffs.mean():+.3f}{spread})")
    return "\n".join(lines)


# ------------------------------------------------------------------ figures


def _by_variant(results):
    by = collections.defaultdict(list)
    for r in results:
        by[r["variant"]].append(r)
    return by


def _save(fig, out: str, name: str) -> list[str]:
    paths = [os.path.join(out, f"{name}.{ext}") for ext in ("png", "pdf")]
    for p in paths:
        fig.savefig(p, bbox_inches="tight", dpi=150)
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


def plot_loss_curves(suite, results, out):
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    by = _by_variant(results)
    for row in suite.rows:
        rs = by.get(row.variant)
        if rs:
            _band(a, rs[0]["curves"]["step"], [r["curves"]["loss"] for r in rs], row.label)
            _band(b, rs[0]["curves"]["val_step"], [r["curves"]["val_loss"] for r in rs], row.label)
    a.set(xlabel="step", ylabel="training loss (incl. balance losses)", title="training")
    b.set(xlabel="step", ylabel="validation loss (nats/token)", title="validation")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        lo = min(ln.get_ydata().min() for ln in ax.get_lines()) if ax.get_lines() else 0
        ax.set_ylim(lo - 0.05, lo + 1.5)  # the first steps' loss (~5.5) would flatten the differences
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


def write_report(workdir: str, out: str | None = None) -> str:
    """Write the tables and figures of a results directory; returns the output directory."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    meta, results = load_results(workdir)
    suite = suites.get_suite(meta["suite"])
    out = out or os.path.join(workdir, "report")
    os.makedirs(out, exist_ok=True)
    md, tex = tables(suite, meta, summarise(suite, results))
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "tables.tex"), "w") as f:
        f.write(tex)
    if results:
        for plot in (plot_loss_curves, plot_expert_load, plot_max_vio, plot_specialisation):
            plot(suite, results, out)
    return out


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="results directory of experiments.deepseekmoe.run")
    parser.add_argument("--out", default=None, help="output directory (default: WORKDIR/report)")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.workdir, args.out))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"experiments.deepseekmoe.report: error: {e}")


if __name__ == "__main__":
    main()
