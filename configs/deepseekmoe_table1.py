"""DeepSeekMoE Table 1 (Dai et al. 2024, arXiv:2401.06066, sec. 4.1-4.2): Dense, Hash Layer, Switch,
GShard and DeepSeekMoE under the same data, steps and hyper-parameters.

  python -m moejax.main --config=configs/deepseekmoe_table1.py:method=deepseekmoe,scale=tiny --workdir=/tmp/ds

Arguments: method in (dense, hash, switch, gshard, deepseekmoe); scale in (tiny, small, paper).
Every FFN is replaced by an MoE layer (no dense first layer at this scale). With a standard FFN of width
d_ff (SwiGLU, 3 d d_ff parameters) every MoE method holds 16 x its parameters in experts:
  dense        1 FFN                                                         active 1x
  hash         16 experts, top-1 by a fixed hash of the token id (Roller et al. 2021)   active 1x
  switch       16 experts, softmax top-1 (Fedus et al. 2021)                 active 1x
  gshard       16 experts, top-2 with the random second-expert policy        active 2x
  deepseekmoe  1 shared + 63 routed experts of d_ff/4, top-7 (m = 4, Ks = 1) active 2x
As in the paper: no token dropping (dispatch 'dropless' for every method), expert-level balance loss
a1 = 0.01 for the learned routers, AdamW (0.9, 0.95, wd 0.1), clip 1.0, linear warmup then x0.316 at
80% and 90% of steps.

Scales keep these ratios (and d_ff / d_model ~ 2.7):
  tiny   2 layers, d 128, 2 heads, d_ff 352, byte tokens, 16 x 128 tokens/step, 300 steps (2-core CPU).
  small  4 layers, d 256, 2 heads, d_ff 688, byte tokens, 32 x 512 tokens/step, 5000 steps (one GPU).
  paper  9 layers, d 1280, 10 heads of 128, d_ff 3456, 8K SentencePiece vocabulary, 2048 x 2048
         tokens/step, 25K steps (100B tokens), lr 1.08e-3, 2K warmup (sec. 4.1.3).
The paper does not state d_ff; 3456 = 2.7 d gives 13.3M parameters per FFN, close to the 13.1M per
FFN implied by its Table 2 (1.89B expert parameters = 16 x 9 FFNs). Paper scale initialises every
weight N(0, 0.006) as the paper does; tiny and small use fan-in scaling (with 0.006 the tiny DeepSeekMoE
run ends at val loss 2.87 instead of 1.98 nats/token). Paper scale expects a tokenizer trained first:
  python -m moejax.tokenizer --source=stdlib --vocab_size=8192 --output=spm8k.model
(or give --config.data.tokenizer=byte).

Expected, scale=tiny on the default stdlib corpus (2-core CPU, JAX 0.10.2, seed 0, 300 steps = 614K
tokens; wall time of the whole command, corpus already built):
  method        val loss (nats/token)  bits/byte  wall
  dense         2.010                  2.899      27 s
  hash          1.874                  2.704      41 s
  switch        2.189                  3.158      44 s
  gshard        2.007                  2.896      63 s
  deepseekmoe   1.977                  2.853      73 s
Tiny is a smoke scale (614K tokens): over seeds 0-2 (experiments/deepseekmoe/RESULTS.md) the means are dense
2.033, hash 1.911, switch 2.174, gshard 1.976, deepseekmoe 2.009, with a spread of ~0.03 per method, so
DeepSeekMoE and GShard are not separable here; Hash leads on byte tokens and Switch trails. Paper Table 1 Pile loss: dense 2.060, hash 1.932, switch 1.881,
gshard 1.867, deepseekmoe 1.808. small: ~3-7 s per step on 2 CPU cores (hours), minutes on a GPU;
paper: 25K steps of 4M tokens, about 2.9 / 4.3 TFLOPs per 2K tokens (1x / 2x active).
"""
from moejax import config as config_lib
from moejax import moe

METHODS = ("dense", "hash", "switch", "gshard", "deepseekmoe")
SCALES = {
    #        layers d_model heads d_ff  seq_len batch steps  warmup lr       eval_every
    "tiny": (2, 128, 2, 352, 128, 16, 300, 30, 2e-3, 100),
    "small": (4, 256, 2, 688, 512, 32, 5000, 500, 1.08e-3, 500),
    "paper": (9, 1280, 10, 3456, 2048, 2048, 25000, 2000, 1.08e-3, 1000),
}


# The stdlib scales hold out 4% of the files (32 files, 1.02M bytes) and report the final validation loss
# on the first 524,288 tokens of them (256 batches of 16 x 128 tiny; 32 of 32 x 512 small); the periodic
# evaluations during training use the first eval_steps batches.
VALIDATION = {"tiny": dict(val_fraction=0.04, final_eval_steps=256), "small": dict(val_fraction=0.04)}


def moe_config(method: str, d_model: int, d_ff: int) -> moe.MoEConfig:
    """The FFN of `method` for a standard FFN width d_ff (16x expert parameters, no token dropping)."""
    learned = dict(dispatch="dropless", aux_loss_coef=0.01)
    if method == "dense":
        return moe.dense(d_model, d_ff)
    if method == "hash":
        return moe.hash_layer(d_model, d_ff, n_experts=16, top_k=1)
    if method == "switch":
        return moe.switch(d_model, d_ff, n_experts=16, **learned)
    if method == "gshard":
        return moe.gshard(d_model, d_ff, n_experts=16, **learned)
    if method == "deepseekmoe":
        return moe.deepseekmoe(d_model, d_ff, n_experts=16, top_k=2, m=4, n_shared=1, **learned)
    raise ValueError(f"method={method!r} is invalid; allowed: {METHODS}")


def get_config(arg=None):
    a = config_lib.parse_arg(arg, method="deepseekmoe", scale="tiny")
    if a.scale not in SCALES:
        raise ValueError(f"scale={a.scale!r} is invalid; allowed: {tuple(SCALES)}")
    layers, d, heads, d_ff, seq_len, batch, steps, warmup, lr, eval_every = SCALES[a.scale]
    return config_lib.experiment(
        model=dict(n_layers=layers, d_model=d, n_heads=heads, dtype="bfloat16" if a.scale == "paper" else "float32",
                   init_std=0.006 if a.scale == "paper" else 0.0),
        moe=moe_config(a.method, d, d_ff),
        data=dict(seq_len=seq_len, batch_size=batch, tokenizer="spm8k.model" if a.scale == "paper" else "byte",
                  eval_steps=8 if a.scale == "tiny" else 32, **VALIDATION.get(a.scale, {})),
        train=dict(steps=steps, warmup_steps=warmup, lr=lr, schedule="deepseekmoe", log_every=10,
                   eval_every=eval_every, checkpoint_every=eval_every),
    )
