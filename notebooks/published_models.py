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
# # moejax and published MoE models: convert, route, generate, evaluate
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moejax/moejax/blob/main/notebooks/published_models.ipynb)
#
# Converts a Hugging Face MoE checkpoint (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2, DeepSeek-V3) into a
# moejax workdir with `moejax.convert`, then shows which routed experts each token goes to in every MoE layer,
# how evenly a text loads the experts, a few generated tokens, and multiple-choice scoring.
#
# `HF_DIR` below names the checkpoint directory (config.json + *.safetensors). Left empty, the notebook makes
# one itself: a small **random** model in DeepSeek-V3's layout (multi-head latent attention, sigmoid routing
# over 4 groups of experts, a shared expert, a dense first layer), written by `moejax.convert.export_state`, so
# everything runs offline. Its routing shows the machinery, not a trained model's specialisation.

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
import json

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from moejax import convert, downstream, generate, model, model_config
from moejax.checkpoint import load_checkpoint

SMOKE = os.environ.get("MOEJAX_NOTEBOOK_SMOKE") == "1"  # CI runs this notebook as a script
WORKDIR = os.environ.get("MOEJAX_NOTEBOOK_WORKDIR", "/tmp/moejax_published")
# A Hugging Face checkpoint directory, e.g. on Colab (a small real model needs ~2x its size in RAM as float32):
#   from huggingface_hub import snapshot_download; HF_DIR = snapshot_download("allenai/OLMoE-1B-7B-0924")
HF_DIR = ""
# The tokenizer of the workdir: "" = the checkpoint's own tokenizer.json (or SentencePiece tokenizer.model)
TOKENIZER = ""

# %% [markdown]
# ## A checkpoint to convert
#
# Without `HF_DIR`: a random DeepSeek-V3-style model, built by moejax and exported to the Hugging Face layout.

# %%
if not HF_DIR:
    d = 64
    demo = model_config.ModelConfig(
        vocab_size=384, d_model=d, n_layers=2 if SMOKE else 3, n_heads=4, first_k_dense=1, dense_d_ff=192,
        tie_embeddings=False,
        attention="mla", kv_lora_rank=32, q_lora_rank=48, head_dim=16, rope_head_dim=8, v_head_dim=16,
        moe=model_config.deepseek_v3(d, 48, n_experts=16, top_k=4, n_shared=1, n_groups=4, topk_groups=2))
    params, rest = nnx.split(model.Transformer(demo, rngs=nnx.Rngs(0)), nnx.Param, ...)[1:]
    HF_DIR, TOKENIZER = os.path.join(WORKDIR, "hf_demo"), "byte"
    print("exported as", convert.export_state({"params": params, "rest": rest}, demo, HF_DIR))
with open(os.path.join(HF_DIR, "config.json")) as f:
    hf = json.load(f)
print({k: hf[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads") if k in hf})

# %% [markdown]
# ## Convert
#
# `import_checkpoint` maps config.json to a `ModelConfig` and reads the tensors one by one into the
# parameters (on a mesh, each device reads only its shard). The workdir then works like a trained one:
# `load_checkpoint`, `python -m moejax.generate`, `python -m moejax.downstream`, `train.init_from`.

# %%
MJ = os.path.join(WORKDIR, "moejax")
if not os.path.isdir(os.path.join(MJ, "checkpoints")):
    convert.import_checkpoint(HF_DIR, MJ, tokenizer=TOKENIZER)
ck = load_checkpoint(MJ)
c = ck.trainer.model_config
m = generate.for_inference(ck)
graphdef, state = nnx.split(m)
routes_of = jax.jit(lambda state, tokens: nnx.merge(graphdef, state).routes(tokens))  # one compiled program
print(f"{c.n_layers} layers, d_model {c.d_model}, attention {c.attention}, {c.moe.n_experts} routed experts "
      f"(top {c.moe.top_k}, {c.moe.score_fn}), {c.moe.n_shared} shared; routed layers {c.routed_layers}")

# %% [markdown]
# ## Routing of a text
#
# `model.routes(tokens)` returns each routed layer's decision: expert ids and gate weights [tokens, K]
# (jitted here through nnx.split / nnx.merge, so the layers compile once instead of running op by op).

# %%
TEXT = "The mixture of experts routes every token to a few of its experts."
tokens = np.asarray(ck.tokenizer.encode(TEXT))
routes = routes_of(state, jnp.asarray(tokens)[None])
E = c.moe.n_experts
fig, axes = plt.subplots(1, len(routes), figsize=(5 * len(routes), 0.14 * len(tokens) + 1.5), squeeze=False)
for ax, layer, r in zip(axes[0], c.routed_layers, routes):
    g = np.zeros((len(tokens), E))
    np.put_along_axis(g, np.asarray(r.expert_ids), np.asarray(r.weights), axis=1)
    ax.imshow(np.where(g > 0, g, np.nan), aspect="auto", cmap="viridis", interpolation="nearest")
    labels = [ck.tokenizer.decode(np.asarray([t], np.int32)) for t in tokens]
    ax.set_yticks(range(len(tokens)), [repr(s)[1:-1] for s in labels], fontsize=6, family="monospace")
    ax.set(xlabel="routed expert", title=f"layer {layer}: gate weights")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Expert load
#
# The share of a text's token-expert assignments each expert receives, per routed layer (1/E: perfectly even).

# %%
LOAD_TEXT = (TEXT + " ") * (2 if SMOKE else 20)
load_tokens = jnp.asarray(ck.tokenizer.encode(LOAD_TEXT))[None]
fig, ax = plt.subplots(figsize=(8, 3))
for layer, r in zip(c.routed_layers, routes_of(state, load_tokens)):
    counts = np.bincount(np.asarray(r.expert_ids).ravel(), minlength=E)
    ax.plot(counts / counts.sum(), marker="o", label=f"layer {layer}")
ax.axhline(1 / E, color="k", ls="--", label="1/E")
ax.set(xlabel="expert", ylabel="share of assignments")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Generate and score
#
# Greedy continuation with the key/value cache, and the log-likelihood scoring of multiple-choice tasks
# (here three PIQA-style questions shipped with the tests; a random model is at chance).

# %%
out, _ = generate.generate(m, [list(ck.tokenizer.encode("The experts"))], 4 if SMOKE else 32,
                           eos_id=ck.tokenizer.eos_id)
print(repr(ck.tokenizer.decode(np.asarray(out[0]))))
task = os.path.join(ROOT, "tests", "data", "tasks", "piqa.jsonl")
res = downstream.evaluate(m, ck.tokenizer, {"piqa": task})["piqa"]
print(f"piqa: acc {res['acc']:.2f} (95% interval {res['acc_ci95'][0]:.2f}-{res['acc_ci95'][1]:.2f}, n = {res['n']})")
