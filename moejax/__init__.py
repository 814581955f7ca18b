"""moejax: Mixture-of-Experts language models in JAX/Flax NNX (GShard to DeepSeekMoE and DeepSeek-V3)."""
from moejax import balance, dispatch, experts, routing
from moejax.moe import PRESETS, MoE, MoEConfig, MoEStats, preset

__version__ = "0.1.0"
