"""Evaluation tasks: bad task files and metrics refused before training, the metrics' definitions, the policy on
task metrics, and batches dealt whole to ranks."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from keeltune.config import ConfigError, config_from_dict
from keeltune.distributed import ParallelEnv
from keeltune.eval.policy import HeldOutPolicy
from keeltune.eval.scoring import (
    check_tasks,
    choice_scores,
    corpus_bleu,
    corpus_chrf,
    exact_match,
    generation_scores,
    sample_stderr,
    token_f1,
)
from keeltune.eval.tasks import _dealt
from tests.conftest import base_config, keeltune, write_config, write_jsonl


def _config(assets: dict, tmp_path: Path, tasks: list[dict], **sections: dict):
    return config_from_dict(base_config(assets, tmp_path / "runs", eval={"tasks": tasks}, **sections))


def _mc(path: Path, **extra: object) -> dict:
    return {"name": "mc", "path": str(path), "kind": "multiple_choice", **extra}


def test_bad_task_files_are_refused_with_file_and_line(assets: dict, tmp_path: Path) -> None:
    good = {"text": "Pick one", "choices": ["a", "bb"], "gold": 1}
    cases = [
        ({"choices": ["a", "bb"], "gold": 0}, r"mc.jsonl:2: missing field 'text'"),
        (
            {**good, "choices": "a or bb"},
            r"mc.jsonl:2: field 'choices' must be a list of at least two non-empty",
        ),
        (
            {**good, "choices": ["a", ""]},
            r"mc.jsonl:2: field 'choices' must be a list of at least two non-empty",
        ),
        ({**good, "gold": 2}, r"mc.jsonl:2: 'gold' = 2 is out of range for 2 choices \(0 to 1\)"),
        ({**good, "gold": "1"}, r"mc.jsonl:2: field 'gold' must be the index of the right choice"),
    ]
    for bad, message in cases:
        path = write_jsonl(tmp_path / "mc.jsonl", [good, bad])
        with pytest.raises(ConfigError, match=message):
            check_tasks(_config(assets, tmp_path, [_mc(path)]))
    (tmp_path / "mc.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match=r"eval.tasks.0 \(mc\): .*mc.jsonl has no items"):
        check_tasks(_config(assets, tmp_path, [_mc(tmp_path / "mc.jsonl")]))
    (tmp_path / "mc.jsonl").write_text('{"text": "x", "choices": ["a", "b"], "gold": 0}\n{"text": \n')
    with pytest.raises(ConfigError, match=r"mc.jsonl:2: not valid JSON"):
        check_tasks(_config(assets, tmp_path, [_mc(tmp_path / "mc.jsonl")]))
    qa = {
        "name": "qa",
        "path": str(write_jsonl(tmp_path / "qa.jsonl", [{"text": "q", "answer": []}])),
        "kind": "generate",
    }
    with pytest.raises(
        ConfigError, match=r"qa.jsonl:1: field 'answer' must be a reference string or a non-empty"
    ):
        check_tasks(_config(assets, tmp_path, [qa]))
    qa["path"] = str(write_jsonl(tmp_path / "qa.jsonl", [{"text": "q", "answer": "a"}]))
    with pytest.raises(
        ConfigError, match=r"eval.tasks.0.metrics: 'blue' is not a generate metric \(known: exact"
    ):
        _config(assets, tmp_path, [{**qa, "metrics": ["blue"]}])
    with pytest.raises(
        ConfigError, match=r"'no_such_module_kt:score': module 'no_such_module_kt' does not import"
    ):
        check_tasks(_config(assets, tmp_path, [{**qa, "metrics": ["no_such_module_kt:score"]}]))
    with pytest.raises(ConfigError, match=r"eval.tasks: names must be unique, \['qa'\] used twice"):
        _config(assets, tmp_path, [qa, qa])
    with pytest.raises(ConfigError, match=r"eval.tasks.0.kind: 'mcq' is not one of"):
        _config(assets, tmp_path, [{**qa, "kind": "mcq"}])


def test_watched_metrics_must_be_reported(assets: dict, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mc.jsonl", [{"text": "Pick", "choices": ["a", "bb"], "gold": 1}])
    stopping = {"early_stopping": {"patience": 2, "metric": "task/mc/f1", "mode": "max"}}
    with pytest.raises(
        ConfigError, match=r"early_stopping.metric: 'task/mc/f1' is not reported by this config"
    ):
        _config(assets, tmp_path, [_mc(path)], regularization=stopping)
    guard = {"retention_guard": {"metric": "task/mc/acc", "max_drop": 0.05}}
    with pytest.raises(
        ConfigError, match=r"retention_guard.metric: 'task/mc/acc' is not a metric of a retention"
    ):
        _config(assets, tmp_path, [_mc(path)], regularization=guard)
    config = _config(assets, tmp_path, [_mc(path, retention=True)], regularization=guard)
    assert config.regularization.retention_guard.metric == "task/mc/acc"
    with pytest.raises(ConfigError, match=r"metric and max_drop: set both"):
        _config(assets, tmp_path, [_mc(path)], regularization={"retention_guard": {"max_drop": 0.05}})


def test_a_bad_task_stops_keeltune_train_before_any_step(assets: dict, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mc.jsonl", [{"text": "Pick", "choices": ["a", "bb"], "gold": 5}])
    cfg = write_config(
        tmp_path / "cfg.yaml", base_config(assets, tmp_path / "runs", eval={"tasks": [_mc(path)]})
    )
    done = keeltune("train", str(cfg), timeout=120)
    assert done.returncode != 0
    assert "mc.jsonl:1: 'gold' = 5 is out of range for 2 choices" in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_generation_metrics() -> None:
    assert exact_match("The  Answer!", ["an answer", "answer"]) == 1.0
    assert exact_match("answers", ["answer"]) == 0.0
    assert token_f1("the cat sat", ["a cat sat down"]) == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    assert token_f1("", [""]) == 1.0 and token_f1("x", ["y"]) == 0.0
    import sacrebleu

    predictions, references = (
        ["the cat sat on the mat", "a dog"],
        [["the cat sat on a mat"], ["a dog barked", "dog"]],
    )
    streams = [["the cat sat on a mat", "a dog barked"], ["the cat sat on a mat", "dog"]]
    assert corpus_bleu(predictions, references) == sacrebleu.corpus_bleu(predictions, streams).score
    assert corpus_chrf(predictions, references) == sacrebleu.corpus_chrf(predictions, streams).score
    scores, rows = generation_scores(
        ["exact_match", "f1", "rouge_l", "bleu"], predictions, references, bootstrap_iters=200
    )
    assert [r["exact_match"] for r in rows] == [1.0, 1.0] and rows[1]["rouge_l"] == pytest.approx(0.8)
    assert scores["bleu"].stderr is not None and scores["bleu"].stderr > 0
    assert "bleu" not in rows[0]  # a corpus metric has no per-item value


def test_a_user_metric_is_imported_by_module_and_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_metrics_kt.py").write_text(
        "def starts_right(prediction, references):\n    return float(prediction[:1] == references[0][:1])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    scores, rows = generation_scores(
        ["my_metrics_kt:starts_right"], ["abc", "xyz", "aaa"], [["a"], ["b"], ["a"]], bootstrap_iters=10
    )
    assert [r["starts_right"] for r in rows] == [1.0, 0.0, 1.0]
    assert scores["starts_right"].value == pytest.approx(2 / 3)
    sys.modules.pop("my_metrics_kt", None)


def test_acc_and_acc_norm_are_lm_evaluation_harness_definitions() -> None:
    # item 0: "b" is likelier in total, "aaaa" per character: acc and acc_norm disagree
    lls = [[-4.0, -3.0], [-1.0, -5.0], [-2.0, -2.0]]
    choices = [["aaaa", "b"], ["x", "yy"], ["p", "q"]]
    scores, rows = choice_scores(lls, choices, [0, 0, 1])
    assert [r["acc"] for r in rows] == [0.0, 1.0, 0.0]  # ties go to the first choice (numpy's argmax)
    assert [r["acc_norm"] for r in rows] == [1.0, 1.0, 0.0]
    values = [0.0, 1.0, 0.0]
    assert scores["acc"].value == pytest.approx(1 / 3)
    assert scores["acc"].stderr == pytest.approx(np.std(values, ddof=1) / math.sqrt(3))
    assert sample_stderr([1.0]) is None


def test_early_stopping_and_the_guard_watch_any_metric_in_its_mode(assets: dict, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mc.jsonl", [{"text": "Pick", "choices": ["a", "bb"], "gold": 1}])
    config = _config(
        assets,
        tmp_path,
        [_mc(path, retention=True), {"name": "qa", "path": str(path), "kind": "multiple_choice"}],
        regularization={
            "early_stopping": {"patience": 2, "metric": "task/qa/acc", "mode": "max"},
            "retention_guard": {"metric": "task/mc/acc", "mode": "max", "max_drop": 0.1, "action": "stop"},
        },
    )
    policy = HeldOutPolicy(config.regularization)
    verdicts = [
        policy.observe(step, {"task/qa/acc": acc, "task/mc/acc": 0.5, "task/mc/acc_change": change}, {})
        for step, acc, change in [(0, 0.3, 0.0), (1, 0.4, -0.05), (2, 0.35, -0.1)]
    ]
    assert [v.new_best for v in verdicts] == [True, True, False] and not any(v.stop for v in verdicts)
    breach = policy.observe(3, {"task/qa/acc": 0.45, "task/mc/acc": 0.38, "task/mc/acc_change": -0.12}, {})
    assert breach.stop.startswith("retention guard: task/mc/acc worse by 0.12 since step 0 (now 0.38)")
    policy = HeldOutPolicy(config.regularization)
    for step, acc in enumerate([0.5, 0.4, 0.45]):
        verdict = policy.observe(step, {"task/qa/acc": acc}, {})
    assert (
        verdict.stop.startswith("early stopping: task/qa/acc did not improve")
        and "best 0.5 at step 0" in verdict.stop
    )


def test_batches_are_dealt_whole_and_every_rank_makes_the_same_number_of_calls() -> None:
    order = list(range(7))
    for world in (1, 2, 3):
        dealt = {
            rank: _dealt(order, 2, ParallelEnv(rank=rank, world_size=world, local_rank=rank))
            for rank in range(world)
        }
        assert len({len(batches) for batches in dealt.values()}) == 1
        counted = sorted(tuple(b) for batches in dealt.values() for b, used in batches if used)
        assert counted == [(0, 1), (2, 3), (4, 5), (6,)]


def test_generation_stops_at_a_stop_string_and_cuts_it_off(assets: dict, tmp_path: Path) -> None:
    """The tiny random model repeats one token: with its first two generated tokens' text as the stop string,
    each row ends after those two tokens (not at max_new_tokens) and the answer is cut before the stop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from keeltune.config import TaskConfig
    from keeltune.config.schema import TaskGenerationConfig
    from keeltune.eval.tasks import HFTaskModel, generate_ids, prepare_task, run_task

    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    model = HFTaskModel(AutoModelForCausalLM.from_pretrained(assets["model"]).eval(), None)
    path = write_jsonl(tmp_path / "qa.jsonl", [{"text": f"Question {i}:", "answer": "x"} for i in range(3)])

    def generate(stop: list[str]) -> tuple[list[list[int]], list[str]]:
        generation = TaskGenerationConfig(max_new_tokens=6, stop=stop)
        task = TaskConfig(name="qa", path=str(path), kind="generate", generation=generation)
        prepared = prepare_task(task, tokenizer, max_length=64)
        tokens = generate_ids(model, prepared.prompts, task.generation, tokenizer, 2, ParallelEnv())
        result = run_task(model, prepared, tokenizer, ParallelEnv(), batch_size=2, bootstrap_iters=10)
        return tokens, [item["generation"] for item in result.items]

    tokens, texts = generate([])
    assert [len(t) for t in tokens] == [6, 6, 6]  # no stop: every row runs to the limit
    stop = tokenizer.decode(tokens[0][:2])
    assert stop not in tokenizer.decode(tokens[0][:1]) and all(stop in text for text in texts)
    tokens, texts = generate([stop])
    assert [len(t) for t in tokens] == [2, 2, 2] and texts == ["", "", ""], (tokens, texts)
