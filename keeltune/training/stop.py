"""A graceful stop: a signal only raises a flag; the loop stops at the next step boundary once every rank agrees
(so all ranks write the same checkpoint), whichever rank got the signal."""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("keeltune")


class StopRequest:
    """Set by a signal handler (or by code); read by the loop at step boundaries."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        self.requeue = False  # after a time-limit warning (USR2); not after TERM (cancel, preemption)

    def set(self, reason: str, *, requeue: bool = False) -> None:
        if not self._event.is_set():
            self.reason, self.requeue = reason, requeue
            log.warning("%s: stopping at the next step boundary to checkpoint", reason)
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def install(self, signals: tuple[signal.Signals, ...] = (signal.SIGUSR2, signal.SIGTERM)) -> StopRequest:
        """Route these signals to the flag (Slurm sends USR2 before a time limit, TERM on preemption)."""
        for number in signals:
            signal.signal(number, self._on_signal)
        # Forked workers (data preparation pools, DataLoader workers) must die on TERM as usual: a handler that
        # only sets a flag never runs while a worker blocks in C, and its parent then waits for it forever.
        os.register_at_fork(after_in_child=lambda: _default_handlers(signals))
        return self

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.set(f"received {signal.Signals(signum).name}", requeue=signum == signal.SIGUSR2)


def _default_handlers(signals: tuple[signal.Signals, ...]) -> None:
    for number in signals:
        signal.signal(number, signal.SIG_DFL)
