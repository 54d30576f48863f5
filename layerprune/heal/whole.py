"""The whole-model heal: train every kept layer of the truncated model, and its head, to compute what the
original computes (intermediate-layer distillation, as PKD and TinyBERT set it up).

The student starts as the original truncated at `depth` (its bottom layers and fine-tuned head) and learns
from the original on the heal texts:
- the logits: Hinton et al.'s KL at temperature T, plus the label loss where labels exist;
- the hidden states: student layer j matches original layer map(j), map spreading the kept layers evenly
  over the original's (j * L / depth, rounded; the top kept layer matches the last layer, whose first token
  the head reads). First tokens always, as unit vectors (PKD's patient loss: in the lower layers the first
  token barely varies across texts, so a gap in units of its variance there would drown every other term),
  and every token where `token_weight` > 0 (TinyBERT's hidden-state loss), in units of the original's
  variance over the tokens of that layer.
Agreement with the original, not accuracy, is what certifies a cut (validate.forecast), so the label loss
is weighted low and the original's outputs on texts it never saw (augment.py) carry most of the signal.
The learning rate warms up over the first steps and decays linearly to zero over `epochs` passes, or over as
many steps as fit in `minutes` (timed on the held-out texts before training); the epoch with the lowest
held-out loss is kept (epoch 0, the truncated model as it was, included). Figures: docs/results.md.
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from ..artifacts import HealStats
from ..errors import LayerpruneError
from ..hidden import model_inputs
from ..models import head_modules, layer_list, total_layers
from ..options import WholeOptions  # options are declared once, with their CLI flags
from ..prune import head_state, load_head, truncate
from .base import check_depth, held_out_split, mean_loss, seeded, snapshot
from .loss import direction_loss, distillation_loss, state_loss
from .states import TextStates, real_tokens, token_states


def layer_map(depth: int, total: int) -> list[int]:
    """The original layer each student layer 1..depth learns to match: j * total / depth, rounded half up (so
    the top kept layer matches the last layer)."""
    return [(j * total + depth // 2) // depth for j in range(1, depth + 1)]


@dataclass
class WholeHeal:
    """The truncated model with every kept layer and its head trained from the original (`Heal`)."""

    depth: int
    student: PreTrainedModel = field(repr=False)  # the original truncated at `depth`, then trained
    steps: int
    held_out_loss: float
    stats: HealStats | None  # None: not trained (a start)
    held_out: list[int]  # the heal texts' batches held out to choose the epoch

    def logits(self, texts: TextStates) -> np.ndarray:
        out = np.zeros_like(texts.logits)
        accepted = inspect.signature(self.student.forward).parameters
        device = next(self.student.parameters()).device
        self.student.eval()
        with torch.inference_mode():
            for batch in texts.batches:
                out[batch.indices] = self.student(**model_inputs(batch, accepted, device)).logits.float().cpu().numpy()
        return out

    def install(self, truncated: PreTrainedModel) -> None:
        check_depth(truncated, self.depth)
        stack = layer_list(truncated)
        for i, layer in enumerate(layer_list(self.student)):
            stack[i] = copy.deepcopy(layer)
        load_head(truncated, head_state(self.student))


def heal_whole(
    original: PreTrainedModel, depth: int, texts: TextStates, labels: np.ndarray | None, *,
    regression: bool = False, opts: WholeOptions = WholeOptions(), start: WholeHeal | None = None,
    mapped: list[int] | None = None,
) -> WholeHeal:
    """Train every kept layer and the head of `original` truncated at `depth` on `texts` (the original's
    outputs on them; `labels` where known: -1 / NaN marks a text without). The student starts as `original`
    truncated at `depth`, or as `start` (a deeper whole-model heal) truncated there: most of the work is
    done already. Student layer j matches original layer `mapped`[j] (default `layer_map`). The original is not
    changed."""
    total = total_layers(original.config)
    if not 1 <= depth <= total:
        raise LayerpruneError(f"cannot heal a model truncated at {depth} of {total} layers")
    mapped = mapped or layer_map(depth, total)
    if len(mapped) != depth:
        raise LayerpruneError(f"a heal of depth {depth} matches {depth} original layers, not {len(mapped)}")
    for index in sorted(mapped) if opts.token_weight > 0 else []:  # the targets, each from the one below
        token_states(original, texts, index)
    started = time.perf_counter()
    if start is not None and start.depth < depth:
        raise LayerpruneError(f"a heal of depth {start.depth} cannot start one of depth {depth}")
    student = truncate(copy.deepcopy(original if start is None else start.student).float(), depth)
    trained = [p for module in [layer_list(student), *head_modules(student).values()] for p in module.parameters()]
    student.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(opts.seed)
    held, train = held_out_split(len(texts.batches), texts.n, generator)
    loss_of = _Loss(student, texts, mapped, labels, regression, opts)
    optimizer = torch.optim.AdamW(trained, lr=opts.lr, weight_decay=opts.weight_decay)
    timed = time.perf_counter()
    best_loss, best, best_epoch = loss_of.mean(held), snapshot(student), 0
    steps_total = _steps_within_budget(opts, len(train), len(held), time.perf_counter() - timed)
    schedule = get_linear_schedule_with_warmup(optimizer, int(opts.warmup * steps_total), max(steps_total, 1))
    steps = best_steps = epochs_run = 0
    # seeded: dropout's draws, so the heal is the same whatever ran before it
    with seeded(opts.seed), tqdm(total=steps_total, desc=f"heal every layer, depth {depth}", unit="batch",
                                 leave=False) as bar:
        while steps < steps_total:
            epochs_run += 1
            order = [train[j] for j in torch.randperm(len(train), generator=generator).tolist()]
            for i in order[: steps_total - steps]:
                optimizer.zero_grad()
                loss_of(i, training=True).backward()
                optimizer.step()
                schedule.step()
                steps += 1
                bar.update()
            held_loss = loss_of.mean(held)
            if held_loss is None or held_loss < best_loss:
                best_loss, best, best_epoch, best_steps = held_loss, snapshot(student), epochs_run, steps
            bar.set_postfix(held_out_loss=f"{held_loss:.4f}" if held_loss is not None else "-")
    student.load_state_dict(best)
    student.eval().requires_grad_(False)
    n_train = sum(len(texts.batches[i].indices) for i in train)
    stats = HealStats(depth=depth, heal="whole", n_train=n_train, n_held_out=texts.n - n_train, epochs=best_epoch,
                      epochs_run=epochs_run, seconds=round(time.perf_counter() - started, 1))
    return WholeHeal(depth, student, best_steps, float("nan") if best_loss is None else best_loss, stats, held)


def _steps_within_budget(opts: WholeOptions, train: int, held: int, held_seconds: float) -> int:
    """The training steps: `epochs` passes over the train batches, fewer where they would outrun
    `minutes`. A step (forward and backward) costs about three forward passes, which the held-out loss just
    timed; every pass ends with another held-out loss."""
    planned = opts.epochs * train
    if opts.minutes is None or held == 0 or planned == 0:
        return planned
    forward = held_seconds / held
    affordable = (60 * opts.minutes - opts.epochs * held_seconds) / (3 * forward)
    return max(1, min(planned, int(affordable + 1e-9)))  # 1e-9: 57 / 0.3 is 189.99... in floats


class _Loss:
    """The whole-model heal's loss on one batch of the heal texts, or the mean over several."""

    def __init__(self, student, texts: TextStates, mapped: list[int], labels, regression: bool, opts: WholeOptions):
        self.student, self.texts, self.mapped, self.regression, self.opts = student, texts, mapped, regression, opts
        self.accepted = inspect.signature(student.forward).parameters
        self.device = next(student.parameters()).device
        self.teacher = torch.from_numpy(texts.logits)
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels))
        self.first = torch.from_numpy(texts.first)  # (L+1, n, D)
        self.token_variance = [_token_variance(texts, m) for m in mapped] if opts.token_weight > 0 else []

    def __call__(self, i: int, training: bool) -> torch.Tensor:
        batch = self.texts.batches[i]
        self.student.train(training)
        out = self.student(**model_inputs(batch, self.accepted, self.device), output_hidden_states=True)
        idx = torch.from_numpy(batch.indices)
        labels = None if self.labels is None else self.labels[idx].to(self.device)
        loss = distillation_loss(out.logits.float(), self.teacher[idx].to(self.device), labels, self.regression,
                                 temperature=self.opts.temperature, label_weight=self.opts.label_weight)
        mask = batch.encoding["attention_mask"].to(self.device)
        for j, m in enumerate(self.mapped, start=1):
            state = out.hidden_states[j]
            loss = loss + self.opts.first_weight * direction_loss(state[:, 0], self.first[m, idx].to(self.device))
            if self.opts.token_weight > 0:
                target = self.texts.tokens[m][i].to(self.device)
                loss = loss + self.opts.token_weight * state_loss(state, target, self.token_variance[j - 1], mask)
        return loss

    def mean(self, batches: list[int]) -> float | None:
        return mean_loss(self, self.texts, batches)


def _token_variance(texts: TextStates, index: int) -> float:
    """The original's mean per-dimension variance over the real tokens at hidden-state `index` (from the first
    batches, `real_tokens`: a scale, not a statistic to be exact about)."""
    return float(real_tokens(texts.tokens[index], texts).var(dim=0).mean()) or 1.0
