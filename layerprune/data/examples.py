"""The Examples container, and turning a source's raw columns into it: texts, and labels resolved in
one place (:func:`resolve_labels`: names or ids -> class ids, numbers -> regression targets, or the
label names inferred from the values when a task does not give them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from ..tasks import TaskConfig


@dataclass(frozen=True, eq=False)
class Examples:
    """Texts (and optional second texts of pairs) with int64 label ids or float32 targets."""

    texts: list[str]
    pairs: list[str] | None
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.labels.ndim != 1 or len(self.labels) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but labels of shape {self.labels.shape}")
        if self.pairs is not None and len(self.pairs) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.pairs)} pairs")

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int) -> "Examples":
        """The first ``n`` examples, in order (all of them when there are fewer)."""
        if n < 0:
            raise ValueError(f"head(n) needs n >= 0, got {n}")
        return Examples(
            texts=self.texts[:n],
            pairs=None if self.pairs is None else self.pairs[:n],
            labels=self.labels[:n].copy(),
        )

    def concat(self, other: "Examples") -> "Examples":
        """These examples followed by `other`'s (both with pairs or both without)."""
        if (self.pairs is None) != (other.pairs is None):
            raise ValueError("cannot concatenate examples with pairs and examples without")
        return Examples(
            texts=self.texts + other.texts,
            pairs=None if self.pairs is None else self.pairs + other.pairs,
            labels=np.concatenate([self.labels, other.labels]),
        )

    def select(self, idx: Sequence[int] | np.ndarray) -> "Examples":
        """The examples at the given positions, in the given order."""
        ix = np.asarray(idx, dtype=np.int64).reshape(-1)
        n = len(self)
        if ix.size and (ix.min() < -n or ix.max() >= n):
            raise IndexError(f"select: index out of range for {n} examples")
        pos = [int(i) for i in ix]
        return Examples(
            texts=[self.texts[i] for i in pos],
            pairs=None if self.pairs is None else [self.pairs[i] for i in pos],
            labels=self.labels[ix].copy(),
        )


def task_fields(task: TaskConfig) -> list[str]:
    """The columns a task reads: text, second text (pairs only), label."""
    return [task.text_field] + ([task.text_pair_field] if task.text_pair_field else []) + [task.label_field]


# --------------------------------------------------------------------------- labels


def short(v: Any) -> str:
    """A value as it appears in an error message: its repr, cut at 60 characters."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def as_int(v: Any) -> int | None:
    """An integer-valued label (1, 1.0, "1", "1.0", True) as int; None for anything else."""
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return int(v) if math.isfinite(v) and float(v).is_integer() else None
    if isinstance(v, str):
        s = v.strip()
        try:
            return int(s)
        except ValueError:
            pass
        try:
            f = float(s)
        except ValueError:
            return None
        return int(f) if math.isfinite(f) and f.is_integer() else None
    return None


def resolve_labels(
    values: Sequence[Any], where: str, *, names: list[str] | None = None, regression: bool = False
) -> tuple[list[str] | None, np.ndarray]:
    """Raw labels -> (label names, labels): the one place labels are interpreted.

    regression: float32 targets, names None. names given: each value is a name or an id 0..K-1 -> int64
    ids. Neither: the names are inferred (:func:`_infer_names`) and the values resolved against them.
    """
    if regression:
        return None, _targets(values, where)
    if names is None:
        names = _infer_names(values, where)
        if names is None:
            return None, _targets(values, where)
    return list(names), _class_ids(values, names, where)


def _infer_names(values: Sequence[Any], where: str) -> list[str] | None:
    """Label names of labels a task does not name: string labels give their sorted unique names; integer
    labels give ids 0..max named "0", "1", ...; other finite numbers mean regression (None)."""
    cleaned: list[Any] = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            v = v.strip()
        if v is None or v == "":
            raise DataError(f"missing label in row {i + 1} of {where}; every example needs a label")
        cleaned.append(int(v) if isinstance(v, bool) else v)
    numbers = _numbers(cleaned)
    if numbers is not None:
        if not all(x.is_integer() for x in numbers):
            return None
        lo, hi = int(min(numbers)), int(max(numbers))
        if lo < 0:
            raise DataError(
                f"integer labels in {where} must be ids 0..K-1, found {lo}; map them to 0..K-1 or use label names"
            )
        if hi < 1:
            raise DataError(
                f"all labels in {where} are 0, so the number of classes is unknown; pass the label names (--label-names)"
            )
        return [str(i) for i in range(hi + 1)]
    names = sorted({str(v) for v in cleaned})
    if len(names) < 2:
        raise DataError(f"only one label ({names[0]!r}) found in {where}; pass all label names (--label-names) in id order")
    return names


def _numbers(values: list[Any]) -> list[float] | None:
    """The values as finite floats when every one is a number (or a numeric string), else None."""
    out = []
    for v in values:
        if isinstance(v, (int, float)):
            out.append(float(v))
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            return None
    return out if all(math.isfinite(x) for x in out) else None


def _class_ids(values: Sequence[Any], names: list[str], where: str) -> np.ndarray:
    name_to_id = {n: i for i, n in enumerate(names)}
    k = len(names)
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        if isinstance(v, str) and v.strip() in name_to_id:
            out[i] = name_to_id[v.strip()]
            continue
        if v is None or (isinstance(v, str) and not v.strip()):
            raise DataError(f"missing label in row {i + 1} of {where}; every example needs a label")
        idx = as_int(v)
        if idx is None:
            raise DataError(
                f"unknown label {short(v)} in row {i + 1} of {where}; "
                f"expected one of {', '.join(names)} (or an id 0..{k - 1})"
            )
        if not 0 <= idx < k:
            raise DataError(
                f"label id {idx} in row {i + 1} of {where} is out of range: the task has {k} classes "
                f"({', '.join(names)}), ids 0..{k - 1}"
            )
        out[i] = idx
    return out


def _targets(values: Sequence[Any], where: str) -> np.ndarray:
    out = np.empty(len(values), dtype=np.float32)
    for i, v in enumerate(values):
        try:
            if isinstance(v, (bool, np.bool_)) or v is None:
                raise ValueError
            x = float(v.strip() if isinstance(v, str) else v)
        except (TypeError, ValueError):
            raise DataError(
                f"label {short(v)} in row {i + 1} of {where} is not a number; this is a regression task"
            ) from None
        if not math.isfinite(x):
            raise DataError(f"label {short(v)} in row {i + 1} of {where} is not a finite number")
        out[i] = x
    return out


# --------------------------------------------------------------------------- texts


def texts_of(values: Sequence[Any], column: str, where: str) -> list[str]:
    """A text column as strings; a missing value is an error (an empty string is a text)."""
    out = []
    for i, v in enumerate(values):
        if v is None:
            raise DataError(f"row {i + 1} of {where} has no text in column {column!r}")
        out.append(v if isinstance(v, str) else str(v))
    return out


def to_examples(task: TaskConfig, cols: dict[str, list[Any]], where: str) -> Examples:
    """A task's examples from raw columns (as a source read them), labels resolved with the task's names."""
    raw_labels = cols[task.label_field]
    if not raw_labels:
        raise DataError(f"{where} has no examples; check the file or the split")
    _, labels = resolve_labels(raw_labels, where, names=task.label_names, regression=task.is_regression)
    texts = texts_of(cols[task.text_field], task.text_field, where)
    pairs = texts_of(cols[task.text_pair_field], task.text_pair_field, where) if task.text_pair_field else None
    return Examples(texts=texts, pairs=pairs, labels=labels)
