"""Probe items' log-likelihoods on the tiny model equal a direct forward pass of each (prefix, sentence)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


def test_probe_loglikelihoods_equal_a_direct_computation(assets: dict[str, Path]) -> None:
    from keeltune.distributed import ParallelEnv
    from keeltune.eval.bias.items import ProbeItem
    from keeltune.eval.bias.score import probe_loglikelihoods
    from keeltune.eval.tasks import HFTaskModel
    from keeltune.sharding.model import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(assets["model"]))
    model = load_causal_lm(str(assets["model"])).eval()
    items = [
        ProbeItem("p", "gender", (("", "He is a nurse."), ("", "She is a nurse.")), ("stereotype", "anti"), "t:1"),
        ProbeItem("p", "age", (("The old man", " walked."), ("The young man", " walked."), ("A", " b")),
                  ("old", "young", "x"), "t:2"),
    ]  # fmt: skip
    lls = probe_loglikelihoods(
        HFTaskModel(model, None), items, tokenizer, ParallelEnv(), batch_size=2, max_length=64
    )
    assert [len(row) for row in lls] == [2, 3]
    for item, row in zip(items, lls, strict=True):
        for (context, continuation), value in zip(item.requests, row, strict=True):
            prefix = [tokenizer.bos_token_id] + tokenizer.encode(context, add_special_tokens=False)
            target = tokenizer.encode(context + continuation, add_special_tokens=False)[len(prefix) - 1 :]
            ids = torch.tensor([prefix + target])
            with torch.no_grad():
                logprobs = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
            expected = logprobs[len(prefix) - 1 :].gather(-1, torch.tensor(target)[:, None]).sum().item()
            assert value == pytest.approx(expected, abs=1e-4)
