"""Hugging Face MoE checkpoints in and out: a checkpoint directory (config.json + *.safetensors) <-> a moejax
workdir (config.json + an orbax checkpoint) that `moejax.checkpoint.load_checkpoint`, evaluation and
`python -m moejax.generate` read. Families (`FAMILIES`, by config.json's model_type): Mixtral, OLMoE,
Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 and DeepSeek-V3, in their Hub layout (one tensor per expert projection).

Tensors are read with the `safetensors` package into numpy (no torch). Each moejax parameter is built by
`jax.make_array_from_callback` on its sharding: a device's callback reads only the Hugging Face tensors of
its shard (for an expert stack, only its experts), so host memory holds a few tensors at a time, never the
model. Export writes one safetensors shard per layer.

Weight layouts: Hugging Face's nn.Linear weights are [out, in]; moejax's are [in, out] with heads split out
(moejax.attention, moejax.moe). Rotary channels: Hugging Face's DeepSeek models rotate interleaved pairs
(2i, 2i + 1), moejax pairs (i, i + r/2); import permutes the rotary output channels of the query and key
projections (`_deinterleave`), which leaves every q . k unchanged, and export permutes them back.

Command line:
    python -m moejax.convert import HF_DIR WORKDIR [--tokenizer=byte|SPM.model|tokenizer.json]
    python -m moejax.convert export WORKDIR HF_DIR [--step=N]
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
from typing import Callable

import jax
import numpy as np

from moejax import model_config as mc

FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")


class ConversionError(ValueError):
    """A Hugging Face config or checkpoint that moejax cannot hold, or that does not match its config."""


def _fail(field: str, value, allowed: str):
    raise ConversionError(f"Hugging Face config.json {field}={value!r} is not supported; allowed: {allowed}")


# ---------------------------------------------------------------------------------------------- configs

def model_config(hf: dict) -> mc.ModelConfig:
    """The ModelConfig of a Hugging Face config.json dict (ConversionError naming an unsupported field)."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        _fail("model_type", family, str(FAMILIES))
    if hf.get("hidden_act", "silu") != "silu":
        _fail("hidden_act", hf.get("hidden_act"), "'silu' (SwiGLU experts)")
    for field in ("clip_qkv", "sliding_window"):
        if hf.get(field) and not (field == "sliding_window" and not hf.get("use_sliding_window", True)):
            _fail(field, hf[field], "null")
    d, H, L = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    base = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    partial = rope.pop("partial_rotary_factor", 1.0)
    if partial != 1.0:
        _fail("rope_parameters.partial_rotary_factor", partial, "1.0 (every channel of a head rotates)")
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = {}
    kw = dict(vocab_size=hf["vocab_size"], d_model=d, n_layers=L, n_heads=H, max_len=hf.get("max_position_embeddings", 2048),
              rope_base=float(base), rope_scaling=rope, norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=False)
    moe = dict(d_model=d, dispatch="dropless", top_k=hf["num_experts_per_tok"])
    dense_d_ff = hf["intermediate_size"]
    if family.startswith("deepseek"):
        if hf.get("attention_bias"):
            _fail("attention_bias", True, "false")
        kw.update(attention="mla", q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
                  head_dim=hf["qk_nope_head_dim"], rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
                  first_k_dense=hf.get("first_k_dense_replace", 0), moe_every=hf.get("moe_layer_freq", 1))
        moe.update(d_ff=hf["moe_intermediate_size"], n_experts=hf["n_routed_experts"],
                   n_shared=hf.get("n_shared_experts") or 0, routed_scale=float(hf.get("routed_scaling_factor", 1.0)),
                   normalize=bool(hf.get("norm_topk_prob", False)))
        method = hf.get("topk_method", "noaux_tc" if family == "deepseek_v3" else "greedy")
        if method == "group_limited_greedy":
            moe.update(n_groups=hf["n_group"], topk_groups=hf["topk_group"], group_score="max")
        elif method == "noaux_tc":
            moe.update(score_fn="sigmoid", aux_free_bias=True, n_groups=hf.get("n_group") or 1,
                       topk_groups=hf.get("topk_group") or 1, group_score="top2_sum")
        elif method != "greedy":
            _fail("topk_method", method, "'greedy', 'group_limited_greedy', 'noaux_tc'")
        if family == "deepseek_v3" and not hf.get("rope_interleave", True):
            kw["rope_interleave"] = False  # popped below: only the converter reads it
    else:
        if hf.get("num_key_value_heads", H) != H:
            kw["n_kv_heads"] = hf["num_key_value_heads"]
        if hf.get("head_dim") and hf["head_dim"] != d // H:
            kw["head_dim"] = hf["head_dim"]
        if family == "qwen2_moe":
            kw["qkv_bias"] = bool(hf.get("qkv_bias", True))
        elif hf.get("attention_bias"):
            _fail("attention_bias", True, "false (moejax has no output-projection bias)")
        kw["qk_norm"] = {"olmoe": "full", "qwen3_moe": "head"}.get(family, "none")
        if family == "mixtral":
            moe.update(d_ff=hf["intermediate_size"], n_experts=hf["num_local_experts"], normalize=True)
        else:
            moe.update(d_ff=hf.get("moe_intermediate_size", hf["intermediate_size"]),
                       n_experts=hf.get("num_experts") or hf["num_local_experts"],
                       normalize=bool(hf.get("norm_topk_prob", False)))
        if family == "qwen2_moe":
            moe.update(n_shared=1, shared_d_ff=hf["shared_expert_intermediate_size"], shared_gate=True)
        if family.startswith("qwen"):
            kw.update(_qwen_layers(hf, L))
    kw.pop("rope_interleave", None)
    try:
        return mc.ModelConfig(moe=mc.MoEConfig(**moe), dense_d_ff=dense_d_ff, **kw)
    except ValueError as e:
        raise ConversionError(f"the Hugging Face config does not make a valid moejax config: {e}") from e


def _qwen_layers(hf: dict, L: int) -> dict:
    """first_k_dense / moe_every of Qwen's layer pattern: MoE iff l not in mlp_only_layers and
    (l + 1) % decoder_sparse_step == 0."""
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
    sparse = [l for l in range(L) if l not in dense and (l + 1) % step == 0]
    for first in range(L + 1):
        for every in range(1, L + 1):
            if [l for l in range(L) if l >= first and (l - first) % every == 0] == sparse:
                return dict(first_k_dense=first, moe_every=every)
    _fail("mlp_only_layers", sorted(dense), f"a pattern moejax holds: the first k layers dense, then every n-th "
          f"layer MoE (decoder_sparse_step={step})")


def family_of(c: mc.ModelConfig) -> str:
    """The Hugging Face family that computes what c computes (ConversionError if none does)."""
    m = c.moe
    if m.router != "topk" or m.dispatch != "dropless" or m.activation != "swiglu" or not m.n_experts:
        raise ConversionError(f"MoEConfig router={m.router!r}, dispatch={m.dispatch!r}, activation={m.activation!r},"
                              f" n_experts={m.n_experts} has no Hugging Face family; allowed: router='topk', "
                              f"dispatch='dropless', activation='swiglu', n_experts >= 1")
    if m.disable_top:
        raise ConversionError(f"MoEConfig.disable_top={m.disable_top} is an evaluation ablation; allowed: 0")
    if c.attention == "mla":
        family = "deepseek_v3" if m.score_fn == "sigmoid" else "deepseek_v2"
        group = "top2_sum" if family == "deepseek_v3" else "max"
        if m.n_groups > 1 and m.group_score != group:
            raise ConversionError(f"MoEConfig.group_score={m.group_score!r} has no Hugging Face family; allowed: "
                                  f"{group!r} ({family})")
        if m.aux_free_bias and family == "deepseek_v2":
            raise ConversionError("MoEConfig.aux_free_bias=True with softmax scores has no Hugging Face family; "
                                  "allowed: score_fn='sigmoid' (DeepSeek-V3)")
        return family
    plain = dict(score_fn="softmax", routed_scale=1.0, n_groups=1, aux_free_bias=False)
    for name, value in plain.items():  # Mixtral, OLMoE and Qwen route by plain softmax top-k
        if getattr(m, name) != value:
            raise ConversionError(f"MoEConfig.{name}={getattr(m, name)!r} without multi-head latent attention has "
                                  f"no Hugging Face family; allowed: {value!r} (Mixtral, OLMoE, Qwen routers)")
    if m.shared_gate:
        return "qwen2_moe"
    if c.qk_norm == "full":
        return "olmoe"
    if c.qk_norm == "head":
        return "qwen3_moe"
    if m.normalize and not m.n_shared and not c.qkv_bias and not c.head_dim and c.first_k_dense == 0:
        return "mixtral"
    raise ConversionError("this moejax config has no Hugging Face family: without MLA, a gated shared expert "
                          "(moe.shared_gate) or query/key norms only Mixtral fits, which needs moe.normalize=True, "
                          "no shared expert, no biases, the default head width and every layer MoE")


def hf_config(c: mc.ModelConfig, family: str | None = None) -> dict:
    """The Hugging Face config.json dict of c (the inverse of `model_config` on its families)."""
    family = family or family_of(c)
    m = c.moe
    rope = {"rope_theta": c.rope_base, **(c.rope_params if c.rope_scaling else {"rope_type": "default"})}
    out = dict(model_type=family, architectures=[_ARCH[family]], vocab_size=c.vocab_size, hidden_size=c.d_model,
               num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads,
               max_position_embeddings=c.max_len, rms_norm_eps=c.norm_eps, rope_parameters=rope,
               rope_theta=c.rope_base, hidden_act="silu", tie_word_embeddings=False, num_experts_per_tok=m.top_k,
               intermediate_size=c.dense_d_ff or m.d_ff, attention_bias=False, torch_dtype="float32")
    if family.startswith("deepseek"):
        out.update(q_lora_rank=c.q_lora_rank or None, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.head_width,
                   qk_rope_head_dim=c.rope_head_dim, v_head_dim=c.v_width, head_dim=c.rope_head_dim,
                   first_k_dense_replace=c.first_k_dense, moe_layer_freq=c.moe_every, moe_intermediate_size=m.d_ff,
                   n_routed_experts=m.n_experts, n_shared_experts=m.n_shared, routed_scaling_factor=m.routed_scale,
                   norm_topk_prob=m.normalize, n_group=m.n_groups, topk_group=m.topk_groups,
                   topk_method="noaux_tc" if m.score_fn == "sigmoid" else
                   ("group_limited_greedy" if m.n_groups > 1 else "greedy"))
        if family == "deepseek_v3":
            out["rope_interleave"] = True
        return out
    out.update(head_dim=c.head_width)
    if family == "mixtral":
        out.update(num_local_experts=m.n_experts, intermediate_size=m.d_ff)
        return out
    out.update(num_experts=m.n_experts, norm_topk_prob=m.normalize, moe_intermediate_size=m.d_ff)
    if family == "olmoe":
        out["intermediate_size"] = m.d_ff
    if family.startswith("qwen"):
        out.update(decoder_sparse_step=1, mlp_only_layers=[l for l in range(c.n_layers) if not c.is_routed(l)])
        if c.moe_every != 1:
            raise ConversionError(f"ModelConfig.moe_every={c.moe_every} with first_k_dense={c.first_k_dense} is "
                                  f"exported as mlp_only_layers; allowed here: moe_every=1")
    if family == "qwen2_moe":
        out.update(shared_expert_intermediate_size=m.shared_width, qkv_bias=c.qkv_bias)
    return out


_ARCH = {"mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
         "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
         "deepseek_v3": "DeepseekV3ForCausalLM"}


# ---------------------------------------------------------------------------------------------- weights

@dataclasses.dataclass(frozen=True)
class Rule:
    """One moejax array from Hugging Face tensors: `names` (per expert: one list per expert, stacked on a
    leading axis), `load(tensors) -> array` and its inverse `save(array) -> tensors` (one expert's, for a
    stack)."""

    names: tuple
    load: Callable
    save: Callable
    per_expert: bool = False


def _t(shape_after=None):
    """nn.Linear [out, in] -> [in, *shape_after] (shape_after splits `out`), and back."""
    def load(ts):
        w = ts[0].T
        return w.reshape(w.shape[0], *shape_after) if shape_after else w

    def save(a):
        return [a.reshape(a.shape[0], -1).T]
    return load, save


def _deinterleave(r: int) -> np.ndarray:
    """Channel order taking interleaved rotary pairs (2i, 2i + 1) to moejax's (i, i + r/2)."""
    return np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)])


def _rules(c: mc.ModelConfig, family: str) -> dict[tuple, Rule]:
    """{moejax state path: Rule} for every parameter (and router bias) of Transformer(c), unrolled layers."""
    rules = {("embed",): Rule(("model.embed_tokens.weight",), lambda t: t[0], lambda a: [a]),
             ("final_norm", "scale"): _copy("model.norm.weight"),
             ("unembed",): Rule(("lm_head.weight",), *_t())}
    interleaved = family.startswith("deepseek")
    for l in range(c.n_layers):
        p, b = f"model.layers.{l}.", ("blocks", l)
        rules[b + ("attn_norm", "scale")] = _copy(p + "input_layernorm.weight")
        rules[b + ("ffn_norm", "scale")] = _copy(p + "post_attention_layernorm.weight")
        a = p + "self_attn."
        if c.attention == "mla":
            rules.update(_mla_rules(c, a, b + ("attn",), interleaved))
        else:
            rules.update(_mha_rules(c, a, b + ("attn",)))
        rules.update(_ffn_rules(c, l, p, b + ("ffn",), family))
    return rules


def _copy(name: str) -> Rule:
    return Rule((name,), lambda t: t[0], lambda a: [a])


def _mha_rules(c, a, b) -> dict:
    H, G, h = c.n_heads, c.kv_heads, c.head_width
    r = {b + ("wq",): Rule((a + "q_proj.weight",), *_t((H, h))),
         b + ("wkv",): Rule((a + "k_proj.weight", a + "v_proj.weight"),
                            lambda ts: np.stack([t.T.reshape(-1, G, h) for t in ts], 1),
                            lambda w: [w[:, 0].reshape(w.shape[0], -1).T, w[:, 1].reshape(w.shape[0], -1).T]),
         b + ("wo",): Rule((a + "o_proj.weight",), lambda ts: ts[0].T.reshape(H, h, -1),
                           lambda w: [w.reshape(H * h, -1).T])}
    if c.qkv_bias:
        r[b + ("bq",)] = Rule((a + "q_proj.bias",), lambda ts: ts[0].reshape(H, h), lambda w: [w.reshape(-1)])
        r[b + ("bkv",)] = Rule((a + "k_proj.bias", a + "v_proj.bias"), lambda ts: np.stack(ts).reshape(2, G, h),
                               lambda w: [w[0].reshape(-1), w[1].reshape(-1)])
    if c.qk_norm != "none":
        r[b + ("q_norm", "scale")] = _copy(a + "q_norm.weight")
        r[b + ("k_norm", "scale")] = _copy(a + "k_norm.weight")
    return r


def _mla_rules(c, a, b, interleaved: bool) -> dict:
    H, h, rr, hv, rkv = c.n_heads, c.head_width, c.rope_head_dim, c.v_width, c.kv_lora_rank
    perm = _deinterleave(rr) if interleaved else np.arange(rr)
    inv = np.argsort(perm)
    q_cols = np.concatenate([np.arange(h), h + perm])  # per head: nope channels, then rotary in moejax order
    q_back = np.concatenate([np.arange(h), h + inv])
    kv_cols, kv_back = np.concatenate([np.arange(rkv), rkv + perm]), np.concatenate([np.arange(rkv), rkv + inv])

    def q_rule(name, rows):
        return Rule((a + name,), lambda ts: ts[0].T.reshape(rows, H, h + rr)[..., q_cols],
                    lambda w: [w[..., q_back].reshape(w.shape[0], -1).T])

    r = {b + ("wkv_a",): Rule((a + "kv_a_proj_with_mqa.weight",), lambda ts: ts[0].T[:, kv_cols],
                              lambda w: [w[:, kv_back].T]),
         b + ("kv_norm", "scale"): _copy(a + "kv_a_layernorm.weight"),
         b + ("wkv_b",): Rule((a + "kv_b_proj.weight",), *_t((H, h + hv))),
         b + ("wo",): Rule((a + "o_proj.weight",), lambda ts: ts[0].T.reshape(H, hv, -1),
                           lambda w: [w.reshape(H * hv, -1).T])}
    if c.q_lora_rank:
        r[b + ("wq_a",)] = Rule((a + "q_a_proj.weight",), *_t())
        r[b + ("q_norm", "scale")] = _copy(a + "q_a_layernorm.weight")
        r[b + ("wq_b",)] = q_rule("q_b_proj.weight", c.q_lora_rank)
    else:
        r[b + ("wq",)] = q_rule("q_proj.weight", c.d_model)
    return r


def _ffn_names(family: str, routed: bool) -> tuple[str, dict, str]:
    """(module prefix, {moejax weight: Hugging Face projection}, shared expert module) of one layer's FFN."""
    if family == "mixtral" and routed:
        return "block_sparse_moe.", {"w_gate": "w1", "w_up": "w3", "w_down": "w2"}, ""
    shared = {"qwen2_moe": "shared_expert", "deepseek_v2": "shared_experts", "deepseek_v3": "shared_experts"}
    return "mlp.", {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}, shared.get(family, "")


def _ffn_rules(c, l, p, b, family) -> dict:
    m = c.ffn_config(l)
    mod, proj, shared = _ffn_names(family, c.is_routed(l))
    if not c.is_routed(l):  # a dense FFN (DeepSeek's first layers, Qwen's mlp_only_layers): moejax's `shared`
        return {b + ("shared", k): Rule((f"{p}mlp.{v}.weight",), *_t()) for k, v in proj.items()}
    r = {b + ("router",): Rule((f"{p}{mod}gate.weight",), *_t())}
    for k, v in proj.items():
        names = tuple((f"{p}{mod}experts.{e}.{v}.weight",) for e in range(m.n_experts))
        r[b + ("experts", k)] = Rule(names, lambda ts: ts[0].T, lambda w: [w.T], per_expert=True)
        if m.n_shared:
            r[b + ("shared", k)] = Rule((f"{p}mlp.{shared}.{v}.weight",), *_t())
    if m.shared_gate:
        r[b + ("shared_gate",)] = Rule((f"{p}mlp.shared_expert_gate.weight",), *_t())
    if m.aux_free_bias:
        r[b + ("bias",)] = _copy(f"{p}mlp.gate.e_score_correction_bias")
    return r


class _Safetensors:
    """Lazy reader of a checkpoint directory's *.safetensors files (tensor name -> file), numpy float32."""

    def __init__(self, path: str):
        from safetensors import safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        else:
            files = {}
            for fn in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
                with safe_open(fn, "np") as f:
                    files.update({k: fn for k in f.keys()})
        if not files:
            raise ConversionError(f"{path} holds no *.safetensors files; allowed: a Hugging Face checkpoint directory "
                                  f"(config.json and model*.safetensors)")
        self.files, self._open = files, safe_open

    def get(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise ConversionError(f"tensor {name} is missing from the checkpoint (its config.json asks for it)")
        with self._open(self.files[name], "np") as f:  # bf16 comes back as ml_dtypes.bfloat16
            return np.asarray(f.get_tensor(name)).astype(np.float32)


def _flat(state) -> dict:
    from flax import nnx
    return {tuple(k): v for k, v in nnx.to_flat_state(state)}


def _ignored(name: str, c: mc.ModelConfig, family: str) -> bool:
    """Tensors moejax does not load: rotary caches, and DeepSeek-V3's multi-token-prediction layers (numbered
    from num_hidden_layers on)."""
    layer = re.match(r"model\.layers\.(\d+)\.", name)
    mtp = family == "deepseek_v3" and layer is not None and int(layer.group(1)) >= c.n_layers
    return name.endswith("rotary_emb.inv_freq") or mtp


def load_state(hf_dir: str, c: mc.ModelConfig, family: str, shardings: dict) -> dict:
    """{'params', 'rest'} of Transformer(c) from the checkpoint in hf_dir, each array placed on its sharding
    in `shardings` (Trainer.state_sharding) tensor by tensor. ConversionError naming a missing, unused or
    wrongly shaped tensor."""
    from flax import nnx
    from moejax import model as model_lib

    reader = _Safetensors(hf_dir)
    rules = _rules(c, family)
    abstract = nnx.eval_shape(lambda: model_lib.Transformer(c, rngs=nnx.Rngs(0)))
    _, params, rest = nnx.split(abstract, nnx.Param, ...)
    used = {n for r in rules.values() for ns in r.names for n in ((ns,) if isinstance(ns, str) else ns)}
    unused = sorted(n for n in set(reader.files) - used if not _ignored(n, c, family))
    if unused:
        raise ConversionError(f"tensor {unused[0]} of the checkpoint has no place in the moejax model "
                              f"({len(unused)} unused tensors); its config.json does not describe these weights")
    out = {}
    for part, state in (("params", params), ("rest", rest)):
        sh = _flat(shardings[part])
        flat = []
        for path, var in _flat(state).items():
            if path not in rules:
                raise ConversionError(f"moejax parameter {'/'.join(map(str, path))} has no Hugging Face tensor")
            flat.append((path, var.replace(_build(reader, rules[path], var.shape, sh[path].get_value(), path))))
        out[part] = nnx.from_flat_state(flat)
    return out


def _build(reader, rule: Rule, shape, sharding, path) -> jax.Array:
    """The array of `rule` on `sharding`, each device reading only what its shard needs."""
    where = "/".join(map(str, path))

    def check(a, shape):
        if a.shape != tuple(shape):
            raise ConversionError(f"tensors {rule.names[0]} give moejax parameter {where} the shape {a.shape}; "
                                  f"its config asks for {tuple(shape)}")
        return a

    if not rule.per_expert:
        cache = {}

        def whole(index):
            if "a" not in cache:
                try:
                    cache["a"] = check(rule.load([reader.get(n) for n in rule.names]), shape)
                except ValueError as e:
                    if isinstance(e, ConversionError):
                        raise
                    raise ConversionError(f"tensors {rule.names} do not fit moejax parameter {where} of shape "
                                          f"{tuple(shape)}: {e}") from e
            return cache["a"][index]
        return jax.make_array_from_callback(tuple(shape), sharding, whole)

    def experts(index):
        rows = range(*index[0].indices(shape[0]))
        stack = np.stack([check(rule.load([reader.get(n) for n in rule.names[e]]), shape[1:]) for e in rows])
        return stack[(slice(None),) + tuple(index[1:])]
    return jax.make_array_from_callback(tuple(shape), sharding, experts)


def hf_tensors(state: dict, c: mc.ModelConfig, family: str):
    """Yield (layer or None, {Hugging Face name: numpy array}) for the model state {'params', 'rest'}: the
    tensors of one layer at a time (None: embeddings, final norm, head)."""
    rules = _rules(c, family)
    flat = {**_flat(state["params"]), **_flat(state["rest"])}
    by_layer: dict = {}
    for path, rule in rules.items():
        by_layer.setdefault(path[1] if path[0] == "blocks" else None, []).append((path, rule))
    for layer, items in by_layer.items():
        out = {}
        for path, rule in items:
            if path == ("unembed",) and path not in flat:  # tied: Hugging Face gets the scaled head
                a = np.asarray(flat[("embed",)][...]).T * c.d_model ** -0.5
            else:
                a = np.asarray(flat[path][...], np.float32)
            if rule.per_expert:
                for e, names in enumerate(rule.names):
                    out.update(zip(names, rule.save(a[e])))
            else:
                out.update(zip(rule.names, rule.save(a)))
        yield layer, {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- workdirs

def import_checkpoint(hf_dir: str, workdir: str, *, tokenizer: str = "", mesh=None) -> mc.ModelConfig:
    """Write the Hugging Face checkpoint in hf_dir as a moejax workdir (config.json + checkpoints/0) that
    `load_checkpoint` reads. tokenizer: the data.tokenizer of the workdir ('byte', a SentencePiece .model or a
    tokenizer.json; default: hf_dir's tokenizer.json, else its tokenizer.model). Returns the ModelConfig."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; allowed: a Hugging Face checkpoint directory (config.json and "
                                f"model*.safetensors)")
    with open(path) as f:
        hf = json.load(f)
    c = model_config(hf)
    if not tokenizer:
        found = [os.path.join(hf_dir, n) for n in ("tokenizer.json", "tokenizer.model")
                 if os.path.isfile(os.path.join(hf_dir, n))]
        if not found:
            raise ConversionError(f"{hf_dir} has no tokenizer.json or tokenizer.model; pass tokenizer= ('byte', a "
                                  f"SentencePiece .model or a Hugging Face tokenizer.json)")
        tokenizer = os.path.abspath(found[0])
    experiment, trainer = model_workdir_config(c, tokenizer, mesh)
    state = load_state(hf_dir, c, hf["model_type"], trainer.state_sharding)
    save_model(workdir, experiment, trainer, state, {"converted_from": os.path.abspath(hf_dir),
                                                     "family": hf["model_type"]})
    return c


def model_workdir_config(c: mc.ModelConfig, tokenizer: str, mesh=None):
    """(experiment ConfigDict, Trainer) of a workdir holding a model of config c with `tokenizer`: the data
    and training parts are moejax's defaults (a fine-tuning run sets its own)."""
    from moejax import config as config_lib
    from moejax import data as data_lib
    from moejax.trainer import Trainer

    model = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name not in ("moe", "max_len")}
    experiment = config_lib.experiment(model=model, moe=c.moe, data=dict(tokenizer=tokenizer,
                                                                          seq_len=min(c.max_len, 2048)),
                                       train=dict(steps=1, warmup_steps=0))
    run = config_lib.to_typed(experiment)
    vocab = data_lib.get_tokenizer(run.data).vocab_size
    if vocab > c.vocab_size:
        raise ConversionError(f"tokenizer {tokenizer!r} has {vocab} ids, more than the model's vocab_size="
                              f"{c.vocab_size}; allowed: the model's own tokenizer")
    return experiment, Trainer(run.model_config(vocab), run.train, run.seed, mesh)


def save_model(workdir: str, experiment, trainer, state: dict, meta: dict) -> None:
    """Save the model state {'params', 'rest'} as step 0 of a new workdir (with a fresh optimiser state, so
    that `load_checkpoint` reads it like a training checkpoint) and its config.json."""
    import orbax.checkpoint as ocp
    from moejax import checkpoint as ckpt

    state = {**state, "opt": jax.jit(trainer.tx.init, out_shardings=trainer.state_sharding["opt"])(state["params"])}
    os.makedirs(workdir, exist_ok=True)
    config_dict = json.loads(experiment.to_json())
    mngr = ckpt.manager(workdir, trainer.train)
    try:
        if mngr.latest_step() is not None:
            raise FileExistsError(f"{workdir} already holds checkpoints {list(mngr.all_steps())}; allowed: a new "
                                  f"or empty workdir")
        mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_dict),
                                             meta=ocp.args.JsonSave(meta)))
        mngr.wait_until_finished()
    finally:
        mngr.close()
    ckpt.write_json_atomic(os.path.join(workdir, "config.json"), config_dict)
    ckpt.history(workdir, "import", 0, **meta)


def export_checkpoint(workdir: str, hf_dir: str, *, step: int | None = None, family: str | None = None) -> str:
    """Write checkpoint `step` (default: the latest) of a moejax workdir as a Hugging Face checkpoint in
    hf_dir. Returns the family."""
    from moejax.checkpoint import load_checkpoint

    ck = load_checkpoint(workdir, step=step)
    return export_state(ck.state, ck.trainer.model_config, hf_dir, family)


def export_state(state: dict, c: mc.ModelConfig, hf_dir: str, family: str | None = None) -> str:
    """Write the model state {'params', 'rest'} of Transformer(c) to hf_dir: config.json, one
    model-LLLLL.safetensors shard per layer (model-rest: embeddings, final norm, head) and the index.
    Tied embeddings are written as an untied head embed^T d^-1/2 (what moejax's tied logits compute)."""
    from safetensors.numpy import save_file

    family = family or family_of(c)
    os.makedirs(hf_dir, exist_ok=True)
    weight_map = {}
    for layer, tensors in hf_tensors(state, c, family):
        fn = "model-rest.safetensors" if layer is None else f"model-{layer:05d}.safetensors"
        save_file(tensors, os.path.join(hf_dir, fn), metadata={"format": "pt"})
        weight_map.update({k: fn for k in tensors})
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(hf_config(c, family), f, indent=1)
    return family


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m moejax.convert", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="Hugging Face checkpoint directory -> moejax workdir")
    imp.add_argument("hf_dir")
    imp.add_argument("workdir")
    imp.add_argument("--tokenizer", default="", help="'byte', a SentencePiece .model or a tokenizer.json (default: "
                                                     "HF_DIR/tokenizer.json, else HF_DIR/tokenizer.model)")
    exp = sub.add_parser("export", help="moejax workdir -> Hugging Face checkpoint directory")
    exp.add_argument("workdir")
    exp.add_argument("hf_dir")
    exp.add_argument("--step", type=int, default=None)
    exp.add_argument("--family", default=None, choices=FAMILIES)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "import":
            c = import_checkpoint(a.hf_dir, a.workdir, tokenizer=a.tokenizer)
            print(f"imported {a.hf_dir} -> {a.workdir}: {c.n_layers} layers, d_model {c.d_model}, "
                  f"{c.moe.n_experts} experts (top {c.moe.top_k})")
        else:
            family = export_checkpoint(a.workdir, a.hf_dir, step=a.step, family=a.family)
            print(f"exported {a.workdir} -> {a.hf_dir} ({family})")
    except (ConversionError, FileNotFoundError, FileExistsError) as e:
        ap.exit(2, f"moejax.convert: error: {e}\n")


if __name__ == "__main__":
    main()
