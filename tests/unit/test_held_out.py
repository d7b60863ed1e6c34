"""Held-out evaluation's pieces that need no model: metric names, forgetting, the held-out policy and its state
across a resume, and the process group ParallelEnv owns."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from keeltune.config import RegularizationConfig, config_from_dict
from keeltune.distributed import ParallelEnv
from keeltune.eval.evaluate import forgetting
from keeltune.eval.names import FORGETTING, PPL, metric, retention_metrics, retention_set
from keeltune.eval.policy import HeldOutPolicy


def test_metric_names_are_built_and_read_by_one_helper() -> None:
    key = metric(retention_set("wiki/2024"), PPL)
    assert key == "retention/wiki/2024/ppl"
    results = {key: 3.0, "retention/code/ppl": 2.0, "val/ppl": 9.0, "retention/code/loss": 1.0}
    assert retention_metrics(results, PPL) == {"wiki/2024": 3.0, "code": 2.0}
    assert forgetting(results, {"retention/code/ppl": 1.6}) == {
        metric(retention_set("code"), FORGETTING): pytest.approx(25.0)
    }


EVALS = [  # (step, results): val/loss improves, then stalls; retention forgets more and more
    (0, {"val/loss": 3.0, "retention/g/loss": 2.0, "retention/g/forgetting_pct": 0.0}),
    (2, {"val/loss": 2.5, "retention/g/loss": 2.05, "retention/g/forgetting_pct": 5.0}),
    (4, {"val/loss": 2.4, "retention/g/loss": 2.2, "retention/g/forgetting_pct": 16.0}),
    (6, {"val/loss": 2.45, "retention/g/loss": 2.3, "retention/g/forgetting_pct": 25.0}),
    (8, {"val/loss": 2.46, "retention/g/loss": 2.4, "retention/g/forgetting_pct": 30.0}),
]
BASELINE = {"val/loss": 3.0, "retention/g/loss": 2.0}
SETTINGS = {
    "early_stopping": {"patience": 2, "min_delta": 0.0},
    "retention_guard": {"max_forgetting_pct": 20.0, "action": "best", "retention_weight": 1.0},
}


def _regularization() -> RegularizationConfig:
    raw = {
        "model": {"path": "."},
        "data": {
            "train": [{"name": "t", "path": "x.jsonl"}],
            "validation": {"name": "v", "path": "v.jsonl"},
            "retention": [{"name": "g", "path": "g.jsonl"}],
        },
        "regularization": SETTINGS,
    }
    return config_from_dict(raw).regularization


def test_the_policy_keeps_the_best_within_the_guard_warns_and_stops_early() -> None:
    policy = HeldOutPolicy(_regularization())
    verdicts = [policy.observe(step, results, BASELINE) for step, results in EVALS]
    assert [v.keep_best for v in verdicts] == [
        True,
        True,
        False,
        False,
        False,
    ]  # step 4 scores worse, 6 and 8 breach the guard
    assert [v.new_best for v in verdicts[:3]] == [True, True, True]
    assert verdicts[2].warning == ""  # 16% is within the guard's 20%
    assert "retention/g/forgetting_pct 25.0% above" in verdicts[3].warning and verdicts[3].stop == ""
    assert verdicts[4].stop.startswith("early stopping: val/loss did not improve")
    assert policy.best_model.step == 2 and policy.exhausted


def test_the_policy_state_survives_a_resume_and_decides_as_the_uninterrupted_run() -> None:
    uninterrupted = HeldOutPolicy(_regularization())
    expected = [uninterrupted.observe(step, results, BASELINE) for step, results in EVALS]
    first = HeldOutPolicy(_regularization())
    for step, results in EVALS[:3]:
        first.observe(step, results, BASELINE)
    resumed = HeldOutPolicy(_regularization())
    resumed.load_state_dict(first.state_dict())
    assert [resumed.observe(step, results, BASELINE) for step, results in EVALS[3:]] == expected[3:]
    assert resumed.state_dict() == uninterrupted.state_dict()
    fresh = HeldOutPolicy(_regularization())
    fresh.load_state_dict({})  # a checkpoint of an older version holds neither part
    assert fresh.state_dict() == HeldOutPolicy(_regularization()).state_dict()


def test_parallel_env_owns_and_destroys_the_one_rank_group_a_backend_asks_for() -> None:
    parallel = ParallelEnv()
    assert not dist.is_initialized()
    parallel.ensure_process_group()  # what ZeRO-3 does with one rank
    assert dist.is_initialized() and dist.get_world_size() == 1
    parallel.ensure_process_group()  # a second call joins the same group
    parallel.close()
    assert not dist.is_initialized()


def test_the_guard_may_watch_forgetting_per_byte() -> None:
    from keeltune.config import RetentionGuardConfig
    from keeltune.eval.policy import forgetting_breaches

    guard = RetentionGuardConfig(max_forgetting_bpb_pct=5.0)
    results = {"retention/g/forgetting_pct": 30.0, "retention/g/forgetting_bpb_pct": 4.0}
    assert forgetting_breaches(results, guard) == {}  # per token it would breach: only bits per byte count
    breaches = forgetting_breaches({**results, "retention/g/forgetting_bpb_pct": 6.0}, guard)
    assert breaches == {
        "retention/g/forgetting_bpb_pct": "retention/g/forgetting_bpb_pct 6.0% above max_forgetting_bpb_pct=5"
    }
