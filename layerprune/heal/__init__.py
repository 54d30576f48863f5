"""Healing a truncated model: making the original model truncated at a depth compute what the original
computes. Every heal meets one interface (`base.Heal`: logits at the depth, install, stats), and `heal_at`
builds the one asked for; each heal is a module with its class and its function, and its options in options.py:

- none: the truncated model as it is (Phang et al.'s setting): `NoHeal`;
- head (head.py): re-fit only the head on the depth's first-token states: `HeadHeal`, `heal_head`, `HeadOptions`;
- top (top.py): re-tune the top kept layers and the head, distilled from the original's outputs, from its cached
  inputs to them: `TopHeal`, `heal_top`, `TopOptions`;
- whole (whole.py): train every kept layer and the head from the original, intermediate layers included:
  `WholeHeal`, `heal_whole`, `WholeOptions`.

How each is chosen and what each buys: docs/export.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedModel

from ..artifacts import HealMode, HealStats
from ..options import HeadOptions, TopOptions, WholeOptions
from ..prune import depth_logits
from .augment import augment_texts
from .base import HELD_OUT_MIN, Heal, held_out_split
from .head import HeadFit, HeadHeal, fit_head, heal_head
from .states import TextStates, encode_texts, token_states
from .top import TopHeal, heal_top, start_layers
from .whole import WholeHeal, heal_whole, layer_map

__all__ = ["HELD_OUT_MIN", "Heal", "HeadFit", "HeadHeal", "HeadOptions", "NoHeal", "TextStates", "TopHeal", "TopOptions",
           "WholeHeal", "WholeOptions", "augment_texts", "encode_texts", "fit_head", "heal_at", "heal_head", "heal_top",
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
            labels: np.ndarray | None, *, regression: bool, top: TopOptions = TopOptions(),
            whole: WholeOptions = WholeOptions(), head: HeadOptions = HeadOptions(),
            start: WholeHeal | None = None) -> Heal:
    """The heal `mode` of `original` truncated at `depth`, trained on `texts` (the original's outputs on the
    heal texts) and `labels` where known, with that heal's options (`top`, `whole`, `head`); a whole-model heal
    starts from `start` (a deeper one) if given."""
    if mode == "none":
        return NoHeal(depth, original)
    if mode == "head":
        return heal_head(original, depth, texts, labels, regression, opts=head)
    if mode == "top":
        layers = min(top.heal_layers, depth)  # at depth 1 only layer 1 can be re-tuned
        return heal_top(original, depth, texts, labels, regression=regression,
                        opts=dataclasses.replace(top, heal_layers=layers))
    return heal_whole(original, depth, texts, labels, regression=regression, opts=whole, start=start)
