"""The one training loop. It talks to the model only through a backend and knows no scheduler."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from keeltune.config import Config, mixing_counts
from keeltune.data_pipeline.prepare import prepare_sets, tokenizer_fingerprint
from keeltune.data_pipeline.reader import PackedDataset, TrainStream
from keeltune.data_pipeline.sources import DataError
from keeltune.distributed import ParallelEnv
from keeltune.eval.evaluate import EvalResult, evaluate, forgetting, token_nll
from keeltune.eval.stopping import BestModel, EarlyStopping, forgetting_breaches
from keeltune.sharding.backends import build_backend
from keeltune.sharding.base import Backend
from keeltune.sharding.model import load_tokenizer
from keeltune.training.base_samples import draw_base_samples
from keeltune.training.checkpoint import load_checkpoint, resume_checkpoint, save_checkpoint
from keeltune.training.loader import StepLoader
from keeltune.training.metrics import MetricsLogger, truncate_metrics
from keeltune.training.progress import StepProgress
from keeltune.training.regularizers import ewc_fisher, token_kl
from keeltune.training.run_files import (
    BASELINE_FILE,
    BEST_FILE,
    BEST_MODEL_DIR,
    BEST_MODEL_FILE,
    FINAL_MODEL_DIR,
    follow_umask,
)
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
    ended_early: str = ""  # why a finished run ended before max_steps (early stopping, retention guard)
    best_model: Path | None = None  # retention_guard action best: the kept model (best/), when one was kept


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
        self.backend: Backend = build_backend(config, parallel)
        draw_base_samples(config, self.backend, self.tokenizer, parallel)  # before the first step and resume
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
        self.step = 0
        self.baseline: dict[str, float] = {}
        self.early_stopping = EarlyStopping(config.regularization.early_stopping)
        self.best_model = BestModel(config.regularization.retention_guard)
        self._resume()
        self._set_up_ewc()
        self.metrics = MetricsLogger(
            self.run_dir, config.logging.wandb, enabled=parallel.is_main, run_config=config.to_dict()
        )
        self.progress = StepProgress(
            total=config.training.max_steps, start=self.step, enabled=parallel.is_main
        )
        self._tokens_done, self._train_seconds = 0, 0.0

    def _resume(self) -> None:
        checksums = self.config.training.checkpoint.verify == "checksum"
        checkpoint = resume_checkpoint(self.run_dir, self.parallel, checksums=checksums)
        if checkpoint is None:
            return
        state = load_checkpoint(checkpoint, self.backend, self.parallel)
        if state.get("tokenizer_fingerprint") != tokenizer_fingerprint(self.tokenizer):
            raise ValueError(
                f"{checkpoint}: written with another tokenizer than {self.config.model.tokenizer_path}"
            )
        self.step = state["step"]
        self.stream.load_state_dict(state["data"])
        if "early_stopping" in state:
            self.early_stopping.load_state_dict(state["early_stopping"])
        if "best_model" in state:
            self.best_model.load_state_dict(state["best_model"])
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

    def _set_up_ewc(self) -> None:
        ewc = self.config.regularization.ewc
        if ewc.weight <= 0:
            return
        chosen = {f"retention/{name}" for name in ewc.sets or [r.name for r in self.config.data.retention]}
        retention = [d for name, d in self.eval_sets.items() if name in chosen]
        fisher = ewc_fisher(
            self.backend,
            self.run_dir,
            retention,
            samples=ewc.samples,
            batch_size=self.config.training.micro_batch_size,
            parallel=self.parallel,
            resumed=self.step > 0,
        )
        self.backend.set_fisher(fisher)

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
        results.update(forgetting(results, self.baseline))
        summary = ", ".join(f"{k} {v:.4g}" for k, v in results.items())
        log.info("eval at step %d: %s", self.step, summary)
        return results

    # ------------------------------------------------------------------ training

    def _watch(self, results: dict[str, float]) -> str:
        """Early stopping and the retention guard on one eval's results: why to stop now, or ""."""
        if self.early_stopping.update(self.step, results):
            return self.early_stopping.reason()
        if (
            self.early_stopping.enabled
            and self.early_stopping.best_step == self.step
            and self.parallel.is_main
        ):
            best = {"step": self.step, "val/loss": self.early_stopping.best}
            (self.run_dir / BEST_FILE).write_text(json.dumps(best, indent=1))
        guard = self.config.regularization.retention_guard
        if self.best_model.update(self.step, results, self.baseline):
            self._keep_best(results)
        breaches = forgetting_breaches(results, guard.max_forgetting_pct)
        if not breaches:
            return ""
        text = (
            ", ".join(f"{key} {value:.1f}%" for key, value in breaches.items())
            + f" above regularization.retention_guard.max_forgetting_pct={guard.max_forgetting_pct:g} "
            f"at step {self.step}"
        )
        if guard.action == "best" and self.best_model.step is not None:
            text += f"; keeping the best model within it (step {self.best_model.step}) in {BEST_MODEL_DIR}/"
        log.warning("retention guard: %s", text)
        self.metrics.alert("keeltune retention guard", text)
        return f"retention guard: {text}" if guard.action == "stop" else ""

    def _keep_best(self, results: dict[str, float]) -> None:
        """Export the model to ``best/`` (written aside, then swapped in) with what made it the best."""
        folder, staging = self.run_dir / BEST_MODEL_DIR, self.run_dir / f".tmp-{BEST_MODEL_DIR}"
        if self.parallel.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        self.export(staging)
        if self.parallel.is_main:
            chosen = {"step": self.step, "score": self.best_model.score, **results}
            (staging / BEST_MODEL_FILE).write_text(json.dumps(chosen, indent=1))
            old = self.run_dir / f".old-{BEST_MODEL_DIR}"
            if folder.exists():
                os.replace(folder, old)
            os.replace(staging, folder)
            shutil.rmtree(old, ignore_errors=True)
            log.info(
                "best model so far (score %.4f at step %d) kept in %s",
                self.best_model.score,
                self.step,
                folder,
            )
        self.parallel.barrier()

    def _train_step(self) -> tuple[dict[str, float], int]:
        """One optimizer step over this rank's share of the global batch; returns (metrics, tokens): the task
        loss as ``train/loss`` and each weighted penalty as ``train/<name>``."""
        ids, mask = self.loader.next_step()
        ids_t = ids.to(self.parallel.device)
        mask_t = mask[:, 1:].float().to(self.parallel.device)
        counts = torch.tensor([float(mask_t.sum())], dtype=torch.float64, device=self.parallel.device)
        global_targets = float(self.parallel.all_reduce_sum(counts).item())
        if global_targets == 0:  # every rank sees the same sum, so every rank stops here
            raise DataError(
                f"training step {self.step + 1}: no sample of the global batch has a target token (each is prompt "
                "only, masked out of the loss), so the step would learn nothing; the train sources "
                f"{[s.name for s in self.config.data.train]} are mostly prompt without answer (keeltune prepare "
                "warns which): shorten the prompts, set data.long_prompts, or fix the records"
            )
        # DDP averages gradients over ranks, so each rank scales by world/targets: the result is the mean
        # over every target token of the global batch, whatever the number of ranks or micro-batches.
        scale = self.parallel.world_size / max(global_targets, 1.0)
        micro = self.config.training.micro_batch_size
        kl = self.config.regularization.kl
        sums = torch.zeros(2, dtype=torch.float64, device=self.parallel.device)  # task loss, KL term
        for index in range(self.accumulation):
            rows = slice(index * micro, (index + 1) * micro)
            inputs, targets, weights = ids_t[rows, :-1], ids_t[rows, 1:], mask_t[rows]
            reference = self.backend.reference_logits(inputs) if kl.weight > 0 else None

            def loss_fn(
                logits: torch.Tensor,
                targets: torch.Tensor = targets,
                weights: torch.Tensor = weights,
                reference: torch.Tensor | None = reference,
            ) -> torch.Tensor:
                loss = token_nll(logits, targets, weights) * scale
                sums[0] += loss.detach().double()
                if reference is not None:
                    term = kl.weight * token_kl(logits, reference, weights, kl.temperature) * scale
                    sums[1] += term.detach().double()
                    loss = loss + term
                return loss

            self.backend.forward_backward(inputs, loss_fn, sync_grads=index == self.accumulation - 1)
        penalties = self.backend.add_penalties()  # same on every rank: added after the reduction
        self.parallel.all_reduce_sum(sums)
        values = {"train/loss": float(sums[0].item()) / self.parallel.world_size}
        if kl.weight > 0:
            values["train/kl"] = float(sums[1].item()) / self.parallel.world_size
        values.update(penalties)
        return values, ids.shape[0] * (ids.shape[1] - 1) * self.parallel.world_size

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "early_stopping": self.early_stopping.state_dict(),
            "best_model": self.best_model.state_dict(),
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
            checksums=self.config.training.checkpoint.verify == "checksum",
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
            self._watch(summary.first_eval)
        elif self.baseline:
            summary.first_eval = dict(self.baseline)
        if self.early_stopping.exhausted:  # resumed after an early stop: nothing left to train
            summary.ended_early, summary.steps = self.early_stopping.reason(), self.step
            log.warning("nothing to train, the run ended at step %d: %s", self.step, summary.ended_early)
        self.backend.train(True)
        try:
            while self.step < cfg.max_steps and not summary.ended_early:
                self.train_one_step()
                last = self.step == cfg.max_steps
                if self.eval_sets and (self.step % self.config.eval.every_steps == 0 or last):
                    summary.last_eval = self.run_evals()
                    self.metrics.log(self.step, summary.last_eval)
                    summary.ended_early = self._watch(summary.last_eval)
                checkpointed = (
                    self.step % cfg.checkpoint.every_steps == 0 or last or bool(summary.ended_early)
                )
                if checkpointed:
                    self._checkpoint()
                if summary.ended_early:
                    log.warning("ended at step %d after checkpointing: %s", self.step, summary.ended_early)
                    summary.steps = self.step
                    break
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
        if self.best_model.step is not None:
            summary.best_model = self.run_dir / BEST_MODEL_DIR
            log.info("best model: step %d of %d, in %s", self.best_model.step, self.step, summary.best_model)
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
        values, tokens = self._train_step()
        grad_norm = self.backend.step(lr)
        self.step += 1
        elapsed = time.perf_counter() - started
        self._tokens_done += tokens
        self._train_seconds += elapsed
        self.progress.update(self.step, loss=values["train/loss"], tokens_per_s=tokens / elapsed)
        if self.step % self.config.logging.every_steps == 0 or self.step == cfg.max_steps:
            self.metrics.log(
                self.step,
                {
                    **values,
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
            follow_umask(folder)
        self.parallel.barrier()
        return folder

    def close(self) -> None:
        self.loader.close()
        self.metrics.close()
