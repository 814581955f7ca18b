"""moejax: Mixture-of-Experts language models in JAX/Flax NNX (GShard to DeepSeekMoE and DeepSeek-V3)."""
import glob as _glob
import os as _os


def _default_platform_env() -> None:
    """Quiet, lighter CPU runs where libtpu is installed but no TPU is attached. Runs on `import moejax`.

    Why: the test extra installs jax[tpu] (libtpu) so that tests compile for TPU topologies ahead of time
    (moejax.aot). jax then starts a TPU backend in every process, and libtpu, on a machine without a TPU,
    prints "could not determine TPU accelerator type" and "E0000 ... INVALID_ARGUMENT: unexpected worker
    hostname" on every CPU run (and costs ~0.1 GB and ~0.3 s per process). Without a TPU attached (no
    Google TPU PCI device, as jax itself checks; no /dev/accel*, no /dev/vfio/*):
    - JAX_PLATFORMS defaults to 'cpu' when no GPU is visible either, so no TPU backend is started. Read when
      jax is imported: entry points and tests/conftest.py import moejax first;
    - libtpu's host description defaults to one TPU-less host (any valid accelerator type: a topology
      description carries its own), so that where libtpu still loads (topology descriptions for moejax.aot,
      a GPU machine, a script that imported jax first) it skips the GCE metadata server, finds its
      settings, and takes no /tmp/libtpu_lockfile (compiling needs no chip; a pytest-xdist worker or
      another run may hold it). Read when the backend starts, so it also works after `import jax`.
    Only defaults: a variable already set wins, and nothing changes on a machine with a TPU attached.
    """
    tpu_pci_ids = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}  # jax hardware_utils
    for vendor in _glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f, open(_os.path.join(_os.path.dirname(vendor), "device")) as g:
                if f.read().strip() == "0x1ae0" and g.read().strip() in tpu_pci_ids:
                    return
        except OSError:
            continue
    if _glob.glob("/dev/accel*") or _glob.glob("/dev/vfio/*"):
        return
    gpu_devices = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
    if not any(_os.path.exists(d) for d in gpu_devices):
        _os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5p-8"),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        _os.environ.setdefault(key, value)


def _default_xla_cpu_flags() -> None:
    """With jaxlib 0.10, turn XLA:CPU's YNNPACK fusions off (`--xla_cpu_experimental_ynn_fusion_type=`).

    Why: jaxlib 0.10.2 (what Python 3.11 installs) compiles the expert FFN's batched matmuls into YNNPACK
    fusions that run on one thread (16.3 ms instead of 10.2 for DeepSeekMoE tiny's first expert matmul on 2
    cores); without them small-scale Table-1 training steps were 7-14% faster and took 9-25% less temp memory
    (experiments/benchmarks/README.md, train_throughput). jaxlib 0.12's fusions are faster than the fallback,
    so nothing changes there. XLA reads XLA_FLAGS when the first
    backend starts, so this works after `import jax` too, as long as nothing has run. A ynn setting already
    in XLA_FLAGS wins.
    """
    from importlib.metadata import PackageNotFoundError, version
    try:
        major_minor = tuple(int(v) for v in version("jaxlib").split(".")[:2])
    except (PackageNotFoundError, ValueError):  # no jaxlib metadata, or an unparsable version: leave XLA alone
        return
    flags = _os.environ.get("XLA_FLAGS", "")
    if major_minor == (0, 10) and "ynn_fusion_type" not in flags:
        _os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_experimental_ynn_fusion_type=").strip()


_default_platform_env()
_default_xla_cpu_flags()

from moejax import balance, dispatch, experts, routers, routing  # noqa: E402
from moejax.model_config import PRESETS, ModelConfig, MoEConfig, preset  # noqa: E402
from moejax.moe import MoE, MoEStats  # noqa: E402

__version__ = "0.1.0"
