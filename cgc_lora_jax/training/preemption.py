"""SIGTERM, what clusters send before they preempt a job: finish the step, save it, stop cleanly.

One host: a signal handler notes the SIGTERM; after the step in flight, the loop saves a
checkpoint of that step and returns, and `train.py` exits with status 143 (128 + SIGTERM, what a
shell reports for a terminated job) and a message. Several hosts: the cluster may signal them at
different moments, and they must save the same step, so JAX's preemption service (started by
jax.distributed.initialize) receives the SIGTERM on whichever host gets it and picks one step for
all; `reached(step)` is then true on every host at that step.

    with PreemptionWatch() as preemption:
        for step in ...:
            ...
            if preemption.reached(done):
                save(done); break
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils

EXIT_STATUS = 128 + signal.SIGTERM


class PreemptionWatch:
    def __init__(self):
        self.multi_host = jax.process_count() > 1
        self.received = False
        self._previous = None
        # A handler can only be set from the main thread (a run in a worker thread is not watched).
        if not self.multi_host and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum, frame) -> None:
        self.received = True

    def reached(self, step: int) -> bool:
        """True when the run should save `step` and stop; call it after every step (on every host)."""
        if self.multi_host:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __enter__(self) -> PreemptionWatch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
