"""Starting a run from another model's parameters (config.train.init_from): fine-tuning (same shapes), sparse
upcycling of a dense model (Komatsuzaki et al. 2022, arXiv:2212.05055, sec. 3: every expert a copy of the
dense FFN, the router new) and fine-grained upcycling into DeepSeekMoE experts (the dense FFN's hidden units
cut into m segments of width f = d_ff / m, DeepSeekMoE sec. 3.1: the Ks shared experts are segments 0..Ks-1,
routed expert i is segment Ks + i mod (m - Ks)).

What the upcycled model computes at step 0 (tests/test_upcycle.py): a SwiGLU FFN is the sum of its hidden
units' contributions, so FFN(x) = sum_j seg_j(x) over its segments. Sparse upcycling: y = sum_i g_i FFN(x)
= (sum_i g_i) FFN(x), the dense model exactly when the gates are normalised (Mixtral, GShard). Fine-grained:
y = sum_{j < Ks} seg_j(x) + sum_{i routed} g_i seg_{s(i)}(x); the dense model exactly iff a token's routed
picks cover the other segments once each with gate 1, which a new router does not do; training adapts it.

Everything else (attention, norms, embeddings, dense layers) is copied; the router and the aux-loss-free
bias keep this run's initial values.
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from moejax.config import UPCYCLE as METHODS
from moejax.model_config import ModelConfig


def _flat(state) -> dict:
    return {tuple(k): v for k, v in nnx.to_flat_state(state)}


def segment_of(config: ModelConfig, expert: int) -> int:
    """The dense FFN segment that routed expert `expert` starts from under fine-grained upcycling."""
    m, Ks = config.moe.segmentation, config.moe.n_shared
    return Ks + expert % (m - Ks)


def check(method: str, source: ModelConfig, target: ModelConfig) -> None:
    """ValueError naming the field unless `method` can start `target` from `source`."""
    if method not in METHODS:
        raise ValueError(f"TrainConfig.upcycle={method!r} is invalid; allowed: {METHODS}")
    if method == "none":
        return
    if target.scan_layers:
        raise ValueError("config.model.scan_layers=True is invalid for upcycling; allowed: False (upcycle, then "
                         "resume with scan_layers in a new run if wanted)")
    moe, width = target.moe, source.dense_d_ff or source.moe.d_ff
    if source.moe.n_experts:
        raise ValueError(f"TrainConfig.upcycle={method!r} needs a dense model in init_from; its moe.n_experts="
                         f"{source.moe.n_experts}")
    if not moe.n_experts:
        raise ValueError(f"TrainConfig.upcycle={method!r} makes MoE layers; config.model.moe.n_experts=0")
    if moe.activation != source.moe.activation:
        raise ValueError(f"config.model.moe.activation={moe.activation!r} is invalid for upcycling; allowed: the "
                         f"dense model's {source.moe.activation!r}")
    if method == "sparse":
        if moe.expert_width != width or moe.n_shared:
            raise ValueError(f"config.model.moe (expert width {moe.expert_width}, n_shared={moe.n_shared}) is invalid "
                             f"for sparse upcycling; allowed: experts as wide as the dense FFN ({width}), n_shared=0")
    elif moe.d_ff != width or not 0 <= moe.n_shared < moe.segmentation:
        raise ValueError(f"config.model.moe (d_ff={moe.d_ff}, n_shared={moe.n_shared}, segmentation="
                         f"{moe.segmentation}) is invalid for fine-grained upcycling; allowed: d_ff = the dense FFN's "
                         f"width {width} and 0 <= n_shared < segmentation")


def upcycle(method: str, source: ModelConfig, source_params, target: ModelConfig, target_state: dict) -> dict:
    """target_state {'params', 'rest'} (this run's initial values, numpy or jax) with every parameter taken
    from source_params as `method` says -> {'params', 'rest'} as numpy arrays. ValueError naming a parameter
    the source cannot give."""
    check(method, source, target)
    src = {k: np.asarray(v[...]) for k, v in _flat(source_params).items()}
    out = {}
    for part in ("params", "rest"):
        flat = []
        for path, var in _flat(target_state[part]).items():
            flat.append((path, var.replace(_take(method, path, var, src, target))))
        out[part] = nnx.from_flat_state(flat)
    return out


def _take(method, path, var, src, target) -> np.ndarray:
    shape, where = tuple(var.shape), "/".join(map(str, path))
    if path[-1] in ("router", "bias") or (len(path) > 1 and path[-2] == "router"):
        return np.asarray(var[...])  # new router, zero bias
    if method != "none" and "ffn" in path and target.is_routed(path[1]):
        dense = path[:path.index("ffn") + 1] + ("shared", path[-1])
        if dense not in src:
            raise ValueError(f"parameter {where} needs {'/'.join(map(str, dense))} from init_from, which lacks it")
        w = src[dense]  # w_gate / w_up [d, F]; w_down [F, d]
        units = 0 if path[-1] == "w_down" else 1  # the axis of the FFN's hidden units
        if path[-2] == "experts":
            if method == "sparse":
                segs = [w] * target.moe.n_experts
            else:
                f = target.moe.expert_width
                segs = [np.take(w, np.arange(f) + f * segment_of(target, i), axis=units)
                        for i in range(target.moe.n_experts)]
            stack = np.stack(segs)
            pad = [(0, shape[0] - len(segs))] + [(0, 0)] * (stack.ndim - 1)  # zero padding slots
            return _fit(np.pad(stack, pad), shape, where)
        if path[-2] == "shared":  # fine-grained: segments 0..Ks-1
            return _fit(np.take(w, np.arange(shape[units]), axis=units), shape, where)
    if path not in src:
        raise ValueError(f"parameter {where} is not in init_from's checkpoint; allowed with upcycle='none': a "
                         f"model of the same config.model")
    return _fit(src[path], shape, where)


def _fit(a: np.ndarray, shape, where: str) -> np.ndarray:
    if a.shape != shape:
        raise ValueError(f"parameter {where} of init_from has shape {a.shape}; this model's is {shape} (allowed: "
                         f"the same config.model, or upcycling of a dense model)")
    return a
