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
from keeltune.data_pipeline.prepare import prepare_sets, tokenizer_fingerprint
from keeltune.data_pipeline.reader import PackedDataset, TrainStream
from keeltune.data_pipeline.sources import DataError
from keeltune.distributed import ParallelEnv
from keeltune.eval.bias.probes import bias_results, item_rows, load_probe_sets
from keeltune.eval.bias.score import score_probe_sets
from keeltune.eval.evaluate import evaluate_sets, forgetting, token_nll
from keeltune.eval.names import BPB, held_out_names, task_change
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
    Regularizer,
    RegularizerContext,
    build_regularizers,
    needs_reference,
)
from keeltune.training.schedule import lr_at
from keeltune.training.stop import StopRequest
from keeltune.training.vocabulary import base_vocab_size, ensure_extended_base, read_vocabulary

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
        if parallel.is_main:
            ensure_extended_base(config)  # model.extend_vocabulary: the base with the domain tokens
        parallel.barrier()
        as_written, config = config, config.with_extended_base()
        self.whole_config = config
        self.views = config.stage_views()  # one per stage (the config itself without stages)
        self.config = self.views[0]  # the current stage's
        self.parallel = parallel
        self.run_dir = config.run_dir
        self.accumulation = config.training.gradient_accumulation(parallel.world_size)
        seed_everything(config.training.seed)
        self.tokenizer = load_tokenizer(config.model.tokenizer_path)
        keep_reference = any(needs_reference(view) for view in self.views)
        self.backend: Backend = build_backend(self.views[0], parallel, keep_reference=keep_reference)
        for view in self.views:  # before the first step and resume: samples of the base model
            draw_base_samples(view, self.backend, self.tokenizer, parallel)
        # every stage's data prepared and opened now: bad data fails the job before its first step
        self.stage_data = [
            build_datasets(config, self.tokenizer, parallel, stage=i) for i in range(len(self.views))
        ]
        self.tasks = build_tasks(config, self.tokenizer)
        self.probes = load_probe_sets(config.eval.bias)  # every probe file read and checked before training
        self.base_rows = base_vocab_size(config)  # with a domain vocabulary: the original base's rows
        self.original_tokenizer_path = as_written.model.tokenizer_path
        # each stage's regularizers, all built before any step or resume: they anchor at the original base
        self.stage_regularizers: list[list[Regularizer]] = []
        pretrained = None
        for view, (_, eval_sets) in zip(self.views, self.stage_data, strict=True):
            context = RegularizerContext(
                view, self.backend, parallel, self.run_dir, eval_sets, tokenizer=self.tokenizer,
                base_vocab_size=self.base_rows, _pretrained=pretrained,
            )  # fmt: skip
            self.stage_regularizers.append(build_regularizers(context))
            pretrained = context._pretrained
        self.step = 0
        self.baseline: dict[str, float] = {}
        self.bias_baseline: dict[str, dict[str, list]] = {}  # probe -> the base's items ("where") and lls
        self.loader: StepLoader | None = None
        self._enter_stage(0, start=0)
        self.stage_ended = ""  # why the current stage ended before its max_steps (checkpointed with it)
        self._resume()
        for regularizer in (r for stage in self.stage_regularizers for r in stage):
            regularizer.start(resumed=self.step > 0)
        self.metrics = MetricsLogger(
            self.run_dir, config.logging.wandb, enabled=parallel.is_main, run_config=as_written.to_dict()
        )
        self.progress = StepProgress(total=config.total_steps, start=self.step, enabled=parallel.is_main)
        self._tokens_done, self._train_seconds = 0, 0.0

    def _enter_stage(self, index: int, *, start: int) -> None:
        """Make stage ``index`` (starting after step ``start``) the current one: its data stream from the first
        sample, its regularizers and a new held-out policy (early stopping counts within the stage)."""
        self.stage, self.stage_start = index, start
        self.config = self.views[index]
        self.train_sources, self.eval_sets = self.stage_data[index]
        self.regularizers = self.stage_regularizers[index]
        self.policy = HeldOutPolicy(self.config.regularization, self.config.eval.bias.probes)
        self.stream = TrainStream(
            self.train_sources,
            global_batch=self.config.training.global_batch_size,
            rank=self.parallel.rank,
            world_size=self.parallel.world_size,
            seed=self.config.training.seed,
            mixing=mixing_counts(self.config.data.train),
        )
        if self.loader is not None:
            self.loader.close()
        self.loader = StepLoader(
            self.stream,
            micro_batch=self.config.training.micro_batch_size,
            workers=self.config.data.loader_workers,
        )

    @property
    def stage_end(self) -> int:
        """The step after which the current stage is over (unless it ends early)."""
        return self.stage_start + self.config.training.max_steps

    @property
    def stage_name(self) -> str:
        return self.whole_config.stages[self.stage].name if self.whole_config.stages else ""

    def _next_stage(self) -> None:
        """From the end of one stage to the start of the next (also on a resume from the last checkpoint of the
        one before): a new schedule, data and policy, and a fresh optimizer state unless the stage keeps it."""
        previous = self.stage_name
        self._enter_stage(self.stage + 1, start=self.step)
        self.stage_ended = ""
        if self.whole_config.stages[self.stage].reset_optimizer:
            self.backend.reset_optimizer()
        log.info(
            "stage %s ended at step %d; stage %s starts (%d steps%s)",
            previous,
            self.step,
            self.stage_name,
            self.config.training.max_steps,
            ", fresh optimizer state" if self.whole_config.stages[self.stage].reset_optimizer else "",
        )

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
        if state.get("stage", 0) != self.stage:
            self._enter_stage(state["stage"], start=state["stage_start"])
        self.stage_ended = state.get("stage_ended", "")
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
            if self.base_rows is not None and sets:
                original = self._original_base_bpb()
                self.baseline.update(original)  # forgetting per byte is measured against the original base
                results.update({f"base/{name}": value for name, value in original.items()})
            if self.parallel.is_main:
                (self.run_dir / BASELINE_FILE).write_text(json.dumps(self.baseline, indent=1))
        results.update(forgetting(results, self.baseline))
        results.update(task_change(results, self.baseline, self.config.eval.tasks))
        summary = ", ".join(
            f"{k} {v:.4g}" for k, v in results.items() if not k.endswith(("_stderr", "_lo", "_hi"))
        )
        log.info("eval at step %d: %s", self.step, summary)
        return results

    def _original_base_bpb(self) -> dict[str, float]:
        """With a domain vocabulary: each retention set's bits per byte under the original base, i.e. the
        extended base at step 0 on the set as the original tokenizer makes it, its logits on the original rows
        only (those rows, and so that distribution, are the original model's exactly)."""
        tokenizer = load_tokenizer(self.original_tokenizer_path)
        data = self.config.data
        folders = None
        if self.parallel.is_main:  # next to, never over, the sets made with the extended tokenizer
            prepared = prepare_sets(data, self.run_dir, tokenizer, refresh=False, held_out_only=True)
            names = held_out_names(data)
            folders = {
                names[key]: str(folder) for key, folder, _ in prepared if key.startswith("data.retention")
            }
        folders = self.parallel.broadcast_object(folders)
        sets = {
            name: PackedDataset(
                Path(folder), fingerprint=tokenizer_fingerprint(tokenizer), verify_checksums="never"
            )
            for name, folder in folders.items()
        }
        rows = self.base_rows
        results = evaluate_sets(
            lambda ids: self.backend.logits(ids)[..., :rows],
            sets,
            self.parallel,
            micro_batch_size=self.config.eval.micro_batch_size,
            max_samples=self.config.eval.max_samples,
        )
        return {name: value for name, value in results.items() if name.endswith(f"/{BPB}")}

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
            "stage": self.stage,
            "stage_start": self.stage_start,
            "stage_ended": self.stage_ended,
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
        """Train every stage to its ``max_steps``, evaluating and checkpointing on the way; export the final model.

        An early stop (early stopping, a guard) ends the current stage, and the run when it is the last; a sweep's
        pruning ends the run. When ``stop`` is set on any rank, all ranks checkpoint at the next step boundary and
        return early (``summary.stopped`` says why); the next run resumes from that checkpoint."""
        summary = TrainSummary(
            run_dir=self.run_dir, steps=self.whole_config.total_steps, wandb=self.metrics.wandb_location
        )
        at_start = self.config.eval.at_start and (self.eval_sets or self.tasks)
        vocabulary = read_vocabulary(Path(self.config.model.path))
        if self.step == 0 and vocabulary is not None:  # model.extend_vocabulary: what it bought
            per_document = vocabulary["tokens_per_document"]
            self.metrics.log(
                0,
                {
                    "vocab/new_tokens": float(len(vocabulary["tokens"])),
                    "vocab/tokens_per_document_before": per_document["before"],
                    "vocab/tokens_per_document_after": per_document["after"],
                },
            )
        if self.step == 0 and (at_start or self.probes):  # the probes' base scores are taken at step 0
            summary.first_eval = self.run_evals(sets=at_start, tasks=None if at_start else [])
            self.metrics.log(0, summary.first_eval)
            self._watch(summary.first_eval)
        elif self.baseline:
            summary.first_eval = dict(self.baseline)
        if self.policy.exhausted and not self.stage_ended:  # checkpointed before stage_ended was kept
            self.stage_ended = self.policy.reason()
        if self.stage_ended:  # resumed from the checkpoint an early stop wrote
            log.warning(
                "nothing to train in this stage, it ended at step %d: %s", self.step, self.stage_ended
            )
        self.backend.train(True)
        try:
            while True:
                if self.step < self.stage_end and not self.stage_ended:
                    outcome = self._train_stage(summary, stop)
                    if outcome == "stopped":
                        return summary
                    if outcome == "pruned":
                        break
                if self.stage == len(self.views) - 1:
                    summary.ended_early = self.stage_ended
                    break
                self._next_stage()
        finally:
            self.progress.close()
        if summary.ended_early:
            summary.steps = self.step
        summary.tokens_per_s = self._tokens_done / self._train_seconds if self._train_seconds else 0.0
        summary.final_model = self.export(self.run_dir / FINAL_MODEL_DIR)
        if self.policy.best_model.step is not None:
            summary.best_model = self.run_dir / BEST_MODEL_DIR
            log.info(
                "best model: step %d of %d, in %s", self.policy.best_model.step, self.step, summary.best_model
            )
        return summary

    def _train_stage(self, summary: TrainSummary, stop: StopRequest | None) -> str:
        """The current stage's steps: "stopped" (checkpointed on request), "pruned" (checkpointed: the run
        ends), or "" when the stage is over (at its max_steps, or early: ``stage_ended`` says why)."""
        cfg = self.config.training
        while self.step < self.stage_end:
            self.train_one_step()
            last = self.step == self.stage_end
            pruned = ""
            sets, tasks, bias = self._evals_due(last)
            if sets or tasks or bias:
                summary.last_eval = self.run_evals(sets=sets, tasks=tasks, bias=bias)
                self.metrics.log(self.step, summary.last_eval)
                self.stage_ended = self._watch(summary.last_eval)
                pruned = "" if self.stage_ended else self._pruned()
            ended = bool(self.stage_ended or pruned)
            checkpointed = self.step % cfg.checkpoint.every_steps == 0 or last or ended
            if checkpointed:
                self._checkpoint()
            if pruned:
                log.warning("ended at step %d after checkpointing: %s", self.step, pruned)
                summary.ended_early, summary.steps = pruned, self.step
                return "pruned"
            if self.stage_ended:
                what = f"stage {self.stage_name} ended" if self.stage_name else "ended"
                log.warning("%s at step %d after checkpointing: %s", what, self.step, self.stage_ended)
                return ""
            if not (last and self.stage == len(self.views) - 1) and self._stop_agreed(stop):
                if not checkpointed:
                    self._checkpoint()
                summary.stopped = (stop.reason if stop else "") or "stop requested on another rank"
                log.warning("stopped at step %d after checkpointing (%s)", self.step, summary.stopped)
                return "stopped"
        return ""

    def train_one_step(self) -> None:
        """One optimizer step with its logging and progress (the body of a stage's loop)."""
        cfg = self.config.training
        started = time.perf_counter()
        lr = lr_at(
            self.step - self.stage_start,
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
        if self.step % self.config.logging.every_steps == 0 or self.step == self.stage_end:
            stage = {"train/stage": float(self.stage)} if self.whole_config.stages else {}
            self.metrics.log(
                self.step,
                {
                    **values,
                    "train/lr": lr,
                    "train/grad_norm": grad_norm,
                    "train/tokens_per_s": tokens / elapsed,
                    "train/epoch": self.stream.epoch,
                    **stage,
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
        if self.loader is not None:
            self.loader.close()
        self.metrics.close()
