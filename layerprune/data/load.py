"""One split of a task's examples, from whichever source its config names."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..tasks import FileSource, HubSource, RTPolaritySource, TaskConfig
from .examples import Examples, task_fields, to_examples
from .files import read_columns
from .glue import glue_examples
from .rt_polarity import rt_polarity_bytes, rt_polarity_examples


def load_examples(task: TaskConfig, split: str, *, glue_dir: Path | str | None = None) -> Examples:
    """The examples of one split of a task (``"train"``, ``"validation"``, ``"validation_matched"``, ...)."""
    source = task.source
    if split not in task.splits:
        extra = "; GLUE test labels are not public" if isinstance(source, HubSource) and split == "test" else ""
        raise DataError(f"task {task.name!r} has no split {split!r}; its splits are: {', '.join(task.splits)}{extra}")
    if isinstance(source, RTPolaritySource):
        return rt_polarity_examples(rt_polarity_bytes(), split)
    if isinstance(source, FileSource):
        path = Path(source.files[split])
        return to_examples(task, read_columns(path, task_fields(task)), str(path))
    return glue_examples(task, split, glue_dir)
