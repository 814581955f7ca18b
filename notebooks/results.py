# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # moejax results: tables and figures of the DeepSeekMoE ablations
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moejax/moejax/blob/main/notebooks/results.ipynb)
#
# `python -m experiments.deepseekmoe.run --suite=S --scale=tiny --seeds=3 --workdir=DIR` writes one JSON file per
# run into `DIR/results/`. This notebook reads such directories and draws what `experiments/deepseekmoe/report.py`
# makes of them: tables with the mean and standard deviation over seeds (markdown, LaTeX) and figures. By default
# it reads the tiny-scale results committed in `experiments/deepseekmoe/results/` (see
# `experiments/deepseekmoe/RESULTS.md`); point `RESULTS` at your own workdirs to see yours. Nothing is trained here.

# %%
# Colab / a fresh machine: clone moejax unless this is a checkout; notebooks/colab_setup.py installs it if needed
import os, sys, subprocess
ROOT = next((p for p in (".", "..", "moejax") if os.path.isfile(os.path.join(p, "notebooks", "colab_setup.py"))), None)
if ROOT is None:
    subprocess.run(["git", "clone", "-q", "https://github.com/moejax/moejax"], check=True)
    ROOT = "moejax"
sys.path.insert(0, os.path.join(ROOT, "notebooks"))
from colab_setup import setup; ROOT = setup(ROOT)  # noqa: E402

# %%
import glob
import tempfile

import matplotlib.pyplot as plt
import numpy as np

from experiments.deepseekmoe import report, suites

# Results directories (each made by one `run --suite=...` command); the default is every committed one.
RESULTS = sorted(glob.glob(os.path.join(os.environ.get("MOEJAX_RESULTS", "experiments/deepseekmoe/results"), "*")))
RESULTS = [d for d in RESULTS if os.path.isfile(os.path.join(d, "suite.json"))]
print("\n".join(RESULTS) or "no results directories found: run experiments.deepseekmoe.run first")


def show(markdown_text: str, image_paths=()):
    """Rendered in a notebook, printed in a terminal."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, Markdown, display
        if get_ipython() is not None:
            display(Markdown(markdown_text))
            for p in image_paths:
                display(Image(p))
            return
    except ImportError:
        pass
    print(markdown_text)
    print("\n".join(f"figure: {p}" for p in image_paths))


# %% [markdown]
# ## Every suite: tables and figures
#
# Validation loss is in nats per byte-level token. `paper` is the DeepSeekMoE paper's Pile loss at 2B scale where
# it publishes one: the scales differ, so compare orderings, not values. Under each table, the suite's claims (the
# paper's ordering and others) are checked on paired seeds: mean difference, 95% Student-t interval, verdict.

# %%
OUT = os.environ.get("MOEJAX_NOTEBOOK_WORKDIR") or tempfile.mkdtemp(prefix="moejax_report_")  # tests set the workdir
for d in RESULTS:
    meta, results = report.load_results(d)
    suite = suites.get_suite(meta["suite"])
    md, tex = report.tables(suite, meta, report.summarise(suite, results), results)
    out = report.write_report(d, os.path.join(OUT, meta["suite"]))
    pngs = sorted(glob.glob(os.path.join(out, "*.png")))
    show(f"**{d}** ({len(results)} runs, commit {results[0]['commit'][:10] if results else '-'})\n\n" + md, pngs)

# %% [markdown]
# ## LaTeX
#
# The same tables in booktabs LaTeX, ready for a paper (`\usepackage{booktabs}`):

# %%
if RESULTS:
    meta, results = report.load_results(RESULTS[0])
    suite = suites.get_suite(meta["suite"])
    print(report.tables(suite, meta, report.summarise(suite, results))[1])

# %% [markdown]
# ## Your own figure from the raw results
#
# Every results file holds the run's config, curves and final numbers; here, each seed's final validation loss
# per variant, the spread the tables summarise.

# %%
if RESULTS:
    fig, axes = plt.subplots(1, len(RESULTS), figsize=(4.5 * len(RESULTS), 3.5), squeeze=False)
    for ax, d in zip(axes[0], RESULTS):
        meta, results = report.load_results(d)
        suite = suites.get_suite(meta["suite"])
        for i, row in enumerate(suite.rows):
            losses = [r["val_loss"] for r in results if r["variant"] == row.variant]
            ax.scatter([i] * len(losses), losses)
        ax.set_xticks(range(len(suite.rows)), [r.label for r in suite.rows], rotation=45, ha="right", fontsize=7)
        ax.set(title=meta["suite"], ylabel="validation loss (nats/token)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.show()
