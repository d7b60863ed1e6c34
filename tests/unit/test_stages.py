"""Staged runs' config: what a stage may change, what it inherits, and the errors for what it may not; the
optimizer reset a new stage starts with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from keeltune.config import ConfigError, config_from_dict, load_config, resume_differences
from keeltune.sharding.model import reset_optimizer_state


def staged(**stage_sections: Any) -> dict[str, Any]:
    """Two stages over a plain config: cpt on raw text, sft on instructions."""
    return {
        "model": {"path": "/m"},
        "data": {
            "seq_len": 64,
            "train": [{"name": "task", "path": "/task.jsonl", "format": "instruction"}],
            "retention": [{"name": "general", "path": "/general.jsonl"}],
        },
        "training": {
            "max_steps": 8,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "lr": 1e-3,
            "warmup_steps": 2,
        },
        "stages": [
            {
                "name": "cpt",
                "data": {"train": [{"name": "domain", "path": "/domain.jsonl"}]},
                "training": {"max_steps": 5, "lr": 3e-4},
                **stage_sections,
            },
            {"name": "sft", "regularization": {"kl": {"weight": 0.1}}},
        ],
    }


def test_a_stage_overrides_what_it_names_and_inherits_the_rest() -> None:
    config = config_from_dict(staged())
    cpt, sft = config.stage_views()
    assert [s.name for s in cpt.data.train] == ["domain"] and cpt.training.lr == 3e-4
    assert cpt.training.max_steps == 5 and cpt.training.micro_batch_size == 2  # inherited
    assert cpt.data.retention == sft.data.retention == config.data.retention
    assert [s.name for s in sft.data.train] == ["task"] and sft.training.max_steps == 8
    assert sft.regularization.kl.weight == 0.1 and cpt.regularization.kl.weight == 0.0
    assert config.total_steps == 13
    assert config.stages[0].reset_optimizer and config.stage_view(-1).training == sft.training
    # the whole run's contamination check reads every stage's train sources, each once
    assert [s.name for s in config.whole_run_view().data.train] == ["domain", "task"]
    # a saved (fully resolved) config loads to the same stages
    again = config_from_dict(config.to_dict())
    assert again.stages == config.stages


def test_overrides_reach_into_stages(tmp_path: Path) -> None:
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(staged()))
    config = load_config(path, ["stages.1.training.lr=5e-5", "training.warmup_steps=3"])
    assert config.stages[1].training.lr == 5e-5
    assert config.stages[0].training.warmup_steps == config.stages[1].training.warmup_steps == 3
    assert config.stages[0].training.lr == 3e-4  # its own value stays over the top level's


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        (
            {"model": {"path": "/other"}},
            "stages.0.model: the model and its backend are the same in every stage",
        ),
        ({"sharding": {"backend": "qlora"}}, "stages.0.sharding: the model and its backend are the same"),
        (
            {"training": {"lrr": 1.0}},
            "stages.0.training.lrr: unknown key (did you mean stages.0.training.lr?)",
        ),
        (
            {"training": {"micro_batch_size": 4}},
            "stages.0.training.micro_batch_size: 4 differs from the top level",
        ),
        (
            {"regularization": {"dropout": 0.1}},
            "stages.0.regularization.dropout: 0.1 differs from the top level",
        ),
        ({"data": {"retention": []}}, "stages.0.data.retention: [] differs from the top level"),
        ({"training": {"max_steps": 0}}, "stages.0.training.max_steps: must be >= 1"),
        ({"name": "sft"}, "stages.1.name: 'sft' names two stages"),
        ({"name": "c p t"}, "is not a stage name"),
        ({"reset_optimizer": "yes"}, "stages.0.reset_optimizer: expected bool"),
        (
            {"data": {"train": [{"name": "task", "path": "/other.jsonl"}]}},
            "stages.1.data.train.0: the name 'task' is also used by stages.0.data.train.0 for other data",
        ),
    ],
)
def test_a_stage_that_cannot_work_is_refused_at_config_time(stage: dict[str, Any], expected: str) -> None:
    raw = staged()
    raw["stages"][0].update(stage)
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw)
    assert expected in str(caught.value)


def test_changing_a_stage_before_a_resume_is_a_training_relevant_difference() -> None:
    saved = config_from_dict(staged()).to_dict()
    changed = staged()
    changed["stages"][1]["training"] = {"lr": 5e-5}
    lines = resume_differences(saved, config_from_dict(changed).to_dict())
    assert lines == ["  stages.1.training.lr: 0.001 -> 5e-05"]


def _adam_step(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
    param.grad = grad.clone()
    optimizer.step()


def test_a_reset_optimizer_steps_as_a_new_one() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(5) for _ in range(4)]
    used = torch.nn.Parameter(torch.randn(5))
    optimizer = torch.optim.AdamW([used], lr=0.1)
    for grad in grads[:3]:
        _adam_step(optimizer, used, grad)
    fresh_param = torch.nn.Parameter(used.detach().clone())
    fresh = torch.optim.AdamW([fresh_param], lr=0.1)
    state = optimizer.state[used]
    moments = state["exp_avg"]
    reset_optimizer_state(optimizer)
    assert state["exp_avg"] is moments and not moments.any() and float(state["step"]) == 0  # in place
    _adam_step(optimizer, used, grads[3])
    _adam_step(fresh, fresh_param, grads[3])
    assert torch.equal(used, fresh_param)
    kept = torch.nn.Parameter(used.detach().clone())  # without the reset the step differs: the test can fail
    carried = torch.optim.AdamW([kept], lr=0.1)
    for grad in grads:
        _adam_step(carried, kept, grad)
    assert not torch.equal(kept, used)
