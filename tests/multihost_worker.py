"""`python -m tests.multihost_worker ARGS`: moejax.main (same flags) with two test-only knobs, read from the
environment, for the subprocesses of tests/test_multihost.py.

  MOEJAX_TEST_SHUFFLE_WINDOW=R  moejax.data.SHUFFLE_WINDOW = R rows. With R = the rows a process reads per
                                step, every step starts a new shuffle window, so the processes' data iterator
                                states differ after step 1 (as they do in a long run, not only in its first
                                1024 rows per process).
  MOEJAX_TEST_EMULATE_PROCESSES=N  one process reads the rows that processes 0..N-1 of an N-process run read,
                                concatenated in process order, so its global batches equal that run's.
"""
import os

import grain
import numpy as np


class ConcatIterator(grain.DatasetIterator):
    """Batches of several per-process train iterators, concatenated along rows (process 0's first)."""

    def __init__(self, iterators):
        super().__init__(iterators)
        self.iterators = iterators

    def __next__(self):
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
        return {"processes": [it.get_state() for it in self.iterators]}

    def set_state(self, state):
        for it, s in zip(self.iterators, state["processes"]):
            it.set_state(s)


def _patch():
    from moejax import data

    if os.environ.get("MOEJAX_TEST_SHUFFLE_WINDOW"):
        data.SHUFFLE_WINDOW = int(os.environ["MOEJAX_TEST_SHUFFLE_WINDOW"])
    n = int(os.environ.get("MOEJAX_TEST_EMULATE_PROCESSES") or 0)
    if n:
        one_process = data.train_iterator

        def train_iterator(cfg, tokenizer, **kw):
            return ConcatIterator([one_process(cfg, tokenizer, process_index=i, process_count=n) for i in range(n)])

        data.train_iterator = train_iterator


if __name__ == "__main__":
    from moejax import main

    _patch()
    main.run()
