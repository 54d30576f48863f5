"""What several benchmarks measure with: a run directory read once, markdown tables, timing in interleaved rounds,
and the comma-separated flag values they take."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layerprune.artifacts import AnalysisReport, load_analysis
from layerprune.tasks import TaskConfig
from layerprune.timing import Timing, timed_rounds  # the benchmarks time as the library does (re-exported)
from layerprune.validate import EvalParts, calibration_and_holdout


@dataclass(frozen=True)
class Run:
    """A run directory's analysis (`layerprune analyze`), with its task and data."""

    dir: Path
    analysis: AnalysisReport

    @property
    def task(self) -> TaskConfig:
        return self.analysis.task_config

    @property
    def glue_dir(self) -> Path | None:
        return Path(self.analysis.glue_dir) if self.analysis.glue_dir else None

    def parts(self, max_examples: int | None = None, resample_seed: int | None = None) -> EvalParts:
        """The task's calibration and holdout examples, as export and validation cut them."""
        return calibration_and_holdout(self.task, self.glue_dir, max_examples, resample_seed)


def read_run(run_dir: Path) -> Run:
    """The run directory's analysis, or export's one-line refusal (before any work)."""
    return Run(Path(run_dir), load_analysis(run_dir))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table; `align` is one letter a column, l or r (default: every column left)."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in (align or "l" * len(header))) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(map(str, r)) + " |" for r in rows)])


def disagreement(original: np.ndarray, other: np.ndarray) -> float:
    """The share of rows whose top class differs between two (n, classes) logit arrays."""
    return float(np.mean(original.argmax(-1) != other.argmax(-1)))


def listed(parse: Callable[[str], Any], choices: Sequence[Any] | None = None) -> Callable[[str], list[Any]]:
    """A flag type: comma-separated values, each parsed by `parse` (and one of `choices`, if given)."""

    def values(text: str) -> list[Any]:
        try:
            out = [parse(x.strip()) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}") from None
        if choices is not None and not set(out) <= set(choices):
            raise argparse.ArgumentTypeError(f"each must be one of {', '.join(map(str, choices))}, got {text!r}")
        return out

    return values
