"""DeepSeekMoE 16B (Dai et al. 2024, arXiv:2401.06066, sec. 5.1): 28 layers, d 2048, 16 heads of 128; the
first layer's FFN dense (width 10944), every other FFN an MoE layer of 2 shared + 64 routed experts of
width 1408 (0.25 x a standard FFN), top-6, softmax gates not renormalised, no token dropping,
expert-level balance loss a1 = 0.001 only (no device-level loss); vocabulary 102400 (untied embeddings,
as the released checkpoint); every weight N(0, 0.006). 16.4B parameters, 2.8B activated (moejax.metrics:
16.38B in all; 2.62B multiplied per token + the 0.21B embedding table = 2.83B).

Training as in the paper: AdamW (0.9, 0.95, weight decay 0.1), clip 1.0, lr 4.2e-4 with 2K warmup steps
then x0.316 at 80% and 90% of steps, batch 4.5K = 4608 sequences of 4096 tokens (18.9M tokens per step),
106449 steps (2T tokens). Training needs a ~100K-piece tokenizer (the paper's is byte-level BPE, 100K):
  python -m moejax.train_tokenizer --source=tfds --tfds_name=... --vocab_size=100000 --output=spm100k.model
  python -m moejax.main --config=configs/deepseekmoe_16b.py --workdir=...   (on a TPU pod)

Ahead-of-time check on a 64-chip v5p slice (any Linux machine with libtpu, no TPU):
  python -m moejax.aot --config=configs/deepseekmoe_16b.py --topology=v5p:4x4x4
Mesh fsdp=64 (parameters and AdamW moments split 64 ways; every chip routes its own tokens to all 64
experts, as the paper keeps a layer's experts on one device), the paper's 4608 x 4096 batch in
grad_accum=36 micro-batches (2 sequences per chip each), the 27 MoE layers scanned (model.scan_layers: XLA
compiles one of them). Rematerialisation recomputes only each block's attention sublayer in the backward
pass (remat_ffn=False: the MoE layers' activations are kept), and attention runs on the Pallas flash attention
kernels (model.attention_kernel 'auto' on TPU; pallas_kernels.flash_attention). Routed experts use the 'auto'
backend, on TPU the Pallas grouped matmul (pallas_kernels.gmm; XLA's ragged_dot would compute its weight
gradient as a dense masked product over all 64 experts). Expected (measured with JAX 0.10.2, libtpu 0.0.42.1
on a 2-core CPU):
  memory per chip  arguments 2.87 GiB, outputs 2.86 GiB (aliased to the donated state), temporaries
                   80.04 GiB: total 82.90 GiB of 95 GiB HBM, fits (84.54 with XLA's attention by blocks of
                   1024 queries, model.attention_kernel='xla'; 19.38 with whole blocks recomputed,
                   --config.model.remat_ffn=True, and a slower step).
  step time        the compiler's estimate (experiments/benchmarks/tpu_estimate.py --step, layers unrolled
                   so that it counts each): 24.02 s per step, estimated MFU 49.6% (XLA's attention: 29.84 s,
                   39.9%). With no rematerialisation at all (--config.model.remat=False) 22.61 s, 52.7%, but
                   87.25 GiB per chip: not the default, for the margin.
  FLOPs per step   not counted when scanned (the compiler counts a scanned layer once); model 6 N +
                   attention 5465 TFLOPs per chip, 349.8 PFLOPs (18.5 GFLOPs per token)
  compile time     scanned: about 2 min on 2 quiet CPU cores; unrolled: 7-12 min
Expert parallelism does not help here: fsdp=8 x expert=8 needed 99.4 GiB per chip even at 1 sequence per
chip (with XLA's attention), as each chip's dropless receive buffer holds every row that all 8 chips of its
expert group could send.
"""
from moejax import config as config_lib
from moejax import model_config

PAPER_BATCH = 4608  # 4.5K sequences
PAPER_STEPS = 106449  # 2T tokens / (4608 x 4096)


def get_config(arg=None):
    config_lib.parse_arg(arg)  # no arguments
    return config_lib.experiment(
        model=dict(n_layers=28, d_model=2048, n_heads=16, first_k_dense=1, dense_d_ff=10944, vocab_size=102400,
                   tie_embeddings=False, dtype="bfloat16", init_std=0.006, remat=True, remat_ffn=False,
                   scan_layers=True),
        moe=model_config.MoEConfig(d_model=2048, d_ff=1408, n_experts=64, top_k=6, n_shared=2, segmentation=1,
                          aux_loss_coef=0.001, dispatch="dropless", backend="auto"),
        data=dict(seq_len=4096, batch_size=PAPER_BATCH, tokenizer="spm100k.model"),
        train=dict(steps=PAPER_STEPS, warmup_steps=2000, lr=4.2e-4, schedule="deepseekmoe", decay_at=(0.8, 0.9),
                   decay_factor=0.316, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0, grad_accum=36,
                   log_every=10, eval_every=1000, checkpoint_every=1000),
        mesh=dict(data=1, fsdp=-1),
    )
