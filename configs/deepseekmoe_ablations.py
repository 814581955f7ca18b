"""The DeepSeekMoE paper's ablations (Dai et al. 2024, arXiv:2401.06066, sec. 4.2-4.5 and appendix B) and the
OLMoE / auxiliary-loss-free baselines, at the scales and with the training recipe of deepseekmoe_table1.py.

  python -m moejax.main --config=configs/deepseekmoe_ablations.py:variant=seg_1s_3of31,scale=tiny --workdir=/tmp/s

Arguments: variant in VARIANTS (below); scale in (tiny, small, paper). Every variant keeps a standard FFN
width d_ff as its unit: routed-expert layers hold 16 x its parameters (16 d_ff of hidden units) unless
the name says otherwise, and `active` counts the FFN hidden units a token passes through, in d_ff.
The suites of experiments/deepseekmoe/run.py train these variants; its README gives runtimes and results.

  variant          FFN                                                          total  active
  dense, hash, switch, gshard, deepseekmoe: Table 1, see deepseekmoe_table1.py
  gshard_x1.2      GShard with 16 experts of 1.2 d_ff (Table 2, app. B)           19.2   2.4
  gshard_x1.5      GShard with 16 experts of 1.5 d_ff (Table 2)                   24     3
  dense_x4         one FFN of 4 d_ff                                              4      4
  dense_x16        one FFN of 16 d_ff: every parameter of the 16 experts active   16     16
                   (Fig. 3's baseline, 0 shared + 2 of 16 routed, is `gshard`)
  seg_1s_1of15     1 shared + 1 of 15 routed, d_ff wide                           16     2
  seg_1s_3of31     1 shared + 3 of 31 routed, d_ff / 2 wide (m = 2)               16     2
                   (1 shared + 7 of 63, m = 4, is `deepseekmoe`)
  shared_2of64     2 shared + 6 of 62 routed of d_ff / 4 (sec. 4.5, shared ratio)  16     2
  shared_4of64     4 shared + 4 of 60 routed of d_ff / 4                          16     2
  aux_free         deepseekmoe, no balance loss; aux-loss-free bias, u = 1e-3      16     2
                   (Wang et al. 2024; DeepSeek-V3 sec. 2.1.2)
  no_balance       deepseekmoe with neither balance loss nor bias                 16     2
  olmoe            OLMoE: 8 of 64 routed of d_ff / 4, no shared, z-loss 1e-3      16     2
  olmoe_shared     the same with 1 shared + 7 of 63 routed                        16     2
  expert_choice    64 experts of d_ff / 4, each takes C = 8 S / 64 tokens of a     16     2
                   sequence (Zhou et al. 2022; OLMoE sec. 4.1.4). Not causal: which tokens an expert takes
                   depends on later tokens of the sequence, so its loss is not comparable with the others'.
  switch_gs        switch with its gate x 4.3                                     16     1
  deepseekmoe_gs   deepseekmoe with its routed gates x 2.5                        16     2
                   Gate-scale controls: at initialisation the routed gates of a token sum to about 1 / 4.3
                   (Switch's top-1 softmax of 16) and 1 / 2.5 (DeepSeekMoE's 7 of 63, beside the shared
                   expert's gate 1), against 1 for GShard's normalised top-2 and for Hash (measured on the
                   first validation batch at tiny scale, seeds 0-2, experiments/deepseekmoe/run.py
                   `init_gate_mass`). The factors make the routed gate mass 1 at initialisation for all.
Expected, scale=tiny (300 steps, mean +- std over seeds 0-2, val loss in nats/token on 524,288 held-out tokens):
  deepseekmoe 1.873 +- 0.066   seg_1s_1of15 1.832 +- 0.032   seg_1s_3of31 1.867 +- 0.059   aux_free 1.878 +- 0.054
  no_balance 1.886 +- 0.062    switch_gs 1.978 +- 0.077      deepseekmoe_gs 1.833 +- 0.061
  (gshard_x1.2, gshard_x1.5, dense_x4, dense_x16, shared_*, olmoe*, expert_choice: not yet run with this
  validation.) Wall time 100-300 s per run on a 2-core CPU shared with a second run.
The full tables, figures and commands are in experiments/deepseekmoe/RESULTS.md.
"""
import dataclasses

from configs import deepseekmoe_table1 as table1
from moejax import config as config_lib
from moejax import model_config

# 1 / (initial routed gate mass), rounded: see the docstring (gate-scale controls)
GATE_SCALE = {"switch": 4.3, "deepseekmoe": 2.5}
LEARNED = dict(dispatch="dropless", aux_loss_coef=0.01)  # the paper's rules: no token dropping, a1 = 0.01


def _width(d_ff: int, ratio: float) -> int:
    """ratio x d_ff rounded to a multiple of 8."""
    return max(8, round(ratio * d_ff / 8) * 8)


VARIANTS = {
    **{m: (lambda m: lambda d, f: table1.moe_config(m, d, f))(m) for m in table1.METHODS},
    "gshard_x1.2": lambda d, f: model_config.gshard(d, _width(f, 1.2), n_experts=16, **LEARNED),
    "gshard_x1.5": lambda d, f: model_config.gshard(d, _width(f, 1.5), n_experts=16, **LEARNED),
    "dense_x4": lambda d, f: model_config.dense(d, 4 * f),
    "dense_x16": lambda d, f: model_config.dense(d, 16 * f),
    "seg_1s_1of15": lambda d, f: model_config.deepseekmoe(d, f, n_experts=16, top_k=2, m=1, n_shared=1),
    "seg_1s_3of31": lambda d, f: model_config.deepseekmoe(d, f, n_experts=16, top_k=2, m=2, n_shared=1),
    "shared_2of64": lambda d, f: model_config.deepseekmoe(d, f, n_experts=16, top_k=2, m=4, n_shared=2),
    "shared_4of64": lambda d, f: model_config.deepseekmoe(d, f, n_experts=16, top_k=2, m=4, n_shared=4),
    "aux_free": lambda d, f: model_config.deepseekmoe(d, f, n_experts=16, top_k=2, m=4, n_shared=1, aux_loss_coef=0.0,
                                             aux_free_bias=True, bias_update_rate=1e-3),
    "no_balance": lambda d, f: model_config.deepseekmoe(d, f, n_experts=16, top_k=2, m=4, n_shared=1, aux_loss_coef=0.0),
    "olmoe": lambda d, f: model_config.olmoe(d, f, n_experts=64, top_k=8, segmentation=4),
    "olmoe_shared": lambda d, f: model_config.olmoe(d, f, n_experts=63, top_k=7, n_shared=1, segmentation=4),
    "expert_choice": lambda d, f: model_config.expert_choice(d, f, n_experts=64, top_k=8, segmentation=4),
    "switch_gs": lambda d, f: dataclasses.replace(table1.moe_config("switch", d, f), routed_scale=GATE_SCALE["switch"]),
    "deepseekmoe_gs": lambda d, f: dataclasses.replace(table1.moe_config("deepseekmoe", d, f),
                                                       routed_scale=GATE_SCALE["deepseekmoe"]),
}


def moe_config(variant: str, d_model: int, d_ff: int) -> model_config.MoEConfig:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is invalid; allowed: {tuple(VARIANTS)}")
    return VARIANTS[variant](d_model, d_ff)


def get_config(arg=None):
    a = config_lib.parse_arg(arg, variant="deepseekmoe", scale="tiny")
    c = table1.get_config(f"method=deepseekmoe,scale={a.scale}")
    d, d_ff = c.model.d_model, c.model.moe.d_ff
    c.model.moe = config_lib.moe_fields(moe_config(a.variant, d, d_ff))
    return c
