"""Task evaluation on any number of ranks: generation, multiple choice and log-likelihood.

Every task's work (multiple choice: one request per choice) is sorted globally by length, cut into batches of
``eval.task_batch_size`` and batch ``b`` goes to rank ``b mod world``, so a batch holds the same rows on any
world size: generations, counts and log-likelihoods are bit-identical on 1, 2 or 3 ranks. Results land in
slots of a tensor with one contributor each, all-reduced (exact), and every rank scores the same totals.
Every rank makes the same number of model calls (a rank without a batch repeats one and drops it), as
ZeRO-3 needs: its ranks generate in lockstep."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from keeltune.config import TaskConfig, TaskGenerationConfig
from keeltune.config.schema import DEFAULT_METRICS
from keeltune.data_pipeline.formats import encode_record, prompt_ids
from keeltune.data_pipeline.task_items import TaskItem, load_task_items
from keeltune.distributed import ParallelEnv
from keeltune.eval.names import STDERR, task_metric
from keeltune.eval.scoring import Score, choice_scores, generation_scores, likelihood_scores


class TaskModel(Protocol):
    """What task evaluation needs of a model: a backend, or a plain transformers model (``HFTaskModel``)."""

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def generate(self, input_ids: torch.Tensor, **options: Any) -> torch.Tensor: ...


@dataclass
class PreparedTask:
    """A task's items as token ids, ready for any model with this tokenizer."""

    task: TaskConfig
    items: list[TaskItem]
    prompts: list[list[int]]  # generate: each item's prompt
    requests: list[tuple[int, list[int], list[int]]] = field(
        default_factory=list
    )  # (item, context, continuation)
    documents: list[tuple[list[int], list[int]]] = field(
        default_factory=list
    )  # loglikelihood: (ids, loss mask)


def _lm_eval_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's ``_encode_pair``: trailing spaces of the context move to the continuation, the
    whole is encoded and split at the context's length."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids) :]


def prepare_task(
    task: TaskConfig, tokenizer: Any, *, max_length: int, excluded: frozenset[int] = frozenset()
) -> PreparedTask:
    """Load and tokenize ``task`` (items in ``excluded`` are left out); sequences keep their last
    ``max_length`` tokens, generation prompts leave room for the answer."""
    items = [item for item in load_task_items(task) if item.index not in excluded]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prepared = PreparedTask(task, items, [])
    for item in items:
        where = f"{task.path}:{item.line}"
        if task.kind == "loglikelihood":
            document = encode_record(item.record, task.format, task.fields, tokenizer, where)
            prepared.documents.append(
                (list(document.ids)[: max_length + 1], list(document.loss_mask)[: max_length + 1])
            )
            continue
        if task.kind == "generate":
            room = max(1, max_length - task.generation.max_new_tokens)
            prepared.prompts.append(
                prompt_ids(item.record, task.format, task.fields, tokenizer, where)[-room:]
            )
            continue
        for choice in item.choices:
            continuation = task.delimiter + choice
            if task.format == "text":  # as lm-eval encodes a plain context
                context_ids, choice_ids = _lm_eval_pair(
                    tokenizer, item.record[task.fields.text], continuation
                )
                context_ids = (bos + context_ids) or [tokenizer.eos_token_id]  # as lm-eval: never empty
            else:  # rendered like training: the prompt, then the answer encoded on its own
                context_ids = prompt_ids(item.record, task.format, task.fields, tokenizer, where)
                choice_ids = tokenizer.encode(continuation, add_special_tokens=False)
            whole = (context_ids + choice_ids)[-(max_length + 1) :]
            prepared.requests.append((item.index, whole[: len(whole) - len(choice_ids)], choice_ids))
    return prepared


def _dealt(order: Sequence[int], batch_size: int, parallel: ParallelEnv) -> list[tuple[list[int], bool]]:
    """This rank's batches of ``order`` (b mod world), each with whether it counts; every rank gets the same
    number (a rank short of one repeats the first batch, which does not count)."""
    batches = [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    rounds = -(-len(batches) // parallel.world_size)
    dealt = []
    for index in range(parallel.rank, rounds * parallel.world_size, parallel.world_size):
        dealt.append((batches[index], True) if index < len(batches) else (batches[0], False))
    return dealt


def _by_length(lengths: Sequence[int]) -> list[int]:
    """Positions sorted longest first (ties in file order): lm-eval's order, and padding stays small."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def _padded(
    rows: list[list[int]], pad_id: int, *, left: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[r, span] = torch.tensor(row, dtype=torch.long)
        mask[r, span] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def _loglikelihoods(
    model: TaskModel, sequences: list[tuple[list[int], list[int]]], weights: list[list[int]] | None,
    pad_id: int, batch_size: int, parallel: ParallelEnv,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Summed log-probability of each (context, continuation)'s continuation tokens (with ``weights``: only
    where the weight is 1) and whether the continuation is the greedy one; float64 sums of float32 terms."""
    sums = torch.zeros(2, len(sequences), dtype=torch.float64, device=parallel.device)
    order = _by_length([len(c) + len(x) for c, x in sequences])
    for batch, counted in _dealt(order, batch_size, parallel):
        rows = [(sequences[i][0] + sequences[i][1])[:-1] for i in batch]
        ids, _ = _padded(rows, pad_id, left=False, device=parallel.device)
        logprobs = F.log_softmax(model.logits(ids).float(), dim=-1)
        if not counted:
            continue
        for r, i in enumerate(batch):
            context, continuation = sequences[i]
            span = slice(len(context) - 1, len(context) - 1 + len(continuation))
            targets = torch.tensor(continuation, dtype=torch.long, device=parallel.device)
            picked = logprobs[r, span].gather(-1, targets[:, None]).squeeze(-1)
            if weights is not None:
                picked = picked * torch.tensor(weights[i], dtype=picked.dtype, device=parallel.device)
            sums[0, i] = picked.double().sum()
            sums[1, i] = float(bool((logprobs[r, span].argmax(-1) == targets).all()))
    parallel.all_reduce_sum(sums)
    return sums[0].cpu().numpy(), sums[1].cpu().numpy()


class _StopStrings:
    """Ends a row once its new text contains a stop string (transformers' per-row stopping criterion). Only the
    last few generated tokens are decoded at each step, as lm-evaluation-harness does: a stop string is found
    at the step that completes it, and rows that stopped stay stopped."""

    def __init__(self, tokenizer: Any, stops: list[str], prompt_width: int) -> None:
        self.tokenizer, self.stops, self.prompt_width = tokenizer, stops, prompt_width
        self.window = max(len(tokenizer.encode(s, add_special_tokens=False)) for s in stops) + 2

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        tail = input_ids[:, max(self.prompt_width, input_ids.shape[1] - self.window) :]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


@torch.no_grad()
def generate_ids(
    model: TaskModel, prompts: list[list[int]], settings: TaskGenerationConfig, tokenizer: Any,
    batch_size: int, parallel: ParallelEnv,
) -> list[list[int]]:  # fmt: skip
    """Each prompt's generated tokens (up to EOS), batched with left padding and the KV cache; every rank
    returns all of them."""
    from transformers import StoppingCriteriaList

    pad_id = _pad_id(tokenizer)
    slots = torch.zeros(len(prompts), settings.max_new_tokens, dtype=torch.long, device=parallel.device)
    devices = [parallel.device.index or 0] if parallel.device.type == "cuda" else []
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
    for batch, counted in _dealt(_by_length([len(p) for p in prompts]), batch_size, parallel):
        ids, mask = _padded([prompts[i] for i in batch], pad_id, left=True, device=parallel.device)
        stops = StoppingCriteriaList(
            [_StopStrings(tokenizer, settings.stop, ids.shape[1])] if settings.stop else []
        )
        with torch.random.fork_rng(devices=devices):  # training's random state is left as it was
            torch.manual_seed(settings.seed + batch[0])  # the batch's first item: the same on any world size
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=settings.max_new_tokens,  # the model's own end tokens (all of them) end a row
                pad_token_id=pad_id,
                stopping_criteria=stops,
                **(sampling if settings.temperature > 0 else {"do_sample": False}),
            )
        if not counted:
            continue
        new = out[:, ids.shape[1] :]
        for r, i in enumerate(batch):
            tokens = new[r].tolist()
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
            slots[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=slots.device) + 1
    parallel.all_reduce_sum(slots)
    return [[t - 1 for t in row if t > 0] for row in slots.tolist()]


def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to the first of ``stops``."""
    cut = min((text.index(s) for s in stops if s in text), default=len(text))
    return text[:cut]


@dataclass
class TaskResult:
    """A task's metrics (``task/<task>/<metric>`` and ``..._stderr``) and one record per item."""

    metrics: dict[str, float]
    items: list[dict[str, Any]]


def _named(task: TaskConfig, scores: dict[str, Score]) -> dict[str, float]:
    metrics = {}
    for name, score in scores.items():
        metrics[task_metric(task.name, name)] = score.value
        if score.stderr is not None:
            metrics[task_metric(task.name, name) + STDERR] = score.stderr
    return metrics


def run_task(
    model: TaskModel, prepared: PreparedTask, tokenizer: Any, parallel: ParallelEnv, *, batch_size: int,
    bootstrap_iters: int,
) -> TaskResult:  # fmt: skip
    """Evaluate one prepared task on this rank's share; every rank returns the same result."""
    task, items = prepared.task, prepared.items
    pad_id = _pad_id(tokenizer)
    if task.kind == "multiple_choice":
        pairs = [(context, continuation) for _, context, continuation in prepared.requests]
        lls, greedy = _loglikelihoods(model, pairs, None, pad_id, batch_size, parallel)
        per_item_lls: list[list[float]] = [[] for _ in items]
        position = {item.index: k for k, item in enumerate(items)}
        for (index, _, _), value in zip(prepared.requests, lls.tolist(), strict=True):
            per_item_lls[position[index]].append(value)
        scores, rows = choice_scores(per_item_lls, [i.choices for i in items], [i.gold for i in items])
        records = [
            {"index": i.index, "gold": i.gold, "loglikelihoods": lls_, "choices": list(i.choices), **row}
            for i, lls_, row in zip(items, per_item_lls, rows, strict=True)
        ]
        return TaskResult(_named(task, scores), records)
    if task.kind == "loglikelihood":
        pairs = [([ids[0]], ids[1:]) for ids, _ in prepared.documents]
        weights = [mask[1:] for _, mask in prepared.documents]
        lls, _ = _loglikelihoods(model, pairs, weights, pad_id, batch_size, parallel)
        tokens = [int(sum(w)) for w in weights]
        scores, rows = likelihood_scores((-lls).tolist(), tokens, bootstrap_iters=bootstrap_iters)
        records = [
            {"index": i.index, "tokens": t, "nll": -float(v), **row}
            for i, t, v, row in zip(items, tokens, lls.tolist(), rows, strict=True)
        ]
        return TaskResult(_named(task, scores), records)
    generated = generate_ids(model, prepared.prompts, task.generation, tokenizer, batch_size, parallel)
    texts = [
        cut_at_stop(tokenizer.decode(t, skip_special_tokens=True), task.generation.stop) for t in generated
    ]
    predictions = [t.strip() for t in texts]
    references = [list(i.references) for i in items]
    metrics = task.metrics or DEFAULT_METRICS["generate"]
    scores, rows = generation_scores(metrics, predictions, references, bootstrap_iters=bootstrap_iters)
    records = [
        {"index": i.index, "prompt": tokenizer.decode(p), "generation": text, "references": refs, **row}
        for i, p, text, refs, row in zip(items, prepared.prompts, texts, references, rows, strict=True)
    ]
    return TaskResult(_named(task, scores), records)


class HFTaskModel:
    """A transformers model as a ``TaskModel`` (``keeltune eval`` on a folder), with bf16 autocast where asked."""

    def __init__(self, model: Any, amp_dtype: torch.dtype | None) -> None:
        self.model, self.amp_dtype = model, amp_dtype

    def _autocast(self) -> Any:
        device = next(self.model.parameters()).device
        return torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model(input_ids=input_ids, use_cache=False).logits.float()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **options: Any) -> torch.Tensor:
        with self._autocast():
            return self.model.generate(input_ids=input_ids, **options)
