"""keeltune.review.results: win rates with item-clustered bootstrap intervals, reviewer agreement, Bradley–Terry."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from keeltune.review.results import (
    ReviewResults,
    WinRate,
    plot_results,
    results_markdown,
    results_rows,
    review_results,
)

MODELS = ["run", "base", "other"]


def _item(item_id: str, a: int, b: int) -> dict[str, Any]:
    return {
        "id": item_id,
        "prompt": f"prompt {item_id}",
        "answers": {"A": f"{item_id} answer A", "B": f"{item_id} answer B"},
        "models": {"A": a, "B": b},
    }


def _vote(reviewer: str, item: str, choice: str, criteria: dict[str, str] | None = None) -> dict[str, Any]:
    vote = {
        "vote_id": f"{reviewer}-{item}",
        "reviewer": reviewer,
        "item": item,
        "choice": choice,
        "comment": "",
    }
    if criteria is not None:
        vote["criteria"] = criteria
    return vote


# i1: run on A; i2: run on B (sides swapped); i3: run vs other; i4: no run (only Bradley–Terry sees it)
ITEMS = [_item("i1", 0, 1), _item("i2", 1, 0), _item("i3", 0, 2), _item("i4", 2, 1)]
VOTES = [
    _vote("r1", "i1", "A", {"accuracy": "A", "style": "B"}),  # win
    _vote("r2", "i1", "B", {"accuracy": "tie"}),  # loss
    _vote("r1", "i2", "B", {"accuracy": "A"}),  # win (run is B); accuracy: loss
    _vote("r2", "i2", "tie"),  # tie
    _vote("r3", "i2", "both_bad", {}),  # both bad
    _vote("r1", "i3", "B", {"style": "A"}),  # loss against other; style: win
    _vote("r1", "i4", "A"),  # other beats base
]


def _counts(rate: WinRate) -> tuple[int, int, int, int, int, int]:
    return rate.wins, rate.losses, rate.ties, rate.both_bad, rate.votes, rate.items


def _width(rate: WinRate) -> float:
    assert rate.low is not None and rate.high is not None
    return rate.high - rate.low


def _one_vote_per_item(outcomes: list[str], reviewers: int = 1) -> tuple[list[dict], list[dict]]:
    """An item run-vs-base per outcome ("win"/"loss"/"tie"), run on alternating sides, voted by ``reviewers``."""
    items, votes = [], []
    for k, outcome in enumerate(outcomes):
        run_side = "AB"[k % 2]
        items.append(_item(f"i{k}", *((0, 1) if run_side == "A" else (1, 0))))
        choice = {"win": run_side, "loss": "B" if run_side == "A" else "A", "tie": "tie"}[outcome]
        votes += [_vote(f"r{r}", f"i{k}", choice) for r in range(reviewers)]
    return items, votes


def test_win_rate_counts_from_the_runs_side_with_sides_swapped() -> None:
    results = review_results(MODELS, ITEMS, VOTES, iters=200)
    vs_base, vs_other = results.vs
    assert (vs_base.opponent, vs_other.opponent) == ("base", "other")
    assert _counts(vs_base) == (2, 1, 1, 1, 5, 2)
    assert vs_base.rate == pytest.approx((2 + 0.5 * 1) / (2 + 1 + 1))  # ties half, both bad out
    assert vs_base.both_bad_share == pytest.approx(1 / 5)
    assert _counts(vs_other) == (0, 1, 0, 0, 1, 1)
    assert (vs_other.rate, vs_other.low, vs_other.high) == (0.0, 0.0, 0.0)
    assert (results.items, results.votes, results.reviewers) == (4, 7, ("r1", "r2", "r3"))


def test_no_decisive_vote_gives_none_not_nan() -> None:
    models = ["run", "base", "never"]
    results = review_results(models, [_item("i1", 1, 0)], [_vote("r1", "i1", "both_bad")], iters=50)
    both_bad, never = results.vs
    assert (both_bad.rate, both_bad.low, both_bad.high, both_bad.both_bad_share) == (None, None, None, 1.0)
    assert (never.votes, never.items, never.rate, never.both_bad_share) == (0, 0, None, None)
    json.dumps(results.to_dict(), allow_nan=False)


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_items() -> None:
    rng = np.random.default_rng(1)
    few = review_results(["run", "base"], *_one_vote_per_item(list(rng.choice(["win", "loss", "tie"], 20))))
    many = review_results(["run", "base"], *_one_vote_per_item(list(rng.choice(["win", "loss", "tie"], 400))))
    for rate in (few.vs[0], many.vs[0]):
        assert rate.low is not None and rate.high is not None and rate.rate is not None
        assert rate.low < rate.rate < rate.high
    assert _width(many.vs[0]) < _width(few.vs[0]) / 2


def test_bootstrap_is_seeded() -> None:
    data = _one_vote_per_item(["win"] * 13 + ["loss"] * 9 + ["tie"] * 5)
    first = review_results(["run", "base"], *data, iters=100, seed=3).vs[0]
    assert review_results(["run", "base"], *data, iters=100, seed=3).vs[0] == first
    seeds = [review_results(["run", "base"], *data, iters=100, seed=s).vs[0] for s in range(6)]
    assert len({(r.low, r.high) for r in seeds}) > 1


def test_bootstrap_is_clustered_by_item() -> None:
    # 40 votes, rate 0.75 both ways: 10 reviewers agreeing on each of 4 items, or one vote on each of 40 items
    clustered = review_results(["run", "base"], *_one_vote_per_item(["win"] * 3 + ["loss"], reviewers=10)).vs[
        0
    ]
    spread = review_results(["run", "base"], *_one_vote_per_item(["win"] * 30 + ["loss"] * 10)).vs[0]
    assert clustered.votes == spread.votes == 40 and clustered.items == 4
    assert clustered.rate == spread.rate == 0.75
    assert _width(clustered) > 1.5 * _width(spread)


def test_per_criterion_and_per_reviewer() -> None:
    results = review_results(MODELS, ITEMS, VOTES, iters=100)
    assert sorted(results.by_criterion) == ["accuracy", "style"]
    (accuracy,) = results.by_criterion["accuracy"]  # i1: A (win), tie; i2: A with the run on B (loss)
    assert (accuracy.opponent, _counts(accuracy)) == ("base", (1, 1, 1, 0, 3, 2))
    assert accuracy.rate == pytest.approx(1.5 / 3)
    style_base, style_other = results.by_criterion["style"]  # i1: B (loss); i3: A (win)
    assert (style_base.opponent, _counts(style_base)) == ("base", (0, 1, 0, 0, 1, 1))
    assert (style_other.opponent, _counts(style_other)) == ("other", (1, 0, 0, 0, 1, 1))
    assert sorted(results.by_reviewer) == ["r1", "r2", "r3"]
    r1_base, r1_other = results.by_reviewer["r1"]  # i4 (no run) is not counted
    assert _counts(r1_base) == (2, 0, 0, 0, 2, 2) and _counts(r1_other) == (0, 1, 0, 0, 1, 1)
    (r2,) = results.by_reviewer["r2"]
    assert _counts(r2) == (0, 1, 1, 0, 2, 2) and r2.rate == pytest.approx(0.25)
    (r3,) = results.by_reviewer["r3"]
    assert (r3.rate, r3.both_bad_share) == (None, 1.0)


def test_cohens_kappa_against_a_hand_computation() -> None:
    first = ["A", "A", "A", "B", "B", "tie", "tie", "both_bad", "A", "B"]
    second = ["A", "A", "B", "B", "tie", "tie", "A", "both_bad", "A", "A"]
    items = [_item(f"i{k}", k % 2, 1 - k % 2) for k in range(12)]
    votes = [_vote("ann", f"i{k}", c) for k, c in enumerate(first)]
    votes += [_vote("bob", f"i{k}", c) for k, c in enumerate(second)]
    votes += [_vote("cyd", "i10", "A"), _vote("dee", "i11", "A")]  # no common item with anyone
    p_o = sum(x == y for x, y in zip(first, second, strict=True)) / 10  # 6/10
    p_e = (4 * 5 + 3 * 2 + 2 * 2 + 1 * 1) / 100  # marginals ann A4 B3 tie2 bb1, bob A5 B2 tie2 bb1
    (agreement,) = review_results(["run", "base"], items, votes, iters=10).agreement
    assert (agreement.reviewer_a, agreement.reviewer_b, agreement.items) == ("ann", "bob", 10)
    assert agreement.raw == pytest.approx(0.6)
    assert agreement.kappa == pytest.approx((p_o - p_e) / (1 - p_e))


def test_kappa_perfect_and_degenerate() -> None:
    items = [_item(f"i{k}", 0, 1) for k in range(4)]
    same = [_vote(r, f"i{k}", c) for r in ("ann", "bob") for k, c in enumerate(["A", "B", "tie", "both_bad"])]
    (perfect,) = review_results(["run", "base"], items, same, iters=10).agreement
    assert (perfect.raw, perfect.kappa) == (1.0, 1.0)
    always_a = [_vote(r, f"i{k}", "A") for r in ("ann", "bob") for k in range(4)]
    (degenerate,) = review_results(["run", "base"], items, always_a, iters=10).agreement
    assert (degenerate.raw, degenerate.kappa) == (1.0, None)


def _bt_votes(strengths: list[float], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``n`` comparisons between random pairs, i beating j with probability s_i / (s_i + s_j)."""
    rng = np.random.default_rng(seed)
    items, votes = [], []
    for k in range(n):
        a, b = rng.choice(len(strengths), size=2, replace=False)
        items.append(_item(f"i{k}", int(a), int(b)))
        votes.append(
            _vote("r", f"i{k}", "A" if rng.random() < strengths[a] / (strengths[a] + strengths[b]) else "B")
        )
    return items, votes


def test_bradley_terry_recovers_known_strengths() -> None:
    truth = np.array([4.0, 2.0, 1.0, 0.5])
    items, votes = _bt_votes(list(truth), 8000, seed=0)
    # both-bad votes with the weakest model on side A: they would lift it if they counted
    items += [_item(f"bad{k}", 3, 0) for k in range(300)]
    votes += [_vote("r", f"bad{k}", "both_bad") for k in range(300)]
    results = review_results(["m0", "m1", "m2", "m3"], items, votes, iters=20)
    fitted = np.array([s.strength for s in results.bradley_terry])
    assert list(np.argsort(-fitted)) == [0, 1, 2, 3]
    assert np.exp(np.log(fitted).mean()) == pytest.approx(1.0)
    assert fitted == pytest.approx(truth / np.exp(np.log(truth).mean()), rel=0.1)
    assert [s.log_strength for s in results.bradley_terry] == pytest.approx(list(np.log(fitted)))
    in_pairs = [sum(i in (it["models"]["A"], it["models"]["B"]) for it in items[:8000]) for i in range(4)]
    assert [s.comparisons for s in results.bradley_terry] == in_pairs


def test_bradley_terry_prior_keeps_an_unbeaten_model_finite() -> None:
    items = [_item("x0", 0, 1), _item("x1", 1, 0), _item("x2", 0, 1), _item("x3", 1, 0)]
    votes = [_vote("r", "x0", "A"), _vote("r", "x1", "B"), _vote("r", "x2", "A"), _vote("r", "x3", "tie")]
    run, base, never = review_results(MODELS, items, votes, iters=10).bradley_terry
    # two models: p_run / p_base = W_run / W_base = (3 + 0.5 + 0.5) / (0 + 0.5 + 0.5), geometric mean 1
    assert run.strength == pytest.approx(math.sqrt(4.0 / 1.0))
    assert base.strength == pytest.approx(1 / math.sqrt(4.0))
    assert (run.comparisons, base.comparisons) == (4, 4)
    assert (never.strength, never.log_strength, never.comparisons) == (None, None, 0)
    sweep_items = [_item(f"s{k}", 0, 1 + k % 2) for k in range(10)] + [_item("s10", 1, 2)]
    sweep_votes = [_vote("r", f"s{k}", "A") for k in range(11)]
    strengths = [s.strength for s in review_results(MODELS, sweep_items, sweep_votes, iters=10).bradley_terry]
    assert all(s is not None and math.isfinite(s) and s > 0 for s in strengths)
    assert strengths[0] > strengths[1] > strengths[2]


def test_markdown_and_plot(tmp_path: Path) -> None:
    results = review_results(MODELS, ITEMS, VOTES, iters=200)
    text = results_markdown(results, name="runs/sft-7")
    vs_base = results.vs[0]
    assert vs_base.low is not None and vs_base.high is not None
    for fragment in (
        "runs/sft-7",
        "(wins + 0.5 × ties) / (wins + losses + ties)",
        f"| base | {vs_base.rate:.3f} | [{vs_base.low:.3f}, {vs_base.high:.3f}] | 2 | 1 | 1 | 1 | 0.200 | 5 | 2 |",
        "| accuracy | base | 0.500 |",
        "| r2 | base | 0.250 |",
        "4 items, 7 votes, 3 reviewers",
        "Bradley–Terry",
        f"| other | {results.bradley_terry[2].strength:.3f} |",
    ):
        assert fragment in text
    two = review_results(["run", "base"], *_one_vote_per_item(["win", "tie"]), iters=10)
    assert "Bradley–Terry" not in results_markdown(two, name="x")
    for res, name in ((results, "three.png"), (two, "two.png")):
        path = plot_results(res, tmp_path / name)
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["three.png", "two.png"]  # no temporary left behind


def test_to_dict_is_json() -> None:
    results = review_results(MODELS, ITEMS, VOTES, iters=50)
    data = json.loads(json.dumps(results.to_dict(), allow_nan=False))
    assert data["vs"][0]["wins"] == 2 and data["by_criterion"]["style"][1]["opponent"] == "other"
    assert data["bradley_terry"][0]["model"] == "run" and data["agreement"][0]["reviewer_a"] == "r1"
    assert isinstance(results, ReviewResults)


def test_rows_one_per_vote() -> None:
    rows = results_rows(ITEMS, VOTES, MODELS)
    assert len(rows) == len(VOTES)
    swapped = rows[2]  # i2: base on A, run on B; chose B
    assert (swapped["model_a"], swapped["model_b"], swapped["winner"]) == ("base", "run", "run")
    assert (swapped["answer_a"], swapped["prompt"]) == ("i2 answer A", "prompt i2")
    assert json.loads(swapped["criteria"]) == {"accuracy": "A"}
    assert [row["winner"] for row in rows[3:5]] == ["tie", "both bad"]
    assert json.loads(rows[3]["criteria"]) == {}


def test_rejects_unknown_item_and_choice() -> None:
    with pytest.raises(ValueError, match="unknown item"):
        review_results(MODELS, ITEMS, [_vote("r", "nope", "A")])
    with pytest.raises(ValueError, match="choice"):
        review_results(MODELS, ITEMS, [_vote("r", "i1", "C")])
    with pytest.raises(ValueError, match="choice"):
        review_results(MODELS, ITEMS, [_vote("r", "i1", "A", {"style": "left"})])
