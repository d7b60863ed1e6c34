"""Progress on rank 0: a live bar on a terminal, a line every few percent in log files."""

from __future__ import annotations

import logging
import sys
import time

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger("keeltune")


class StepProgress:
    """Shows step, loss, tokens/s and ETA; does nothing on other ranks."""

    def __init__(self, *, total: int, start: int, enabled: bool) -> None:
        self.total = total
        self.start = start
        self.enabled = enabled
        self.started = time.perf_counter()
        self.every = max(1, total // 20)
        self.bar: Progress | None = None
        if enabled and sys.stderr.isatty():
            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)
            self.bar.start()

    def update(self, step: int, *, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, tps=tokens_per_s)
            return
        if step % self.every == 0 or step == self.total:
            done = step - self.start
            eta = (time.perf_counter() - self.started) / max(done, 1) * (self.total - step)
            log.info(
                "step %d/%d  loss %.4f  %.0f tok/s  ETA %.0fs", step, self.total, loss, tokens_per_s, eta
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
