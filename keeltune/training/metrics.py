"""Metrics to ``metrics.jsonl`` and W&B, from rank 0 only. The W&B key is never written anywhere."""

from __future__ import annotations

import json
import logging
import netrc
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from keeltune.config import WandbConfig
from keeltune.run_folder import METRICS_FILE, WANDB_ID_FILE

log = logging.getLogger("keeltune")

DEFAULT_WANDB_HOST = "https://api.wandb.ai"
STEP_METRIC = "trainer/step"  # the x-axis of every W&B chart


def _wandb_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_HOST))
    return url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)


def wandb_key_available() -> bool:
    """A key in the environment or in ``~/.netrc`` for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        entry = netrc.netrc().authenticators(_wandb_host()[0])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def wandb_host_answers(timeout_s: float = 2.0) -> bool:
    try:
        with socket.create_connection(_wandb_host(), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_wandb_mode(mode: str) -> tuple[str, str]:
    """``auto`` becomes online with a key and a reachable host, offline otherwise; returns the mode and, for a
    fallback to offline, why."""
    if mode != "auto":
        return mode, ""
    host, port = _wandb_host()
    if not wandb_key_available():
        return "offline", f"no W&B key found (WANDB_API_KEY, or a ~/.netrc entry for {host})"
    if not wandb_host_answers():
        return "offline", f"the W&B host {host}:{port} did not answer within 2 s (no internet on this node?)"
    return "online", ""


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """Drop records a crashed attempt wrote after the checkpoint we resume from."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line and json.loads(line).get("step", 0) <= after_step
    ]
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    """Writes metrics on rank 0 (other ranks hold a logger that does nothing).

    W&B is a guest: a failure of W&B (its service killed by a signal, a lost connection) is logged once and W&B
    is left aside for the rest of the run, while ``metrics.jsonl`` goes on; training never stops for it. W&B
    charts use this run's own step (``trainer/step``) as their x-axis, so a resume from an earlier checkpoint
    continues the curves instead of being dropped as steps W&B has already seen."""

    def __init__(
        self, run_dir: Path, wandb_config: WandbConfig, *, enabled: bool, run_config: dict[str, Any]
    ) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.wandb_run: Any = None
        self._file = open(run_dir / METRICS_FILE, "a", buffering=1) if enabled else None  # noqa: SIM115
        if enabled:
            self._start_wandb(wandb_config, run_config)

    def _start_wandb(self, wandb_config: WandbConfig, run_config: dict[str, Any]) -> None:
        mode, why = resolve_wandb_mode(wandb_config.mode)
        if mode == "disabled":
            return
        if why:
            log.info("W&B mode auto: offline, because %s", why)
        import wandb

        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        try:
            self.wandb_run = wandb.init(
                project=wandb_config.project,
                entity=wandb_config.entity or None,
                group=wandb_config.group or None,
                name=run_config["run"]["name"],
                id=run_id,
                resume="allow",
                mode=mode,
                dir=str(self.run_dir),
                config=run_config,
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, save_code=False),
            )
            self.wandb_run.define_metric(STEP_METRIC, hidden=True)
            self.wandb_run.define_metric("*", step_metric=STEP_METRIC)
        except Exception as err:  # W&B must never stop training
            self._wandb_failed("could not start", err)
            return
        if mode == "offline":
            log.info(
                "W&B offline run in %s; upload it later with: wandb sync %s",
                self.wandb_run.dir,
                Path(self.wandb_run.dir).parent,
            )
        else:
            log.info("W&B run: %s", self.wandb_run.url)

    def _wandb_failed(self, what: str, err: BaseException) -> None:
        log.warning(
            "W&B %s (%s: %s); going on without it, metrics.jsonl has every record",
            what, type(err).__name__, err,
        )  # fmt: skip
        self.wandb_run = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        if self.wandb_run is not None:
            try:
                self.wandb_run.log({STEP_METRIC: step, **values})
            except Exception as err:
                self._wandb_failed("stopped working", err)

    def table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        """Per-item rows as a W&B Table (lists shown as JSON), when W&B is on."""
        if self.wandb_run is None or not rows:
            return
        import wandb

        columns = list(rows[0])
        data = [
            [v if isinstance(v, str | int | float) else json.dumps(v) for v in row.values()] for row in rows
        ]
        try:
            self.wandb_run.log({STEP_METRIC: step, name: wandb.Table(columns=columns, data=data)})
        except Exception as err:
            self._wandb_failed("stopped working", err)

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (e-mail/Slack per the user's W&B settings) when W&B is on; a failure is only logged."""
        if self.wandb_run is None:
            return
        try:
            self.wandb_run.alert(title=title, text=text)
        except Exception as err:  # an alert must never stop training
            log.warning("W&B alert failed: %s", err)

    @property
    def wandb_location(self) -> str:
        if self.wandb_run is None:
            return "disabled"
        if self.wandb_run.settings.mode == "offline":
            return str(Path(self.wandb_run.dir).parent)
        return self.wandb_run.url

    def close(self) -> None:
        """Close metrics.jsonl, then W&B; a W&B failure is logged, never raised."""
        if self._file is not None:
            self._file.close()
            self._file = None
        run, self.wandb_run = self.wandb_run, None
        if run is not None:
            try:
                run.finish()
            except Exception as err:
                log.warning("W&B did not close cleanly (%s: %s); metrics.jsonl has every record",
                            type(err).__name__, err)  # fmt: skip
