"""keeltune's CrowS-Pairs scoring (``read_crows_pairs`` + ``probe_loglikelihoods`` + ``score_crows_pairs``)
equals lm-evaluation-harness's own ``crows_pairs_english`` task on the same CSV and model: the token ids of
every request, each sentence's log-likelihood, each row's ``likelihood_diff`` and ``pct_stereotype`` and both
aggregates. lm-eval runs through ``keeltune.eval.harness.run_lm_eval`` (in this process, offline).

The lm-eval task: the installed ``lm_eval/tasks/crows_pairs/crows_pairs_english.yaml`` itself, with only its
name, its tag (dropped) and its data source (the hub set ``jannalu/crows_pairs_multilingual`` -> ``dataset_path:
csv`` with the test's CSV as ``data_files``) changed; ``doc_to_text: ""``, ``target_delimiter: ""``,
``doc_to_choice`` and ``process_results`` are lm-eval's (a ``utils.py`` next to the YAML re-exports lm-eval's
``lm_eval.tasks.crows_pairs.utils`` functions). Both sides read the very same CSV file.

The rows: 40 rows in the exact header of ``data/crows_pairs_anonymized.csv``, built from Python's
``pydoc_data.topics`` text: ``sent_more`` is a run of 2 to 4 of a topic's words within 4 to 7 tokens,
``sent_less`` the same run with one word swapped for a word of another topic (as CrowS-Pairs swaps a group
word), at most 7 tokens.
Some words carry commas and quotes, so the CSV quoting is read alike by Python's ``csv`` (keeltune) and
pandas (``datasets``' csv builder). Stereo/antistereo labels and the nine bias types rotate. The tiny
random-weight Llama of the ``assets`` fixture gives every token about -6.2 nats, so every sentence's
log-likelihood stays above about -50 nats, where lm-eval's float32 sums are good to well within the 1e-5
tolerance (see ``test_lm_eval_equality.py``); no row is a near tie (checked: the two sentences of every row are
at least 0.005 nats apart), and both outcomes of ``pct_stereotype`` occur (checked).

Why the prefix token is the same on both sides: every CrowS-Pairs request has an empty context. lm-eval's
``TemplateLM.loglikelihood`` then encodes the sentence with ``add_special_tokens=False`` and conditions it on
``HFLM.prefix_token_id``, which (no ``prefix_token_id`` argument given) is the tokenizer's BOS id when it has
one, else its EOS id. keeltune's ``probe_loglikelihoods`` encodes the sentence without special tokens too and
puts ``[bos_token_id]`` (EOS without a BOS) before it: the same token, and no description or BOS-text trick is
needed, unlike the multiple-choice test (whose contexts are not empty). The test checks it token by token
against the (context, continuation) ids lm-eval's ``_loglikelihood_tokens`` actually received.

One known difference, not exercised here: when a sentence's own first token IS the prefix token (a sentence
starting with the BOS token's text, e.g. ``<|bos|>``), lm-eval uses that token as the context and scores the
rest, while keeltune puts a second BOS before it and scores the whole sentence, including that first token.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TASK = "kt_equality_crows_pairs"
ROWS = 40
TOLERANCE = 1e-5
# nats between a row's two sentences at least: hundreds of times the tolerance, so no indicator can flip
MIN_GAP = 0.005
LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks" / "crows_pairs"
HEADER = ["", "sent_more", "sent_less", "stereo_antistereo", "bias_type", "annotations", "anon_writer",
          "anon_annotators"]  # fmt: skip
BIAS_TYPES = ("race-color", "socioeconomic", "gender", "disability", "nationality", "sexual-orientation",
              "physical-appearance", "religion", "age")  # fmt: skip


def _tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _rows(tokenizer: Any) -> list[list[str]]:
    """ROWS CrowS-Pairs rows: (index, sent_more, sent_less, stereo_antistereo, bias_type, annotations,
    anon_writer, anon_annotators)."""
    from pydoc_data.topics import topics

    texts = [topics[name].split() for name in sorted(topics)]
    texts = [words for words in texts if len(words) > 60]
    rows: list[list[str]] = []
    for i in range(ROWS):
        words, budget = texts[i], 4 + i % 4
        more = next(
            words[start : start + length]
            for start in range(3 + i % 9, len(words))
            for length in (4, 3, 2)
            if _tokens(tokenizer, " ".join(words[start : start + length])) <= budget
        )
        other = texts[(i + 17) % len(texts)]
        swap = i % len(more)
        for word in other[10 + i % 13 :]:
            less = [*more[:swap], word, *more[swap + 1 :]]
            if word != more[swap] and _tokens(tokenizer, " ".join(less)) <= 7:
                break
        else:
            raise AssertionError(f"row {i}: no word to swap into {more}")
        bias_type = BIAS_TYPES[i % len(BIAS_TYPES)]
        rows.append([
            str(i), " ".join(more), " ".join(less), ("stereo", "antistereo")[i % 3 == 2], bias_type,
            str([[bias_type]] * 5), f"a{i}", str([f"a{i + k}" for k in range(1, 6)]),
        ])  # fmt: skip
    return rows


def _task_yaml(data: Path) -> str:
    """lm-eval's own crows_pairs_english.yaml, reading ``data`` instead of the hub set."""
    text = (LM_EVAL_TASKS / "crows_pairs_english.yaml").read_text()
    replacements = {
        "tag:\n  - crows_pairs\n": "",
        "task: crows_pairs_english\n": f"task: {TASK}\n",
        "dataset_path: jannalu/crows_pairs_multilingual\ndataset_name: english\n": (
            f"dataset_path: csv\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        ),
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, f"lm-eval's crows_pairs_english.yaml changed: no {old!r}"
        text = text.replace(old, new)
    for line in ('doc_to_text: ""', 'target_delimiter: ""', "doc_to_choice: !function utils.doc_to_choice",
                 "process_results: !function utils.process_results"):  # fmt: skip
        assert line in text.splitlines(), f"lm-eval's crows_pairs_english.yaml changed: no {line!r}"
    return text


@pytest.fixture(scope="module")
def compared(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both sides on the same CSV and model: keeltune's items, token ids, log-likelihoods and score; lm-eval's
    results (with samples) and the token ids its ``_loglikelihood_tokens`` received, by request text."""
    from lm_eval.models.huggingface import HFLM

    import keeltune.eval.bias.score as bias_score
    from keeltune.distributed import ParallelEnv
    from keeltune.eval.bias.standard_sets import read_crows_pairs, score_crows_pairs
    from keeltune.eval.harness import run_lm_eval
    from keeltune.eval.tasks import HFTaskModel
    from keeltune.sharding.model import load_causal_lm, load_tokenizer

    root = tmp_path_factory.mktemp("bias_lm_eval_equality")
    tokenizer = load_tokenizer(str(assets["model"]))
    data = root / "crows_pairs_anonymized.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)  # the original's dialect: comma, minimal quoting, "\r\n" line ends
        writer.writerow(HEADER)
        writer.writerows(_rows(tokenizer))
    include = root / "tasks"
    include.mkdir()
    (include / f"{TASK}.yaml").write_text(_task_yaml(data))
    (include / "utils.py").write_text(
        "from lm_eval.tasks.crows_pairs.utils import doc_to_choice, process_results\n"
    )

    model = load_causal_lm(str(assets["model"])).eval()
    items = read_crows_pairs(data)
    our_pairs: list[tuple[list[int], list[int]]] = []
    original_lls = bias_score._loglikelihoods
    their_pairs: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    original_tokens = HFLM._loglikelihood_tokens

    def ours_recorded(model: Any, sequences: list[tuple[list[int], list[int]]], *args: Any) -> Any:
        our_pairs.extend(sequences)
        return original_lls(model, sequences, *args)

    def theirs_recorded(self: Any, requests: list[Any], *args: Any, **kwargs: Any) -> Any:
        for key, context, continuation in requests:
            their_pairs[key] = (list(context), list(continuation))
        return original_tokens(self, requests, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bias_score, "_loglikelihoods", ours_recorded)
        lls = bias_score.probe_loglikelihoods(
            HFTaskModel(model, None), items, tokenizer, ParallelEnv(), batch_size=8,
            max_length=model.config.max_position_embeddings,
        )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(HFLM, "_loglikelihood_tokens", theirs_recorded)
        theirs = run_lm_eval(
            assets["model"], str(assets["model"]), [TASK], include_path=include, log_samples=True
        )
    return {
        "items": items,
        "lls": lls,
        "score": score_crows_pairs(items, lls),
        "our_pairs": our_pairs,
        "their_pairs": their_pairs,
        "theirs": theirs,
        "samples": sorted(theirs["samples"][TASK], key=lambda s: s["doc_id"]),
        "bos_id": tokenizer.bos_token_id,
    }


def test_same_rows_and_tokens(compared: dict[str, Any]) -> None:
    """Both read the same rows from the CSV, and every request lm-eval scored is, as token ids, the one
    keeltune scored: [BOS] as the context of an empty-context sentence on both sides."""
    items, samples = compared["items"], compared["samples"]
    assert len(items) == len(samples) == ROWS
    our_pairs, their_pairs, bos = compared["our_pairs"], compared["their_pairs"], compared["bos_id"]
    assert bos is not None and len(our_pairs) == 2 * ROWS
    for i, (item, sample) in enumerate(zip(items, samples, strict=True)):
        assert sample["doc_id"] == i
        assert (sample["doc"]["sent_more"], sample["doc"]["sent_less"]) == tuple(c for _, c in item.requests)
        assert [tuple(arguments) for arguments in sample["arguments"]] == list(item.requests)
        assert sample["target"] == 0
        for j, request in enumerate(item.requests):
            context, continuation = their_pairs[request]
            assert (context, continuation) == our_pairs[2 * i + j], f"row {i}, request {j}"
            assert context == [bos] and bos not in continuation


def test_loglikelihoods_and_scores_equal(compared: dict[str, Any]) -> None:
    samples, lls, score = compared["samples"], np.array(compared["lls"]), compared["score"]
    theirs = np.array([[response[0] for response in s["filtered_resps"]] for s in samples], dtype=np.float64)
    assert theirs.shape == lls.shape == (ROWS, 2)
    assert np.abs(theirs - lls).max() < TOLERANCE, np.abs(theirs - lls).max()
    assert lls.min() > -50.0, lls.min()  # the range where float32 sums hold the tolerance
    assert np.abs(lls[:, 0] - lls[:, 1]).min() > MIN_GAP, "a near tie: float noise could flip its indicator"

    stereo = [s["pct_stereotype"] for s in samples]
    assert stereo == score.per_item["pct_stereotype"]
    assert 0.2 < np.mean(stereo) < 0.8, "one outcome only: the test would not tell > from <"
    diffs = np.array([s["likelihood_diff"] for s in samples])
    assert np.abs(diffs - np.array(score.per_item["likelihood_diff"])).max() < TOLERANCE

    results = compared["theirs"]["results"][TASK]
    assert results["pct_stereotype,none"] == score.values["pct_stereotype"]
    assert results["likelihood_diff,none"] == pytest.approx(score.values["likelihood_diff"], abs=TOLERANCE)
