"""Task metrics from per-item outcomes, with standard errors as lm-evaluation-harness computes them (no torch):
per-item metrics are means with the sample standard error; corpus metrics (bleu, chrf, perplexity) get a
bootstrap standard error. Generation metrics come from sacrebleu and rouge-score, not re-implementations."""

from __future__ import annotations

import collections
import importlib
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from keeltune.config import Config, ConfigError, TaskConfig
from keeltune.data_pipeline.task_items import load_task_items

ItemMetric = Callable[[str, Sequence[str]], float]


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_NO_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference."""
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD's token F1 of the normalised words, the best over the references."""
    best = 0.0
    predicted = normalize_answer(prediction).split()
    for reference in references:
        truth = normalize_answer(reference).split()
        common = sum((collections.Counter(predicted) & collections.Counter(truth)).values())
        if not predicted or not truth:
            best = max(best, float(predicted == truth))
        elif common:
            precision, recall = common / len(predicted), common / len(truth)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (rouge-score), the best over the references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return max(scorer.score(reference, prediction)["rougeL"].fmeasure for reference in references)


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str]]:
    """sacrebleu's reference streams; items with fewer references repeat their first (no effect on the score)."""
    width = max(len(r) for r in references)
    return [[r[k] if k < len(r) else r[0] for r in references] for k in range(width)]


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), _reference_streams(references)).score)


def corpus_chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(predictions), _reference_streams(references)).score)


ITEM_METRICS: dict[str, ItemMetric] = {"exact_match": exact_match, "f1": token_f1, "rouge_l": rouge_l}
CORPUS_METRICS = {"bleu": corpus_bleu, "chrf": corpus_chrf}


def user_metric(name: str, key: str = "metrics") -> ItemMetric:
    """The function ``module:function`` names; a clear error when it does not import."""
    module_name, _, function = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any error while importing user code
        raise ConfigError(f"{key}: {name!r}: module {module_name!r} does not import ({err})") from None
    found = getattr(module, function, None)
    if not callable(found):
        raise ConfigError(f"{key}: {name!r}: {module_name} has no function {function!r}")
    return found


def sample_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: the sample standard deviation over sqrt(n); None for fewer than 2 items."""
    if len(values) < 2:
        return None
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) / math.sqrt(len(values)))


def bootstrap_stderr(
    statistic: Callable[[np.ndarray], float], count: int, iterations: int, seed: int = 1234
) -> float | None:
    """The standard deviation of ``statistic(indices)`` over resamples of the items with replacement."""
    if count < 2:
        return None
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, count, size=count)) for _ in range(iterations)]
    return float(np.std(values, ddof=1))


@dataclass(frozen=True)
class Score:
    value: float
    stderr: float | None


def generation_scores(
    metrics: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    bootstrap_iters: int,
) -> tuple[dict[str, Score], list[dict[str, float]]]:
    """Each metric over the items, and each item's own scores (per-item metrics only)."""
    scores: dict[str, Score] = {}
    per_item: list[dict[str, float]] = [{} for _ in predictions]
    for name in metrics:
        label = name.rsplit(":", 1)[-1]
        if name in CORPUS_METRICS:
            corpus = CORPUS_METRICS[name]
            value = corpus(predictions, references)

            def resampled(rows: np.ndarray, corpus: Callable = corpus) -> float:
                return corpus([predictions[i] for i in rows], [references[i] for i in rows])

            scores[label] = Score(value, bootstrap_stderr(resampled, len(predictions), bootstrap_iters))
            continue
        function = ITEM_METRICS.get(name) or user_metric(name)
        values = [float(function(p, r)) for p, r in zip(predictions, references, strict=True)]
        for row, value in zip(per_item, values, strict=True):
            row[label] = value
        scores[label] = Score(float(np.mean(values)), sample_stderr(values))
    return scores, per_item


def choice_scores(
    loglikelihoods: Sequence[Sequence[float]], choices: Sequence[Sequence[str]], golds: Sequence[int]
) -> tuple[dict[str, Score], list[dict[str, float]]]:
    """``acc`` and ``acc_norm`` exactly as lm-evaluation-harness defines them: the argmax of the choices'
    log-likelihoods, and of the log-likelihoods divided by each choice's length in characters."""
    per_item = []
    for lls, options, gold in zip(loglikelihoods, choices, golds, strict=True):
        values = np.asarray(lls, dtype=np.float64)
        lengths = np.asarray([float(len(option)) for option in options])
        per_item.append(
            {"acc": float(np.argmax(values) == gold), "acc_norm": float(np.argmax(values / lengths) == gold)}
        )
    scores = {}
    for name in ("acc", "acc_norm"):
        values = [row[name] for row in per_item]
        scores[name] = Score(float(np.mean(values)), sample_stderr(values))
    return scores, per_item


def likelihood_scores(
    nll: Sequence[float], tokens: Sequence[int], *, bootstrap_iters: int
) -> tuple[dict[str, Score], list[dict[str, float]]]:
    """Loss per token over the whole set and its perplexity, with bootstrap standard errors over the items."""
    nll_array, token_array = np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)

    def loss(rows: np.ndarray) -> float:
        return float(nll_array[rows].sum() / max(token_array[rows].sum(), 1.0))

    def ppl(rows: np.ndarray) -> float:
        return math.exp(min(loss(rows), 50.0))

    everything = np.arange(len(nll_array))
    scores = {
        "loss": Score(loss(everything), bootstrap_stderr(loss, len(nll_array), bootstrap_iters)),
        "ppl": Score(ppl(everything), bootstrap_stderr(ppl, len(nll_array), bootstrap_iters)),
    }
    per_item = [{"loss": float(n / max(t, 1.0))} for n, t in zip(nll_array, token_array, strict=True)]
    return scores, per_item


def check_task(task: TaskConfig, key: str) -> int:
    """Read and check a task's items and import its user metrics (before any training or queue wait);
    returns the number of items."""
    items = load_task_items(task, key)
    for name in task.metrics:
        if ":" in name:
            user_metric(name, f"{key} ({task.name}).metrics")
    return len(items)


def check_tasks(config: Config) -> dict[str, int]:
    """Every task of ``config`` checked: name -> item count."""
    return {task.name: check_task(task, f"eval.tasks.{i}") for i, task in enumerate(config.eval.tasks)}
