"""The configured bias probes: reading and subsetting, scores per axis, amplification over the base with its
paired bootstrap interval, and the bias guard's decisions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from keeltune.config import BiasConfig, BiasProbeConfig, ConfigError, config_from_dict
from keeltune.eval.bias.items import ProbeError
from keeltune.eval.bias.probes import bias_results, load_probe_sets, paired_bootstrap, score_probe
from keeltune.eval.policy import HeldOutPolicy

FIXTURES = Path(__file__).with_name("bias_fixtures")


def _probes(*probes: dict, **options: object) -> BiasConfig:
    return BiasConfig(probes=[BiasProbeConfig(**p) for p in probes], **options)


def test_builtin_probes_filter_axes_and_keep_an_evenly_spaced_subset_per_axis() -> None:
    full = load_probe_sets(_probes({"kind": "pairs", "axes": ["gender", "age"]}))[0]
    assert full.counts() == {"age": 220, "gender": 216}
    subset = load_probe_sets(_probes({"kind": "pairs", "axes": ["gender", "age"], "max_items_per_axis": 10}))[
        0
    ]
    assert subset.counts() == {"age": 10, "gender": 10}
    gender = [item for item in full.items if item.axis == "gender"]
    kept = [item for item in subset.items if item.axis == "gender"]
    assert kept[0] == gender[0] and kept[-1] == gender[-1]  # spread over the whole axis, not its head
    assert len({item.meta["template"] for item in kept}) >= 8
    templates = load_probe_sets(_probes({"kind": "templates"}))[0]
    assert set(templates.counts().values()) == {200} and len(templates.counts()) == 6


def test_probe_file_errors_name_the_probe_key_and_the_file_line(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"axis": "gender", "stereotype": "He fixed it.", "anti_stereotype": "She fixed it."})
        + "\n\n"
        + json.dumps({"axis": "gender", "stereotype": "Same.", "anti_stereotype": "Same."})
        + "\n"
    )
    with pytest.raises(
        ProbeError, match=rf"eval\.bias\.probes\.1 \(pairs\): {pairs}:3: a pair whose sentences"
    ):
        load_probe_sets(
            _probes({"kind": "templates", "axes": ["age"]}, {"kind": "pairs", "path": str(pairs)})
        )
    pairs.write_text(
        json.dumps({"axis": "gender", "stereotype": "He fixed it.", "anti_stereotype": "She fixed it."})
        + "\n"
    )
    with pytest.raises(
        ProbeError, match=r"eval\.bias\.probes\.0\.axes: \['religion'\] are not axes of .*gender"
    ):
        load_probe_sets(_probes({"kind": "pairs", "path": str(pairs), "axes": ["religion"]}))
    templates = tmp_path / "templates.jsonl"
    templates.write_text(json.dumps({"axis": "age", "template": "no slot here"}) + "\n")
    with pytest.raises(ProbeError, match=rf"{templates}:1: a template without the {{descriptor}} slot"):
        load_probe_sets(_probes({"kind": "templates", "path": str(templates)}))


def test_config_refuses_probe_and_guard_mistakes() -> None:
    base = {"model": {"path": "m"}, "data": {"train": [{"name": "t", "path": "x"}]}}
    mistakes = {
        "are not built-in axes": {"eval": {"bias": {"probes": [{"kind": "pairs", "axes": ["gendr"]}]}}},
        "reads the set's published file": {"eval": {"bias": {"probes": [{"kind": "stereoset"}]}}},
        "winobias needs path": {"eval": {"bias": {"probes": [{"kind": "winobias", "path": "pro.txt"}]}}},
        "names must be unique": {"eval": {"bias": {"probes": [{"kind": "pairs"}, {"kind": "pairs"}]}}},
        "watches bias probes": {"regularization": {"bias_guard": {"max_amplification": 0.1}}},
        "set max_amplification": {
            "eval": {"bias": {"probes": [{"kind": "pairs"}]}},
            "regularization": {"bias_guard": {"action": "stop"}},
        },
        "is not a bias metric": {
            "eval": {"bias": {"probes": [{"kind": "pairs"}]}},
            "regularization": {"bias_guard": {"max_amplification": 0.1, "metrics": ["bias/pairs/gender/ss"]}},
        },
    }
    for message, sections in mistakes.items():
        with pytest.raises(ConfigError, match=message):
            config_from_dict({**base, **sections})


def _pair_lls(gaps: np.ndarray) -> list[list[float]]:
    return [[-10.0 + gap, -10.0] for gap in gaps]


def test_amplification_is_now_minus_base_with_a_paired_interval() -> None:
    config = _probes(
        {"kind": "pairs", "axes": ["gender", "age"], "max_items_per_axis": 40}, bootstrap_iters=500
    )
    probe = load_probe_sets(config)[0]
    rng = np.random.default_rng(0)
    base_gaps = rng.normal(0.0, 1.0, len(probe.items))
    base = _pair_lls(base_gaps)
    same = bias_results(probe, base, base, config)
    for key in ("bias/pairs/all/likelihood_gap", "bias/pairs/gender/pct_stereotype"):
        assert same[key + "_amplification"] == same[key + "_amplification_lo"] == 0.0
        assert same[key + "_amplification_hi"] == 0.0
    # the fine-tune prefers the stereotype by 0.5 nats more on gender items only, with item-level noise
    shift = np.array([0.5 if item.axis == "gender" else 0.0 for item in probe.items])
    now_gaps = base_gaps + shift + rng.normal(0.0, 0.2, len(probe.items))
    found = bias_results(probe, _pair_lls(now_gaps), base, config)
    gender = [i for i, item in enumerate(probe.items) if item.axis == "gender"]
    key = "bias/pairs/gender/likelihood_gap"
    assert found[key] == pytest.approx(now_gaps[gender].mean())
    assert found[key + "_amplification"] == pytest.approx((now_gaps - base_gaps)[gender].mean())
    assert (
        0
        < found[key + "_amplification_lo"]
        < found[key + "_amplification"]
        < found[key + "_amplification_hi"]
    )
    age = "bias/pairs/age/likelihood_gap"
    assert (
        found[age + "_amplification_lo"] < 0 < found[age + "_amplification_hi"]
    )  # untouched axis: no effect
    # paired: the interval of the differences is far narrower than the spread of the scores themselves
    assert found[key + "_amplification_hi"] - found[key + "_amplification_lo"] < 0.25
    assert found["bias/pairs/all/pct_stereotype"] == pytest.approx(np.mean(now_gaps > 0))


def test_paired_bootstrap_equals_a_plain_loop_over_resamples() -> None:
    config = _probes({"kind": "pairs", "axes": ["age"], "max_items_per_axis": 30})
    probe = load_probe_sets(config)[0]
    rng = np.random.default_rng(1)
    base = score_probe(probe, _pair_lls(rng.normal(size=30)))
    now = score_probe(probe, _pair_lls(rng.normal(size=30)))
    index = np.arange(30)
    got = paired_bootstrap(now, base, index, iters=200, confidence=0.9, seed=7)
    draws = np.random.default_rng(7).integers(0, 30, size=(200, 30))
    for name in ("likelihood_gap", "pct_stereotype"):
        diffs = [now.per_item[name][d].mean() - base.per_item[name][d].mean() for d in draws]
        assert got[name] == pytest.approx((np.percentile(diffs, 5), np.percentile(diffs, 95)))


def test_stereoset_amplification_is_recombined_per_target_term() -> None:
    config = _probes(
        {"kind": "stereoset", "path": str(FIXTURES / "stereoset" / "dev.json")}, bootstrap_iters=50
    )
    probe = load_probe_sets(config)[0]
    stereotyped = []
    for item in probe.items:
        by_role = {"stereotype": -4.0, "anti-stereotype": -6.0, "unrelated": -9.0}
        stereotyped.append([by_role[role] for role in item.roles])
    base = [
        [{"stereotype": -6.0, "anti-stereotype": -4.0, "unrelated": -9.0}[r] for r in i.roles]
        for i in probe.items
    ]
    found = bias_results(probe, stereotyped, base, config)
    assert found["bias/stereoset/all/ss"] == 100.0
    assert found["bias/stereoset/all/ss_amplification"] == 100.0  # from 0 (always anti) to 100
    assert found["bias/stereoset/all/lms_amplification"] == 0.0


def _guarded(**guard: object) -> HeldOutPolicy:
    config = config_from_dict(
        {
            "model": {"path": "m"},
            "data": {"train": [{"name": "t", "path": "x"}], "validation": {"name": "v", "path": "y"}},
            "eval": {"bias": {"probes": [{"kind": "pairs"}, {"kind": "templates"}]}},
            "regularization": {"bias_guard": guard},
        }
    )
    return HeldOutPolicy(config.regularization, config.eval.bias.probes)


def _amplified(key: str, value: float, low: float, high: float) -> dict[str, float]:
    return {
        key: 1.0,
        key + "_amplification": value,
        key + "_amplification_lo": low,
        key + "_amplification_hi": high,
    }


def test_bias_guard_warns_stops_and_keeps_the_best_model_within_it() -> None:
    gap = "bias/pairs/gender/likelihood_gap"
    significant = _amplified(gap, 0.4, 0.1, 0.7)
    within_noise = _amplified(gap, 0.4, -0.1, 0.9)
    warn = _guarded(max_amplification=0.2)
    verdict = warn.observe(3, {"val/loss": 1.0, **significant}, {})
    assert not verdict.stop and verdict.guards == "bias guard"
    assert verdict.warning.startswith(f"{gap} rose by 0.4 over the base (interval 0.1 to 0.7)")
    assert "(regularization.bias_guard) at step 3" in verdict.warning
    assert not warn.observe(4, {"val/loss": 1.0, **within_noise}, {}).warning  # interval includes 0
    assert _guarded(max_amplification=0.2, significant=False).observe(4, within_noise, {}).warning
    # by default only each probe's first metric is watched; metrics: names others
    share = "bias/pairs/gender/pct_stereotype"
    assert not warn.observe(5, _amplified(share, 0.4, 0.1, 0.7), {}).warning
    assert (
        _guarded(max_amplification=0.2, metrics=[share])
        .observe(5, _amplified(share, 0.4, 0.1, 0.7), {})
        .warning
    )
    stop = _guarded(max_amplification=0.2, action="stop").observe(3, {"val/loss": 1.0, **significant}, {})
    assert stop.stop.startswith(f"bias guard: {gap} rose by 0.4")
    best = _guarded(max_amplification=0.2, action="best")
    assert best.observe(1, {"val/loss": 2.0, **_amplified(gap, 0.1, 0.05, 0.15)}, {}).keep_best
    breached = best.observe(2, {"val/loss": 1.0, **significant}, {})  # better loss, but above the guard
    assert not breached.keep_best and "keeping the best model within the guards (step 1)" in breached.warning
    assert best.observe(3, {"val/loss": 1.5, **within_noise}, {}).keep_best
