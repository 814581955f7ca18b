"""The suites of the DeepSeekMoE ablation runner: which variants of configs/deepseekmoe_ablations.py each
trains, how each row is labelled, the paper's published numbers beside them, and the evaluation-time
ablations of trained models (specialisation).

Every variant of a suite follows the paper's equal-compute rules (Dai et al. 2024, sec. 4.1): the same
data, steps, batch and optimiser; the MoE variants hold 16 standard FFNs of expert parameters and, except
where a suite studies exactly that (larger baselines), the active FFN compute of GShard's top-2.
"""
from __future__ import annotations

import dataclasses
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "deepseekmoe_ablations.py")
SCALES = ("tiny", "small", "paper", "proxy", "gpu")  # configs/deepseekmoe_table1.py
DISABLE_RATIOS = (1 / 16, 2 / 16, 3 / 16, 4 / 16)  # of the routed experts (Fig. 4's x axis)


@dataclasses.dataclass(frozen=True)
class Row:
    """One variant of a suite: `variant` names a configs/deepseekmoe_ablations.py VARIANTS entry."""

    variant: str
    label: str
    paper: float | None = None  # the paper's Pile loss for this row, where it publishes one
    evals: bool = False  # evaluation-time ablations of the trained model (specialisation suite)


@dataclasses.dataclass(frozen=True)
class Claim:
    """A finding checked seed by seed: `lower` has a lower `metric` than `higher`. Each side is a variant of
    the suite, or 'variant@eval' for one of its evaluation-time ablations (specialisation), e.g.
    'deepseekmoe@no_shared'. metric: a key of report.METRICS ('val_loss', 'max_vio_global', 'rise@EVAL' = the
    loss an ablation adds over the trained model)."""

    lower: str
    higher: str
    source: str  # whose finding: "paper", "Wang et al. 2024", "control", ...
    metric: str = "val_loss"


@dataclasses.dataclass(frozen=True)
class Budget:
    """A training length of the token sweep: `steps` at the suite's scale, trained with `seeds` seeds."""

    steps: int
    seeds: int


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    title: str
    rows: tuple[Row, ...]
    paper_note: str = ""
    ordering: tuple[str, ...] = ()  # the paper's finding: variants from lowest to highest validation loss
    claims: tuple[Claim, ...] = ()  # further findings checked per seed (report.py), besides `ordering`
    budgets: tuple[Budget, ...] = ()  # token sweep: every row at each budget (run.py); () = the scale's steps
    set: tuple[tuple[str, object], ...] = ()  # config overrides of every run of the suite (before --set)

    def all_claims(self) -> tuple[Claim, ...]:
        """The adjacent pairs of `ordering` (source 'paper'), then `claims`."""
        chain = tuple(Claim(a, b, "paper") for a, b in zip(self.ordering, self.ordering[1:]))
        return chain + self.claims


# The token sweep trains on the PyPI corpus (moejax.datasets.pypi_corpus: 226 MB of training text, so even
# 20M tokens are a tenth of an epoch), with the scale's byte tokens: at tiny width its 8K SentencePiece model
# would make the embeddings 2/3 of the active parameters and halve the tokens/s (measured: DeepSeekMoE 2.1K
# vs 4.0K tokens/s on a shared 2-core CPU). val_fraction: the corpus has its own split, by distribution.
PYPI = (("data.source", "pypi"), ("data.tfds_name", ""), ("data.val_fraction", 0.02))
_MOE = ("hash", "switch", "gshard", "deepseekmoe")

SUITES = {s.name: s for s in (
    Suite("table1", "Table 1: MoE designs at equal compute", (
        Row("dense", "Dense", 2.060), Row("hash", "Hash Layer", 1.932), Row("switch", "Switch", 1.881),
        Row("gshard", "GShard", 1.867), Row("deepseekmoe", "DeepSeekMoE", 1.808)),
          "Paper: Pile validation loss, 2B-scale models (Dai et al. 2024, Table 1).",
          ("deepseekmoe", "gshard", "switch", "hash", "dense"),
          tuple(Claim(v, "dense", "paper") for v in _MOE if v != "hash")),
    Suite("larger", "Larger baselines: GShard with larger experts, dense upper bounds", (
        Row("gshard", "GShard"), Row("gshard_x1.2", "GShard x1.2"), Row("gshard_x1.5", "GShard x1.5"),
        Row("dense_x4", "Dense x4"), Row("dense_x16", "Dense x16"), Row("deepseekmoe", "DeepSeekMoE")),
          "Paper: Table 2 and appendix B compare these at 2B and 13B on downstream tasks."),
    Suite("segmentation", "Fine-grained expert segmentation and shared expert isolation (Fig. 3)", (
        Row("gshard", "GShard: 0 shared + 2/16 routed"), Row("seg_1s_1of15", "1 shared + 1/15 routed"),
        Row("seg_1s_3of31", "1 shared + 3/31 routed"), Row("deepseekmoe", "1 shared + 7/63 routed")),
          "Paper: Fig. 3 shows each step lowering the Pile loss and raising downstream scores.",
          ("deepseekmoe", "seg_1s_3of31", "seg_1s_1of15", "gshard")),
    Suite("shared_ratio", "Shared experts out of 64 with 8 active (sec. 4.5)", (
        Row("deepseekmoe", "1 shared + 7/63 routed"), Row("shared_2of64", "2 shared + 6/62 routed"),
        Row("shared_4of64", "4 shared + 4/60 routed")),
          "Paper: sec. 4.5 studies this ratio at 2B scale."),
    Suite("specialisation", "Expert specialisation: disabled top experts, no shared expert, fewer active (Fig. 4-5)", (
        Row("deepseekmoe", "DeepSeekMoE", 1.808, evals=True), Row("gshard_x1.5", "GShard x1.5", evals=True)),
          "Paper: DeepSeekMoE without its shared expert (one more routed expert active) goes from 1.808 to "
          "2.414 Pile loss (sec. 4.5).",
          claims=(Claim("deepseekmoe", "deepseekmoe@no_shared", "paper"),
                  Claim("gshard_x1.5", "deepseekmoe", "paper", "rise@disable_top=1/16"))),
    Suite("balancing", "Auxiliary loss vs auxiliary-loss-free balancing (Wang et al. 2024)", (
        Row("deepseekmoe", "balance loss a1 = 0.01"), Row("aux_free", "loss-free bias, u = 1e-3"),
        Row("no_balance", "neither")),
          claims=(Claim("aux_free", "deepseekmoe", "Wang et al. 2024"),
                  Claim("aux_free", "deepseekmoe", "Wang et al. 2024", "max_vio_global"),
                  Claim("deepseekmoe", "no_balance", "balance loss", "max_vio_global"),
                  Claim("aux_free", "no_balance", "loss-free bias", "max_vio_global"))),
    Suite("olmoe", "OLMoE-style choices: shared expert, expert choice", (
        Row("olmoe", "8/64 routed, no shared"), Row("olmoe_shared", "1 shared + 7/63 routed"),
        Row("expert_choice", "expert choice, 64 experts, C = 8S/64")),
          claims=(Claim("olmoe", "olmoe_shared", "OLMoE"),)),
    Suite("gate_scale", "Gate-scale control: routed gates that start at the same mass", (
        Row("switch", "Switch"), Row("switch_gs", "Switch, gate x 4.3"), Row("gshard", "GShard"),
        Row("deepseekmoe", "DeepSeekMoE"), Row("deepseekmoe_gs", "DeepSeekMoE, routed gates x 2.5")),
          "At initialisation the routed gates sum to about 0.24 (Switch), 1 (GShard) and 0.40 (DeepSeekMoE); "
          "the x 4.3 and x 2.5 variants start at about 1 (configs/deepseekmoe_ablations.py GATE_SCALE).",
          claims=(Claim("switch_gs", "switch", "control"), Claim("deepseekmoe_gs", "deepseekmoe", "control"),
                  Claim("deepseekmoe", "gshard", "paper"), Claim("deepseekmoe_gs", "gshard", "paper"),
                  Claim("gshard", "switch", "paper"), Claim("gshard", "switch_gs", "paper"))),
    Suite("tokens", "Token sweep on the PyPI corpus: does DeepSeekMoE overtake GShard with more tokens?", (
        Row("dense", "Dense"), Row("gshard", "GShard"), Row("deepseekmoe", "DeepSeekMoE"),
        Row("deepseekmoe_gs", "DeepSeekMoE, routed gates x 2.5")),
          claims=(Claim("deepseekmoe", "gshard", "paper"), Claim("deepseekmoe_gs", "gshard", "paper"),
                  Claim("gshard", "dense", "paper")),
          budgets=(Budget(300, 3), Budget(950, 3), Budget(3000, 2), Budget(10000, 2)), set=PYPI),
)}

PAPER_EVALS = {("deepseekmoe", "no_shared"): 2.414}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"--suite={name!r} is invalid; allowed: {tuple(SUITES)}")
    return SUITES[name]


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise ValueError(f"--scale={scale!r} is invalid; allowed: {SCALES}")
    return scale


def evals(moe: dict) -> dict[str, dict]:
    """Evaluation-time ablations of a trained model with MoE config `moe` (a dict of MoEConfig fields):
    name -> MoEConfig changes. DeepSeekMoE sec. 4.5: disable each token's top r routed experts for r / E in
    DISABLE_RATIOS (Fig. 4); drop the shared experts and route one more expert per shared one; activate
    fewer routed experts, 1 .. K - 1 (Fig. 5)."""
    E, K, Ks = moe["n_experts"], moe["top_k"], moe["n_shared"]
    out = {}
    for ratio in DISABLE_RATIOS:
        r = round(ratio * E)
        if 1 <= r <= E - K:
            out[f"disable_top={r}"] = {"disable_top": r}
    if Ks and K + Ks <= E:
        out["no_shared"] = {"n_shared": 0, "top_k": K + Ks}
    if moe["router"] == "topk":
        out.update({f"top_k={k}": {"top_k": k} for k in range(1, K)})
    return out
