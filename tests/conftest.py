"""Shared test settings (tolerances live in tests/tolerances.py), and the test processes' memory.

Memory: every program jax compiles stays in its caches for the life of the process, so a pytest-xdist
worker running the whole suite grew past 10 GiB (2 workers on a 24 GiB machine: killed). So compiled
programs are dropped (jax.clear_caches) and the freed heap handed back to the system after each module and
after any test that leaves the process above RELEASE_ABOVE_MIB, and tests/test_aot.py compiles paper-scale
models in processes of their own. The end of the run prints each process's peak resident memory (each
xdist worker's); MOEJAX_TEST_RSS_LOG=FILE appends 'process rss_mib peak_mib subprocess_peak_mib seconds
test' after every test, to find the tests that drive the peak.
"""
import atexit
import ctypes
import gc
import os
import resource
import shutil
import tempfile
import time

import pytest

# XLA:CPU compiles tests' programs at LLVM optimisation level 0: compiling is most of a test's time and level
# 0 halves it (a DeepSeekMoE train step on 8 devices: 8.3 s -> 4.4 s to compile, 0.025 s -> 0.048 s to run).
# On jaxlib 0.10 (Python 3.11's) it also uses XLA's elemental IR emitters instead of its newer MLIR fusion
# emitters (LEGACY_EMITTERS): the whole suite 1924 -> 1556 s on 2 cores (test_sharding.py 451 -> 255 worker-s,
# test_moe_layer.py 553 -> 404). jaxlib 0.12 has only the fusion emitters and aborts on the flag.
# Numerics are checked to tolerance either way; TPU programs compiled ahead of time (test_aot.py) are unchanged.
# Tests that start Python processes pass FAST_COMPILE on (the notebooks' smoke runs: 72 -> 46 s for the four,
# one after the other), but the GPU script takes LEGACY_EMITTERS only (its --smoke 85 -> 60 s; level 0 on top
# changed nothing measurable: 30-31 s either way alone).
def _jaxlib_minor() -> tuple:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return tuple(int(v) for v in version("jaxlib").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return ()


LEGACY_EMITTERS = "--xla_cpu_use_fusion_emitters=false" if _jaxlib_minor() == (0, 10) else ""
FAST_COMPILE = f"--xla_backend_optimization_level=0 {LEGACY_EMITTERS}".strip()
# Simulated devices for sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + FAST_COMPILE

# Compiled programs are shared between the processes of one test run through jax's persistent compilation
# cache, in a directory the first process (the xdist controller) makes and the workers and the processes
# tests start inherit: resumed runs, CLI runs and notebooks compile the same programs again in new processes
# (the train resume tests: 150 s -> 105 s). Removed when that first process ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_DIR = tempfile.mkdtemp(prefix="moejax-tests-compiled-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)

import moejax  # noqa: E402,F401  (before jax: its platform defaults, see moejax/__init__.py)
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # glibc only
except (OSError, AttributeError):
    _LIBC = None


def _rss_mib() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def _peak_rss_mib(who=resource.RUSAGE_SELF) -> int:
    """High-water resident memory of this process (RUSAGE_SELF) or of the largest subprocess it waited for
    (RUSAGE_CHILDREN); ru_maxrss is in KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(who).ru_maxrss
    return peak // 2**20 if os.uname().sysname == "Darwin" else peak // 1024


def _process_name() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


# A test process drops its compiled programs when it passes this resident size, and after each module. Not
# after every test: tests of a module share many small programs (the references' op-by-op jax calls), and
# compiling them again for every test made test_moe_layer.py twice as slow.
RELEASE_ABOVE_MIB = 2048


def _release_compiled_programs() -> None:
    """Drop jax's compiled programs and traces, collect the garbage they kept alive, and return the freed
    heap to the OS (glibc's malloc keeps it otherwise)."""
    jax.clear_caches()
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@pytest.fixture(autouse=True, scope="module")
def _release_after_each_module():
    yield
    _release_compiled_programs()


_LAST = [time.monotonic()]


@pytest.fixture(autouse=True)
def _release_when_large(request):
    yield
    rss = _rss_mib()
    if log := os.environ.get("MOEJAX_TEST_RSS_LOG"):
        now = time.monotonic()
        with open(log, "a") as f:
            f.write(f"{_process_name()} {rss} {_peak_rss_mib()} {_peak_rss_mib(resource.RUSAGE_CHILDREN)} "
                    f"{now - _LAST[0]:.1f} {request.node.nodeid}\n")
        _LAST[0] = now
    if rss > RELEASE_ABOVE_MIB:
        _release_compiled_programs()


# ----- peak resident memory of each test process, printed in the terminal summary ---------------------------

_PEAKS = pytest.StashKey[dict]()


def _peaks() -> dict:
    return {"self": _peak_rss_mib(), "subprocess": _peak_rss_mib(resource.RUSAGE_CHILDREN)}


def pytest_configure(config):
    config.stash[_PEAKS] = {}


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand its peaks to the controller
        workeroutput["moejax_peak_rss_mib"] = _peaks()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: a worker finished; keep its peaks."""
    peaks = getattr(node, "workeroutput", {}).get("moejax_peak_rss_mib")
    if peaks is not None:
        node.config.stash[_PEAKS][node.gateway.id] = peaks


def pytest_terminal_summary(terminalreporter, config):
    """'peak RSS: gw0 1.52 GiB, gw1 1.31 GiB, controller 0.12 GiB; largest subprocess 3.02 GiB' (without
    xdist: 'main'): the test processes, and the largest process a test started (tests/test_aot.py's
    compiles). Linux counts in a subprocess's peak the peak its parent had reached when it started it, so
    'largest subprocess' is only a subprocess's own when it exceeds the workers' peaks."""
    if hasattr(config, "workeroutput"):
        return
    peaks = dict(sorted(config.stash[_PEAKS].items()))
    workers = list(peaks.values()) or [_peaks()]  # the controller's subprocesses are the workers
    peaks["controller" if peaks else _process_name()] = _peaks()
    line = ", ".join(f"{name} {p['self'] / 1024:.2f} GiB" for name, p in peaks.items())
    line += f"; largest subprocess {max(p['subprocess'] for p in workers) / 1024:.2f} GiB"
    terminalreporter.write_line(f"peak RSS: {line}")
