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
# # moejax routing explorer: which experts does each byte go to?
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moejax/moejax/blob/main/notebooks/routing_explorer.ipynb)
#
# Loads the tiny DeepSeekMoE trained by `quickstart.ipynb` (or trains it here if its workdir holds no
# checkpoint) and shows, for a sentence of your choice, the routed experts each token picks in every MoE
# layer, with their gate weights. Tiny DeepSeekMoE: byte tokens, 2 layers, each with 1 shared expert
# (always on, so not shown: it is not routed) and 63 routed experts, of which each token picks 7.

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
import itertools

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import moejax.config
import moejax.routing
import moejax.train

# CI runs this notebook as a script with MOEJAX_NOTEBOOK_SMOKE=1: a 6-step model, same shapes.
SMOKE = os.environ.get("MOEJAX_NOTEBOOK_SMOKE") == "1"
# the quickstart notebook's workdir (smoke runs get their own: a workdir holds one config)
WORKDIR = os.environ.get("MOEJAX_NOTEBOOK_WORKDIR", "/tmp/moejax_quickstart_smoke" if SMOKE else "/tmp/moejax_quickstart")
CONFIG = "configs/deepseekmoe_table1.py:method=deepseekmoe,scale=tiny"


def train_quickstart(workdir: str) -> dict:
    """The quickstart notebook's training run (1-2 min on 2 CPU cores; SMOKE: 6 steps)."""
    config = moejax.config.load(CONFIG)
    if SMOKE:
        config.train.update(steps=6, warmup_steps=2, log_every=2, eval_every=3, checkpoint_every=6)
        config.data.update(eval_steps=1, final_eval_steps=0)  # 0: the final evaluation also reads 1 batch
    return moejax.train.train_and_evaluate(config, workdir)


try:
    ck = moejax.train.load_checkpoint(WORKDIR)
except FileNotFoundError:  # no checkpoint in WORKDIR yet: run the quickstart training here
    train_quickstart(WORKDIR)
    ck = moejax.train.load_checkpoint(WORKDIR)
model = ck.model()
print(f"{WORKDIR}: step {ck.step}")

# %% [markdown]
# ## Route a sentence
#
# `model.routes(tokens [B, S])` runs the model in eval mode and returns, for every MoE layer with routed
# experts, the router's decision: a `moejax.routing.Routing` with `expert_ids` and `weights` [B S, K]
# (the gate values that multiply each expert's output; softmax over the 63 experts, not renormalised over
# the 7 picked). Expert-choice layers return a `routing.ExpertChoice` instead (experts pick tokens); this
# notebook handles token choice only. The model was trained on Python's standard library sources in rows of
# 128 bytes, so code reads as in-distribution text.

# %%
TEXT = "def forward(self, x):\n    return self.norm(x + self.attn(x))  # residual"

tokens = ck.tokenizer.encode(TEXT)  # [S] int32: the UTF-8 bytes
routes = model.routes(jnp.asarray(tokens)[None, :])  # one per MoE layer
if not all(isinstance(r, moejax.routing.Routing) for r in routes):
    raise NotImplementedError("expert-choice layers (routing.ExpertChoice) are not handled here")
ids = [np.asarray(r.expert_ids) for r in routes]  # L x [S, K]
gates = [np.asarray(r.weights) for r in routes]  # L x [S, K], 0 where the router drops a pick
S, K = ids[0].shape
E = routes[0].probs.shape[-1]


def label(i: int) -> str:
    """A printable label for token i: its character, or its byte in hex inside a multi-byte character."""
    c = ck.tokenizer.decode([i])
    c = {" ": "␣", "\n": "\\n", "\t": "\\t"}.get(c, c)
    return c if c.isprintable() and c != "\ufffd" else f"x{i:02x}"


labels = [label(int(i)) for i in tokens]
dense = np.zeros((len(routes), S, E))  # [L, S, E] gate weight of every expert (0: not picked)
for layer in range(len(routes)):
    np.put_along_axis(dense[layer], ids[layer], gates[layer], axis=1)
print(f"{S} tokens, {len(routes)} MoE layers, top-{K} of {E} routed experts")

# %% [markdown]
# ### Per token: the picked experts, highest gate first

# %%
for layer in range(len(routes)):
    print(f"layer {layer}   token  experts (gate weight)")
    for s in range(S):
        order = np.argsort(-gates[layer][s])
        picks = "  ".join(f"e{ids[layer][s, k]:<2d} {gates[layer][s, k]:.3f}" for k in order)
        print(f"{'':9s}{labels[s]:>5s}  {picks}")
    print()

# %% [markdown]
# ### Tokens x experts
#
# Each row is a token, each column a routed expert; colour is the gate weight (white: not picked).
# Columns that light up for many tokens are generalists; a column lit only by one kind of character
# (spaces, letters, punctuation) is a specialist.

# %%
fig, axes = plt.subplots(1, len(routes), figsize=(7 * len(routes), 0.16 * S + 1.5), squeeze=False)
for layer, ax in enumerate(axes[0]):
    im = ax.imshow(np.where(dense[layer] > 0, dense[layer], np.nan), aspect="auto", cmap="viridis",
                   interpolation="nearest")
    ax.set_yticks(range(S), labels, fontsize=7, family="monospace")
    ax.set(xlabel="routed expert", title=f"layer {layer}: gate weights")
    fig.colorbar(im, ax=ax, fraction=0.04)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The same byte in different contexts
#
# Does a byte always go to the same experts? Each row below is one occurrence of `BYTE` in `TEXT` (with
# the text before it); the overlap is |A ∩ B| / K for the picked sets A, B of two occurrences (1: same
# experts; K / E = 7 / 63 ~ 0.11 for random picks).

# %%
BYTE = None  # a one-byte character of TEXT, e.g. "s"; None: the most frequent one but space


def overlap(layer: int, a: int, b: int) -> float:
    """|A ∩ B| / K of the experts picked for tokens a and b in `layer`."""
    return len(set(ids[layer][a]) & set(ids[layer][b])) / K


byte = int(ck.tokenizer.encode(BYTE)[0]) if BYTE else int(np.bincount(tokens[tokens != ord(" ")]).argmax())
where = np.flatnonzero(tokens == byte)
context = [repr(TEXT.encode()[max(p - 10, 0):p + 1].decode(errors="replace"))[1:-1] for p in where]
pairs = list(itertools.combinations(where, 2))
fig, axes = plt.subplots(1, len(routes), figsize=(7 * len(routes), 0.25 * len(where) + 1.5), squeeze=False)
for layer, ax in enumerate(axes[0]):
    ax.imshow(np.where(dense[layer, where] > 0, dense[layer, where], np.nan), aspect="auto", cmap="viridis",
              interpolation="nearest")
    ax.set_yticks(range(len(where)), context, fontsize=7, family="monospace")
    mean = np.mean([overlap(layer, a, b) for a, b in pairs]) if pairs else float("nan")
    ax.set(xlabel="routed expert", title=f"layer {layer}: {label(byte)!r} x{len(where)}, mean overlap {mean:.2f}")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Layer by layer
#
# Left: the overlap of every pair of tokens in each layer (how much two tokens share experts). Right, per
# layer: mean overlap of pairs of the same byte in different contexts, of pairs of different bytes, and the
# random level K / E. Routing that depends on the byte alone gives same-byte overlap 1; context makes it lower.

# %%
same = [(a, b) for a, b in itertools.combinations(range(S), 2) if tokens[a] == tokens[b]]
diff = [(a, b) for a, b in itertools.combinations(range(S), 2) if tokens[a] != tokens[b]]
fig, axes = plt.subplots(1, len(routes) + 1, figsize=(6 * len(routes) + 4, 5.5), layout="constrained",
                         width_ratios=[3] * len(routes) + [2])
for layer, ax in enumerate(axes[:-1]):
    m = np.array([[overlap(layer, a, b) for b in range(S)] for a in range(S)])
    im = ax.imshow(m, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(S), labels, fontsize=5, family="monospace")
    ax.set_yticks(range(S), labels, fontsize=5, family="monospace")
    ax.set_title(f"layer {layer}: shared experts of token pairs")
fig.colorbar(im, ax=axes[-2], fraction=0.05)
x = np.arange(len(routes))
mean = lambda ps, layer: np.mean([overlap(layer, a, b) for a, b in ps]) if ps else np.nan
axes[-1].bar(x - 0.2, [mean(same, l) for l in x], 0.4, label=f"same byte ({len(same)} pairs)")
axes[-1].bar(x + 0.2, [mean(diff, l) for l in x], 0.4, label=f"different bytes ({len(diff)} pairs)")
axes[-1].axhline(K / E, color="k", ls="--", label="random K / E")
axes[-1].set(xticks=x, xlabel="layer", ylabel="mean overlap |A ∩ B| / K", ylim=(0, 1))
axes[-1].legend(fontsize=8)
plt.show()
for layer in x:
    print(f"layer {layer}: same byte {mean(same, layer):.2f}, different bytes {mean(diff, layer):.2f}, "
          f"random {K / E:.2f}")
