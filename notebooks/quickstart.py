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
# # moejax quickstart: train a tiny DeepSeekMoE
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moejax/moejax/blob/main/notebooks/quickstart.ipynb)
#
# [DeepSeekMoE](https://arxiv.org/abs/2401.06066) (Dai et al. 2024) changes a top-2-of-16 MoE layer in two ways,
# keeping parameters and compute fixed:
#
# - **fine-grained expert segmentation**: each expert is cut into m = 4 experts of a quarter of the width, and
#   each token picks 4x as many, so 64 experts, top-8;
# - **shared expert isolation**: one of them becomes a shared expert that every token always uses, leaving
#   1 shared + top-7 of 63 routed experts.
#
# This notebook trains the tiny scale of the Table-1 config (`configs/deepseekmoe_table1.py`: 2 layers, width 128,
# byte tokens, 300 steps of 16 x 128 tokens on Python's own standard library sources), then plots the losses
# and the expert load. Expected: validation loss ~1.98 nats/token (2.85 bits/byte) after 300 steps, 1-2 minutes
# on 2 CPU cores (the config's docstring gives every method's result and time); a GPU or TPU runtime is not needed.

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
import matplotlib.pyplot as plt
import numpy as np

import moejax.config
import moejax.metrics
import moejax.train

# CI runs this notebook as a script with MOEJAX_NOTEBOOK_SMOKE=1: a few steps, same model.
SMOKE = os.environ.get("MOEJAX_NOTEBOOK_SMOKE") == "1"
# A workdir holds one config: the trainer refuses to resume a checkpoint of another, so smoke runs get their own.
WORKDIR = os.environ.get("MOEJAX_NOTEBOOK_WORKDIR", "/tmp/moejax_quickstart_smoke" if SMOKE else "/tmp/moejax_quickstart")
CONFIG = "configs/deepseekmoe_table1.py:method=deepseekmoe,scale=tiny"

config = moejax.config.load(CONFIG)
if SMOKE:
    config.train.update(steps=6, warmup_steps=2, log_every=2, eval_every=3, checkpoint_every=6)
    config.data.update(eval_steps=1, final_eval_steps=0)  # 0: the final evaluation also reads 1 batch
m = config.model
print(f"{m.n_layers} layers, width {m.d_model}; MoE: {m.moe.n_shared} shared + top-{m.moe.top_k} of {m.moe.n_experts} routed experts "
      f"of width {m.moe.d_ff // m.moe.segmentation}; {config.train.steps} steps of {config.data.batch_size} x {config.data.seq_len} tokens")

# %% [markdown]
# ## Train
#
# `train_and_evaluate` is what `python -m moejax.main --config=... --workdir=...` calls. It writes
# `metrics.jsonl`, TensorBoard events and checkpoints to the workdir, and resumes from the latest checkpoint
# when run again (a finished run is only re-evaluated).

# %%
summary = moejax.train.train_and_evaluate(config, WORKDIR)
print({k: v for k, v in summary.items() if np.ndim(v) == 0})

# %% [markdown]
# ## Losses
#
# Training rows of `metrics.jsonl` hold `loss` (cross-entropy + balance loss, averaged over the last
# `log_every` steps) and `ce_loss`; evaluation rows hold `val_loss` (nats/token on held-out files).
# The learning rate drops x0.316 at 80% and 90% of the steps (DeepSeekMoE sec. 4.1.3).

# %%
rows = moejax.metrics.read_jsonl(os.path.join(WORKDIR, "metrics.jsonl"))
train_rows = [r for r in rows if "loss" in r]
eval_rows = [r for r in rows if "val_loss" in r]

steps = [r["step"] for r in train_rows]
plt.figure(figsize=(7, 4))
plt.plot(steps, [r["loss"] for r in train_rows], label="train loss (CE + balance)")
plt.plot(steps, [r["ce_loss"] for r in train_rows], label="train cross-entropy")
plt.plot([r["step"] for r in eval_rows], [r["val_loss"] for r in eval_rows], "o-", label="validation loss")
plt.xlabel("step"); plt.ylabel("nats / token"); plt.legend(); plt.grid(alpha=0.3)
plt.title("tiny DeepSeekMoE")
plt.show()

# %% [markdown]
# ## Expert load
#
# `load` [L, E] is each routed expert's share of the token-to-expert assignments in the last logged step
# (uniform: 1/E = 1/63 ~ 1.6%); the shared expert takes every token and is not counted. MaxVio
# (Wang et al. 2024) = max load / mean load - 1 per layer: 0 when perfectly balanced. The balance loss
# (coefficient 0.01) keeps it from collapsing onto a few experts.

# %%
load = np.asarray(train_rows[-1]["load"])  # [L, E]
max_vio = np.asarray([r["max_vio"] for r in train_rows])  # [steps logged, L]
L, E = load.shape

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 3.5), gridspec_kw={"width_ratios": [2, 1]})
im = ax0.imshow(load * E, aspect="auto", cmap="RdBu_r", vmin=0, vmax=2)
ax0.set(xlabel="routed expert", ylabel="layer", yticks=range(L),
        title=f"load x E at step {train_rows[-1]['step']} (1 = uniform)")
fig.colorbar(im, ax=ax0)
for layer in range(L):
    ax1.plot(steps, max_vio[:, layer], label=f"layer {layer}")
ax1.set(xlabel="step", ylabel="MaxVio", title="load imbalance")
ax1.legend(); ax1.grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# Next: `routing_explorer.ipynb` loads this checkpoint and shows which experts each byte of a sentence goes to.
# The other Table-1 methods train with `method=dense|hash|switch|gshard` in `CONFIG`.
