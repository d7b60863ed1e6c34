"""Probe items' log-likelihoods on any model and world size: every request encoded as task evaluation encodes a
plain-text multiple-choice pair (lm-evaluation-harness's ``_encode_pair``; an empty context is the BOS token, or
EOS without one, as lm-eval's prefix token), batches dealt whole to ranks, exact sums all-reduced."""

from __future__ import annotations

from typing import Any

from keeltune.distributed import ParallelEnv
from keeltune.eval.bias.items import ProbeItem
from keeltune.eval.bias.probes import ProbeSet
from keeltune.eval.tasks import TaskModel, _lm_eval_pair, _loglikelihoods, _pad_id


def probe_loglikelihoods(
    model: TaskModel, items: list[ProbeItem], tokenizer: Any, parallel: ParallelEnv, *, batch_size: int,
    max_length: int,
) -> list[list[float]]:  # fmt: skip
    """``lls[i][j]``: the log-likelihood of ``items[i].requests[j]``'s continuation after its context (each
    sequence keeps its last ``max_length + 1`` tokens); every rank returns all of them."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pairs = []
    for item in items:
        for context, continuation in item.requests:
            context_ids, continuation_ids = _lm_eval_pair(tokenizer, context, continuation)
            context_ids = (bos + context_ids) or [tokenizer.eos_token_id]
            whole = (context_ids + continuation_ids)[-(max_length + 1) :]
            pairs.append((whole[: len(whole) - len(continuation_ids)], continuation_ids))
    lls, _ = _loglikelihoods(model, pairs, None, _pad_id(tokenizer), batch_size, parallel)
    found, start = [], 0
    for item in items:
        found.append(lls[start : start + len(item.requests)].tolist())
        start += len(item.requests)
    return found


def score_probe_sets(
    model: TaskModel, probes: list[ProbeSet], tokenizer: Any, parallel: ParallelEnv, *, batch_size: int,
    max_length: int,
) -> dict[str, list[list[float]]]:  # fmt: skip
    """Every probe's log-likelihoods (probe name -> ``lls[i][j]``) in one pass over all their items."""
    items = [item for probe in probes for item in probe.items]
    lls = probe_loglikelihoods(
        model, items, tokenizer, parallel, batch_size=batch_size, max_length=max_length
    )
    found, start = {}, 0
    for probe in probes:
        found[probe.name] = lls[start : start + len(probe.items)]
        start += len(probe.items)
    return found
