"""Model configuration without Flax: `MoEConfig` (one MoE layer) and its papers' presets, `ModelConfig` (the
decoder LM), and the validation helper the typed configs share. Frozen dataclasses, validated on construction.

y = sum_{i <= Ks} FFN_i(x) + sum_{i routed} g_{i,t} FFN_i(x)   (DeepSeekMoE eq. 9-11)

Parameterisation (DeepSeekMoE sec. 3): `d_ff` is the width of a standard FFN; segmentation factor m
makes every expert d_ff / m wide. `n_experts` routed experts and `top_k` routed picks are counted
after segmentation. The Ks shared experts are computed together as one dense FFN of width Ks * d_ff / m, or
`shared_d_ff` if set; `shared_gate` scales their output by sigmoid(x . w_g) (Qwen2-MoE).
Presets build the papers' settings, e.g. `deepseekmoe(d, d_ff, n_experts=16, top_k=2, m=4,
n_shared=1)` -> 63 routed experts of width d_ff / 4 with 7 picks, plus 1 shared.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from moejax import experts, routers, routing

DISPATCHES = ("capacity", "dropless")
ATTENTIONS = ("mha", "mla")
ATTENTION_KERNELS = ("xla", "flash", "auto")
_YARN = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
         "attention_factor", "truncate")
# rope_scaling keys by rope_type (moejax.attention.rope_frequencies)
ROPE_SCALING = {"default": (), "linear": ("factor",), "yarn": _YARN,
                "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")}


def require_for(cls_name: str):
    """A check that raises ValueError("<cls_name>.<field>=<value> is invalid; allowed: <allowed>")."""

    def require(ok: bool, field: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{cls_name}.{field}={value!r} is invalid; allowed: {allowed}")

    return require


_require = require_for("MoEConfig")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Everything the MoE layer needs; validated on construction (ValueError names field and value).

    Routed experts: `n_experts` (E, 0 for a dense FFN), `top_k` (K). Expert width f = d_ff // segmentation.
    Routing: `router` names a moejax.routers entry; 'topk' uses `score_fn`, `normalize`, `routed_scale`, group limits
    (`n_groups`, `topk_groups`, `group_score`) and the aux-free bias (`aux_free_bias`,
    `bias_update_rate`). 'expert_choice' gives each expert C = S * top_k * capacity_factor / E tokens of each
    sequence. Dispatch: `dispatch` in DISPATCHES; 'capacity' uses `capacity_factor`, `batch_prioritized`, with
    capacity C = ceil(S K capacity_factor / E) per sequence of S tokens.
    Backend: 'auto' or a name in experts.BACKENDS. Dropless 'einsum' (the CPU default) runs a capacity
    buffer of C = ceil(T K / E) rows per expert and loops over the rest (`dispatch.dropless_capacity_plan`);
    it needs a mesh without expert or tensor split ('auto' takes 'blocked' there). `block_size`: rows per
    block of a dropless 'blocked' buffer or of the 'einsum' overflow; 0 = `dispatch.auto_block` (the largest
    power of two <= T K / E, at most 256 for 'blocked' and 64 for the overflow).
    Losses (coefficients, >= 0): aux_loss_coef (a1), device_loss_coef (a2, over `n_devices` groups of
    experts; 0 = the devices of the mesh's expert axis), seq_aux_loss_coef (DeepSeek-V3), z_loss_coef (ST-MoE).
    `disable_top` r > 0 masks each token's r best routed experts before its K picks: an evaluation ablation
    of a trained model (DeepSeekMoE sec. 4.5, Fig. 4), 0 in training.
    Placement: `pad_experts_to` rounds the expert weights up to `n_slots` (e.g. DeepSeekMoE's 63 routed
    experts to 64 for an expert axis of 8); device j of D holds slots [j n_slots / D, (j + 1) n_slots / D).
    """

    d_model: int
    d_ff: int
    n_experts: int = 0
    top_k: int = 0
    n_shared: int = 0
    shared_d_ff: int = 0  # hidden width of the shared expert(s) together; 0 = n_shared * expert_width
    shared_gate: bool = False  # scale the shared experts' output by sigmoid(x . w_g), w_g [d, 1] (Qwen2-MoE)
    segmentation: int = 1
    activation: str = "swiglu"
    router: str = "topk"
    score_fn: str = "softmax"
    normalize: bool = False
    routed_scale: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    group_score: str = "top2_sum"
    aux_free_bias: bool = False
    bias_update_rate: float = 1e-3
    jitter: float = 0.0
    hash_salt: int = 0
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    batch_prioritized: bool = False
    backend: str = "auto"
    block_size: int = 0
    aux_loss_coef: float = 0.0
    device_loss_coef: float = 0.0
    n_devices: int = 0
    pad_experts_to: int = 1
    seq_aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    disable_top: int = 0

    def __post_init__(self):
        _require(self.d_model >= 1, "d_model", self.d_model, "an integer >= 1")
        _require(self.segmentation >= 1, "segmentation", self.segmentation, "an integer >= 1")
        _require(self.d_ff >= 1 and self.d_ff % self.segmentation == 0, "d_ff", self.d_ff,
                 f"a positive multiple of segmentation={self.segmentation}")
        _require(self.n_experts >= 0, "n_experts", self.n_experts, "an integer >= 0 (0 = dense FFN)")
        _require(self.n_shared >= 0, "n_shared", self.n_shared, "an integer >= 0")
        _require(self.shared_d_ff >= 0, "shared_d_ff", self.shared_d_ff,
                 "an integer >= 0 (0 = n_shared * d_ff / segmentation)")
        for name, off in (("shared_d_ff", 0), ("shared_gate", False)):
            _require(self.n_shared >= 1 or getattr(self, name) == off, name, getattr(self, name),
                     f"{off} with n_shared=0 (no shared expert)")
        if self.n_experts == 0:
            _require(self.top_k == 0, "top_k", self.top_k, "0 when n_experts=0 (dense)")
            _require(self.n_shared >= 1, "n_shared", self.n_shared, ">= 1 when n_experts=0 (dense)")
        else:
            _require(1 <= self.top_k <= self.n_experts, "top_k", self.top_k,
                     f"1 <= top_k <= n_experts={self.n_experts}")
        _require(self.activation in experts.ACTIVATIONS, "activation", self.activation, str(experts.ACTIVATIONS))
        _require(self.score_fn in routing.SCORE_FNS, "score_fn", self.score_fn, str(routing.SCORE_FNS))
        _require(self.group_score in routing.GROUP_SCORES, "group_score", self.group_score,
                 str(routing.GROUP_SCORES))
        _require(self.dispatch in DISPATCHES, "dispatch", self.dispatch, str(DISPATCHES))
        backends = ("auto",) + tuple(experts.BACKENDS)
        _require(self.backend in backends, "backend", self.backend, str(backends))
        _require(self.block_size >= 0, "block_size", self.block_size, "an integer >= 0 (0 = automatic)")
        if self.dispatch == "capacity":
            _require(self.capacity_factor > 0, "capacity_factor", self.capacity_factor, "> 0 with capacity dispatch")
        if self.dispatch == "dropless":
            _require(not self.batch_prioritized, "batch_prioritized", self.batch_prioritized,
                     "False with dispatch='dropless' (nothing is dropped)")
        _require(self.n_groups >= 1 and (self.n_experts or 1) % self.n_groups == 0, "n_groups", self.n_groups,
                 f"a divisor of n_experts={self.n_experts}")
        _require(1 <= self.topk_groups <= self.n_groups, "topk_groups", self.topk_groups,
                 f"1 <= topk_groups <= n_groups={self.n_groups}")
        _require(0 <= self.disable_top <= max(self.n_experts - self.top_k, 0), "disable_top", self.disable_top,
                 f"0 <= disable_top <= n_experts - top_k = {max(self.n_experts - self.top_k, 0)}")
        _require(self.pad_experts_to >= 1, "pad_experts_to", self.pad_experts_to, "an integer >= 1")
        _require(self.n_devices == 0 or (self.n_devices >= 1 and (self.n_slots or 1) % self.n_devices == 0),
                 "n_devices", self.n_devices, f"0 (the mesh's expert axis) or a divisor of n_experts={self.n_experts}"
                 + (f" padded to {self.n_slots}" if self.n_slots != self.n_experts else ""))
        for name in ("aux_loss_coef", "device_loss_coef", "seq_aux_loss_coef", "z_loss_coef",
                     "bias_update_rate", "routed_scale"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        _require(0 <= self.jitter < 1, "jitter", self.jitter, "0 <= jitter < 1")
        _require(0 <= self.hash_salt < 2**32, "hash_salt", self.hash_salt, "an integer in [0, 2**32)")
        routers.check_config(self, _require)  # the router exists; options it does not read keep their defaults

    @property
    def n_slots(self) -> int:
        """Expert weight slots: n_experts rounded up to a multiple of pad_experts_to (extra slots are zero and
        never routed; they let an expert axis that does not divide n_experts split the weights)."""
        return -(-self.n_experts // self.pad_experts_to) * self.pad_experts_to

    @property
    def expert_width(self) -> int:
        """f: hidden width of one (fine-grained) expert."""
        return self.d_ff // self.segmentation

    @property
    def shared_width(self) -> int:
        """Hidden width of the shared experts, computed together as one FFN (0 without them)."""
        return self.shared_d_ff or self.n_shared * self.expert_width


def dense(d_model: int, d_ff: int, **kw) -> MoEConfig:
    """A standard FFN (no routing): the 'Dense' baseline of DeepSeekMoE Table 1."""
    return MoEConfig(d_model, d_ff, **{"n_shared": 1, **kw})


def hash_layer(d_model: int, d_ff: int, n_experts: int = 16, top_k: int = 1, **kw) -> MoEConfig:
    """Hash layers (Roller et al. 2021): top-1 by a fixed hash of the token id; no learned router."""
    return MoEConfig(d_model, d_ff, n_experts, top_k, **{"router": "hash", **kw})


def switch(d_model: int, d_ff: int, n_experts: int = 16, **kw) -> MoEConfig:
    """Switch Transformer (Fedus et al. 2021): softmax top-1, gate p_i unnormalised, capacity 1.25,
    aux loss 0.01, multiplicative router jitter 0.01."""
    base = dict(dispatch="capacity", capacity_factor=1.25, aux_loss_coef=0.01, jitter=0.01)
    return MoEConfig(d_model, d_ff, n_experts, 1, **{**base, **kw})


def gshard(d_model: int, d_ff: int, n_experts: int = 16, **kw) -> MoEConfig:
    """GShard (Lepikhin et al. 2020): top-2 with normalised gates and the random second-expert policy,
    expert capacity 2T/E (capacity_factor 1 over T K / E), aux loss 0.01."""
    base = dict(router="gshard", dispatch="capacity", capacity_factor=1.0, aux_loss_coef=0.01)
    return MoEConfig(d_model, d_ff, n_experts, 2, **{**base, **kw})


def deepseekmoe(d_model: int, d_ff: int, n_experts: int = 16, top_k: int = 2, m: int = 4, n_shared: int = 1,
                **kw) -> MoEConfig:
    """DeepSeekMoE (Dai et al. 2024, sec. 3): from a GShard-like layer of N experts with K picks,
    segment each expert into m (width d_ff/m), isolate Ks of the mN as shared: mN - Ks routed experts
    with mK - Ks picks. Softmax gates without renormalisation, aux loss a1 = 0.01, dropless."""
    base = dict(segmentation=m, n_shared=n_shared, aux_loss_coef=0.01, dispatch="dropless")
    return MoEConfig(d_model, d_ff, m * n_experts - n_shared, m * top_k - n_shared, **{**base, **kw})


def deepseek_v3(d_model: int, d_ff: int, n_experts: int = 256, top_k: int = 8, n_shared: int = 1,
                n_groups: int = 8, topk_groups: int = 4, **kw) -> MoEConfig:
    """DeepSeek-V3 (2024, sec. 2.1): sigmoid scores normalised over the K picks, routed scale 2.5,
    node-limited routing (8 groups, keep 4), aux-loss-free bias (u = 0.001), sequence-wise loss 1e-4."""
    base = dict(n_shared=n_shared, score_fn="sigmoid", normalize=True, routed_scale=2.5, n_groups=n_groups,
                topk_groups=topk_groups, aux_free_bias=True, seq_aux_loss_coef=1e-4)
    return MoEConfig(d_model, d_ff, n_experts, top_k, **{**base, **kw})


def mixtral(d_model: int, d_ff: int, n_experts: int = 8, top_k: int = 2, **kw) -> MoEConfig:
    """Mixtral (Jiang et al. 2024): softmax top-2 renormalised over the picks, dropless."""
    return MoEConfig(d_model, d_ff, n_experts, top_k, **{"normalize": True, "aux_loss_coef": 0.01, **kw})


def olmoe(d_model: int, d_ff: int, n_experts: int = 64, top_k: int = 8, **kw) -> MoEConfig:
    """OLMoE (Muennighoff et al. 2024): 64 experts top-8, softmax gates not renormalised,
    aux loss 0.01, router z-loss 0.001, no shared expert, dropless."""
    return MoEConfig(d_model, d_ff, n_experts, top_k, **{"aux_loss_coef": 0.01, "z_loss_coef": 1e-3, **kw})


def expert_choice(d_model: int, d_ff: int, n_experts: int = 16, top_k: int = 2, **kw) -> MoEConfig:
    """Expert choice (Zhou et al. 2022): each expert takes its top C = S * top_k * capacity_factor / E
    tokens of each sequence (compute of top-K token choice at capacity 1)."""
    base = dict(router="expert_choice", dispatch="capacity", capacity_factor=1.0)
    return MoEConfig(d_model, d_ff, n_experts, top_k, **{**base, **kw})


PRESETS = {
    "dense": dense, "hash": hash_layer, "switch": switch, "gshard": gshard, "deepseekmoe": deepseekmoe,
    "deepseek_v3": deepseek_v3, "mixtral": mixtral, "olmoe": olmoe, "expert_choice": expert_choice,
}


def preset(name: str, d_model: int, d_ff: int, **kw) -> MoEConfig:
    """A named preset (see PRESETS) with keyword overrides."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r}; allowed: {tuple(PRESETS)}")
    return PRESETS[name](d_model, d_ff, **kw)


def check_placement(c: MoEConfig, n: int) -> None:
    """ValueError unless an expert axis of n devices can hold the layer: n divides the expert slots, and
    device-level losses and group-limited routing match the placement (device j of n holds slots
    [j n_slots / n, (j + 1) n_slots / n))."""
    if not c.n_experts or n == 1:
        return
    if c.n_slots % n:
        raise ValueError(f"MoEConfig.n_experts={c.n_experts} (padded to {c.n_slots} slots) is invalid for a mesh "
                         f"with expert={n}; allowed: a multiple of the expert axis size {n}, or set "
                         f"pad_experts_to={n} to add never-routed zero experts")
    if c.n_devices not in (0, n):
        raise ValueError(f"MoEConfig.n_devices={c.n_devices} is invalid for a mesh with expert={n}; allowed: "
                         f"0 (the mesh's expert axis) or {n}")
    if c.n_groups > 1 and c.n_groups % n and n % c.n_groups:
        raise ValueError(f"MoEConfig.n_groups={c.n_groups} is invalid for a mesh with expert={n}; allowed: a "
                         f"multiple or divisor of {n}, so that each routing group lies on whole devices")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder LM; `moe` configures every MoE layer (its d_model must equal d_model)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    moe: MoEConfig
    dense_d_ff: int = 0  # width of the dense FFN layers; 0 = moe.d_ff
    first_k_dense: int = 0
    moe_every: int = 1
    max_len: int = 2048
    rope_base: float = 10000.0
    rope_scaling: tuple = ()  # Hugging Face rope_parameters but rope_theta, as (key, value) pairs (or a dict)
    n_kv_heads: int = 0  # key/value heads; 0 = n_heads (multi-head); fewer: grouped-query attention
    head_dim: int = 0  # width of a head; 0 = d_model // n_heads
    qk_norm: str = "none"  # RMSNorm of queries and keys: 'none', 'head' (each head: Qwen3), 'full' (OLMoE)
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    norm_eps: float = 1e-6  # every RMSNorm's epsilon (but MLA's latent norms: 1e-6)
    attention: str = "mha"  # 'mha' (multi-head / grouped-query) or 'mla' (DeepSeek-V2 multi-head latent)
    q_lora_rank: int = 0  # mla: width of the query latent (0 = queries straight from x)
    kv_lora_rank: int = 0  # mla: width of the key/value latent
    rope_head_dim: int = 0  # mla: rotary width r of queries and the shared key (head_dim: the rest)
    v_head_dim: int = 0  # mla: width of a value head; 0 = head width
    attention_chunk: int = 1024  # causal attention by blocks of this many queries, each over the keys up to its
    #   last (the masked blocks above the diagonal never computed: moejax.attention.attend); 0: one block
    attention_kernel: str = "auto"  # causal attention in training: 'xla' (attend, by attention_chunk), 'flash'
    #   (Pallas TPU flash attention, pallas_kernels.flash_attention; interpreted on CPU, slow), 'auto' (flash on
    #   TPU where the sequence length takes it, else xla)
    tie_embeddings: bool = True
    dtype: str = "float32"
    init_std: float = 0.0  # > 0: every weight N(0, init_std) (DeepSeekMoE: 0.006); 0: fan-in, embeddings N(0, 1)
    remat: bool = False  # recompute each block's activations in the backward pass (jax.checkpoint)
    remat_ffn: bool = True  # with remat: the FFN's activations recomputed too; False: only the attention
    #   sublayer's (the FFN's kept: more memory, one FFN forward pass fewer)
    scan_layers: bool = False  # the layers from first_k_dense on as one jax.lax.scan (see Transformer)

    def __post_init__(self):
        req = require_for("ModelConfig")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "moe_every", "max_len"):
            req(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        if self.head_dim and self.attention == "mla":  # rotary channels are rope_head_dim's
            req(self.head_dim >= 1, "head_dim", self.head_dim, "0 (d_model // n_heads) or an integer >= 1")
        elif self.head_dim:
            req(self.head_dim >= 2 and self.head_dim % 2 == 0, "head_dim", self.head_dim,
                "0 (d_model // n_heads) or an even integer >= 2 (rotary pairs)")
        else:
            req(self.d_model % self.n_heads == 0 and (self.d_model // self.n_heads) % 2 == 0, "n_heads",
                self.n_heads, f"a divisor of d_model={self.d_model} leaving an even head width (or set head_dim)")
        req(self.n_kv_heads >= 0 and self.n_heads % self.kv_heads == 0,
            "n_kv_heads", self.n_kv_heads, f"0 (= n_heads) or a divisor of n_heads={self.n_heads}")
        req(self.qk_norm in ("none", "head", "full"), "qk_norm", self.qk_norm, "('none', 'head', 'full')")
        req(self.norm_eps > 0, "norm_eps", self.norm_eps, "> 0")
        req(self.attention_chunk >= 0, "attention_chunk", self.attention_chunk, "an integer >= 0 (0 = one block)")
        req(self.attention_kernel in ATTENTION_KERNELS, "attention_kernel", self.attention_kernel,
            str(ATTENTION_KERNELS))
        self._check_attention(req)
        req(self.moe.d_model == self.d_model, "moe.d_model", self.moe.d_model, f"d_model={self.d_model}")
        req(0 <= self.first_k_dense <= self.n_layers, "first_k_dense", self.first_k_dense,
            f"0 <= first_k_dense <= n_layers={self.n_layers}")
        req(self.dense_d_ff >= 0, "dense_d_ff", self.dense_d_ff, "an integer >= 0 (0 = moe.d_ff)")
        req(self.rope_base > 0, "rope_base", self.rope_base, "> 0")
        req(self.init_std >= 0, "init_std", self.init_std, ">= 0 (0 = fan-in scaled)")
        req(self.dtype in ("float32", "bfloat16"), "dtype", self.dtype, "('float32', 'bfloat16')")
        for name in ("remat", "remat_ffn"):
            req(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        req(not self.scan_layers or self.moe_every == 1, "scan_layers", self.scan_layers,
            f"False with moe_every={self.moe_every} (scanned layers must all be alike: moe_every=1)")

    def _check_attention(self, req) -> None:
        req(self.attention in ATTENTIONS, "attention", self.attention, str(ATTENTIONS))
        mla = self.attention == "mla"
        for name in ("q_lora_rank", "kv_lora_rank", "rope_head_dim", "v_head_dim"):
            req(getattr(self, name) >= 0 and (mla or getattr(self, name) == 0), name, getattr(self, name),
                "an integer >= 0 with attention='mla', else 0")
        if mla:
            req(self.kv_lora_rank >= 1, "kv_lora_rank", self.kv_lora_rank, ">= 1 with attention='mla'")
            req(self.rope_head_dim >= 2 and self.rope_head_dim % 2 == 0, "rope_head_dim", self.rope_head_dim,
                "an even integer >= 2 with attention='mla'")
            for name, off in (("n_kv_heads", 0), ("qk_norm", "none"), ("qkv_bias", False)):
                req(getattr(self, name) == off, name, getattr(self, name), f"{off!r} with attention='mla'")
        pairs = self.rope_scaling.items() if isinstance(self.rope_scaling, dict) else self.rope_scaling
        try:
            params = {str(k): v for k, v in pairs}
        except (TypeError, ValueError):
            params = None
        req(params is not None, "rope_scaling", self.rope_scaling, "a dict or (key, value) pairs")
        object.__setattr__(self, "rope_scaling", tuple(sorted(params.items())))  # hashable, one spelling
        kind = params.get("rope_type", params.get("type", "default"))
        req(kind in ROPE_SCALING, "rope_scaling", self.rope_scaling,
            f"rope_type one of {tuple(ROPE_SCALING)} (Hugging Face's 'dynamic' and 'longrope' are not supported)")
        unknown = set(params) - set(ROPE_SCALING[kind]) - {"rope_type", "type"}
        req(not unknown, "rope_scaling", self.rope_scaling, f"keys {ROPE_SCALING[kind]} for rope_type={kind!r}")
        need = {"linear": ("factor",), "llama3": ("factor", "original_max_position_embeddings"),
                "yarn": ("factor", "original_max_position_embeddings")}.get(kind, ())
        req(all(params.get(k) for k in need), "rope_scaling", self.rope_scaling, f"{need} set for rope_type={kind!r}")

    @property
    def rope_params(self) -> dict:
        """rope_scaling as a dict with 'rope_type' ('default' when empty)."""
        p = dict(self.rope_scaling)
        p["rope_type"] = p.pop("type", p.get("rope_type", "default"))
        return p

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def v_width(self) -> int:
        """Width of a value head (MLA: v_head_dim or the head width)."""
        return self.v_head_dim or self.head_width

    @property
    def qk_width(self) -> int:
        """Width over which queries meet keys: the head width, plus the rotary width under MLA."""
        return self.head_width + self.rope_head_dim

    @property
    def head_width(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def uses_moe_config(self, layer: int) -> bool:
        """Whether layer `layer`'s FFN is configured by `moe` (else a dense FFN of width dense_d_ff). For the
        dense baseline (moe.n_experts = 0) such a layer is dense too; see `is_routed`."""
        return layer >= self.first_k_dense and (layer - self.first_k_dense) % self.moe_every == 0

    def is_routed(self, layer: int) -> bool:
        """Whether layer `layer` has routed experts: the one test of "routed or dense" (stats, loads and
        routes are returned for these layers only, in layer order)."""
        return self.uses_moe_config(layer) and self.moe.n_experts > 0

    @property
    def routed_layers(self) -> tuple[int, ...]:
        return tuple(l for l in range(self.n_layers) if self.is_routed(l))

    def ffn_config(self, layer: int) -> MoEConfig:
        if self.uses_moe_config(layer):
            return self.moe
        return dense(self.d_model, self.dense_d_ff or self.moe.d_ff, activation=self.moe.activation)
