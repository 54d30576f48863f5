"""The head heal: re-fit only the head of the truncated model on the first-token states of its depth.

A model truncated at depth k computes head(hidden_states[k]), so re-fitting its head needs only the
original's first-token states at k (cached in `TextStates`), not the encoder: seconds, on any architecture
(ALBERT's shared layers included).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from ..artifacts import HealStats
from ..errors import LayerpruneError, ModelError
from ..models import apply_head, head, head_modules
from ..options import HeadOptions  # options are declared once, with their CLI flags
from ..prune import load_head, load_head_modules
from .base import held_out_split
from .states import TextStates


@dataclass
class HeadHeal:
    """The truncated model with its head re-fitted (`Heal`)."""

    depth: int
    fit: "HeadFit"
    modules: dict[str, nn.Module]  # the head's modules with the re-fitted weights
    config: object
    stats: HealStats

    def logits(self, texts: TextStates) -> np.ndarray:
        features = torch.from_numpy(np.ascontiguousarray(texts.first[self.depth]))[:, None]
        with torch.inference_mode():
            return apply_head(self.config, self.modules, features).float().numpy()

    def install(self, truncated: PreTrainedModel) -> None:
        load_head(truncated, self.fit.state)


def heal_head(original: PreTrainedModel, depth: int, texts: TextStates, labels: np.ndarray,
              regression: bool, opts: HeadOptions = HeadOptions()) -> HeadHeal:
    """Re-fit the head of `original` truncated at `depth` on the labelled heal texts."""
    started = time.perf_counter()
    fit = fit_head(original, texts.first[depth], labels, regression=regression, opts=opts)
    modules = {name: copy.deepcopy(m).float().cpu().eval() for name, m in head_modules(original).items()}
    load_head_modules(modules, fit.state)
    stats = HealStats(depth=depth, heal="head", n_train=fit.n_train, n_held_out=texts.n - fit.n_train,
                      seconds=round(time.perf_counter() - started, 1))
    return HeadHeal(depth, fit, modules, original.config, stats)


@dataclass
class HeadFit:
    """A re-fitted head: its weights by model state-dict key, ready for `load_head`."""

    state: dict[str, torch.Tensor]
    train_loss: float  # mean loss of the returned head on the features it was trained on
    steps: int  # optimizer steps behind the returned head (0: the fine-tuned head was kept)
    held_out_loss: float | None = None  # its loss on the held-out features that chose the epoch, if any
    n_train: int = 0  # features it was trained on (the rest were held out to choose the epoch)


def fit_head(
    model: PreTrainedModel, features: np.ndarray, labels: np.ndarray, *, regression: bool,
    opts: HeadOptions = HeadOptions(),
) -> HeadFit:
    """Re-fit only the head (pooler included) on frozen first-token features (n, D) of one depth.

    Starts from the fine-tuned head and trains a float32 CPU copy with AdamW, without dropout, shuffled by
    `opts.seed` (deterministic); the model's own head is left as it was. Two things make it robust:
    - the first linear layer is trained in standardized input coordinates (an exact reparametrization):
      lower layers' first tokens can be nearly constant (std 0.002 around a mean of norm 8), which raw
      AdamW steps barely move;
    - with n >= HELD_OUT_MIN (heal.base), a seeded tenth is held out and the epoch with the lowest held-out loss is
      returned, epoch 0 (the fine-tuned head) included, so a head that is already good stays good;
      training stops after `opts.patience` epochs without improvement. Fewer examples: all `opts.epochs` are run.
    """
    with _one_thread():
        return _fit_head(model, features, labels, regression, opts)

@contextmanager
def _one_thread() -> Iterator[None]:
    """Head-sized matmuls gain little from threads, and on a busy machine OpenMP's waiting threads make
    them tens of times slower; run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_head(
    model: PreTrainedModel, features: np.ndarray, labels: np.ndarray, regression: bool, opts: HeadOptions,
) -> HeadFit:
    x, y = _training_data(model, features, labels, regression)
    generator = torch.Generator().manual_seed(opts.seed)
    held, train = (torch.tensor(part, dtype=torch.long) for part in held_out_split(len(x), len(x), generator))
    mean, scale = _standardizer(x[train])
    x = (x - mean) / scale
    modules = _head_copy(model, mean, scale)
    optimizer = torch.optim.AdamW(
        [p for m in modules.values() for p in m.parameters()], lr=opts.lr, weight_decay=opts.weight_decay
    )
    best_loss, best = _mean_loss(model, modules, x, y, held, regression), _snapshot(modules)  # epoch 0
    best_epoch = best_steps = steps = 0
    for epoch in range(1, opts.epochs + 1):
        for idx in train[torch.randperm(len(train), generator=generator)].split(opts.batch_size):
            optimizer.zero_grad()
            _loss(model, modules, x[idx], y[idx], regression).backward()
            optimizer.step()
            steps += 1
        held_loss = _mean_loss(model, modules, x, y, held, regression)
        if held_loss is None or held_loss < best_loss:
            best_loss, best, best_epoch, best_steps = held_loss, _snapshot(modules), epoch, steps
        elif epoch - best_epoch >= opts.patience:
            break
    for name, module in modules.items():
        module.load_state_dict(best[name])
    train_loss = _mean_loss(model, modules, x, y, train, regression)
    return HeadFit(_export(model, modules, mean, scale), train_loss, best_steps, best_loss, len(train))


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
