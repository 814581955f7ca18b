"""moejax: Mixture-of-Experts language models in JAX/Flax NNX."""
import setuptools

JAX_VERSION = "0.10.2"  # the oldest jax moejax supports; CI also runs the newest (.ci/newest_jax).

setuptools.setup(
    name="moejax",
    version="0.1.0",
    description="Mixture-of-Experts language models in JAX/Flax: GShard to DeepSeekMoE and DeepSeek-V3.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["moejax", "moejax.*", "pallas_kernels", "pallas_kernels.*", "configs"]),
    package_data={"moejax.datasets": ["pypi_spm8k.model", "pypi_corpus.tsv"]},  # the PyPI corpus' tokenizer, wheels
    install_requires=[
        f"jax>={JAX_VERSION}",
        "flax>=0.12",
        "optax>=0.2",
        "numpy>=1.26",
        # training system: configs + CLI, checkpoints, data (tfds + grain, no TensorFlow), metrics
        "absl-py>=2",
        "ml_collections>=1.0",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.9",
        "grain>=0.2.12",
        "array-record>=0.8",
        "sentencepiece>=0.2",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        # moejax.convert: Hugging Face checkpoints read and written as numpy (no torch)
        "safetensors>=0.4",
        # Hugging Face tokenizer.json files (data.tokenizer=PATH.json; converted models)
        "tokenizers>=0.19",
        # experiments/deepseekmoe report: figures (PNG, PDF)
        "matplotlib>=3.8",
    ],
    extras_require={
        # jax[tpu] adds the libtpu release matching whichever jax is installed (its tpu extra pins it), so
        # tests compile for TPU topologies ahead of time (moejax.aot) on any Linux machine; no TPU needed.
        # jupytext: the notebooks' .ipynb / .py pairs are checked and the .py run in CI
        # torch + transformers: the outside reference of tests/test_convert.py (Python 3.11: torch 2.13.0's CPU
        # build is the one on this project's machines; elsewhere pip would fetch a multi-GB CUDA build)
        "test": ["pytest>=8", "hypothesis>=6.100", "pytest-xdist>=3.5", "jupytext>=1.16", "pyyaml>=6",
                 f'jax[tpu]>={JAX_VERSION}; sys_platform == "linux"',
                 'torch==2.13.0; python_version < "3.12"', 'transformers==5.24.0; python_version < "3.12"'],
        # jax[tpu] pins the libtpu that matches its own version, so any jax >= JAX_VERSION gets the right one
        "tpu": [f"jax[tpu]>={JAX_VERSION}"],
        "cuda": [f"jax[cuda12]>={JAX_VERSION}"],
    },
)
