"""Dropping the top layers of a fine-tuned classifier, scoring every depth, and re-fitting only its head.

A model truncated at depth k computes head(hidden_states[k]) of the full model (post-LN encoders: nothing
runs after the last layer but the head), so one forward pass scores every depth, and re-fitting the head
("healing") needs only the first-token states of that depth, not the encoder.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from .architectures import albert_groups_to_keep, architecture, num_layers
from .errors import LayerpruneError, ModelError, first_line
from .hidden import Batch, forward_all_layers
from .models import apply_head, head, head_logits, head_modules, layer_list


def truncate(model: PreTrainedModel, depth: int) -> PreTrainedModel:
    """Keep layers 1..depth, in place, with the fine-tuned head untouched; returns the model.

    The config's depth field follows, so `save_pretrained` gives a checkpoint that reloads at that depth.
    """
    arch = architecture(model.config)
    total = num_layers(model.config)
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


@dataclass
class HeadFit:
    """A re-fitted head: its weights by model state-dict key, ready for `load_head`."""

    state: dict[str, torch.Tensor]
    train_loss: float  # mean loss of the returned head on the features it was trained on
    steps: int  # optimizer steps behind the returned head (0: the fine-tuned head was kept)
    holdout_loss: float | None = None  # its loss on the held-out features that chose the epoch, if any


HOLDOUT_MIN = 100  # with at least this many examples, 1/10 is held out to choose the epoch
PATIENCE = 5  # epochs without a better held-out loss before stopping


def fit_head(
    model: PreTrainedModel,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    regression: bool,
    epochs: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    batch_size: int = 64,
    seed: int = 0,
) -> HeadFit:
    """Re-fit only the head (pooler included) on frozen first-token features (n, D) of one depth.

    Starts from the fine-tuned head and trains a float32 CPU copy with AdamW, without dropout, shuffled by
    `seed` (deterministic); the model's own head is left as it was. Two things make it robust:
    - the first linear layer is trained in standardized input coordinates (an exact reparametrization):
      lower layers' first tokens can be nearly constant (std 0.002 around a mean of norm 8), which raw
      AdamW steps barely move;
    - with n >= HOLDOUT_MIN, a seeded tenth is held out and the epoch with the lowest held-out loss is
      returned, epoch 0 (the fine-tuned head) included, so a head that is already good stays good;
      training stops after PATIENCE epochs without improvement. Fewer examples: all `epochs` are run.
    """
    with _one_thread():
        return _fit_head(model, features, labels, regression, epochs, lr, weight_decay, batch_size, seed)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Head-sized matmuls gain little from threads, and on a busy machine OpenMP's waiting threads make
    them tens of times slower (seen: 0.2 s -> 12 s for a 32-wide head); run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_head(
    model: PreTrainedModel, features: np.ndarray, labels: np.ndarray, regression: bool,
    epochs: int, lr: float, weight_decay: float, batch_size: int, seed: int,
) -> HeadFit:
    x, y = _training_data(model, features, labels, regression)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    held = order[: len(x) // 10] if len(x) >= HOLDOUT_MIN else order[:0]
    train = order[len(held):]
    mean, scale = _standardizer(x[train])
    x = (x - mean) / scale
    modules = _head_copy(model, mean, scale)
    optimizer = torch.optim.AdamW(
        [p for m in modules.values() for p in m.parameters()], lr=lr, weight_decay=weight_decay
    )
    best_loss, best = _mean_loss(model, modules, x, y, held, regression), _snapshot(modules)  # epoch 0
    best_epoch = best_steps = steps = 0
    for epoch in range(1, epochs + 1):
        for idx in train[torch.randperm(len(train), generator=generator)].split(batch_size):
            optimizer.zero_grad()
            _loss(model, modules, x[idx], y[idx], regression).backward()
            optimizer.step()
            steps += 1
        held_loss = _mean_loss(model, modules, x, y, held, regression)
        if held_loss is None or held_loss < best_loss:
            best_loss, best, best_epoch, best_steps = held_loss, _snapshot(modules), epoch, steps
        elif epoch - best_epoch >= PATIENCE:
            break
    for name, module in modules.items():
        module.load_state_dict(best[name])
    train_loss = _mean_loss(model, modules, x, y, train, regression)
    return HeadFit(_export(model, modules, mean, scale), train_loss, best_steps, best_loss)


def head_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """A copy of the model's head weights by model state-dict key, as `load_head` takes them."""
    return {f"{name}.{key}": value.detach().clone()
            for name, module in head_modules(model).items() for key, value in module.state_dict().items()}


def load_head(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> None:
    """Install a head fitted by `fit_head` into the model (in place, on the model's device and dtype)."""
    modules = head_modules(model)
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


def _standardizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the first tokens (x: (n, 1, D)); constant dimensions keep scale 1."""
    x = x[:, 0].double()
    mean, std = x.mean(dim=0), x.std(dim=0, correction=0)
    floor = 1e-3 * std.pow(2).mean().sqrt()
    scale = torch.where(std > floor, std, torch.ones_like(std))
    return mean.float(), scale.float()


def _head_copy(model: PreTrainedModel, mean: torch.Tensor, scale: torch.Tensor) -> dict[str, nn.Module]:
    """A trainable float32 CPU copy of the head, dropout off, whose first linear layer reads standardized
    features (x - mean) / scale and computes exactly what the original did on x."""
    modules = {name: copy.deepcopy(m).float().cpu().eval().requires_grad_(True)
               for name, m in head_modules(model).items()}
    first = _first_linear(model, modules)
    with torch.no_grad():
        first.bias += first.weight @ mean
        first.weight *= scale
    return modules


def _snapshot(modules: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}


def _export(
    model: PreTrainedModel, modules: dict[str, nn.Module], mean: torch.Tensor, scale: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The head's weights by model state-dict key, mapped back to raw (unstandardized) features."""
    state = {f"{name}.{key}": value.detach().clone() for name, m in modules.items()
             for key, value in m.state_dict().items()}
    first = head(model.config).first_linear
    weight = state[f"{first}.weight"] / scale
    state[f"{first}.weight"] = weight
    state[f"{first}.bias"] = state[f"{first}.bias"] - weight @ mean
    return state


def _first_linear(model: PreTrainedModel, modules: dict[str, nn.Module]) -> nn.Linear:
    first = head(model.config).first_linear
    name = next(name for name in modules if first == name or first.startswith(f"{name}."))
    return modules[name].get_submodule(first[len(name) + 1:])


def _mean_loss(
    model: PreTrainedModel, modules: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
    rows: torch.Tensor, regression: bool,
) -> float | None:
    """The loss over the given rows (None for no rows)."""
    if len(rows) == 0:
        return None
    with torch.no_grad():
        return float(_loss(model, modules, x[rows], y[rows], regression))


def _training_data(
    model: PreTrainedModel, features: np.ndarray, labels: np.ndarray, regression: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features as (n, 1, D) float32 and labels as class ids or float targets, checked against the head."""
    features, labels = np.asarray(features), np.asarray(labels)
    num_labels, width = model.config.num_labels, model.config.hidden_size
    if features.ndim != 2 or len(features) == 0 or len(features) != len(labels):
        raise LayerpruneError(
            f"fit_head needs features (n, D) and n labels, got {features.shape} and {labels.shape}"
        )
    if features.shape[1] != width:
        raise ModelError(f"features of width {features.shape[1]} do not fit a head of width {width}")
    if regression != (num_labels == 1):
        task = "regression" if regression else "classification"
        raise ModelError(f"the head has {num_labels} outputs, which does not suit a {task} task")
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[:, None]
    if regression:
        return x, torch.from_numpy(labels.astype(np.float32))
    if labels.min() < 0 or labels.max() >= num_labels:
        found = f"{labels.min()}..{labels.max()}"
        raise LayerpruneError(f"labels must be class ids 0..{num_labels - 1}, found {found}")
    return x, torch.from_numpy(labels.astype(np.int64))


def _loss(
    model: PreTrainedModel, modules: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, regression: bool
) -> torch.Tensor:
    logits = apply_head(model.config, modules, x)
    if regression:
        return nn.functional.mse_loss(logits[:, 0], y)
    return nn.functional.cross_entropy(logits, y)
