"""Weight-space interpolation toward the base model (WiSE-FT, Wortsman et al. 2022): keep a fraction ``alpha``
of what fine-tuning changed, theta = theta_0 + alpha * (theta - theta_0). No data needed; streamed tensor by
tensor, so it never holds more than one tensor of each model."""

from __future__ import annotations

from pathlib import Path

import torch

from keeltune.config import ConfigError
from keeltune.sharding.tensor_files import model_tensor_files, write_tensor_file


def _pair_names(tuned: dict, base: dict) -> dict[str, str]:
    """Tuned tensor name -> base tensor name. Tied weights may be stored under either name (``lm_head.weight``
    or ``model.embed_tokens.weight``): names found on one side only are paired when their shape is unique."""
    pairs = {name: name for name in tuned if name in base}
    only_tuned = [n for n in tuned if n not in base]
    only_base = [n for n in base if n not in tuned]
    for name in only_tuned:
        shape = tuned[name].shape(name)
        same = [n for n in only_base if base[n].shape(n) == shape]
        if len(same) == 1 and sum(tuned[n].shape(n) == shape for n in only_tuned) == 1:
            pairs[name] = same[0]
    unpaired = [n for n in tuned if n not in pairs]
    if unpaired:
        raise ConfigError(
            f"{len(unpaired)} tensor(s) of the model are not in the base (e.g. {unpaired[:3]}); interpolation "
            "needs the model it was fine-tuned from (model.path of the run)"
        )
    return pairs


def interpolate_toward_base(model_dir: Path, base_dir: Path, alpha: float) -> int:
    """Rewrite ``model_dir``'s safetensors in place (each file swapped in once complete); computed in fp32 and
    stored in each tensor's own dtype. Returns how many tensors were interpolated."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(
            f"--interpolate: alpha must be in [0, 1] (1 = as fine-tuned, 0 = the base), got {alpha}"
        )
    tuned, base = model_tensor_files(model_dir), model_tensor_files(base_dir)
    for name in tuned:
        if name in base and base[name].shape(name) != tuned[name].shape(name):
            raise ConfigError(
                f"{name}: {tuned[name].shape(name)} in {model_dir} but {base[name].shape(name)} in the base "
                f"{base_dir}; interpolation needs the model it was fine-tuned from"
            )
    pairs = _pair_names(tuned, base)
    for handle in dict.fromkeys(tuned.values()):  # each file once, in order

        def produce(name: str, handle=handle) -> torch.Tensor:
            weights = handle.tensor(name)
            start = base[pairs[name]].tensor(pairs[name]).float()
            return (start + alpha * (weights.float() - start)).to(weights.dtype)

        layout = [(name, handle.dtype(name), handle.shape(name)) for name in handle.names()]
        write_tensor_file(handle.path, layout, produce, metadata={"keeltune_interpolation": f"{alpha:g}"})
    return len(pairs)
