"""The one training loop. It talks to the model only through a backend and knows no scheduler."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from keeltune.atomic import write_atomically
from keeltune.config import Config, mixing_counts
from keeltune.data_pipeline.formats import save_tokenizer
from keeltune.data_pipeline.prepare import tokenizer_fingerprint
from keeltune.data_pipeline.reader import TrainStream
from keeltune.data_pipeline.sources import DataError
from keeltune.distributed import ParallelEnv
from keeltune.eval.bias.probes import bias_results, item_rows, load_probe_sets
from keeltune.eval.bias.score import score_probe_sets
from keeltune.eval.evaluate import evaluate_sets, forgetting, token_nll
from keeltune.eval.names import task_change
from keeltune.eval.policy import HeldOutPolicy
from keeltune.eval.tasks import PreparedTask, run_task
from keeltune.run_folder import (
    BASELINE_FILE,
    BEST_FILE,
    BEST_MODEL_DIR,
    BEST_MODEL_FILE,
    BIAS_BASELINE_FILE,
    FINAL_MODEL_DIR,
    PRUNE_FILE,
    eval_items_file,
    follow_umask,
)
from keeltune.sharding.backends import build_backend
from keeltune.sharding.base import Backend
from keeltune.sharding.model import load_tokenizer
from keeltune.training.base_samples import draw_base_samples
from keeltune.training.build import build_datasets, build_tasks, seed_everything
from keeltune.training.checkpoint import load_checkpoint, resume_checkpoint, save_checkpoint
from keeltune.training.loader import StepLoader
from keeltune.training.metrics import MetricsLogger, truncate_metrics
from keeltune.training.progress import StepProgress
from keeltune.training.regularizers import (
    LossTerm,
    RegularizerContext,
    build_regularizers,
    needs_reference,
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


class Trainer:
    """Builds the pieces from the config, then runs ``fit``."""

    def __init__(self, config: Config, parallel: ParallelEnv) -> None:
        self.config = config
        self.parallel = parallel
        self.run_dir = config.run_dir
        self.accumulation = config.training.gradient_accumulation(parallel.world_size)
        seed_everything(config.training.seed)
        self.tokenizer = load_tokenizer(config.model.tokenizer_path)
        self.backend: Backend = build_backend(config, parallel, keep_reference=needs_reference(config))
        draw_base_samples(config, self.backend, self.tokenizer, parallel)  # before the first step and resume
        self.train_sources, self.eval_sets = build_datasets(config, self.tokenizer, parallel)
        self.tasks = build_tasks(config, self.tokenizer)
        self.probes = load_probe_sets(config.eval.bias)  # every probe file read and checked before training
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
        context = RegularizerContext(
            config, self.backend, parallel, self.run_dir, self.eval_sets, tokenizer=self.tokenizer
        )
        self.regularizers = build_regularizers(context)  # before the resume: they take the pretrained weights
        self.step = 0
        self.baseline: dict[str, float] = {}
        self.bias_baseline: dict[str, dict[str, list]] = {}  # probe -> the base's items ("where") and lls
        self.policy = HeldOutPolicy(config.regularization, config.eval.bias.probes)
        self._resume()
        for regularizer in self.regularizers:
            regularizer.start(resumed=self.step > 0)
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
        self.policy.load_state_dict(state)
        baseline_file = self.run_dir / BASELINE_FILE
        if baseline_file.is_file():
            self.baseline = json.loads(baseline_file.read_text())
        bias_file = self.run_dir / BIAS_BASELINE_FILE
        if bias_file.is_file():
            self.bias_baseline = json.loads(bias_file.read_text())
        if self.parallel.is_main:
            truncate_metrics(self.run_dir, self.step)
        log.info(
            "resumed from %s (step %d, %d samples consumed)",
            checkpoint,
            self.step,
            self.stream.consumed_samples,
        )

    # ------------------------------------------------------------------ evaluation

    def run_evals(
        self, *, sets: bool = True, tasks: list[PreparedTask] | None = None, bias: bool = True
    ) -> dict[str, float]:
        """The held-out sets (when ``sets``), ``tasks`` (default: all) and the bias probes (when ``bias``);
        retention sets and tasks also report forgetting against the step-0 baseline, bias probes their
        amplification over the base (scored at step 0)."""
        self.backend.train(False)
        results: dict[str, float] = {}
        if sets and self.eval_sets:
            results = evaluate_sets(
                self.backend.logits,
                self.eval_sets,
                self.parallel,
                micro_batch_size=self.config.eval.micro_batch_size,
                max_samples=self.config.eval.max_samples,
            )
        for prepared in self.tasks if tasks is None else tasks:
            outcome = run_task(
                self.backend,
                prepared,
                self.tokenizer,
                self.parallel,
                batch_size=self.config.eval.task_batch_size,
                bootstrap_iters=self.config.eval.bootstrap_iters,
            )
            results.update(outcome.metrics)
            self._write_items(prepared.task.name, outcome.items)
        if bias and self.probes:
            results.update(self._run_probes())
        self.backend.train(True)
        if not self.baseline and self.step == 0:
            self.baseline = dict(results)
            if self.parallel.is_main:
                (self.run_dir / BASELINE_FILE).write_text(json.dumps(self.baseline, indent=1))
        results.update(forgetting(results, self.baseline))
        results.update(task_change(results, self.baseline, self.config.eval.tasks))
        summary = ", ".join(
            f"{k} {v:.4g}" for k, v in results.items() if not k.endswith(("_stderr", "_lo", "_hi"))
        )
        log.info("eval at step %d: %s", self.step, summary)
        return results

    def _write_items(self, name: str, rows: list[dict[str, Any]]) -> None:
        """One eval's per-item rows: a JSONL file in the run folder and a W&B table (rank 0)."""
        if not self.parallel.is_main:
            return
        file = eval_items_file(self.run_dir, self.step, name)
        file.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(file, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self.metrics.table(self.step, f"eval_items/{name}", rows)

    def _run_probes(self) -> dict[str, float]:
        """Every bias probe scored now; at step 0 its log-likelihoods are the base's (kept in the run folder),
        later ones are compared with them item by item."""
        bias = self.config.eval.bias
        lls = score_probe_sets(
            self.backend,
            self.probes,
            self.tokenizer,
            self.parallel,
            batch_size=self.config.eval.task_batch_size,
            max_length=self.config.data.seq_len,
        )
        if self.step == 0 and not self.bias_baseline:
            self.bias_baseline = {
                p.name: {"where": [item.where for item in p.items], "lls": lls[p.name]} for p in self.probes
            }
            if self.parallel.is_main:
                write_atomically(self.run_dir / BIAS_BASELINE_FILE, json.dumps(self.bias_baseline))
        results = {}
        for probe in self.probes:
            base = self.bias_baseline.get(probe.name)
            if base is not None and base["where"] != [item.where for item in probe.items]:
                log.warning(
                    "bias probe %s: its items changed since step 0 (eval.bias was edited before a resume), so "
                    "it is reported without amplification over the base",
                    probe.name,
                )
                base = None
            results.update(bias_results(probe, lls[probe.name], base and base["lls"], bias))
            self._write_items(f"bias-{probe.name}", item_rows(probe, lls[probe.name]))
        return results

    def _evals_due(self, last: bool) -> tuple[bool, list[PreparedTask], bool]:
        """Whether the held-out sets are due after this step, which tasks are, and whether the bias probes are."""
        sets = bool(self.eval_sets) and (self.step % self.config.eval.every_steps == 0 or last)
        tasks = [p for p in self.tasks if last or self.config.eval.task_due(p.task, self.step)]
        bias = bool(self.probes) and (last or self.config.eval.bias_due(self.step))
        return sets, tasks, bias

    # ------------------------------------------------------------------ training

    def _watch(self, results: dict[str, float]) -> str:
        """The held-out policy on one eval's results: keep the best model, warn; why to stop now, or ""."""
        verdict = self.policy.observe(self.step, results, self.baseline)
        if verdict.new_best and self.parallel.is_main:
            best = {"step": self.step, self.policy.early_stopping.metric: self.policy.early_stopping.best}
            (self.run_dir / BEST_FILE).write_text(json.dumps(best, indent=1))
        if verdict.keep_best:
            self._keep_best(results)
        if verdict.warning:
            log.warning("%s: %s", verdict.guards, verdict.warning)
            self.metrics.alert(f"keeltune {verdict.guards}", verdict.warning)
        return verdict.stop

    def _keep_best(self, results: dict[str, float]) -> None:
        """Export the model to ``best/`` (written aside, then swapped in) with what made it the best."""
        folder, staging = self.run_dir / BEST_MODEL_DIR, self.run_dir / f".tmp-{BEST_MODEL_DIR}"
        if self.parallel.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        self.export(staging)
        if self.parallel.is_main:
            chosen = {"step": self.step, "score": self.policy.best_model.score, **results}
            (staging / BEST_MODEL_FILE).write_text(json.dumps(chosen, indent=1))
            old = self.run_dir / f".old-{BEST_MODEL_DIR}"
            if folder.exists():
                os.replace(folder, old)
            os.replace(staging, folder)
            shutil.rmtree(old, ignore_errors=True)
            log.info(
                "best model so far (score %.4f at step %d) kept in %s",
                self.policy.best_model.score,
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
        # the task loss, then each loss-side regularizer's weighted term, summed over micro-batches
        sums: dict[str, torch.Tensor] = {
            "loss": torch.zeros((), dtype=torch.float64, device=self.parallel.device)
        }
        for index in range(self.accumulation):
            rows = slice(index * micro, (index + 1) * micro)
            inputs, targets, weights = ids_t[rows, :-1], ids_t[rows, 1:], mask_t[rows]
            terms = {  # before the forward: a term may need its own (reference) forward
                r.name: term for r in self.regularizers if (term := r.loss_term(inputs)) is not None
            }

            def loss_fn(
                logits: torch.Tensor,
                targets: torch.Tensor = targets,
                weights: torch.Tensor = weights,
                terms: dict[str, LossTerm] = terms,
            ) -> torch.Tensor:
                loss = token_nll(logits, targets, weights) * scale
                sums["loss"] += loss.detach().double()
                for name, term in terms.items():
                    value = term(logits, weights) * scale
                    sums[name] = sums.get(name, 0.0) + value.detach().double()
                    loss = loss + value
                return loss

            self.backend.forward_backward(inputs, loss_fn, sync_grads=index == self.accumulation - 1)
        penalties = {  # the same on every rank: added after the reduction
            f"train/{r.name}": value for r in self.regularizers if (value := r.add_gradients()) is not None
        }
        totals = self.parallel.all_reduce_sum(torch.stack(list(sums.values())))
        values = {
            f"train/{name}": float(total) / self.parallel.world_size
            for name, total in zip(sums, totals.tolist(), strict=True)
        }
        values.update(penalties)
        return values, ids.shape[0] * (ids.shape[1] - 1) * self.parallel.world_size

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            **self.policy.state_dict(),
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

    def _pruned(self) -> str:
        """Why keeltune sweep pruned this trial, once its decision is in the run folder (read at each eval,
        agreed by every rank), else ""."""
        path = self.run_dir / PRUNE_FILE
        seen = torch.tensor(
            [1.0 if self.parallel.is_main and path.is_file() else 0.0], device=self.parallel.device
        )
        if self.parallel.all_reduce_sum(seen).item() == 0:
            return ""
        try:
            why = json.loads(path.read_text()).get("reason", "")
        except (OSError, ValueError):
            why = ""
        return f"pruned by keeltune sweep{': ' + why if why else ''}"

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
        at_start = self.config.eval.at_start and (self.eval_sets or self.tasks)
        if self.step == 0 and (at_start or self.probes):  # the probes' base scores are taken at step 0
            summary.first_eval = self.run_evals(sets=at_start, tasks=None if at_start else [])
            self.metrics.log(0, summary.first_eval)
            self._watch(summary.first_eval)
        elif self.baseline:
            summary.first_eval = dict(self.baseline)
        if self.policy.exhausted:  # resumed after an early stop: nothing left to train
            summary.ended_early, summary.steps = self.policy.reason(), self.step
            log.warning("nothing to train, the run ended at step %d: %s", self.step, summary.ended_early)
        self.backend.train(True)
        try:
            while self.step < cfg.max_steps and not summary.ended_early:
                self.train_one_step()
                last = self.step == cfg.max_steps
                sets, tasks, bias = self._evals_due(last)
                if sets or tasks or bias:
                    summary.last_eval = self.run_evals(sets=sets, tasks=tasks, bias=bias)
                    self.metrics.log(self.step, summary.last_eval)
                    summary.ended_early = self._watch(summary.last_eval) or self._pruned()
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
        if self.policy.best_model.step is not None:
            summary.best_model = self.run_dir / BEST_MODEL_DIR
            log.info(
                "best model: step %d of %d, in %s", self.policy.best_model.step, self.step, summary.best_model
            )
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
            save_tokenizer(self.tokenizer, folder, self.config.data)
            follow_umask(folder)
        self.parallel.barrier()
        return folder

    def close(self) -> None:
        self.loader.close()
        self.metrics.close()
