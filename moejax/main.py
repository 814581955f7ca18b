"""Train from an experiment config (configs/*.py), resuming from the workdir's latest checkpoint.

  python -m moejax.main --config=configs/deepseekmoe_table1.py:method=deepseekmoe,scale=tiny \\
      --workdir=/tmp/dsmoe [--config.train.steps=100 --config.data.text_dir=...]

Multi-host (one process per host, same command on every host): on a TPU VM slice nothing more is needed;
elsewhere give --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID). Each process reads its own share of every batch; --workdir must be a
directory all processes share.

An override of a key the config does not have is an error naming the nearest valid key; '~' is expanded
in flag values. Bad input (config values, data, an incompatible checkpoint, a non-finite loss, a workdir
another run holds or that cannot be written) ends with a one-line error and exit status 1; SIGTERM /
Ctrl-C checkpoint first and exit with 128 + the signal number.

Resuming with deliberately changed hyper-parameters (e.g. after a non-finite loss: a lower learning rate
from the last good checkpoint): repeat the command with the new values and name the changed keys,
  python -m moejax.main --config=... --workdir=W --config.train.lr=1e-4 --allow_changes=train.lr
Only train.* keys may change; every change is recorded in W/history.jsonl.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, optionally :arg.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics (resumed if it has any).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
_ALLOW_CHANGES = flags.DEFINE_list(
    "allow_changes", [], "Resume: config keys (e.g. train.lr,train.warmup_steps) whose values may differ from the "
    "checkpoint's; the changes are recorded in WORKDIR/history.jsonl.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from moejax import sharding, train  # imported after flag parsing: jax reads XLA_FLAGS at import

    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; keep the terminal readable
        logging.set_verbosity(logging.WARNING)
    workdir = _WORKDIR.value
    try:
        summary = train.train_and_evaluate(_CONFIG.value, workdir, allow_changes=_ALLOW_CHANGES.value)
    except (ValueError, FileNotFoundError, train.NonFiniteLossError, train.WorkdirBusyError) as e:
        sys.exit(f"moejax: error: {e}")
    except OSError as e:  # e.g. the workdir: missing permissions, a file in the way, a full disk
        where = os.path.abspath(e.filename) if e.filename else os.path.abspath(workdir)
        mine = where.startswith(os.path.abspath(os.path.expanduser(workdir)))
        sys.exit(f"moejax: error: {where}: {e.strerror or e}"
                 + (f" (--workdir={workdir}; use a directory you can write to)" if mine else ""))
    if summary["interrupted"]:
        import signal
        sys.exit(128 + signal.Signals[summary["interrupted"]].value)


def run():
    from moejax import config as config_lib

    app.run(main, flags_parser=config_lib.parse_cli_flags)


if __name__ == "__main__":
    run()
