"""Shared benchmark output: the machine line printed before a run, and rows written as strict JSON."""
from __future__ import annotations

import json
import os
import platform
import sys

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
    with open(path, "w") as fh:
        json.dump([{k: nan_to_null(v) for k, v in r.items()} for r in rows], fh, indent=1)
    print(f"wrote {len(rows)} rows to {path}")


def available_mib() -> float:
    """MemAvailable of /proc/meminfo in MiB (inf where unknown): benchmarks skip runs that would not fit."""
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        return float(info["MemAvailable"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return float("inf")
