"""The losses every distilling heal shares: the logits' distillation loss (Hinton et al. 2015) with the
label loss where labels exist, and the gap between a student's and the original's hidden states (the
intermediate-layer matching of PKD and TinyBERT): as unit vectors (PKD) or in units of the original's variance
(TinyBERT's, normalized)."""

from __future__ import annotations

import torch
from torch import nn



def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, regression: bool, *,
    temperature: float, label_weight: float,
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) + label_weight * CE(student, labels) (Hinton et al.
    2015); for regression, MSE to the teacher's output plus label_weight * MSE to the labels. Rows whose label
    is missing (-1, or NaN for regression: augmented texts) count in the first term only."""
    if regression:
        loss = nn.functional.mse_loss(student[:, 0], teacher[:, 0])
        if labels is not None and (known := ~torch.isnan(labels)).any():
            loss = loss + label_weight * nn.functional.mse_loss(student[known, 0], labels[known].float())
        return loss
    t = temperature
    loss = nn.functional.kl_div(
        nn.functional.log_softmax(student / t, dim=-1), nn.functional.log_softmax(teacher / t, dim=-1),
        reduction="batchmean", log_target=True,
    ) * t * t
    if labels is not None and label_weight and (known := labels >= 0).any():
        loss = loss + label_weight * nn.functional.cross_entropy(student[known], labels[known].long())
    return loss


def state_loss(student: torch.Tensor, teacher: torch.Tensor, variance: float,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared gap between hidden states (B, D) or (B, T, D), over the real tokens when `mask` (B, T)
    is given, divided by the original's mean per-dimension variance at that layer: each layer's term is then
    about 1 for unrelated states, whatever the scale of its activations."""
    gap = (student.float() - teacher.float()) ** 2
    if mask is None:
        return gap.mean() / variance
    weights = mask.to(gap.dtype).unsqueeze(-1)
    return (gap * weights).sum() / (weights.sum() * gap.shape[-1]) / variance


def direction_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """PKD's patient loss (Sun et al. 2019): the mean squared gap between the unit vectors of states (B, D),
    which is scale-free; 2 - 2 cos(student, teacher) per row."""
    gap = nn.functional.normalize(student.float(), dim=-1) - nn.functional.normalize(teacher.float(), dim=-1)
    return (gap ** 2).sum(dim=-1).mean()
