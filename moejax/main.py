"""Train from an experiment config (configs/*.py), resuming from the workdir's latest checkpoint.

  python -m moejax.main --config=configs/deepseekmoe_table1.py:method=deepseekmoe,scale=tiny \\
      --workdir=/tmp/dsmoe [--config.train.steps=100 --config.data.text_dir=...]

Multi-host (one process per host, same command on every host): on a TPU VM slice nothing more is needed;
elsewhere give --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID). Each process reads its own share of every batch; --workdir must be a
directory all processes share.

An override of a key the config does not have is an error naming the nearest valid key. Bad input
(config values, data, an incompatible checkpoint, a non-finite loss) ends with a one-line error and exit
status 1; SIGTERM / Ctrl-C checkpoint first and exit with 128 + the signal number.
"""
from __future__ import annotations

import difflib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, optionally :arg.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics (resumed if it has any).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def check_overrides(argv: list[str]) -> None:
    """SystemExit naming the nearest valid key for a --config.a.b override the config does not have."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if not spec or not overrides or not os.path.exists(spec.partition(":")[0]):
        return  # absl reports a missing or unreadable --config itself
    from moejax import config as config_lib

    config = config_lib.load(spec)
    for key in overrides:
        node, path = config, []
        for part in key.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                near = difflib.get_close_matches(part, keys, n=1, cutoff=0.0)
                hint = f"; did you mean --config.{'.'.join(path + near)}?" if near else ""
                sys.exit(f"moejax: error: --config.{key}: the config has no key {'.'.join(path + [part])}{hint}")
            node, path = node[part], path + [part]


def main(argv):
    del argv
    from moejax import sharding, train  # imported after flag parsing: jax reads XLA_FLAGS at import

    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; keep the terminal readable
        logging.set_verbosity(logging.WARNING)
    os.makedirs(_WORKDIR.value, exist_ok=True)
    try:
        summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError, train.NonFiniteLossError) as e:
        sys.exit(f"moejax: error: {e}")
    if summary["interrupted"]:
        import signal
        sys.exit(128 + signal.Signals[summary["interrupted"]].value)


def run():
    check_overrides(sys.argv[1:])
    app.run(main)


if __name__ == "__main__":
    run()
