"""The texts a heal learns from: the heal texts (the task's train split, or --heal-data), their augmented copies,
and --heal-data's agreement texts, which only measure disagreement.

Agreement texts are the --heal-data texts after the heal texts, never train texts: the original model was most
likely fine-tuned on those, is surer of them, and a pruned model disagrees with it less there than on new texts,
which would make the agreement bound optimistic (docs/export.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import Examples, load_examples, read_texts
from ..options import ExportOptions
from ..tasks import TaskConfig
from .augment import augment_texts


@dataclass(frozen=True)
class HealTexts:
    examples: Examples | None  # the texts heals learn from (None: no heal possible)
    labels: np.ndarray | None  # their labels where known (-1 / NaN: augmented), None: unlabeled texts
    agreement: Examples | None  # unlabeled in-domain texts that bound disagreement (never heal or train texts)


def heal_texts(task: TaskConfig, glue_dir: Path | None, opts: ExportOptions) -> HealTexts:
    """The texts heals learn from: --heal-data (unlabeled) or the task's train split, the first --heal-examples of
    them (default: all, --heal-data's agreement texts excepted), and --heal-data's next --agreement-examples."""
    if opts.heal_data is not None:
        pool = read_texts(opts.heal_data, opts.heal_text_field or task.text_field, task.text_pair_field)
        heal = pool.head(opts.heal_examples or len(pool) - min(opts.agreement_examples, len(pool) // 2))
        rest = pool.select(np.arange(len(heal), min(len(pool), len(heal) + opts.agreement_examples)))
        labels = None
    elif task.train_split:
        heal = load_examples(task, task.train_split, glue_dir=glue_dir)
        heal, rest = heal.head(opts.heal_examples or len(heal)), None
        labels = heal.labels
    else:
        return HealTexts(None, None, None)
    return HealTexts(heal, labels, rest if rest is not None and len(rest) else None)


def with_augmented(texts: HealTexts, task: TaskConfig, opts: ExportOptions) -> HealTexts:
    """The heal texts followed by --augment new texts per text (augment.py), which carry no label."""
    new = augment_texts(texts.examples, opts.augment, seed=opts.augment_seed)
    labels = texts.labels
    if labels is not None:
        missing = np.full(len(new), np.nan if task.is_regression else -1)
        labels = np.concatenate([labels.astype(missing.dtype), missing])
    return HealTexts(texts.examples.concat(new), labels, texts.agreement)
