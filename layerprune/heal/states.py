"""What the original model computes on a set of texts, computed once and shared by every heal and every
depth looked at: its logits, the first-token states of every depth, and the token states of the depths
asked for (the inputs a heal trains from, or the targets it matches)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import psutil
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data import Examples
from ..errors import LayerpruneError
from ..hidden import Batch, forward_all_layers, make_batches, model_inputs
from ..models import layer_list, run_layers_on


@dataclass
class TextStates:
    """Texts with what the original model computes on them: its logits, the first-token states of every
    depth (for head scores and re-fits) and, per depth asked for, the token states of every batch."""

    examples: Examples
    batches: list[Batch]
    logits: np.ndarray  # (n, C) the original model's
    first: np.ndarray  # (L+1, n, D) first-token states, index 0 = embeddings
    tokens: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # hidden-state index -> per batch (B, T, D) fp16

    @property
    def n(self) -> int:
        return len(self.logits)


def encode_texts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Examples, *, batch_size: int,
    max_length: int, keep_tokens: set[int] = frozenset({0}), spare_tokens: Sequence[int] = (),
    desc: str = "original model",
) -> TextStates:
    """One forward pass of the original model over `examples`, keeping the token states of the hidden-state
    indices `keep_tokens` (float16: they are training inputs or targets, and half the memory), and of as many
    of `spare_tokens`, in that order, as fit in half of the memory available: those a heal would otherwise
    compute again later by running the original's lower layers over every text."""
    batches = make_batches(tokenizer, examples, batch_size=batch_size, max_length=max_length)
    size = sum(b.encoding["input_ids"].numel() for b in batches) * model.config.hidden_size * 2  # one index, float16
    spare = [d for d in spare_tokens if d not in keep_tokens]
    affordable = int(psutil.virtual_memory().available / 2 / max(size, 1)) - len(keep_tokens)
    keep_tokens = {*keep_tokens, *spare[:max(affordable, 0)]}
    logits = first = None
    tokens: dict[int, list[torch.Tensor]] = {d: [] for d in keep_tokens}
    for batch, batch_logits, hidden in forward_all_layers(model, batches, desc=desc):
        if logits is None:
            logits = np.zeros((len(examples), batch_logits.shape[-1]), dtype=np.float32)
            first = np.zeros((len(hidden), len(examples), hidden[0].shape[-1]), dtype=np.float32)
        logits[batch.indices] = batch_logits.float().cpu().numpy()
        first[:, batch.indices] = torch.stack([h[:, 0] for h in hidden]).float().cpu().numpy()
        for index in keep_tokens:
            tokens[index].append(hidden[index].to("cpu", torch.float16))
    if logits is None:
        raise LayerpruneError("no texts to run the original model on")
    return TextStates(examples, batches, logits, first, tokens)


def token_states(model: PreTrainedModel, texts: TextStates, index: int) -> list[torch.Tensor]:
    """The original model's token states at hidden-state `index` for every batch: cached, or computed by
    running the original layers from the nearest cached lower index, and cached. Only `index` is kept, not the
    indices passed on the way, which a 12-layer model over tens of thousands of heal texts fills memory with."""
    if index in texts.tokens:
        return texts.tokens[index]
    start = max(d for d in texts.tokens if d < index)
    layers = nn.ModuleList(layer_list(model)[start:index])
    computed: list[torch.Tensor] = []
    accepted = inspect.signature(model.forward).parameters
    device = next(model.parameters()).device
    with run_layers_on(model, layers) as feed, torch.inference_mode():
        for batch, states in tqdm(list(zip(texts.batches, texts.tokens[start])), unit="batch", leave=False,
                                  desc=f"original, layers {start + 1}..{index}"):
            feed(states.to(device, torch.float32))
            out = model(**model_inputs(batch, accepted, device), output_hidden_states=True)
            computed.append(out.hidden_states[-1].to("cpu", torch.float16))
    texts.tokens[index] = computed
    return computed


def real_tokens(states: list[torch.Tensor], texts: TextStates, batches: int = 32) -> torch.Tensor:
    """The rows of per-batch token states (B, T, D) at real tokens, padding dropped, over the first `batches`
    batches, in float32 (N, D): enough for a scale, not a statistic to be exact about."""
    return torch.cat([s[b.encoding["attention_mask"].bool()] for s, b in zip(states[:batches], texts.batches)]).float()
