"""MoEConfig validation (every invalid setting fails at construction with a message naming the field,
its value and what is allowed) and the paper presets in moejax.moe.PRESETS."""
import dataclasses
import json

import pytest
from flax import nnx

from moejax import experts, moe, routers, routing
from moejax import model_config
from moejax.model_config import PRESETS, MoEConfig, preset

BASE = dict(d_model=8, d_ff=16, n_experts=4, top_k=2)

# id -> (overrides of BASE, field, value, fragments of the 'allowed' text that must appear)
INVALID = {
    "top_k_zero": (dict(top_k=0), "top_k", 0, ["1 <= top_k <= n_experts=4"]),
    "top_k_negative": (dict(top_k=-1), "top_k", -1, ["1 <= top_k <= n_experts=4"]),
    "top_k_above_n_experts": (dict(top_k=5), "top_k", 5, ["1 <= top_k <= n_experts=4"]),
    "unknown_router": (dict(router="soft_moe"), "router", "soft_moe", list(routers.names())),
    "unknown_backend": (dict(backend="cuda"), "backend", "cuda", ["auto", *experts.BACKENDS]),
    "unknown_score_fn": (dict(score_fn="relu"), "score_fn", "relu", list(routing.SCORE_FNS)),
    "unknown_activation": (dict(activation="relu"), "activation", "relu", list(experts.ACTIVATIONS)),
    "unknown_dispatch": (dict(dispatch="megablocks"), "dispatch", "megablocks", list(model_config.DISPATCHES)),
    "unknown_group_score": (dict(group_score="mean"), "group_score", "mean", list(routing.GROUP_SCORES)),
    "capacity_factor_zero": (dict(dispatch="capacity", capacity_factor=0.0), "capacity_factor", 0.0,
                             ["> 0", "capacity"]),
    "capacity_factor_negative": (dict(dispatch="capacity", capacity_factor=-1.25), "capacity_factor", -1.25,
                                 ["> 0", "capacity"]),
    "expert_choice_capacity_factor_zero": (dict(router="expert_choice", dispatch="capacity", capacity_factor=0.0),
                                           "capacity_factor", 0.0, ["> 0"]),
    "d_ff_not_divisible_by_segmentation": (dict(d_ff=18, segmentation=4), "d_ff", 18, ["segmentation=4"]),
    "d_ff_zero": (dict(d_ff=0), "d_ff", 0, ["positive"]),
    "d_model_zero": (dict(d_model=0), "d_model", 0, [">= 1"]),
    "segmentation_zero": (dict(segmentation=0), "segmentation", 0, [">= 1"]),
    "n_experts_negative": (dict(n_experts=-4), "n_experts", -4, [">= 0"]),
    "n_groups_not_dividing_n_experts": (dict(n_groups=3), "n_groups", 3, ["divisor", "n_experts=4"]),
    "n_groups_zero": (dict(n_groups=0), "n_groups", 0, ["divisor", "n_experts=4"]),
    "topk_groups_above_n_groups": (dict(n_groups=2, topk_groups=3), "topk_groups", 3, ["n_groups=2"]),
    "topk_groups_zero": (dict(n_groups=2, topk_groups=0), "topk_groups", 0, ["n_groups=2"]),
    "topk_groups_too_few_for_top_k": (dict(n_experts=8, top_k=4, n_groups=4, topk_groups=1), "topk_groups", 1,
                                      ["top_k=4"]),
    "n_groups_with_gshard": (dict(router="gshard", n_groups=2, dispatch="capacity"), "n_groups", 2, ["topk"]),
    "aux_loss_coef_negative": (dict(aux_loss_coef=-0.01), "aux_loss_coef", -0.01, [">= 0"]),
    "device_loss_coef_negative": (dict(device_loss_coef=-0.01), "device_loss_coef", -0.01, [">= 0"]),
    "seq_aux_loss_coef_negative": (dict(seq_aux_loss_coef=-1e-4), "seq_aux_loss_coef", -1e-4, [">= 0"]),
    "z_loss_coef_negative": (dict(z_loss_coef=-1e-3), "z_loss_coef", -1e-3, [">= 0"]),
    "bias_update_rate_negative": (dict(bias_update_rate=-1e-3), "bias_update_rate", -1e-3, [">= 0"]),
    "routed_scale_negative": (dict(routed_scale=-2.5), "routed_scale", -2.5, [">= 0"]),
    "n_shared_negative": (dict(n_shared=-1), "n_shared", -1, [">= 0"]),
    "gshard_top_k_1": (dict(router="gshard", top_k=1, dispatch="capacity"), "top_k", 1, ["2", "gshard"]),
    "gshard_top_k_3": (dict(router="gshard", top_k=3, dispatch="capacity"), "top_k", 3, ["2", "gshard"]),
    "expert_choice_dropless": (dict(router="expert_choice", dispatch="dropless"), "dispatch", "dropless",
                               ["capacity", "expert_choice"]),
    "aux_free_bias_with_gshard": (dict(router="gshard", dispatch="capacity", aux_free_bias=True), "aux_free_bias",
                                  True, ["topk"]),
    "sigmoid_with_gshard": (dict(router="gshard", dispatch="capacity", score_fn="sigmoid"), "score_fn", "sigmoid",
                            ["softmax", "topk"]),
    "normalize_with_hash": (dict(router="hash", normalize=True), "normalize", True, ["False", "topk"]),
    "routed_scale_with_expert_choice": (dict(router="expert_choice", dispatch="capacity", routed_scale=2.5),
                                        "routed_scale", 2.5, ["1.0", "topk"]),
    "aux_loss_with_expert_choice": (dict(router="expert_choice", dispatch="capacity", aux_loss_coef=0.01),
                                    "aux_loss_coef", 0.01, ["0", "expert_choice"]),
    "seq_loss_with_hash": (dict(router="hash", seq_aux_loss_coef=1e-4), "seq_aux_loss_coef", 1e-4, ["0", "hash"]),
    "jitter_with_hash": (dict(router="hash", jitter=0.01), "jitter", 0.01, ["0", "hash"]),
    "z_loss_with_hash": (dict(router="hash", z_loss_coef=1e-3), "z_loss_coef", 1e-3, ["0", "hash"]),
    "batch_prioritized_dropless": (dict(dispatch="dropless", batch_prioritized=True), "batch_prioritized", True,
                                   ["False", "dropless"]),
    "jitter_negative": (dict(jitter=-0.01), "jitter", -0.01, ["0 <= jitter < 1"]),
    "jitter_one": (dict(jitter=1.0), "jitter", 1.0, ["0 <= jitter < 1"]),
    "n_devices_not_dividing_n_experts": (dict(n_devices=3), "n_devices", 3, ["divisor", "n_experts=4"]),
    "n_devices_negative": (dict(n_devices=-1), "n_devices", -1, ["divisor", "n_experts=4"]),
    "pad_experts_to_zero": (dict(pad_experts_to=0), "pad_experts_to", 0, [">= 1"]),
    # hash_expert mixes the salt as a uint32: a salt outside [0, 2**32) passes the config today and then
    # fails with OverflowError at the first forward pass (reported bug; these fail until fixed).
    "hash_salt_negative": (dict(router="hash", top_k=1, hash_salt=-1), "hash_salt", -1, ["allowed"]),
    "hash_salt_too_large": (dict(router="hash", top_k=1, hash_salt=2**32), "hash_salt", 2**32, ["allowed"]),
    "block_size_negative": (dict(block_size=-1), "block_size", -1, [">= 0"]),
    "dense_with_top_k": (dict(n_experts=0, top_k=1, n_shared=1), "top_k", 1, ["n_experts=0"]),
    "dense_without_shared": (dict(n_experts=0, top_k=0, n_shared=0), "n_shared", 0, [">= 1", "n_experts=0"]),
}


@pytest.mark.parametrize("overrides,field,value,allowed", list(INVALID.values()), ids=list(INVALID))
def test_invalid_config_raises_naming_field_value_and_allowed(overrides, field, value, allowed):
    with pytest.raises(ValueError) as info:
        MoEConfig(**{**BASE, **overrides})
    msg = str(info.value)
    assert f"{field}={value!r}" in msg, msg
    for fragment in allowed:
        assert fragment in msg, (fragment, msg)


def test_unknown_key_is_an_error():
    with pytest.raises(TypeError, match="n_expert"):
        MoEConfig(**BASE, n_expert=4)


def test_config_is_frozen():
    c = MoEConfig(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.top_k = 3


@pytest.mark.parametrize("capacity_factor", [0.0, -1.0])
def test_capacity_factor_ignored_when_dropless(capacity_factor):
    c = MoEConfig(**BASE, dispatch="dropless", capacity_factor=capacity_factor)
    assert c.dispatch == "dropless" and c.capacity_factor == capacity_factor


@pytest.mark.parametrize("kw", [
    dict(),
    dict(n_experts=1, top_k=1),
    dict(top_k=4),  # K == E
    dict(n_experts=0, top_k=0, n_shared=1),  # dense
    dict(router="gshard", dispatch="capacity", backend="einsum"),
    dict(router="expert_choice", dispatch="capacity", capacity_factor=2.0),
    dict(router="hash", top_k=1),
    dict(n_experts=8, top_k=4, n_groups=4, topk_groups=2, score_fn="sigmoid", aux_free_bias=True),
    dict(segmentation=4, n_shared=2, activation="gelu", jitter=0.5, n_devices=4),
], ids=["base", "E1", "K_eq_E", "dense", "gshard_einsum", "expert_choice", "hash", "grouped_bias", "misc"])
def test_valid_configs_build(kw):
    c = MoEConfig(**{**BASE, **kw})
    assert c.expert_width == c.d_ff // c.segmentation


# Small sizes for the presets whose defaults are large; any other preset builds with its defaults.
SMALL = {
    "deepseek_v3": dict(n_experts=16, top_k=4, n_groups=4, topk_groups=2),
    "olmoe": dict(n_experts=8, top_k=2),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    c = preset(name, 8, 16, **SMALL.get(name, {}))
    assert isinstance(c, MoEConfig)
    assert c == PRESETS[name](8, 16, **SMALL.get(name, {}))
    layer = nnx.eval_shape(lambda: moe.MoE(c, rngs=nnx.Rngs(0)))  # abstract init: shapes, no compute
    if c.n_experts:
        assert layer.experts["w_down"].shape == (c.n_experts, c.expert_width, 8)
    if c.n_shared:
        assert layer.shared["w_down"].shape == (c.n_shared * c.expert_width, 8)


def test_preset_overrides_apply():
    c = preset("switch", 8, 16, aux_loss_coef=0.02, capacity_factor=2.0)
    assert c.aux_loss_coef == 0.02 and c.capacity_factor == 2.0 and c.top_k == 1
    assert preset("deepseek_v3", 8, 16, n_experts=16, top_k=4, n_groups=4, topk_groups=2).n_groups == 4
    # gshard/switch fix top_k positionally: overriding it is an error that names top_k
    with pytest.raises((TypeError, ValueError), match="top_k"):
        preset("gshard", 8, 16, top_k=3)


def test_preset_paper_settings():
    s = preset("switch", 8, 16)
    assert (s.top_k, s.normalize, s.dispatch, s.capacity_factor, s.aux_loss_coef, s.jitter) == (
        1, False, "capacity", 1.25, 0.01, 0.01)
    g = preset("gshard", 8, 16)
    assert (g.router, g.top_k, g.dispatch, g.capacity_factor) == ("gshard", 2, "capacity", 1.0)
    v3 = preset("deepseek_v3", 8, 16)
    assert (v3.n_experts, v3.top_k, v3.n_shared, v3.n_groups, v3.topk_groups) == (256, 8, 1, 8, 4)
    assert (v3.score_fn, v3.normalize, v3.routed_scale, v3.aux_free_bias) == ("sigmoid", True, 2.5, True)
    m = preset("mixtral", 8, 16)
    assert (m.n_experts, m.top_k, m.normalize) == (8, 2, True)
    o = preset("olmoe", 8, 16)
    assert (o.n_experts, o.top_k, o.n_shared, o.normalize, o.z_loss_coef) == (64, 8, 0, False, 1e-3)
    d = preset("dense", 8, 16)
    assert (d.n_experts, d.top_k, d.n_shared) == (0, 0, 1)
    h = preset("hash", 8, 16)
    assert (h.router, h.top_k) == ("hash", 1)
    e = preset("expert_choice", 8, 16)
    assert (e.router, e.dispatch) == ("expert_choice", "capacity")


def test_deepseekmoe_fine_grained_matches_gshard_active_width():
    d_ff = 64
    c = preset("deepseekmoe", 8, d_ff, n_experts=16, top_k=2, m=4, n_shared=1)
    assert (c.n_experts, c.top_k, c.n_shared, c.segmentation) == (63, 7, 1, 4)
    assert c.expert_width == d_ff // 4
    g = preset("gshard", 8, d_ff, n_experts=16)
    assert g.top_k * g.expert_width == 2 * d_ff
    assert (c.top_k + c.n_shared) * c.expert_width == 2 * d_ff == g.top_k * g.expert_width
    # total expert parameters match too: (63 routed + 1 shared) * d_ff / 4 == 16 * d_ff
    assert (c.n_experts + c.n_shared) * c.expert_width == g.n_experts * g.expert_width


def test_unknown_preset_names_valid_ones():
    with pytest.raises(ValueError) as info:
        preset("nope", 8, 16)
    msg = str(info.value)
    assert "'nope'" in msg
    for name in PRESETS:
        assert name in msg, name


def test_fields_added_after_a_run_was_saved_count_at_their_defaults():
    """A saved config.json that predates a field (here the attention fields and a MoE field) is the same
    config as today's at that field's default, so its run resumes and its results are reused; a value other
    than the default is a difference, named."""
    import copy

    from moejax import config as config_lib

    current = json.loads(config_lib.load("configs/deepseekmoe_table1.py:method=deepseekmoe,scale=tiny").to_json())
    saved = copy.deepcopy(current)  # as config.json holds it, and as runs compare it (tuples are lists)
    for name in ("n_kv_heads", "head_dim", "qk_norm", "qkv_bias", "norm_eps", "rope_scaling", "attention",
                 "kv_lora_rank", "q_lora_rank", "rope_head_dim", "v_head_dim"):
        del saved["model"][name]
    del saved["model"]["moe"]["group_score"]
    assert config_lib.incompatible(saved, current) == []
    assert config_lib.incompatible(saved, current, ignore=()) == []
    current["model"]["n_kv_heads"] = 1
    assert config_lib.incompatible(saved, current) == ["model.n_kv_heads: saved None, now 1"]
    current["model"]["n_kv_heads"] = 0
    current["model"]["no_such_field"] = 3  # not a field: no default to assume
    assert config_lib.incompatible(saved, current) == ["model.no_such_field: saved None, now 3"]
