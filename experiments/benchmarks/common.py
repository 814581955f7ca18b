"""Shared benchmark helpers: the machine line printed before a run, rows written as strict JSON, the memory
free for a run, and round-robin timing of calls."""
from __future__ import annotations

import json
import os
import platform
import sys
import time

import jax


def machine_line() -> str:
    """jax version and backend, CPU count, load average and the environment knobs that change timings."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    return (f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
            f"{platform.machine()}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}, load average {load}, "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES')!r}")


def write_json(path: str, rows: list[dict]) -> None:
    """Rows as a JSON list, NaN written as null (strict JSON)."""
    nan_to_null = lambda v: None if isinstance(v, float) and v != v else v
    with open(os.path.expanduser(path), "w") as fh:
        json.dump([{k: nan_to_null(v) for k, v in r.items()} for r in rows], fh, indent=1)
    print(f"wrote {len(rows)} rows to {path}")


def available_mib() -> float:
    """Memory free for a run in MiB, so that benchmarks skip runs that would not fit: the default device's
    bytes_limit - bytes_in_use where jax reports them (GPU, TPU), else MemAvailable of /proc/meminfo (CPU),
    inf where unknown."""
    stats = jax.devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        return (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) / 2**20
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        return float(info["MemAvailable"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return float("inf")


def once(fn, *args) -> tuple[float, float]:
    """(wall ms, process CPU ms: user + sys over all threads) of one call, its results waited for."""
    c0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def round_robin(calls, repeats: int) -> list[list[tuple[float, float]]]:
    """calls: [(fn, args), ...]. One warm-up call of each, then `repeats` rounds calling each once, in
    order, so that load from other processes on a shared machine hits every candidate alike. Returns
    each call's `repeats` (wall ms, cpu ms) pairs, in the order of calls."""
    for fn, args in calls:
        once(fn, *args)
    times = [[] for _ in calls]
    for _ in range(repeats):
        for ts, (fn, args) in zip(times, calls):
            ts.append(once(fn, *args))
    return times
