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
        self.requeue = (
            False  # a time-limit warning (USR2) asks for a requeue; TERM (cancel, preemption) does not
        )

    def set(self, reason: str, *, requeue: bool = False) -> None:
        if not self._event.is_set():
            self.reason, self.requeue = reason, requeue
            log.warning("%s: stopping at the next step boundary to checkpoint", reason)
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def install(self, signals: tuple[signal.Signals, ...] = (signal.SIGUSR2, signal.SIGTERM)) -> StopRequest:
        """Route these signals to the flag (Slurm sends USR2 before a time limit, TERM on preemption)."""
        self._owner = os.getpid()
        for number in signals:
            signal.signal(number, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame: object) -> None:
        if (
            os.getpid() != self._owner
        ):  # a forked worker (data preparation) inherited the handler: die as usual
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.set(f"received {signal.Signals(signum).name}", requeue=signum == signal.SIGUSR2)
