"""The top-layer heal: re-tune the top kept layers of the truncated model and its head, by distillation
from the original, so that its logits match the full model's.

The layers below the re-tuned ones are frozen, so the re-tuned layers always see the same inputs: the
original model's hidden states at depth - heal_layers. Those are computed once per text (`TextStates`)
and training runs only the re-tuned layers and the head, which is why healing costs seconds to minutes
rather than a fine-tune. Loss: Hinton et al.'s distillation, KL(teacher || student) on logits softened by a
temperature T (scaled by T^2), plus a weighted label cross-entropy where labels exist, plus the squared gap
between the student's top first-token state and the original's last-layer one (what the head reads; in units
of its variance): a 2-class teacher's logits say little per text, its last-layer state says much more.
AdamW at a constant learning rate by default (`TopOptions.warmup` gives TinyBERT's linear warmup and
decay), dropout on as in fine-tuning (`dropout` turns it off). Training stops early on a held-out tenth of
the heal texts; the epoch with the lowest held-out loss wins (epoch 0, the weights as they were, included).
Two levers for the student's behaviour between the heal texts are off by default (`neighbours`: noisy input
states labelled by the original's layers above the cut; `ema`: a moving average of the weights), because
neither brought it closer to the original on unseen texts where measured. Figures: docs/results.md.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from ..artifacts import HealStats
from ..errors import LayerpruneError
from ..hidden import model_inputs
from ..models import head_modules, layer_list, run_layers_on, total_layers
from ..options import TopOptions  # options are declared once, with their CLI flags
from ..prune import head_state, load_head
from .base import check_depth, held_out_split, mean_loss, seeded, snapshot
from .loss import distillation_loss, state_loss
from .states import TextStates, real_tokens, token_states


@dataclass
class TopHeal:
    """A truncated model's re-tuned top layers and head, and how they were trained (`Heal`)."""

    depth: int
    heal_layers: int
    original: PreTrainedModel = field(repr=False)  # computes the re-tuned layers' inputs on new texts
    student: PreTrainedModel = field(repr=False)  # a copy of the original whose layer list is swapped when run
    layers: nn.ModuleList = field(repr=False)  # the re-tuned layers depth-heal_layers+1 .. depth
    steps: int
    held_out_loss: float
    stats: HealStats
    held_out: list[int]  # the heal texts' batches held out to choose the epoch

    def logits(self, texts: TextStates) -> np.ndarray:
        """The healed truncated model's logits on `texts` (in example order)."""
        states = token_states(self.original, texts, self.depth - self.heal_layers)
        out = np.zeros_like(texts.logits)
        accepted = inspect.signature(self.student.forward).parameters
        device = next(self.student.parameters()).device
        self.student.eval()
        with run_layers_on(self.student, self.layers) as feed, torch.inference_mode():
            for batch, batch_states in zip(texts.batches, states):
                feed(batch_states.to(device, torch.float32))
                out[batch.indices] = self.student(**model_inputs(batch, accepted, device)).logits.float().cpu().numpy()
        return out

    def install(self, truncated: PreTrainedModel) -> None:
        """Put the re-tuned layers and head into the model truncated at `depth` (in place)."""
        check_depth(truncated, self.depth)
        stack = layer_list(truncated)
        for offset, layer in enumerate(self.layers):
            stack[self.depth - self.heal_layers + offset] = copy.deepcopy(layer)
        load_head(truncated, head_state(self.student))


def start_layers(depth: int, total: int, opts: TopOptions) -> list[int]:
    """The original's layers (1-based) the student's `depth` layers start as: the kept ones below the re-tuned
    ones, then the re-tuned ones from the kept layers or (`opts.start` "top") from the original's top ones."""
    first = depth - opts.heal_layers if opts.start == "kept" else total - opts.heal_layers
    return [*range(1, depth - opts.heal_layers + 1), *range(first + 1, first + opts.heal_layers + 1)]


def heal_top(
    original: PreTrainedModel, depth: int, texts: TextStates, labels: np.ndarray | None, *,
    regression: bool = False, opts: TopOptions = TopOptions(),
) -> TopHeal:
    """Re-tune layers depth-heal_layers+1..depth and the head of `original` truncated at `depth` to match
    the original's logits on `texts` (plus the labels, when given), starting those layers from the kept ones or
    (`opts.start` "top") from the original's top ones. The original model is not changed."""
    total = total_layers(original.config)
    if not 1 <= opts.heal_layers <= depth <= total:
        raise LayerpruneError(f"cannot re-tune {opts.heal_layers} layers of a model truncated at {depth} of {total}")
    started = time.perf_counter()
    inputs = token_states(original, texts, depth - opts.heal_layers)
    student = copy.deepcopy(original).float()
    stack = layer_list(student)
    layers = nn.ModuleList(stack[i - 1] for i in start_layers(depth, total, opts)[depth - opts.heal_layers:])
    trainable = nn.ModuleList([layers, *head_modules(student).values()])  # trained, snapshotted, averaged
    student.requires_grad_(False)
    trainable.requires_grad_(True)
    generator = torch.Generator().manual_seed(opts.seed)
    held, train = held_out_split(len(texts.batches), texts.n, generator)
    teacher = torch.from_numpy(texts.logits)
    targets = None if labels is None else torch.from_numpy(np.asarray(labels))
    above = _Above(original, depth - opts.heal_layers, inputs, texts) if opts.neighbours > 0 else None
    loss_of = _Loss(student, layers, texts, inputs, teacher, targets, regression, opts, above)
    averaged = None if opts.ema is None else AveragedModel(trainable, multi_avg_fn=get_ema_multi_avg_fn(opts.ema))
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    schedule = None if opts.warmup is None else get_linear_schedule_with_warmup(
        optimizer, int(opts.warmup * opts.epochs * len(train)), max(opts.epochs * len(train), 1))
    best_loss, best, best_epoch = loss_of.mean(held), snapshot(trainable), 0
    steps = best_steps = epochs_run = 0
    with seeded(opts.seed):  # dropout's draws: the same heal whatever ran before
        for epoch in range(1, opts.epochs + 1):
            epochs_run = epoch
            shuffled = [train[i] for i in torch.randperm(len(train), generator=generator).tolist()]
            for i in tqdm(shuffled, desc=f"heal the top layers, depth {depth}, epoch {epoch}", unit="batch", leave=False):
                optimizer.zero_grad()
                loss_of(i, training=True).backward()
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                if averaged is not None:
                    averaged.update_parameters(trainable)
                steps += 1
            with _averaged(trainable, averaged):  # score and keep the average; train on from the live weights
                held_loss = loss_of.mean(held)
                if held_loss is None or held_loss < best_loss:
                    best_loss, best, best_epoch, best_steps = held_loss, snapshot(trainable), epoch, steps
            if epoch - best_epoch >= opts.patience:
                break
    trainable.load_state_dict(best)
    student.eval().requires_grad_(False)
    n_train = sum(len(texts.batches[i].indices) for i in train)
    stats = HealStats(depth=depth, heal="top", n_train=n_train, n_held_out=texts.n - n_train, epochs=best_epoch,
                      epochs_run=epochs_run, seconds=round(time.perf_counter() - started, 1))
    return TopHeal(depth, opts.heal_layers, original, student, layers, best_steps,
                     float("nan") if best_loss is None else best_loss, stats, held)


class _Loss:
    """The distillation loss of one batch of the heal texts, or the mean over several."""

    def __init__(self, student, layers, texts, inputs, teacher, targets, regression, opts: TopOptions,
                 above: _Above | None = None):
        self.student, self.layers, self.texts, self.inputs = student, layers, texts, inputs
        self.teacher, self.targets, self.regression, self.opts, self.above = teacher, targets, regression, opts, above
        self.accepted = inspect.signature(student.forward).parameters
        self.device = next(student.parameters()).device
        self.top_states = torch.from_numpy(texts.first[-1])  # (n, D) the original's last layer, first token
        self.top_variance = float(self.top_states.var(dim=0).mean()) or 1.0

    def __call__(self, i: int, training: bool) -> torch.Tensor:
        batch = self.texts.batches[i]
        noisy = training and self.opts.dropout
        self.layers.train(noisy)
        for module in head_modules(self.student).values():
            module.train(noisy)
        idx = torch.from_numpy(batch.indices)
        states = self.inputs[i].to(self.device, torch.float32)
        targets = None if self.targets is None else self.targets[idx].to(self.device)
        loss = self._loss(batch, states, self.teacher[idx].to(self.device), self.top_states[idx].to(self.device),
                          targets)
        if training and self.above is not None:
            states = self.above.nearby(states, self.opts.neighbours)
            logits, top = self.above(batch, states)
            loss = loss + self._loss(batch, states, logits, top, None)
        return loss

    def _loss(self, batch, states: torch.Tensor, teacher: torch.Tensor, top: torch.Tensor,
              targets: torch.Tensor | None) -> torch.Tensor:
        """The student fed `states` against the original's logits `teacher` and top first-token states `top`
        there, plus the label loss where `targets` are known."""
        features = self.opts.feature_weight > 0
        with run_layers_on(self.student, self.layers) as feed:
            feed(states)
            out = self.student(**model_inputs(batch, self.accepted, self.device), output_hidden_states=features)
        loss = distillation_loss(out.logits.float(), teacher, targets, self.regression,
                                 temperature=self.opts.temperature, label_weight=self.opts.label_weight)
        if features:  # the gap to the original's last-layer first-token state, what the head reads
            loss = loss + self.opts.feature_weight * state_loss(out.hidden_states[-1][:, 0], top, self.top_variance)
        return loss

    def mean(self, batches: list[int]) -> float | None:
        return mean_loss(self, self.texts, batches)


class _Above:
    """The original's layers above the cut and its head, run on any input states: they label states near the
    heal texts' own (`TopOptions.neighbours`)."""

    def __init__(self, original: PreTrainedModel, cut: int, inputs: list[torch.Tensor], texts: TextStates):
        self.model = copy.deepcopy(original).float().eval().requires_grad_(False)
        self.layers = nn.ModuleList(layer_list(self.model)[cut:])
        self.accepted = inspect.signature(self.model.forward).parameters
        self.device = next(self.model.parameters()).device
        self.spread = real_tokens(inputs, texts).std(dim=0).to(self.device)  # per dimension

    def nearby(self, states: torch.Tensor, scale: float) -> torch.Tensor:
        return states + scale * self.spread * torch.randn_like(states)

    def __call__(self, batch, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The original's logits and last-layer first-token states on `states` fed above the cut."""
        with run_layers_on(self.model, self.layers) as feed, torch.no_grad():
            feed(states)
            out = self.model(**model_inputs(batch, self.accepted, self.device), output_hidden_states=True)
        return out.logits.float(), out.hidden_states[-1][:, 0].float()


@contextmanager
def _averaged(trainable: nn.Module, averaged: AveragedModel | None) -> Iterator[None]:
    """Within the block `trainable` holds the moving average's weights (where there is one), then its own again."""
    if averaged is None:
        yield
        return
    live = snapshot(trainable)
    trainable.load_state_dict(averaged.module.state_dict())
    try:
        yield
    finally:
        trainable.load_state_dict(live)
