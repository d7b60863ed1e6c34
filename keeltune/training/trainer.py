"""The one training loop. It talks to the model only through a backend and knows no scheduler."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from keeltune.config import Config, mixing_counts
from keeltune.data_pipeline.prepare import prepare_sets, tokenizer_fingerprint
from keeltune.data_pipeline.reader import PackedDataset, TrainStream
from keeltune.eval.evaluate import EvalResult, evaluate, token_nll
from keeltune.sharding.backends import build_backend
from keeltune.sharding.base import Backend
from keeltune.sharding.model import load_tokenizer
from keeltune.sharding.parallel import ParallelEnv
from keeltune.training.checkpoint import load_checkpoint, save_checkpoint
from keeltune.training.loader import StepLoader
from keeltune.training.metrics import MetricsLogger, truncate_metrics
from keeltune.training.progress import StepProgress
from keeltune.training.run_files import BASELINE_FILE, FINAL_MODEL_DIR, latest_checkpoint
from keeltune.training.schedule import lr_at
from keeltune.training.stop import StopRequest

log = logging.getLogger("keeltune")


@dataclass
class TrainSummary:
    """What a finished run reports (rank 0's view; every rank gets the same eval values)."""

    run_dir: Path
    steps: int
    first_eval: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    final_model: Path | None = None
    wandb: str = "disabled"
    stopped: str = ""  # why training stopped early (a signal) after checkpointing; "" when it finished


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_datasets(
    config: Config, tokenizer: Any, parallel: ParallelEnv
) -> tuple[list[PackedDataset], dict[str, PackedDataset]]:
    """Rank 0 prepares sets not prepared yet (and refuses stale ones) and checks shard checksums; every rank
    then opens the shards. Returns the train sources and the held-out sets (``val``, ``retention/<name>``)."""
    data = config.data
    if parallel.is_main:
        prepare_sets(data, config.run_dir, tokenizer, refresh=False)
    parallel.barrier()
    fingerprint = tokenizer_fingerprint(tokenizer)
    verify = data.verify_checksums if parallel.is_main else "never"
    opened = {
        key: PackedDataset(folder, fingerprint=fingerprint, verify_checksums=verify)
        for key, _, folder in data.prepared_sets(config.run_dir)
    }
    parallel.barrier()
    train = [opened[f"data.train.{i}"] for i in range(len(data.train))]
    held_out = {"val": opened["data.validation"]} if data.validation else {}
    held_out.update(
        {f"retention/{r.name}": opened[f"data.retention.{i}"] for i, r in enumerate(data.retention)}
    )
    return train, held_out


class Trainer:
    """Builds the pieces from the config, then runs ``fit``."""

    def __init__(self, config: Config, parallel: ParallelEnv) -> None:
        self.config = config
        self.parallel = parallel
        self.run_dir = config.run_dir
        self.accumulation = config.training.gradient_accumulation(parallel.world_size)
        seed_everything(config.training.seed)
        self.tokenizer = load_tokenizer(config.model.tokenizer_path)
        self.train_sources, self.eval_sets = build_datasets(config, self.tokenizer, parallel)
        self.stream = TrainStream(
            self.train_sources,
            global_batch=config.training.global_batch_size,
            rank=parallel.rank,
            world_size=parallel.world_size,
            seed=config.training.seed,
            mixing=mixing_counts(config.data.train),
        )
        self.loader = StepLoader(
            self.stream, micro_batch=config.training.micro_batch_size, workers=config.data.loader_workers
        )
        self.backend: Backend = build_backend(config, parallel)
        self.step = 0
        self.baseline: dict[str, float] = {}
        self._resume()
        self.metrics = MetricsLogger(
            self.run_dir, config.logging.wandb, enabled=parallel.is_main, run_config=config.to_dict()
        )
        self.progress = StepProgress(
            total=config.training.max_steps, start=self.step, enabled=parallel.is_main
        )
        self._tokens_done, self._train_seconds = 0, 0.0

    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            return
        state = load_checkpoint(checkpoint, self.backend, self.parallel)
        if state.get("tokenizer_fingerprint") != tokenizer_fingerprint(self.tokenizer):
            raise ValueError(
                f"{checkpoint}: written with another tokenizer than {self.config.model.tokenizer_path}"
            )
        self.step = state["step"]
        self.stream.load_state_dict(state["data"])
        baseline_file = self.run_dir / BASELINE_FILE
        if baseline_file.is_file():
            self.baseline = json.loads(baseline_file.read_text())
        if self.parallel.is_main:
            truncate_metrics(self.run_dir, self.step)
        log.info(
            "resumed from %s (step %d, %d samples consumed)",
            checkpoint,
            self.step,
            self.stream.consumed_samples,
        )

    # ------------------------------------------------------------------ evaluation

    def run_evals(self) -> dict[str, float]:
        """Every held-out set; retention sets also report forgetting against the step-0 baseline."""
        self.backend.train(False)
        results: dict[str, float] = {}
        for name, dataset in self.eval_sets.items():
            result: EvalResult = evaluate(
                self.backend.logits,
                dataset,
                rank=self.parallel.rank,
                world_size=self.parallel.world_size,
                all_reduce_sum=self.parallel.all_reduce_sum,
                micro_batch_size=self.config.eval.micro_batch_size,
                device=self.parallel.device,
                max_samples=self.config.eval.max_samples,
            )
            results[f"{name}/loss"] = result.loss
            results[f"{name}/ppl"] = result.ppl
        self.backend.train(True)
        if not self.baseline and self.step == 0:
            self.baseline = dict(results)
            if self.parallel.is_main:
                (self.run_dir / BASELINE_FILE).write_text(json.dumps(self.baseline, indent=1))
        for key, value in list(results.items()):
            if key.startswith("retention/") and key.endswith("/ppl") and key in self.baseline:
                results[key.replace("/ppl", "/forgetting_pct")] = 100.0 * (value / self.baseline[key] - 1.0)
        summary = ", ".join(f"{k} {v:.4g}" for k, v in results.items())
        log.info("eval at step %d: %s", self.step, summary)
        return results

    # ------------------------------------------------------------------ training

    def _train_step(self) -> tuple[float, int]:
        """One optimizer step over this rank's share of the global batch; returns (mean loss, tokens)."""
        ids, mask = self.loader.next_step()
        ids_t = ids.to(self.parallel.device)
        mask_t = mask[:, 1:].float().to(self.parallel.device)
        counts = torch.tensor([float(mask_t.sum())], dtype=torch.float64, device=self.parallel.device)
        global_targets = float(self.parallel.all_reduce_sum(counts).item())
        # DDP averages gradients over ranks, so each rank scales by world/targets: the result is the mean
        # over every target token of the global batch, whatever the number of ranks or micro-batches.
        scale = self.parallel.world_size / max(global_targets, 1.0)
        micro = self.config.training.micro_batch_size
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.parallel.device)
        for index in range(self.accumulation):
            rows = slice(index * micro, (index + 1) * micro)
            targets, weights = ids_t[rows, 1:], mask_t[rows]

            def loss_fn(
                logits: torch.Tensor, targets: torch.Tensor = targets, weights: torch.Tensor = weights
            ):
                return token_nll(logits, targets, weights) * scale

            loss = self.backend.forward_backward(
                ids_t[rows, :-1], loss_fn, sync_grads=index == self.accumulation - 1
            )
            loss_sum += loss.double()
        mean_loss = float(self.parallel.all_reduce_sum(loss_sum).item()) / self.parallel.world_size
        return mean_loss, ids.shape[0] * (ids.shape[1] - 1) * self.parallel.world_size

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "data": self.stream.state_dict(),
            "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
        }

    def _checkpoint(self) -> None:
        path = save_checkpoint(
            self.run_dir,
            self.step,
            self.backend,
            self._trainer_state(),
            self.parallel,
            self.config.training.checkpoint.keep_last,
        )
        log.info("checkpoint written: %s", path)

    def _stop_agreed(self, stop: StopRequest | None) -> bool:
        """True on every rank when any rank was asked to stop (one tiny all-reduce per step)."""
        if stop is None:
            return False
        flag = torch.tensor([1.0 if stop.is_set() else 0.0], device=self.parallel.device)
        return bool(self.parallel.all_reduce_sum(flag).item() > 0)

    def fit(self, stop: StopRequest | None = None) -> TrainSummary:
        """Train to ``max_steps``, evaluating and checkpointing on the way; export the final model.

        When ``stop`` is set on any rank, all ranks checkpoint at the next step boundary and return early
        (``summary.stopped`` says why); the next run resumes from that checkpoint."""
        cfg = self.config.training
        summary = TrainSummary(run_dir=self.run_dir, steps=cfg.max_steps, wandb=self.metrics.wandb_location)
        if self.eval_sets and self.config.eval.at_start and self.step == 0:
            summary.first_eval = self.run_evals()
            self.metrics.log(0, summary.first_eval)
        elif self.baseline:
            summary.first_eval = dict(self.baseline)
        self.backend.train(True)
        try:
            while self.step < cfg.max_steps:
                self.train_one_step()
                last = self.step == cfg.max_steps
                if self.eval_sets and (self.step % self.config.eval.every_steps == 0 or last):
                    summary.last_eval = self.run_evals()
                    self.metrics.log(self.step, summary.last_eval)
                checkpointed = self.step % cfg.checkpoint.every_steps == 0 or last
                if checkpointed:
                    self._checkpoint()
                if not last and self._stop_agreed(stop):
                    if not checkpointed:
                        self._checkpoint()
                    summary.stopped = stop.reason or "stop requested on another rank"
                    log.warning("stopped at step %d after checkpointing (%s)", self.step, summary.stopped)
                    return summary
        finally:
            self.progress.close()
        summary.tokens_per_s = self._tokens_done / self._train_seconds if self._train_seconds else 0.0
        summary.final_model = self.export(self.run_dir / FINAL_MODEL_DIR)
        return summary

    def train_one_step(self) -> None:
        """One optimizer step with its logging and progress (the body of ``fit``'s loop)."""
        cfg = self.config.training
        started = time.perf_counter()
        lr = lr_at(
            self.step,
            lr=cfg.lr,
            warmup_steps=cfg.warmup_steps,
            max_steps=cfg.max_steps,
            min_lr_ratio=cfg.min_lr_ratio,
        )
        loss, tokens = self._train_step()
        grad_norm = self.backend.step(lr)
        self.step += 1
        elapsed = time.perf_counter() - started
        self._tokens_done += tokens
        self._train_seconds += elapsed
        self.progress.update(self.step, loss=loss, tokens_per_s=tokens / elapsed)
        if self.step % self.config.logging.every_steps == 0 or self.step == cfg.max_steps:
            self.metrics.log(
                self.step,
                {
                    "train/loss": loss,
                    "train/lr": lr,
                    "train/grad_norm": grad_norm,
                    "train/tokens_per_s": tokens / elapsed,
                    "train/epoch": self.stream.epoch,
                    **{f"data/{name}/fraction": f for name, f in self.stream.fractions().items()},
                },
            )

    def export(self, folder: Path) -> Path:
        """The trained model as a Hugging Face folder, with the tokenizer."""
        if self.parallel.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        self.parallel.barrier()
        self.backend.export(folder)
        if self.parallel.is_main:
            self.tokenizer.save_pretrained(folder)
        self.parallel.barrier()
        return folder

    def close(self) -> None:
        self.loader.close()
        self.metrics.close()
