"""Dropping the top layers of a fine-tuned classifier, scoring every depth, and moving head weights.

A model truncated at depth k computes head(hidden_states[k]) of the full model (post-LN encoders: nothing
runs after the last layer but the head), so one forward pass scores every depth (heal/ repairs the cut).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from .architectures import albert_groups_to_keep, architecture, total_layers
from .errors import LayerpruneError, ModelError, first_line
from .hidden import Batch, forward_all_layers
from .models import head_logits, head_modules, layer_list


def truncate(model: PreTrainedModel, depth: int) -> PreTrainedModel:
    """Keep layers 1..depth, in place, with the fine-tuned head untouched; returns the model.

    The config's depth field follows, so `save_pretrained` gives a checkpoint that reloads at that depth.
    """
    arch = architecture(model.config)
    total = total_layers(model.config)
    if not 1 <= depth <= total:
        raise ModelError(f"cannot keep {depth} layers: the model has {total}, so depth must be 1 to {total}")
    if arch.shared_weights:
        _truncate_albert_groups(model, depth)
    else:
        del layer_list(model)[depth:]
    setattr(model.config, arch.depth_field, depth)
    return model


def _truncate_albert_groups(model: PreTrainedModel, depth: int) -> None:
    """ALBERT shares weights: only the depth changes, and the layer groups past the kept layers go. With
    several groups, the new depth must map its layers to the same groups, else the model would differ."""
    config = model.config
    groups = albert_groups_to_keep(config, depth)
    if groups is None:
        exact = [k for k in range(1, config.num_hidden_layers + 1) if albert_groups_to_keep(config, k)]
        raise ModelError(
            f"cannot truncate this ALBERT ({config.num_hidden_groups} layer groups of {config.inner_group_num} "
            f"layers) to {depth} layers exactly; depths that work: {', '.join(map(str, exact))}"
        )
    del layer_list(model)[groups:]
    config.num_hidden_groups = groups


def first_token_states(model: PreTrainedModel, batches: list[Batch], n: int) -> np.ndarray:
    """hidden_states[k][:, 0] for every depth k (0 = embeddings), in example order: (L+1, n, D) float32,
    from one forward pass."""
    states = None
    seen = np.zeros(n, dtype=bool)
    for batch, _, hidden_states in forward_all_layers(model, batches, desc="first tokens"):
        first = torch.stack([h[:, 0] for h in hidden_states]).float().cpu().numpy()
        if states is None:
            states = np.zeros((first.shape[0], n, first.shape[-1]), dtype=np.float32)
        states[:, batch.indices] = first
        seen[batch.indices] = True
    if states is None or not seen.all():
        raise LayerpruneError(f"the batches cover {int(seen.sum())} of the {n} examples asked for")
    return states


def depth_logits(model: PreTrainedModel, features: np.ndarray) -> np.ndarray:
    """The model's head applied to the first-token states of every depth: (L+1, n, D) -> (L+1, n, C).

    Row k is what the model truncated at depth k outputs (row 0, the embeddings, for completeness).
    """
    if features.ndim != 3:
        raise ValueError(f"features must be (depths, n, D), got shape {features.shape}")
    with torch.inference_mode():
        return np.stack([
            head_logits(model, torch.from_numpy(np.ascontiguousarray(f))[:, None]).float().cpu().numpy()
            for f in features
        ])


def head_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """A copy of the model's head weights by model state-dict key, as `load_head` takes them."""
    return {f"{name}.{key}": value.detach().clone()
            for name, module in head_modules(model).items() for key, value in module.state_dict().items()}


def load_head(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> None:
    """Install head weights (`head_state`, or a re-fitted head) into the model (in place, on the model's device and dtype)."""
    load_head_modules(head_modules(model), state)


def load_head_modules(modules: dict[str, nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Install head weights, keyed as the model's state dict, into the head's modules by dotted name (the
    model's own, or copies of them)."""
    left = set(state)
    for name, module in modules.items():
        prefix = f"{name}."
        sub = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        try:
            module.load_state_dict(sub)
        except RuntimeError as exc:
            raise ModelError(f"the head weights do not fit this model's '{name}': {first_line(exc)}") from exc
        left -= {prefix + key for key in sub}
    if left:
        raise ModelError(f"the head weights have keys this model's head lacks: {', '.join(sorted(left))}")
