"""Healing a truncated model: making the original model truncated at a depth compute what the original
computes. Every mode meets one interface (`base.Heal`: logits at the depth, install, stats), and
`heal_at` builds the mode asked for:

- none: the truncated model as it is (Phang et al.'s setting);
- head (head.py): re-fit only the head on the depth's first-token states;
- distill (top.py): re-tune the top kept layers and the head, from the original's cached inputs to them;
- whole (whole.py): train every kept layer and the head from the original, intermediate layers included.

How each is chosen and what each buys: docs/export.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedModel

from ..artifacts import HealMode, HealStats
from ..options import DistillOptions, WholeOptions
from ..prune import depth_logits
from .augment import augment_texts
from .base import HOLDOUT_MIN, Heal, held_out_split
from .head import HeadFit, HeadHeal, fit_head, heal_head
from .states import TextStates, encode_texts, token_states
from .top import TopLayers, distill, start_layers
from .whole import WholeModel, heal_whole, layer_map

__all__ = ["HOLDOUT_MIN", "augment_texts", "DistillOptions", "Heal", "HeadFit", "HeadHeal", "NoHeal", "TextStates", "TopLayers",
           "WholeModel", "WholeOptions", "distill", "encode_texts", "fit_head", "heal_at", "heal_head",
           "heal_whole", "held_out_split", "layer_map", "start_layers", "token_states"]


@dataclass
class NoHeal:
    """The original truncated at `depth`, its fine-tuned head reading that depth's first token (`Heal`)."""

    depth: int
    original: PreTrainedModel
    stats: HealStats | None = None

    def logits(self, texts: TextStates) -> np.ndarray:
        return depth_logits(self.original, texts.first[self.depth : self.depth + 1])[0]

    def install(self, truncated: PreTrainedModel) -> None:
        pass  # truncation is all there is


def heal_at(mode: HealMode, original: PreTrainedModel, depth: int, texts: TextStates | None,
            labels: np.ndarray | None, *, regression: bool, distill_opts: DistillOptions = DistillOptions(),
            whole_opts: WholeOptions = WholeOptions(), start: WholeModel | None = None) -> Heal:
    """The heal `mode` of `original` truncated at `depth`, trained on `texts` (the original's outputs on the
    heal texts) and `labels` where known; a whole-model heal starts from `start` (a deeper one) if given."""
    if mode == "none":
        return NoHeal(depth, original)
    if mode == "head":
        return heal_head(original, depth, texts, labels, regression)
    if mode == "distill":
        layers = min(distill_opts.heal_layers, depth)  # at depth 1 only layer 1 can be re-tuned
        return distill(original, depth, texts, labels, regression=regression,
                       opts=dataclasses.replace(distill_opts, heal_layers=layers))
    return heal_whole(original, depth, texts, labels, regression=regression, opts=whole_opts, start=start)
