"""The results of a human review: how often reviewers preferred the run (model 0) to each other model.

Definitions (the README quotes them):

- **Win rate** of the run against model j, over the votes on items that pair the two, counted from the run's
  side: ``(wins + 0.5 × ties) / (wins + losses + ties)``; a tie counts half a win. A "both bad" vote says that
  neither answer is acceptable, not which is better: it is left out of the win rate and reported on its own, as
  its share of all votes (``both_bad / votes``). With no win, loss or tie the win rate and its interval are None.
- **95% interval**: percentile bootstrap clustered by item: ``iters`` resamples of the items with replacement,
  each drawn item bringing all its votes (ten reviewers of one item are one item's evidence, not ten independent
  votes); numpy's Generator seeded with ``seed`` anew for every estimate; resamples without a win, loss or tie
  are dropped.
- The same per criterion (the votes' ``criteria``) and per reviewer (their overall choice).
- **Agreement**: for each pair of reviewers who voted on a common item, Cohen's kappa of their overall choices
  (A / B / tie / both_bad; both saw the same sides of an item) over the items both voted on:
  ``(p_o - p_e) / (1 - p_e)``, p_o the raw agreement, p_e the agreement expected from each reviewer's own
  shares of the four choices. When p_e is 1 (both gave one and the same choice throughout) kappa is undefined:
  None.
- **Bradley–Terry** strengths of all models from every vote between any two of them (a tie half a win to each,
  both bad left out), fitted by Hunter's (2004) MM algorithm and scaled to a geometric mean of 1 over the models
  compared. As a prior, every pair of compared models gets one virtual tie, so that a model that won every
  comparison keeps a finite strength (the fit diverges otherwise); a model never compared has strength None.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keeltune.atomic import atomic_path
from keeltune.review.store import CHOICES

__all__ = [
    "Agreement",
    "ReviewResults",
    "Strength",
    "WinRate",
    "plot_results",
    "results_markdown",
    "results_rows",
    "review_results",
]

_OUTCOMES = ("win", "loss", "tie", "both_bad")  # the run's view; index into a tally's counts
_BT_TOLERANCE = 1e-10  # largest change of a log-strength between MM iterations
_BT_MAX_ITERATIONS = 10_000
_BOOTSTRAP_CELLS = 1_000_000  # resampled items drawn at a time (bounds the memory of the bootstrap)

Tally = dict[int, dict[str, np.ndarray]]  # opponent -> item id -> counts of _OUTCOMES


@dataclass(frozen=True)
class WinRate:
    """The run's record against one opponent, in one split (all votes, a criterion or a reviewer)."""

    opponent: str
    wins: int
    losses: int
    ties: int
    both_bad: int
    votes: int
    items: int
    rate: float | None
    low: float | None  # 95% interval
    high: float | None
    both_bad_share: float | None  # both_bad / votes; None without votes


@dataclass(frozen=True)
class Agreement:
    """Two reviewers' agreement on the overall choice over the items both voted on."""

    reviewer_a: str
    reviewer_b: str
    items: int
    raw: float
    kappa: float | None  # None when the expected agreement is 1


@dataclass(frozen=True)
class Strength:
    """A model's Bradley–Terry strength (geometric mean 1); None when it was never compared."""

    model: str
    strength: float | None
    log_strength: float | None
    comparisons: int


@dataclass(frozen=True)
class ReviewResults:
    models: tuple[str, ...]
    items: int
    votes: int
    reviewers: tuple[str, ...]
    vs: tuple[WinRate, ...]  # against each other model, in the order of ``models``
    by_criterion: dict[str, tuple[WinRate, ...]]  # only opponents with votes on the criterion
    by_reviewer: dict[str, tuple[WinRate, ...]]  # only opponents the reviewer voted on
    agreement: tuple[Agreement, ...]
    bradley_terry: tuple[Strength, ...]
    iters: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (None where a value is undefined, never NaN)."""
        return dataclasses.asdict(self)


def _choice(value: str) -> str:
    if value not in CHOICES:
        raise ValueError(f"a vote's choice must be one of {CHOICES}, not {value!r}")
    return value


def _outcome(choice: str, run_side: str) -> int:
    if choice in ("tie", "both_bad"):
        return _OUTCOMES.index(choice)
    return _OUTCOMES.index("win" if choice == run_side else "loss")


def _index_items(models: Sequence[str], items: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    by_id = {}
    for item in items:
        sides = item["models"]
        if not all(0 <= sides[side] < len(models) for side in "AB") or sides["A"] == sides["B"]:
            raise ValueError(f"item {item['id']!r}: sides must be two different models of {len(models)}")
        by_id[item["id"]] = item
    return by_id


def _rate(wins: float, losses: float, ties: float) -> float | None:
    decisive = wins + losses + ties
    return (wins + 0.5 * ties) / decisive if decisive else None


def _bootstrap(counts: np.ndarray, iters: int, seed: int) -> tuple[float | None, float | None]:
    """Percentile 95% interval of the win rate, resampling the rows (items) of ``counts``."""
    rng = np.random.default_rng(seed)
    n = len(counts)
    chunk = max(1, _BOOTSTRAP_CELLS // n)
    sums = np.concatenate(
        [
            counts[rng.integers(0, n, size=(min(chunk, iters - start), n))].sum(axis=1)
            for start in range(0, iters, chunk)
        ]
    )
    decisive = sums[:, :3].sum(axis=1)
    kept = sums[decisive > 0]
    if not len(kept):
        return None, None
    rates = (kept[:, 0] + 0.5 * kept[:, 2]) / kept[:, :3].sum(axis=1)
    low, high = np.percentile(rates, [2.5, 97.5])
    return float(low), float(high)


def _win_rate(opponent: str, per_item: Mapping[str, np.ndarray], iters: int, seed: int) -> WinRate:
    counts = np.array(list(per_item.values()), dtype=np.int64).reshape(-1, len(_OUTCOMES))
    wins, losses, ties, both_bad = (int(x) for x in counts.sum(axis=0))
    votes = wins + losses + ties + both_bad
    rate = _rate(wins, losses, ties)
    low, high = _bootstrap(counts, iters, seed) if rate is not None else (None, None)
    share = both_bad / votes if votes else None
    return WinRate(opponent, wins, losses, ties, both_bad, votes, len(counts), rate, low, high, share)


def _split(models: Sequence[str], tally: Tally, iters: int, seed: int) -> tuple[WinRate, ...]:
    return tuple(_win_rate(models[j], tally[j], iters, seed) for j in sorted(tally))


def _agreement(votes: Sequence[Mapping[str, Any]]) -> tuple[Agreement, ...]:
    choices: dict[str, dict[str, str]] = defaultdict(dict)
    for vote in votes:
        choices[vote["reviewer"]][vote["item"]] = vote["choice"]
    found = []
    for a, b in itertools.combinations(sorted(choices), 2):
        common = choices[a].keys() & choices[b].keys()
        if not common:
            continue
        n = len(common)
        agree = sum(choices[a][item] == choices[b][item] for item in common)
        count_a = Counter(choices[a][item] for item in common)
        count_b = Counter(choices[b][item] for item in common)
        expected = sum(count_a[c] * count_b[c] for c in CHOICES)  # p_e × n², exact
        kappa = None if expected == n * n else (agree * n - expected) / (n * n - expected)
        found.append(Agreement(a, b, n, agree / n, kappa))
    return tuple(found)


def _bradley_terry(models: Sequence[str], won: np.ndarray) -> tuple[Strength, ...]:
    """``won[i, j]``: i's wins over j (ties half). MM iterations p_i ← W_i / Σ_j N_ij / (p_i + p_j)."""
    comparisons = (won + won.T).sum(axis=1)
    seen = np.flatnonzero(comparisons > 0)
    log_p = np.full(len(models), np.nan)
    if len(seen):
        w = won[np.ix_(seen, seen)] + 0.5  # the prior: one virtual tie against every other compared model
        np.fill_diagonal(w, 0.0)
        games, total = w + w.T, w.sum(axis=1)
        p = np.ones(len(seen))
        for _ in range(_BT_MAX_ITERATIONS):
            new = total / (games / (p[:, None] + p[None, :])).sum(axis=1)
            new /= np.exp(np.log(new).mean())
            change = np.max(np.abs(np.log(new / p)))
            p = new
            if change < _BT_TOLERANCE:
                break
        log_p[seen] = np.log(p)
    return tuple(
        Strength(model, None, None, 0)
        if not comparisons[i]
        else Strength(model, math.exp(log_p[i]), float(log_p[i]), int(round(comparisons[i])))
        for i, model in enumerate(models)
    )


def review_results(
    models: Sequence[str],
    items: Sequence[Mapping[str, Any]],
    votes: Sequence[Mapping[str, Any]],
    *,
    iters: int = 2000,
    seed: int = 0,
) -> ReviewResults:
    """Win rates of ``models[0]`` (overall, per criterion, per reviewer), reviewer agreement and Bradley–Terry
    strengths, as the module docstring defines them. Raises ValueError on an unknown item or choice."""
    if iters < 1:
        raise ValueError("iters must be at least 1")
    by_id = _index_items(models, items)

    def tally() -> Tally:
        return defaultdict(lambda: defaultdict(lambda: np.zeros(len(_OUTCOMES), dtype=np.int64)))

    overall, criteria, reviewers = tally(), defaultdict(tally), defaultdict(tally)
    won = np.zeros((len(models), len(models)))
    for vote in votes:
        if vote["item"] not in by_id:
            raise ValueError(f"vote {vote.get('vote_id')!r} is on an unknown item {vote['item']!r}")
        item_id, sides, choice = vote["item"], by_id[vote["item"]]["models"], _choice(vote["choice"])
        a, b = sides["A"], sides["B"]
        if choice in ("A", "B"):
            won[(a, b) if choice == "A" else (b, a)] += 1
        elif choice == "tie":
            won[a, b] += 0.5
            won[b, a] += 0.5
        marks = {name: _choice(value) for name, value in (vote.get("criteria") or {}).items()}
        if 0 not in (a, b):
            continue
        run_side, opponent = ("A", b) if a == 0 else ("B", a)
        overall[opponent][item_id][_outcome(choice, run_side)] += 1
        reviewers[vote["reviewer"]][opponent][item_id][_outcome(choice, run_side)] += 1
        for name, value in marks.items():
            criteria[name][opponent][item_id][_outcome(value, run_side)] += 1
    return ReviewResults(
        models=tuple(models),
        items=len(items),
        votes=len(votes),
        reviewers=tuple(sorted({vote["reviewer"] for vote in votes})),
        vs=tuple(_win_rate(models[j], overall.get(j, {}), iters, seed) for j in range(1, len(models))),
        by_criterion={name: _split(models, criteria[name], iters, seed) for name in sorted(criteria)},
        by_reviewer={name: _split(models, reviewers[name], iters, seed) for name in sorted(reviewers)},
        agreement=_agreement(votes),
        bradley_terry=_bradley_terry(models, won),
        iters=iters,
        seed=seed,
    )


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|")


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _interval(rate: WinRate) -> str:
    return "—" if rate.low is None else f"[{_num(rate.low)}, {_num(rate.high)}]"


def _win_rate_table(split: str, groups: Mapping[str, Sequence[WinRate]]) -> list[str]:
    """A table of win rates, with a first column naming the group (criterion, reviewer) when ``split``."""
    lead = f"| {split} " if split else ""
    lines = [
        f"{lead}| opponent | win rate | 95% interval | wins | losses | ties | both bad | both-bad share | votes "
        "| items |",
        "|---" * (10 + bool(split)) + "|",
    ]
    for group, rates in groups.items():
        first = f"| {_cell(group)} " if split else ""
        lines += [
            f"{first}| {_cell(r.opponent)} | {_num(r.rate)} | {_interval(r)} | {r.wins} "
            f"| {r.losses} | {r.ties} | {r.both_bad} | {_num(r.both_bad_share)} | {r.votes} | {r.items} |"
            for r in rates
        ]
    return lines


def results_markdown(results: ReviewResults, *, name: str) -> str:
    """A markdown summary of ``results`` for the review called ``name``."""
    run = _cell(results.models[0])
    lines = [
        f"# Human review: {_cell(name)}",
        "",
        f"{results.items} items, {results.votes} votes, {len(results.reviewers)} reviewers. "
        f"Models: {', '.join(f'`{_cell(m)}`' for m in results.models)} (the first is the run under review).",
        "",
        f"**Win rate** of `{run}` = (wins + 0.5 × ties) / (wins + losses + ties): a tie counts half a win. "
        '"Both bad" votes are left out of the win rate and reported as their share of all votes. '
        f"95% interval: percentile bootstrap over items ({results.iters} resamples, seed {results.seed}), "
        "each drawn item bringing all its votes. — : no win, loss or tie.",
        "",
        f"## Win rate of `{run}` against each model",
        "",
        *_win_rate_table("", {"": results.vs}),
    ]
    if results.by_criterion:
        lines += ["", "## Per criterion", "", *_win_rate_table("criterion", results.by_criterion)]
    if results.by_reviewer:
        lines += ["", "## Per reviewer", "", *_win_rate_table("reviewer", results.by_reviewer)]
    lines += ["", "## Agreement between reviewers", ""]
    if results.agreement:
        lines += [
            "Cohen's kappa of the overall choice (A / B / tie / both bad) over the items both reviewers voted on; "
            "— : undefined, both gave one and the same choice throughout.",
            "",
            "| reviewer | reviewer | items | raw agreement | kappa |",
            "|---|---|---|---|---|",
            *(
                f"| {_cell(a.reviewer_a)} | {_cell(a.reviewer_b)} | {a.items} | {_num(a.raw)} | {_num(a.kappa)} |"
                for a in results.agreement
            ),
        ]
    else:
        lines.append("No two reviewers voted on a common item.")
    if len(results.models) > 2:
        lines += [
            "",
            "## Bradley–Terry strengths",
            "",
            "From every vote between any two models (a tie half a win to each, both bad left out), one virtual tie "
            "per pair of models as a prior; geometric mean 1.",
            "",
            "| model | strength | log strength | comparisons |",
            "|---|---|---|---|",
            *(
                f"| {_cell(s.model)} | {_num(s.strength)} | {_num(s.log_strength)} | {s.comparisons} |"
                for s in results.bradley_terry
            ),
        ]
    return "\n".join(lines) + "\n"


def plot_results(results: ReviewResults, path: Path) -> Path:
    """One PNG: the run's win rates with 95% intervals per opponent and per criterion, and (more than two
    models) the Bradley–Terry log-strengths. Written atomically; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    bars = [(f"vs {r.opponent}", r) for r in results.vs] + [
        (f"{name}: vs {r.opponent}", r) for name, rates in results.by_criterion.items() for r in rates
    ]
    bars = [(label, r) for label, r in bars if r.rate is not None]
    strengths = (
        [s for s in results.bradley_terry if s.log_strength is not None] if len(results.models) > 2 else []
    )
    panels = 1 + bool(strengths)
    fig = Figure(figsize=(7 * panels, 1.5 + 0.4 * max(len(bars), len(strengths), 1)), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    y = np.arange(len(bars))
    ax.barh(y, [r.rate for _, r in bars], color="tab:blue")
    ax.hlines(y, [r.low for _, r in bars], [r.high for _, r in bars], color="black")
    ax.plot([r.low for _, r in bars] + [r.high for _, r in bars], list(y) * 2, "|", color="black")
    ax.axvline(0.5, color="grey", linestyle="--")
    ax.set(
        yticks=y,
        yticklabels=[label for label, _ in bars],
        xlim=(0, 1),
        title=f"Win rate of {results.models[0]}",
    )
    ax.set_xlabel("(wins + ties/2) / (wins + losses + ties), 95% bootstrap interval")
    ax.invert_yaxis()
    if strengths:
        ax = axes[1]
        y = np.arange(len(strengths))
        ax.barh(y, [s.log_strength for s in strengths], color="tab:orange")
        ax.axvline(0.0, color="grey")
        ax.set(yticks=y, yticklabels=[s.model for s in strengths], title="Bradley–Terry log-strength")
        ax.invert_yaxis()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def results_rows(
    items: Sequence[Mapping[str, Any]], votes: Sequence[Mapping[str, Any]], models: Sequence[str]
) -> list[dict[str, str]]:
    """One flat row per vote (for a W&B Table)."""
    by_id = _index_items(models, items)
    rows = []
    for vote in votes:
        item = by_id[vote["item"]]
        sides, choice = item["models"], _choice(vote["choice"])
        rows.append(
            {
                "item": item["id"],
                "prompt": item["prompt"],
                "answer_a": item["answers"]["A"],
                "answer_b": item["answers"]["B"],
                "model_a": models[sides["A"]],
                "model_b": models[sides["B"]],
                "reviewer": vote["reviewer"],
                "choice": choice,
                "winner": models[sides[choice]] if choice in ("A", "B") else choice.replace("_", " "),
                "criteria": json.dumps(vote.get("criteria") or {}, sort_keys=True, ensure_ascii=False),
                "comment": vote.get("comment", ""),
            }
        )
    return rows
