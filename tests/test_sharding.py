"""Meshes, logical axis rules and expert parallelism on 8 simulated CPU devices (tests/conftest.py).

The sharded train step must compute what the single-device run computes: loss and gradients of one step,
and the losses of a few steps, for GShard and DeepSeekMoE in both dispatch modes on every mesh below, at
float32 tolerance (tests/tolerances.py)."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import deepseekmoe_table1 as table1
from moejax import balance, config as config_lib, dispatch, metrics as metrics_lib, model as model_lib, moe, routing
from moejax import model_config as mc_lib
from moejax import sharding, train
from tests.tolerances import F32

MESHES = {
    "data8": dict(data=8),
    "expert8": dict(data=1, expert=8),
    "data2_expert4": dict(data=2, expert=4),
    "fsdp2_expert2_tensor2": dict(data=1, fsdp=2, expert=2, tensor=2),
}
# Meshes over the first devices only: for the interpreted Pallas kernels, whose cost is per call per device.
SUBMESHES = {"expert2": dict(data=1, expert=2)}
B, S, V = 8, 16, 64


def mesh_of(name: str) -> jax.sharding.Mesh:
    if name in SUBMESHES:
        axes = SUBMESHES[name]
        return sharding.make_mesh(sharding.MeshConfig(**axes), jax.devices()[:math.prod(axes.values())])
    return sharding.make_mesh(sharding.MeshConfig(**MESHES[name]))


def model_config(method: str, dispatch_mode: str, backend: str = "auto", scan: bool = False) -> model_lib.ModelConfig:
    """Table-1 GShard (16 experts, top-2) or DeepSeekMoE (1 shared + 63 routed of width d_ff/4, top-7,
    padded to 64 slots for the expert axis) at d 32; capacity dispatch drops tokens (factor 1). scan: two
    layers, scanned, with aux-loss-free router biases."""
    m = table1.moe_config(method, 32, 64)
    m = dataclasses.replace(m, dispatch=dispatch_mode, capacity_factor=1.0, pad_experts_to=8, backend=backend,
                            aux_free_bias=scan)
    return model_lib.ModelConfig(vocab_size=V, d_model=32, n_layers=2 if scan else 1, n_heads=2, moe=m, max_len=S,
                                 scan_layers=scan)


def batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, V, (B, S + 1)).astype(np.int32)
    weights = np.ones((B, S), np.float32)
    weights[1, 9:] = 0
    seg = np.ones((B, S), np.int32)
    seg[:, S // 2:] = 2  # two packed documents per row
    pos = np.concatenate([np.arange(S // 2), np.arange(S // 2)]).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg,
            "positions": np.tile(pos, (B, 1)), "weights": weights}


@functools.lru_cache(maxsize=None)
def run(method: str, dispatch_mode: str, mesh_name: str | None, n_steps: int = 3, backend: str = "auto",
        scan: bool = False):
    """(loss, grads of step 0, params after init, losses of n_steps train steps) as numpy; the final state's
    router biases and parameter specs are kept in FINAL[the arguments]."""
    mesh = mesh_of(mesh_name) if mesh_name else None
    trainer = train.Trainer(model_config(method, dispatch_mode, backend, scan),
                            config_lib.TrainConfig(steps=10, warmup_steps=0, lr=3e-3), 0, mesh)
    state = trainer.init()
    params0 = jax.device_get(nnx.to_pure_dict(state["params"]))
    b0 = sharding.global_batch(batch(0), trainer.mesh)
    with sharding.use(trainer.mesh):
        grads, ce, stats = jax.jit(trainer.grads)(state["params"], state["rest"], b0, jnp.int32(0))
        loss = ce.sum() + sum(s.loss.sum() for s in stats)
    out = (float(loss), jax.device_get(nnx.to_pure_dict(grads)), params0, float(stats[0].dropped.mean()))
    losses = []
    for step in range(n_steps):
        state, m = trainer.train_step(state, sharding.global_batch(batch(step), trainer.mesh), jnp.int32(step))
        losses.append(float(m["loss"]))
    FINAL[method, dispatch_mode, mesh_name, n_steps, backend, scan] = dict(
        rest=jax.device_get(nnx.to_pure_dict(state["rest"])),
        specs=jax.tree.map(lambda a: a.sharding.spec, nnx.to_pure_dict(state["params"])))
    return out + (np.array(losses),)


FINAL = {}


def assert_trees_close(actual, expected, what):
    flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_e = jax.tree_util.tree_flatten_with_path(expected)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_e], what
    for (path, a), (_, e) in zip(flat_a, flat_e):
        np.testing.assert_allclose(a, e, **F32, err_msg=f"{what}{jax.tree_util.keystr(path)}")


CASES = [(m, d) for m in ("gshard", "deepseekmoe") for d in ("dropless", "capacity")]


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("method,dispatch_mode", CASES)
def test_sharded_step_equals_single_device(method, dispatch_mode, mesh_name):
    loss0, grads0, params0, dropped0, losses0 = run(method, dispatch_mode, None)
    loss, grads, params, dropped, losses = run(method, dispatch_mode, mesh_name)
    assert_trees_close(params, params0, "init ")
    np.testing.assert_allclose(loss, loss0, **F32, err_msg="loss of step 0")
    assert_trees_close(grads, grads0, "grads ")
    np.testing.assert_allclose(dropped, dropped0, **F32)
    assert (dropped0 > 0) == (dispatch_mode == "capacity"), "capacity factor 1 should drop some tokens"
    np.testing.assert_allclose(losses, losses0, **F32, err_msg="losses of 3 train steps")


def test_pallas_backend_with_expert_parallelism_equals_single_device():
    """The Pallas grouped matmul (interpreted on CPU) inside the expert-parallel shard_map on 2 devices: each
    device's receive buffer holds its 32 expert slots' rows (device 1 from group offset 32), then zero padding
    the kernel skips. Same init, loss, gradients and 2 AdamW steps as the single-device 'blocked' run (2, not
    3, and 2 devices, not 8: the TPU interpreter costs about 0.2 s per kernel call per device)."""
    loss0, grads0, params0, _, losses0 = run("deepseekmoe", "dropless", None)
    loss, grads, params, _, losses = run("deepseekmoe", "dropless", "expert2", n_steps=2, backend="pallas")
    assert_trees_close(params, params0, "init ")
    np.testing.assert_allclose(loss, loss0, **F32, err_msg="loss of step 0")
    assert_trees_close(grads, grads0, "grads ")
    np.testing.assert_allclose(losses, losses0[:2], **F32, err_msg="losses of 2 train steps")


def test_scanned_layers_sharded_equal_single_device():
    """model.scan_layers under expert, fsdp and tensor parallelism: the stacked weights keep their rules
    behind an unsplit layer axis; same init, loss, gradients and 3 AdamW steps (with aux-free bias
    updates, layer by layer) as on one device."""
    loss0, grads0, params0, _, losses0 = run("deepseekmoe", "dropless", None, scan=True)
    loss, grads, params, _, losses = run("deepseekmoe", "dropless", "fsdp2_expert2_tensor2", scan=True)
    assert params0["scanned"]["ffn"]["experts"]["w_up"].shape[0] == 2
    assert_trees_close(params, params0, "init ")
    np.testing.assert_allclose(loss, loss0, **F32, err_msg="loss of step 0")
    assert_trees_close(grads, grads0, "grads ")
    np.testing.assert_allclose(losses, losses0, **F32, err_msg="losses of 3 train steps")
    final = FINAL["deepseekmoe", "dropless", "fsdp2_expert2_tensor2", 3, "auto", True]
    assert final["specs"]["scanned"]["ffn"]["experts"]["w_gate"] == P(None, "expert", "fsdp", "tensor")
    bias = np.asarray(final["rest"]["scanned"]["ffn"]["bias"])
    assert bias.shape == (2, 63) and not np.allclose(bias[0], bias[1]), "each layer's bias follows its own load"


# --- placement ------------------------------------------------------------------------------------

def test_parameters_and_batches_are_split_by_the_rules():
    mesh = mesh_of("fsdp2_expert2_tensor2")
    trainer = train.Trainer(model_config("gshard", "dropless"), config_lib.TrainConfig(), 0, mesh)
    p = trainer.init()["params"]
    ffn = p["blocks"][0]["ffn"]
    assert ffn["experts"]["w_gate"].sharding.spec == P("expert", "fsdp", "tensor")
    assert ffn["experts"]["w_down"].sharding.spec == P("expert", "tensor", "fsdp")
    assert p["blocks"][0]["attn"]["wq"].sharding.spec == P("fsdp", "tensor", None)
    assert p["blocks"][0]["attn"]["wkv"].sharding.spec == P("fsdp", None, "tensor", None)
    assert p["embed"].sharding.spec == P("tensor", "fsdp")
    assert p["blocks"][0]["attn_norm"]["scale"].sharding.spec == P(None)
    opt_mu = trainer.init()["opt"][1][0].mu  # AdamW's first moment mirrors the parameter's sharding
    assert opt_mu["blocks"][0]["ffn"]["experts"]["w_up"].sharding.spec == P("expert", "fsdp", "tensor")
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp", "expert"), None)
    # a dimension the mesh axes do not divide stays whole; a mesh axis is used once per spec
    assert sharding.spec(("heads", "mlp"), (3, 4), mesh) == P(None, "tensor")
    assert sharding.spec(("batch", "length", "embed"), mesh=mesh) == P(("data", "fsdp", "expert"), None, None)


def test_expert_slots_are_placed_contiguously():
    """Device j of the expert axis holds expert slots [j E/D, (j + 1) E/D): the placement the device loss
    and group-limited routing assume."""
    mesh = mesh_of("data2_expert4")
    trainer = train.Trainer(model_config("gshard", "dropless"), config_lib.TrainConfig(), 0, mesh)
    w = trainer.init()["params"]["blocks"][0]["ffn"]["experts"]["w_up"]
    for device, index in w.sharding.devices_indices_map(w.shape).items():
        j = int(np.argwhere(mesh.devices == device)[0][mesh.axis_names.index("expert")])
        assert index[0] == slice(4 * j, 4 * (j + 1))


def test_device_loss_uses_the_mesh_expert_axis():
    """n_devices=0: DeepSeekMoE eq. 14-15 over the expert axis's devices (here 4, with 15 routed experts in
    16 padded slots: the last device holds 3 experts); equal to the unsharded layer told n_devices=4."""
    cfg = mc_lib.deepseekmoe(16, 64, n_experts=4, m=4, n_shared=1, device_loss_coef=1.0, pad_experts_to=4)
    layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (8, 8, 16))
    with sharding.use(mesh_of("data2_expert4")):
        _, stats = jax.jit(lambda x: layer(x))(x)
    _, ref_stats = moe.MoE(dataclasses.replace(cfg, n_devices=4), rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(stats.device_loss, ref_stats.device_loss, **F32)
    r = routing.topk(x.reshape(64, 16) @ layer.router[...], cfg.top_k)
    groups = [range(4 * j, min(4 * j + 4, 15)) for j in range(4)]
    by_hand = _device_loss_by_hand(np.asarray(r.probs), np.asarray(r.expert_ids), groups)
    np.testing.assert_allclose(stats.device_loss, by_hand, **F32)


def test_dropless_einsum_needs_no_expert_or_tensor_split():
    """Dropless 'einsum' (the CPU default) has no exchange or tensor-split path: asked for by name on an expert
    or tensor mesh it raises, naming the field; 'auto' takes 'blocked' there
    (test_sharded_step_equals_single_device)."""
    cfg = mc_lib.deepseekmoe(16, 64, n_experts=4, m=4, n_shared=1, pad_experts_to=4, backend="einsum")
    layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (8, 8, 16))
    for name in ("data2_expert4", "fsdp2_expert2_tensor2"):
        with sharding.use(mesh_of(name)), pytest.raises(ValueError, match=r"MoEConfig.backend='einsum' with "
                                                          r"dispatch='dropless' on a mesh with expert axis size \d"):
            layer(x)


def _device_loss_by_hand(probs, ids, groups):
    T, E = probs.shape
    K = ids.shape[1]
    f = np.array([(ids == e).sum() for e in range(E)]) * E / (K * T)
    P_ = probs.mean(0)
    return sum(np.mean([f[e] for e in g]) * sum(P_[e] for e in g) for g in groups)


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mesh_kw,match", [
    (dict(data=3), r"data=3.*3 devices but 8 are available"),
    (dict(data=-1, expert=3), r"expert=3.*8 is not divisible by the product 3"),
    (dict(data=-1, fsdp=-1), r"at most one axis of size -1"),
    (dict(tensor=0), r"MeshConfig.tensor=0 is invalid"),
])
def test_bad_mesh(mesh_kw, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(sharding.MeshConfig(**mesh_kw))


def test_experts_not_divisible_by_expert_axis():
    mc = dataclasses.replace(model_config("gshard", "dropless"), moe=mc_lib.gshard(32, 64, n_experts=12))
    with pytest.raises(ValueError, match=r"n_experts=12 .* expert=8; allowed: a multiple .* pad_experts_to=8"):
        train.Trainer(mc, config_lib.TrainConfig(), 0, mesh_of("expert8"))
    with pytest.raises(ValueError, match=r"n_devices=2 is invalid for a mesh with expert=8"):
        mc_lib.check_placement(mc_lib.gshard(32, 64, n_experts=16, n_devices=2), 8)
    with pytest.raises(ValueError, match=r"n_groups=3 is invalid for a mesh with expert=4"):
        mc_lib.check_placement(mc_lib.MoEConfig(32, 64, n_experts=12, top_k=2, n_groups=3, topk_groups=2), 4)


def test_batch_not_divisible_by_batch_shards():
    mesh = mesh_of("data2_expert4")
    with pytest.raises(ValueError, match=r"data.batch_size=12 is invalid .*data=2 x fsdp=1 x expert=4.* of 8"):
        sharding.require_batch(12, mesh)
    with pytest.raises(ValueError, match=r"batch_size=8 is invalid with train.grad_accum=2.* of 16"):
        sharding.require_batch(8, mesh, grad_accum=2)
    sharding.require_batch(16, mesh, grad_accum=2)


def test_unknown_mesh_key_names_the_nearest():
    c = table1.get_config("method=gshard,scale=tiny")
    c.mesh.experts = 8
    with pytest.raises(ValueError, match=r"config.mesh.experts; did you mean 'expert'"):
        config_lib.to_typed(c)


# --- the ragged exchange --------------------------------------------------------------------------

def _ragged_reference(operands, outputs, in_off, send, out_off):
    """jax.lax.ragged_all_to_all's documented semantics with numpy: device i's slice s (the slices of
    device j are j * n .. (j + 1) * n - 1) goes to device s // n at row out_off[i][s]."""
    D = len(operands)
    n = len(send[0]) // D
    out = [o.copy() for o in outputs]
    for i in range(D):
        for s in range(D * n):
            j, rows = s // n, operands[i][in_off[i][s]:in_off[i][s] + send[i][s]]
            out[j][out_off[i][s]:out_off[i][s] + send[i][s]] = rows
    return out


def test_dense_ragged_all_to_all_matches_the_ragged_semantics():
    D, n, L, O, d = 4, 2, 12, 40, 3
    rng = np.random.default_rng(0)
    send = rng.integers(0, 3, (D, D * n))  # device i sends send[i, s] rows of slice s
    in_off = np.stack([rng.permutation(L - 3)[:D * n] % (L - 3) for _ in range(D)])  # any (overlapping) slices
    # receivers pack slices by (source, slice), leaving a gap of one row after each
    out_off = np.zeros_like(send)
    for j in range(D):
        pos = 1
        for i in range(D):
            for s in range(j * n, (j + 1) * n):
                out_off[i, s] = pos
                pos += send[i, s] + 1
    assert out_off.max() + 3 <= O
    recv = np.stack([send[:, j * n:(j + 1) * n].reshape(-1) for j in range(D)])  # [D, D n] what j receives
    operand = rng.standard_normal((D, L, d)).astype(np.float32)
    output = rng.standard_normal((D, O, d)).astype(np.float32)
    mesh = jax.make_mesh((D,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:D])

    def f(op, out, io, ss, oo, rs):
        return dispatch.dense_ragged_all_to_all(op[0], out[0], io[0], ss[0], oo[0], rs[0], axis_name="x")[None]

    got = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("x"),) * 6, out_specs=P("x")))(
        operand, output, *(jnp.asarray(a, jnp.int32) for a in (in_off, send, out_off, recv)))
    want = _ragged_reference(list(operand), list(output), in_off, send, out_off)
    np.testing.assert_array_equal(np.asarray(got), np.stack(want))


# --- resuming on another mesh ---------------------------------------------------------------------

def test_resume_on_a_different_mesh(tmp_path):
    """A checkpoint written on data=8 resumes on data=2 x expert=4 (resharded by orbax) and continues with
    the losses of the uninterrupted data=8 run."""
    import pathlib
    import sysconfig

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]:
        shutil.copy(f, corpus / f.name)
    c = table1.get_config("method=gshard,scale=tiny")
    c.model.update(d_model=32, n_layers=1)
    c.model.moe.d_ff = 64
    c.data.update(source="text_dir", text_dir=str(corpus), tfds_data_dir=str(tmp_path / "tfds"), seq_len=32,
                  batch_size=8, eval_steps=1)
    c.train.update(steps=4, warmup_steps=1, log_every=1, eval_every=100, checkpoint_every=2)
    w = tmp_path / "w"
    train.train_and_evaluate(c, str(w), progress=False)
    first = {r["step"]: r["loss"] for r in metrics_lib.read_jsonl(w / "metrics.jsonl") if "loss" in r}
    shutil.rmtree(w / "checkpoints" / "4")
    os.remove(w / "metrics.jsonl")
    c.mesh.update(data=2, expert=4)
    train.train_and_evaluate(c, str(w), progress=False)
    resumed = {r["step"]: r["loss"] for r in metrics_lib.read_jsonl(w / "metrics.jsonl") if "loss" in r}
    assert sorted(resumed) == [3, 4]
    np.testing.assert_allclose([resumed[3], resumed[4]], [first[3], first[4]], **F32)
    # a checkpoint of a 2-process run cannot resume in 1 process: each process's data position is its own
    shutil.rmtree(w / "checkpoints" / "4")
    data = w / "checkpoints" / "2" / "data"
    os.rename(data / "process_0-of-1.json", data / "process_0-of-2.json")
    with pytest.raises(train.IncompatibleCheckpointError, match=r"data positions of 2 processes; this run has 1"):
        train.train_and_evaluate(c, str(w), progress=False)


def test_balance_device_loss_default_groups_unchanged():
    """Without padding, device groups are E/D contiguous experts (DeepSeekMoE eq. 14-15)."""
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (32, 8)))
    ids = jax.lax.top_k(probs, 2)[1]
    want = _device_loss_by_hand(np.asarray(probs), np.asarray(ids), [range(0, 4), range(4, 8)])
    np.testing.assert_allclose(balance.device_balance_loss(probs, ids, 2), want, **F32)


def test_ragged_exchange_traces_with_gradients(monkeypatch):
    """The dropless exchange as TPU and GPU run it (jax.lax.ragged_all_to_all, which XLA:CPU cannot compile):
    forward and backward lower to ragged-all-to-all (its buffers carry the device-varying type that the
    custom VJPs of dispatch/combine need)."""
    monkeypatch.setattr(dispatch, "RAGGED_PLATFORMS", ("cpu",))
    cfg = mc_lib.gshard(16, 32, n_experts=8, dispatch="dropless")
    layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest)(x)[0] ** 2)
    with sharding.use(mesh_of("data2_expert4")):
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, jnp.ones((8, 4, 16))).as_text()
    assert hlo.count("ragged_all_to_all") >= 4  # there and back, forward and backward
