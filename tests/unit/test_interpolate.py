"""Interpolation toward the base (WiSE-FT) on safetensors folders: the formula per tensor, dtypes kept, a tied
weight stored under the other name paired, a different model refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from keeltune.config import ConfigError
from keeltune.sharding.interpolate import interpolate_toward_base


def _folder(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_each_tensor_keeps_alpha_of_the_change_in_its_own_dtype(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    base = {
        "w": torch.randn(4, 3, generator=generator),
        "h": torch.randn(5, generator=generator).bfloat16(),
        "lm_head.weight": torch.randn(7, 2, generator=generator),  # a tied weight, saved under this name here
    }
    tuned = {
        "w": torch.randn(4, 3, generator=generator),
        "h": torch.randn(5, generator=generator).bfloat16(),
        "model.embed_tokens.weight": torch.randn(7, 2, generator=generator),  # ... and under this one here
    }
    base_dir = _folder(tmp_path / "base", base)
    for alpha in (0.0, 0.3, 1.0):
        model_dir = _folder(tmp_path / f"tuned-{alpha}", tuned)
        assert interpolate_toward_base(model_dir, base_dir, alpha) == 3
        got = load_file(model_dir / "model.safetensors")
        torch.testing.assert_close(got["w"], base["w"] + alpha * (tuned["w"] - base["w"]), rtol=0, atol=1e-6)
        expected_h = (base["h"].float() + alpha * (tuned["h"].float() - base["h"].float())).bfloat16()
        assert got["h"].dtype == torch.bfloat16 and torch.equal(got["h"], expected_h)
        tied = base["lm_head.weight"] + alpha * (tuned["model.embed_tokens.weight"] - base["lm_head.weight"])
        torch.testing.assert_close(got["model.embed_tokens.weight"], tied, rtol=0, atol=1e-6)
    assert torch.equal(load_file(tmp_path / "tuned-0.0" / "model.safetensors")["w"], base["w"])


def test_another_architecture_or_a_bad_alpha_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    base_dir = _folder(tmp_path / "base", {"w": torch.zeros(2, 2)})
    model_dir = _folder(tmp_path / "tuned", {"w": torch.ones(3, 2)})
    before = (model_dir / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"w: \[3, 2\] in .* but \[2, 2\] in the base"):
        interpolate_toward_base(model_dir, base_dir, 0.5)
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\]"):
        interpolate_toward_base(model_dir, base_dir, 1.5)
    other = _folder(tmp_path / "other", {"w": torch.ones(2, 2), "v": torch.ones(3), "u": torch.ones(3)})
    with pytest.raises(ConfigError, match=r"2 tensor\(s\) of the model are not in the base"):
        interpolate_toward_base(other, base_dir, 0.5)
    assert (model_dir / "model.safetensors").read_bytes() == before
