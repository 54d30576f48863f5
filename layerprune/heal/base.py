"""The one interface every heal meets, and the rule that holds out texts to choose a heal's epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import numpy as np
import torch
from transformers import PreTrainedModel

from ..artifacts import HealStats
from ..errors import ModelError
from ..models import total_layers
from .states import TextStates

HELD_OUT_MIN = 100  # with at least this many texts, a tenth is held out to choose the epoch


class Heal(Protocol):
    """A repair of the original model truncated at `depth`: what it outputs on texts the original was run
    on (`TextStates`), how to put it into the truncated model, and how it was trained (None: untrained)."""

    depth: int
    stats: HealStats | None

    def logits(self, texts: TextStates) -> np.ndarray:
        """The healed truncated model's logits on `texts`, in example order."""
        ...

    def install(self, truncated: PreTrainedModel) -> None:
        """Put the heal into the original model truncated at `depth` (in place)."""
        ...


def held_out_split(units: int, n_texts: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """(held out, train): a seeded tenth of `units` (texts, or batches of them) held out to choose the epoch
    when there are at least HELD_OUT_MIN texts, else none (every epoch asked for is then run)."""
    order = torch.randperm(units, generator=generator).tolist()
    held = units // 10 if n_texts >= HELD_OUT_MIN else 0
    return order[:held], order[held:]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global generators (CPU, and CUDA where present) seeded with `seed` for the block, then restored:
    dropout draws from them, so a heal trains the same whatever ran before it in the process, and the caller's
    draws are left as they were."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of `module`'s weights, to go back to (the epoch a heal keeps)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def check_depth(truncated: PreTrainedModel, depth: int) -> None:
    """A heal of `depth` goes into a model truncated at `depth` only."""
    if total_layers(truncated.config) != depth:
        raise ModelError(f"these layers heal a model of depth {depth}, not {total_layers(truncated.config)}")


def mean_loss(loss: Callable[..., torch.Tensor], texts: TextStates, batches: list[int]) -> float | None:
    """`loss(i, training=False)` over the batches `batches` of `texts`, weighted by their sizes (None: none)."""
    if not batches:
        return None
    with torch.no_grad():
        total = sum(float(loss(i, training=False)) * len(texts.batches[i].indices) for i in batches)
    return total / sum(len(texts.batches[i].indices) for i in batches)
