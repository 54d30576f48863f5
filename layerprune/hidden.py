"""One forward pass that yields the logits and the hidden states of every layer.

Index 0 of `hidden_states` is the embedding output, index k the output of layer k. A model truncated at
depth k computes head(hidden_states[k]), so this one pass serves analysis and depth scoring alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .artifacts import Representation
from .data import Examples
from .options import MAX_LENGTH


@dataclass(frozen=True)
class Batch:
    indices: np.ndarray  # positions of these rows in the Examples
    encoding: dict[str, torch.Tensor]  # padded to this batch's longest row (dynamic padding)

    @property
    def lengths(self) -> torch.Tensor:
        return self.encoding["attention_mask"].sum(dim=1)


def tokenize(tokenizer: PreTrainedTokenizerBase, examples: Examples, max_length: int) -> dict[str, list]:
    """Token ids of every example, truncated to max_length and not yet padded."""
    return tokenizer(examples.texts, examples.pairs, truncation=True, max_length=max_length)


def make_batches(
    tokenizer: PreTrainedTokenizerBase,
    examples: Examples,
    *,
    batch_size: int,
    max_length: int,
    sort_by_length: bool = True,
) -> list[Batch]:
    """Batches with dynamic padding; sorted by length, similar-length rows share a batch and waste
    less padding (docs/results.md, analyzer cost), while `indices` keeps the original order."""
    encoded = tokenize(tokenizer, examples, max_length)
    lengths = np.array([len(ids) for ids in encoded["input_ids"]])
    order = np.argsort(lengths, kind="stable") if sort_by_length else np.arange(len(lengths))
    tokenizer.padding_side = "right"  # pooling below assumes real tokens come first
    # Tokenizing once and padding per batch is the fast path here; silence the advice that says otherwise.
    tokenizer.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [{key: encoded[key][i] for key in encoded} for i in idx]
        batches.append(Batch(idx, dict(tokenizer.pad(rows, return_tensors="pt"))))
    return batches


def forward_all_layers(
    model: PreTrainedModel, batches: list[Batch], desc: str = "forward"
) -> Iterator[tuple[Batch, torch.Tensor, tuple[torch.Tensor, ...]]]:
    """Yield (batch, logits, hidden_states) per batch, without gradients, on the model's device."""
    device = next(model.parameters()).device
    # A tokenizer may emit inputs its model does not take (token_type_ids for DistilBERT, MPNet).
    accepted = inspect.signature(model.forward).parameters
    model.eval()
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
            out = model(**model_inputs(batch, accepted, device), output_hidden_states=True)
            yield batch, out.logits, out.hidden_states


def model_inputs(batch: Batch, accepted, device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors that the model's forward takes (`accepted`: its parameters), on `device`."""
    return {key: value.to(device) for key, value in batch.encoding.items() if key in accepted}


def predict_logits(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Examples, *,
    batch_size: int = 64, max_length: int = MAX_LENGTH,
) -> np.ndarray:
    """The model's logits for every example, in example order (batches formed by length)."""
    batches = make_batches(tokenizer, examples, batch_size=batch_size, max_length=max_length)
    logits = None
    for batch, batch_logits, _ in forward_all_layers(model, batches, desc="predict"):
        if logits is None:
            logits = np.zeros((len(examples), batch_logits.shape[-1]), dtype=np.float32)
        logits[batch.indices] = batch_logits.float().cpu().numpy()
    return logits


def pool(hidden: torch.Tensor, mask: torch.Tensor, representation: Representation) -> list[np.ndarray]:
    """Per row, the representation of one layer's output (B, T, D) as float32 numpy.

    cls: the first token (as in Phang et al. 2021); mean: average over real tokens; tokens: every real
    token (rows of shape (n_tokens, D)).
    """
    hidden = hidden.float()
    if representation == "cls":
        return list(hidden[:, 0].cpu().numpy())
    if representation == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return list(mean.cpu().numpy())
    lengths = mask.sum(dim=1).tolist()
    return [h[:n].cpu().numpy() for h, n in zip(hidden, lengths)]
