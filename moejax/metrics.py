"""Training metrics: model FLOPs per token (for MFU), device peak FLOPs, and a writer that appends
metrics.jsonl and TensorBoard event files (tensorboardX, no TensorFlow) in the workdir."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

from moejax import routers
from moejax.model_config import ModelConfig

# Dense bf16 peak FLOP/s per device (vendor datasheets); matched as a substring of device_kind, lower case.
PEAK_FLOPS = {
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12, "h100": 989e12, "h200": 989e12, "a100": 312e12,
}


def peak_flops(device_kind: str) -> float:
    """Peak FLOP/s of one device from PEAK_FLOPS, 0.0 if unknown (CPU)."""
    kind = device_kind.lower()
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), 0.0)


def active_params(config: ModelConfig) -> dict[str, float]:
    """Parameters each token multiplies by: attention, FFN (shared + the routed experts a token uses, as
    its router's registry entry counts them: K, or E C / T for expert choice), router (if it owns a weight),
    unembedding. Embedding lookups and norms are not counted."""
    d, n = config.d_model, {"attention": 0.0, "ffn": 0.0, "router": 0.0}
    for layer in range(config.n_layers):
        m = config.ffn_config(layer)
        mats = 3 if m.activation == "swiglu" else 2
        router = routers.get(m.router)
        routed = router.experts_per_token(m) if m.n_experts else 0.0
        n["attention"] += attention_params(config)
        n["ffn"] += mats * d * (m.shared_width + m.expert_width * routed) + (d if m.shared_gate else 0)
        n["router"] += d * m.n_experts if m.n_experts and router.learned else 0
    n["unembed"] = d * config.vocab_size
    return n


def attention_params(config: ModelConfig) -> int:
    """Weights of one attention layer (biases and norms not counted)."""
    c, d, H, h = config, config.d_model, config.n_heads, config.head_width
    if c.attention == "mla":  # queries (through the query latent or not), latent + rotary key, keys + values, out
        q = d * c.q_lora_rank + c.q_lora_rank * H * c.qk_width if c.q_lora_rank else d * H * c.qk_width
        return q + d * (c.kv_lora_rank + c.rope_head_dim) + c.kv_lora_rank * H * (h + c.v_width) + H * c.v_width * d
    return 2 * d * H * h + 2 * d * c.kv_heads * h  # q and o, k and v


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, 6 N_active + 6 L H (h_qk + h_v) S (PaLM, Chowdhery et al. 2022, app. B: its
    12 L H Q T with the query/key and value widths: matmuls forward and backward, attention scores and values
    without a causal discount)."""
    width = config.n_heads * (config.qk_width + config.v_width)
    return 6 * sum(active_params(config).values()) + 6 * config.n_layers * width * seq_len


def _summary_writer_class():
    """tensorboardX.SummaryWriter, imported late (only the trainer needs it) and without PyTorch: tensorboardX
    imports torch when it is installed (as on Colab), only to accept torch tensors, which moejax never logs;
    that import took 1.7 s of a training process' start on a 2-core CPU. Where torch is already imported it is
    left as it is."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Appends {'step', **scalars, **arrays as lists} lines to workdir/metrics.jsonl; writes scalars and
    array histograms to TensorBoard. Non-finite floats are written as JSON null."""

    def __init__(self, workdir: str):
        SummaryWriter = _summary_writer_class()
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._tb = SummaryWriter(workdir, flush_secs=30)

    def write(self, step: int, scalars: dict[str, float], arrays: dict[str, np.ndarray] | None = None):
        arrays = arrays or {}
        row = {"step": step, **{k: _finite(float(v)) for k, v in scalars.items()}}
        row.update({k: np.asarray(v).tolist() for k, v in arrays.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in scalars.items():
            self._tb.add_scalar(k, float(v), step)
        for k, v in arrays.items():
            if np.size(v):
                self._tb.add_histogram(k, np.asarray(v), step)

    def close(self):
        self._jsonl.close()
        self._tb.close()


def _finite(v: float):
    return v if math.isfinite(v) else None


def truncate_jsonl(path: str, step: int) -> None:
    """Drop the rows of metrics.jsonl after `step` (a resumed run redoes those steps) and any line cut short,
    atomically; a missing file stays missing."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    def kept(line):
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            return False
    keep = [l for l in lines if kept(l)]
    if len(keep) < len(lines):
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(l if l.endswith("\n") else l + "\n" for l in keep)
        os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    """metrics.jsonl rows; for a step logged twice (a resumed run), the later row wins."""
    rows = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[(row["step"], tuple(sorted(row)))] = row
    return sorted(rows.values(), key=lambda r: r["step"])
