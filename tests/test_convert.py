"""moejax.convert against Hugging Face transformers (test dependency; torch CPU build): for each family a tiny
random model is saved, imported, evaluated by moejax and compared with transformers' logits; exported back,
its tensors are bit-identical to the original and transformers loads them. Also: rotary scalings against
transformers' own, sharded import on a mesh, and the errors for checkpoints that do not fit."""
import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the parity tests need torch (setup.py test extra, Python 3.11)")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from moejax import attention, convert, model_config as mc, sharding  # noqa: E402
from moejax.checkpoint import load_checkpoint  # noqa: E402

V = 384  # the byte tokenizer's vocabulary: the converted workdirs evaluate with it
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
           intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
           n_shared_experts=1, first_k_dense_replace=1)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8, beta_fast=32,
            beta_slow=1)
# Each family with the options its published configs use: GQA, q/k norms, biases, gated shared expert, dense
# first layers, group-limited routing, YaRN / linear / llama3 rotary scalings, MLA with and without q latent.
FAMILIES = {
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        rope_parameters=dict(rope_type="llama3", rope_theta=1e6, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16)),
    "olmoe": lambda: transformers.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
        num_experts_per_tok=2, mlp_only_layers=[0]),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, head_dim=16,
        norm_topk_prob=True, rope_parameters=dict(rope_type="linear", rope_theta=1e6, factor=2.0)),
    "deepseek_v2": lambda: transformers.DeepseekV2Config(
        **{**COMMON, **MLA}, q_lora_rank=None, routed_scaling_factor=1.5, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **{**COMMON, **MLA}, q_lora_rank=24, n_group=4, topk_group=2,
        rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 0.8}),
}


def hf_model(family: str, path: str):
    """A tiny random transformers model of `family` saved in path, every weight (norms, biases, the router
    bias) moved away from its initial value so that the comparison sees it; returns the model."""
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation="eager").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.add_(0.1 * torch.randn_like(b))
    m.save_pretrained(path)
    return m


def tensors(path: str) -> dict:
    out = {}
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_matches_transformers_and_export_round_trips(family, tmp_path):
    hf = hf_model(family, str(tmp_path / "hf"))
    toks = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(toks).logits.numpy()
    config = convert.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "mj"), tokenizer="byte")
    ck = load_checkpoint(str(tmp_path / "mj"))
    n_experts = {"mixtral": 4}.get(family, 8)
    assert ck.trainer.model_config == config and config.moe.n_experts == n_experts and config.attention == (
        "mla" if family.startswith("deepseek") else "mha")
    logits, _ = jax.jit(lambda t: ck.model()(t))(jnp.asarray(toks.numpy()))
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)

    assert convert.export_checkpoint(str(tmp_path / "mj"), str(tmp_path / "out")) == family
    before, after = tensors(str(tmp_path / "hf")), tensors(str(tmp_path / "out"))
    assert sorted(before) == sorted(after)
    for name in before:
        assert np.array_equal(before[name], after[name]), name
    with open(tmp_path / "out" / "config.json") as f:
        assert convert.model_config(json.load(f)) == config
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    with torch.no_grad():
        np.testing.assert_array_equal(again.eval()(toks).logits.numpy(), ref)


@pytest.mark.parametrize("rope", [
    dict(rope_type="linear", factor=4.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),
    dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0,
         mscale_all_dim=1.0),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768),
], ids=["linear", "llama3", "yarn_deepseek", "yarn_qwen"])
def test_rope_frequencies_match_transformers(rope):
    """Inverse frequencies and the cos/sin factor of each scaling, against transformers' ROPE_INIT_FUNCTIONS
    at rotary width 64 (DeepSeek-V3's 40x YaRN from 4K, Qwen's 4x YaRN from 32K, Llama 3.1's)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=163840,
                                  rope_parameters={"rope_theta": 10000.0, **rope})
    inv_ref, factor_ref = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    c = mc.ModelConfig(V, 256, 1, 4, mc.dense(256, 64), rope_scaling={k: v for k, v in rope.items()})
    inv, factor = attention.rope_frequencies(c, 64)
    np.testing.assert_allclose(inv, inv_ref.numpy(), rtol=1e-6)
    assert factor == pytest.approx(factor_ref)


def test_sharded_import_reads_only_each_devices_experts(tmp_path, monkeypatch):
    """On a mesh with the experts split over 4 devices (and fsdp 2), every device builds its shard from the
    tensors of its own experts: each expert tensor is read by the 2 devices holding it, never by all 8."""
    hf_model("qwen3_moe", str(tmp_path / "hf"))
    with open(tmp_path / "hf" / "config.json") as f:
        c = convert.model_config(json.load(f))
    from moejax import config as config_lib
    from moejax.trainer import Trainer

    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, expert=4), jax.devices()[:8])
    trainer = Trainer(c, config_lib.TrainConfig(), 0, mesh)
    reads = {}
    get = convert._Safetensors.get
    monkeypatch.setattr(convert._Safetensors, "get",
                        lambda self, name: reads.__setitem__(name, reads.get(name, 0) + 1) or get(self, name))
    state = convert.load_state(str(tmp_path / "hf"), c, "qwen3_moe", trainer.state_sharding)
    w = state["params"]["blocks"][1]["ffn"]["experts"]["w_gate"][...]
    assert w.sharding.spec[0] == "expert" and len(w.addressable_shards) == 8
    expert_reads = {n: k for n, k in reads.items() if ".experts." in n}
    assert expert_reads and set(expert_reads.values()) == {2}
    ref = tensors(str(tmp_path / "hf"))
    np.testing.assert_array_equal(np.asarray(w)[5], ref["model.layers.1.mlp.experts.5.gate_proj.weight"].T)


def test_checkpoints_that_do_not_fit_name_the_tensor_or_field(tmp_path):
    hf_model("olmoe", str(tmp_path / "hf"))
    with open(tmp_path / "hf" / "config.json") as f:
        hf = json.load(f)
    for field, value, says in (("hidden_act", "gelu", "hidden_act='gelu'"), ("model_type", "llama", "model_type"),
                               ("clip_qkv", 8.0, "clip_qkv=8.0")):
        with pytest.raises(convert.ConversionError, match=says):
            convert.model_config({**hf, field: value})
    weights = tensors(str(tmp_path / "hf"))
    cases = {  # a changed checkpoint -> what the error must name
        "missing": ({k: v for k, v in weights.items() if k != "model.layers.1.mlp.gate.weight"},
                    "model.layers.1.mlp.gate.weight is missing"),
        "shape": ({**weights, "model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)},
                  "q_norm.weight"),
        "unused": ({**weights, "model.layers.0.mlp.experts.8.up_proj.weight": np.ones((16, 32), np.float32)},
                   "experts.8.up_proj.weight"),
    }
    for name, (changed, says) in cases.items():
        d = tmp_path / name
        shutil.copytree(tmp_path / "hf", d)
        for f in glob.glob(str(d / "*.safetensors")):
            os.remove(f)
        save_file(changed, str(d / "model.safetensors"))
        with pytest.raises(convert.ConversionError, match=says):
            convert.import_checkpoint(str(d), str(tmp_path / f"mj_{name}"), tokenizer="byte")
        assert not os.path.exists(tmp_path / f"mj_{name}" / "checkpoints" / "0")
    convert.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "mj"), tokenizer="byte")
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        convert.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "mj"), tokenizer="byte")
    with pytest.raises(convert.ConversionError, match="no tokenizer.json or tokenizer.model"):
        convert.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "mj2"))
    from tests.test_data import _hf_tokenizer  # a 600-token tokenizer.json: found, and too large for V = 384

    shutil.copy(_hf_tokenizer(tmp_path, "byte_level"), tmp_path / "hf" / "tokenizer.json")
    with pytest.raises(convert.ConversionError, match="has 640 ids, more than the model's vocab_size=384"):
        convert.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "mj2"))


def test_export_refuses_a_model_no_family_computes():
    """A DeepSeekMoE model trained by moejax (multi-head attention, ungated shared expert) has no Hugging
    Face family: export says what would fit instead of writing something that computes another function."""
    c = mc.ModelConfig(V, 32, 2, 4, mc.deepseekmoe(32, 64, n_experts=4))
    with pytest.raises(convert.ConversionError, match="no Hugging Face family"):
        convert.family_of(c)
    gshard = mc.ModelConfig(V, 32, 2, 4, mc.gshard(32, 64, n_experts=4))
    with pytest.raises(convert.ConversionError, match="router='gshard'"):
        convert.family_of(gshard)
    scaled = mc.ModelConfig(V, 32, 2, 4, mc.mixtral(32, 64, n_experts=4, routed_scale=2.0))
    with pytest.raises(convert.ConversionError, match="routed_scale=2.0"):  # Mixtral has no gate scale
        convert.family_of(scaled)
    mla = dict(attention="mla", kv_lora_rank=8, rope_head_dim=4)
    v3_max = mc.ModelConfig(V, 32, 2, 4, mc.deepseek_v3(32, 64, n_experts=8, top_k=2, n_groups=4, topk_groups=2,
                                                       group_score="max"), **mla)
    with pytest.raises(convert.ConversionError, match="group_score='max'.*'top2_sum'"):
        convert.family_of(v3_max)


def test_a_moejax_model_exports_to_what_transformers_computes(tmp_path):
    """A model built by moejax (tied embeddings, whose logits moejax scales by d^-1/2; Mixtral's routing;
    grouped-query attention) exported and loaded by transformers gives moejax's logits."""
    from flax import nnx
    from moejax import model as model_lib

    c = mc.ModelConfig(V, 32, 2, 4, mc.mixtral(32, 48, n_experts=4), n_kv_heads=2, rope_base=1e6, norm_eps=1e-5)
    model = model_lib.Transformer(c, rngs=nnx.Rngs(3))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    assert convert.export_state({"params": params, "rest": rest}, c, str(tmp_path / "out")) == "mixtral"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
    toks = np.random.default_rng(0).integers(0, V, (2, 9))
    with torch.no_grad():
        ref = hf(torch.from_numpy(toks)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(toks))[0]), ref, atol=1e-4, rtol=0)


def test_command_line_imports_exports_and_reports_errors(tmp_path, capsys):
    hf_model("mixtral", str(tmp_path / "hf"))
    convert.main(["import", str(tmp_path / "hf"), str(tmp_path / "mj"), "--tokenizer=byte"])
    convert.main(["export", str(tmp_path / "mj"), str(tmp_path / "out")])
    assert "exported" in capsys.readouterr().out and os.path.isfile(tmp_path / "out" / "model-00001.safetensors")
    with pytest.raises(SystemExit) as e:
        convert.main(["import", str(tmp_path / "nowhere"), str(tmp_path / "mj2")])
    assert e.value.code == 2 and "nowhere/config.json is missing" in capsys.readouterr().err
