"""One split of a task's examples, from whichever source its config names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import DataError
from ..tasks import TaskConfig
from .examples import Examples, task_fields, to_examples
from .files import read_columns
from .glue import glue_examples
from .rt_polarity import rt_polarity_bytes, rt_polarity_examples


def file_examples(task: TaskConfig, split: str, glue_dir: Path | str | None = None) -> Examples:
    """One split of a task on local files (FileSource): the file it names for the split."""
    path = Path(task.source.files[split])
    return to_examples(task, read_columns(path, task_fields(task)), str(path))


# The reader of each source kind (tasks.Source): (task, split, glue_dir) -> that split's examples.
READERS: dict[str, Callable[[TaskConfig, str, Path | str | None], Examples]] = {
    "hub": glue_examples,
    "rt-polarity": lambda task, split, glue_dir: rt_polarity_examples(rt_polarity_bytes(), split),
    "file": file_examples,
}


def load_examples(task: TaskConfig, split: str, *, glue_dir: Path | str | None = None) -> Examples:
    """The examples of one split of a task (``"train"``, ``"validation"``, ``"validation_matched"``, ...)."""
    source = task.source
    if split not in task.splits:
        extra = "; GLUE test labels are not public" if not source.labelled_test and split == "test" else ""
        raise DataError(f"task {task.name!r} has no split {split!r}; its splits are: {', '.join(task.splits)}{extra}")
    return READERS[source.kind](task, split, glue_dir)
