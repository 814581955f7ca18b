"""DeepSeekMoE Table 1 (Dai et al. 2024, arXiv:2401.06066, sec. 4.1-4.2): Dense, Hash Layer, Switch,
GShard and DeepSeekMoE under the same data, steps and hyper-parameters.

  python -m moejax.main --config=configs/deepseekmoe_table1.py:method=deepseekmoe,scale=tiny --workdir=/tmp/ds

Arguments: method in (dense, hash, switch, gshard, deepseekmoe); scale in (tiny, small, paper, proxy, gpu).
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
  proxy  8 layers, d 512, 4 heads of 128, d_ff 1408 (2.75 d, as DeepSeekMoE 16B), 8K SentencePiece vocabulary
         on c4 (tfds c4/en:3.1.0), bf16, 256 x 1024 tokens/step in 2 micro-batches, 12K steps (3.15B tokens),
         lr 2e-3, 1K warmup; parameters and Adam moments split over the host's chips (fsdp): one TPU host or GPU.
  gpu    small's model in bf16, byte tokens, 64 x 512 tokens/step, 1000 steps (33M tokens), 100 warmup: the
         five methods in under 8 minutes on one H100 or H200 (experiments/deepseekmoe/gpu_table1.py).
paper scans its layers (model.scan_layers: one compiled layer; moejax.aot then counts no FLOPs). proxy does not:
scanned without remat it needs 15.6 GiB per v5e chip instead of 10.68 (tests/test_aot.py).
The paper does not state d_ff; 3456 = 2.7 d gives 13.3M parameters per FFN, close to the 13.1M per
FFN implied by its Table 2 (1.89B expert parameters = 16 x 9 FFNs). Paper scale initialises every
weight N(0, 0.006) as the paper does; the others use fan-in scaling (with 0.006 the tiny DeepSeekMoE
run ended at val loss 2.87 instead of 1.98 nats/token on the earlier 16K-token validation). Paper scale expects a tokenizer trained first:
  python -m moejax.train_tokenizer --source=stdlib --vocab_size=8192 --output=spm8k.model
(or give --config.data.tokenizer=byte).

Proxy: lr 2e-3 ~ the paper's 1.08e-3 x (C_paper / C_proxy)^0.125 = 2.1e-3 (DeepSeek LLM's fit lr ~ C^-0.125,
Bi et al. 2024, whose batch fit gives 0.23M tokens at this C = 1.05e18 FLOPs; here 0.26M); warmup 8% as the
paper's 2K of 25K. It needs c4/en:3.1.0 prepared for tfds as array_record and its tokenizer (model.vocab_size
= 8192 is set, so moejax.aot compiles without either):
  python -m moejax.train_tokenizer --source=tfds --tfds_name=c4/en:3.1.0 --vocab_size=8192 --output=spm8k_c4.model
One GPU: add --config.train.grad_accum=8 (32 sequences per micro-batch; a v5e chip holds 16 in 10.2 GiB).
Measured ahead of time (python -m moejax.aot, JAX 0.10.2, libtpu 0.0.42.1; 80-230 s each on 2 CPU cores):
  v5e:2x4 (v5e-8)   deepseekmoe, fsdp=8: 10.68 GiB per chip of 16 (temporaries 10.24; grad_accum 1: 16.04,
                    does not fit), 10.51 TFLOPs per chip per step as compiled, model 6 N + attention 10.98
  v5p:2x2x1 (v5p-8) fsdp=4, grad_accum 1: 35.6 GiB per chip of 95 (deepseekmoe), 22.14 TFLOPs per chip; the
                    compiler's step time (cost_analysis 'optimal_seconds') below. It counts -1 s for each op
                    it cannot cost (2 in hash; per MoE layer 2 in switch, 4 in gshard and deepseekmoe, which
                    reports -31.41 s); adding them back gives the column (deepseekmoe's grad_accum 1 and 2
                    differenced: 0.57 s).
Predicted hours per run: FLOPs/token x 3.15B tokens / (chips x peak x MFU). v5p-8: the compiler's estimate
(12K x s/step). H100, H200 (989 TFLOP/s bf16 each: the same hours; H200's 1.4x bandwidth helps where memory
bound) and v5e-8 (8 x 197): an assumption, the MFU that estimate implies on v5p; no accelerator run of
moejax exists yet. It sees top-2 / top-7 dispatch, not the expert matmuls, taking most of an MoE step.
  method       MFLOP/token  v5p s/step  MFU   H100 / H200  v5e-8   v5p-8
  dense        229.6        0.093       35%   0.6 h        0.4 h   0.3 h
  hash         229.6        0.110       30%   0.7 h        0.4 h   0.4 h
  switch       230.0        0.118       28%   0.7 h        0.5 h   0.4 h
  gshard       333.8        0.510        9%   3.2 h        2.0 h   1.7 h
  deepseekmoe  335.0        0.590        8%   3.7 h        2.3 h   2.0 h
  all five                                    8.8 h        5.5 h   4.7 h
gpu: 5.1 PFLOPs for the five runs (25.9-38.9 MFLOP/token x 32.8M tokens); at an assumed 5% MFU on one GPU
(49 TFLOP/s: d 256 matmuls) 103 s of steps, + 10 ms per step of kernel launches and host loop (50 s), +
40 s per run to compile the train and eval steps, evaluate and set up (200 s): ~6 min. Assumptions, to be
replaced by the per-run times gpu_table1.py prints. Validation: 32 batches (1.05M tokens) of the held-out
4% of the stdlib files.

Expected, scale=tiny on the default stdlib corpus (JAX 0.10.2, seed 0, 300 steps = 614K tokens; validation
loss on 524,288 held-out tokens; wall time of the run on a 2-core CPU shared with a second training run):
  method        val loss (nats/token)  bits/byte  wall
  dense         1.887                  2.722      76 s
  hash          1.745                  2.517      138 s
  switch        1.975                  2.849      128 s
  gshard        1.824                  2.632      135 s
  deepseekmoe   1.802                  2.600      294 s
Tiny is a smoke scale (614K tokens): over seeds 0-2 (experiments/deepseekmoe/RESULTS.md) the means are dense
1.930, hash 1.812, switch 2.008, gshard 1.866, deepseekmoe 1.873 (standard deviation 0.03-0.08), and the paired
95% interval of DeepSeekMoE - GShard is -0.13 to +0.14: not separable here. Paper Table 1 Pile loss:
dense 2.060, hash 1.932, switch 1.881, gshard 1.867, deepseekmoe 1.808. small: ~3-7 s per step on 2 CPU cores (hours), minutes on a GPU;
paper: 25K steps of 4M tokens, about 2.9 / 4.3 TFLOPs per 2K tokens (1x / 2x active).
"""
from moejax import config as config_lib
from moejax import model_config

METHODS = ("dense", "hash", "switch", "gshard", "deepseekmoe")
SCALES = {
    #        layers d_model heads d_ff  seq_len batch steps  warmup lr       eval_every
    "tiny": (2, 128, 2, 352, 128, 16, 300, 30, 2e-3, 100),
    "small": (4, 256, 2, 688, 512, 32, 5000, 500, 1.08e-3, 500),
    "paper": (9, 1280, 10, 3456, 2048, 2048, 25000, 2000, 1.08e-3, 1000),
    "proxy": (8, 512, 4, 1408, 1024, 256, 12000, 1000, 2e-3, 1000),
    "gpu": (4, 256, 2, 688, 512, 64, 1000, 100, 1.08e-3, 250),
}
# Settings of the accelerator scales beyond their SCALES row, applied over the others' (docstring); gpu saves
# one checkpoint per run (seconds each on a GPU, where steps take milliseconds)
ACCELERATOR = {
    "proxy": dict(model=dict(dtype="bfloat16", vocab_size=8192), mesh=dict(data=1, fsdp=-1), train=dict(grad_accum=2),
                  data=dict(source="tfds", tfds_name="c4/en:3.1.0", tokenizer="spm8k_c4.model")),
    "gpu": dict(model=dict(dtype="bfloat16"), data=dict(val_fraction=0.04), train=dict(checkpoint_every=1000)),
}


# Scales whose layers run as one jax.lax.scan (model.scan_layers): XLA compiles one layer, not all of them
SCANNED = ("paper",)

# The stdlib scales hold out 4% of the files (32 files, 1.02M bytes) and report the final validation loss
# on the first 524,288 tokens of them (256 batches of 16 x 128 tiny; 32 of 32 x 512 small); the periodic
# evaluations during training use eval_steps batches of rows spread evenly over those (moejax.data; runs
# before 2026-12-01 used the first eval_steps batches, which read 1-1.5 nats above the final number).
VALIDATION = {"tiny": dict(val_fraction=0.04, final_eval_steps=256), "small": dict(val_fraction=0.04)}


def moe_config(method: str, d_model: int, d_ff: int) -> model_config.MoEConfig:
    """The FFN of `method` for a standard FFN width d_ff (16x expert parameters, no token dropping)."""
    learned = dict(dispatch="dropless", aux_loss_coef=0.01)
    if method == "dense":
        return model_config.dense(d_model, d_ff)
    if method == "hash":
        return model_config.hash_layer(d_model, d_ff, n_experts=16, top_k=1)
    if method == "switch":
        return model_config.switch(d_model, d_ff, n_experts=16, **learned)
    if method == "gshard":
        return model_config.gshard(d_model, d_ff, n_experts=16, **learned)
    if method == "deepseekmoe":
        return model_config.deepseekmoe(d_model, d_ff, n_experts=16, top_k=2, m=4, n_shared=1, **learned)
    raise ValueError(f"method={method!r} is invalid; allowed: {METHODS}")


def get_config(arg=None):
    a = config_lib.parse_arg(arg, method="deepseekmoe", scale="tiny")
    if a.scale not in SCALES:
        raise ValueError(f"scale={a.scale!r} is invalid; allowed: {tuple(SCALES)}")
    layers, d, heads, d_ff, seq_len, batch, steps, warmup, lr, eval_every = SCALES[a.scale]
    c = config_lib.experiment(
        model=dict(n_layers=layers, d_model=d, n_heads=heads, dtype="bfloat16" if a.scale == "paper" else "float32",
                   init_std=0.006 if a.scale == "paper" else 0.0, scan_layers=a.scale in SCANNED),
        moe=moe_config(a.method, d, d_ff),
        data=dict(seq_len=seq_len, batch_size=batch, tokenizer="spm8k.model" if a.scale == "paper" else "byte",
                  eval_steps=8 if a.scale == "tiny" else 32, **VALIDATION.get(a.scale, {})),
        train=dict(steps=steps, warmup_steps=warmup, lr=lr, schedule="deepseekmoe", log_every=10,
                   eval_every=eval_every, checkpoint_every=eval_every),
    )
    for section, values in ACCELERATOR.get(a.scale, {}).items():
        c[section].update(values)
    return c
