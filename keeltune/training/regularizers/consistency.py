"""Counterfactual consistency (a loss-side term): the model's next-token distributions on the training text
should not move when its demographic terms are exchanged (he <-> she, mother <-> father, ...)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch

from keeltune.data_pipeline.counterfactual import Swapper
from keeltune.training.regularizers.base import LossTerm, Regularizer, RegularizerContext
from keeltune.training.regularizers.kl import token_kl


@dataclass(frozen=True)
class Twin:
    """A row's counterfactual twin: its token ids, and the aligned (row position, twin position) pairs, each
    position being the one that predicts the shared token after it."""

    ids: list[int]
    positions: list[tuple[int, int]]


def make_twin(ids: list[int], tokenizer: Any, swapper: Swapper) -> Twin | None:
    """The twin of a row of token ids, or None when its text holds no swapped term or does not encode back to
    the same ids (its character offsets would not be the row's).

    Row token k (predicted at position k - 1) is aligned with twin token j (at j - 1) when k starts at or
    after the end of the first swapped span, overlaps no span, and j is the same id covering the same
    characters of the shared text: k's offsets shifted by the length changes of the swaps before it."""
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    spans = swapper.spans(text)
    if not spans:
        return None
    row = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if row["input_ids"] != ids:
        return None
    pieces, ends, shifts, last = [], [], [0], 0  # shifts[i]: the length change of the first i swaps
    for start, end, replacement in spans:
        pieces += [text[last:start], replacement]
        ends.append(end)
        shifts.append(shifts[-1] + len(replacement) - (end - start))
        last = end
    twin = tokenizer("".join(pieces) + text[last:], add_special_tokens=False, return_offsets_mapping=True)
    twin_index = {
        (token, start, end): j
        for j, (token, (start, end)) in enumerate(zip(twin["input_ids"], twin["offset_mapping"], strict=True))
    }
    positions = []
    for k, (start, end) in enumerate(row["offset_mapping"]):
        if k == 0 or start < ends[0]:
            continue
        before = bisect.bisect_right(ends, start)  # the spans that end at or before this token
        if before < len(spans) and spans[before][0] < end:
            continue  # the token overlaps a swapped term
        j = twin_index.get((ids[k], start + shifts[before], end + shifts[before]))
        if j is not None and j > 0:
            positions.append((k - 1, j - 1))
    return Twin(twin["input_ids"], positions)


class Consistency(Regularizer):
    name = "consistency"

    def __init__(self, context: RegularizerContext) -> None:
        tokenizer = context.tokenizer
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "regularization.consistency needs the run's fast (Rust) tokenizer for character offsets, got "
                f"{type(tokenizer).__name__}: point model.tokenizer at one (a tokenizer.json), or set its "
                "weight to 0"
            )
        section = context.config.regularization.consistency
        self.backend = context.backend
        self.tokenizer = tokenizer
        self.weight = section.weight
        self.swapper = Swapper.from_config(section.axes, section.swaps)

    def loss_term(self, input_ids: torch.Tensor) -> LossTerm:
        """The twins' predictions come from one forward without gradients, in eval mode (no dropout or NEFTune
        noise in the target), made on every rank (collectives inside ZeRO-3's forward) even without a twin."""
        length = input_ids.shape[1]
        twin_ids = input_ids.clone()
        rows, positions, twin_positions = [], [], []
        for b, ids in enumerate(input_ids.tolist()):
            twin = make_twin(ids, self.tokenizer, self.swapper)
            if twin is None:
                continue
            kept = twin.ids[:length]  # right-padded with the row's own tail: causal, never aligned
            twin_ids[b, : len(kept)] = torch.tensor(kept, dtype=twin_ids.dtype)
            for t, u in twin.positions:
                if u < length:
                    rows.append(b)
                    positions.append(t)
                    twin_positions.append(u)
        if not rows and not self.backend.partitioned:
            return lambda logits, mask: logits.new_zeros(())
        rows_t, positions_t, twin_positions_t = torch.tensor(
            [rows, positions, twin_positions], dtype=torch.long, device=input_ids.device
        )
        self.backend.train(False)
        try:
            reference = self.backend.logits(twin_ids)[rows_t, twin_positions_t]
        finally:
            self.backend.train(True)
        return lambda logits, mask: (
            self.weight * token_kl(logits[rows_t, positions_t], reference, mask[rows_t, positions_t])
        )
