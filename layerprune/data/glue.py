"""GLUE (``kind: hub`` task configs): a local copy in the classic layout, else the Hugging Face hub.

With ``glue_dir`` (``--glue-dir``) or the env var ``GLUE_DIR``: the layout the GLUE download script
writes (``SST-2/dev.tsv``, ``CoLA/dev.tsv`` without header, ``MNLI/dev_matched.tsv``, ...), read as TSV
without quoting (MNLI and QNLI contain stray quotes). Rows with missing fields are skipped, as the
Hugging Face ``glue`` loader does. Otherwise ``datasets.load_dataset(path, name, split=...)``, which
fails offline with one :class:`DataError` line that names the local alternative.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..tasks import HubSource, TaskConfig
from .examples import Examples, as_int, task_fields, to_examples
from .files import RecordLines, csv_error, field_limit

GLUE_DIR_ENV = "GLUE_DIR"


def glue_dir_from_env() -> Path | None:
    env = os.environ.get(GLUE_DIR_ENV)
    return Path(env).expanduser() if env else None


def glue_examples(task: TaskConfig, split: str, glue_dir: Path | str | None = None) -> Examples:
    """One split of a hub task: from the local GLUE copy when there is one (and the task has a GLUE
    layout), else from the hub."""
    source = task.source
    assert isinstance(source, HubSource)
    gdir = Path(glue_dir).expanduser() if glue_dir is not None else glue_dir_from_env()
    if gdir is not None and source.glue_folder is not None:
        path = gdir / source.glue_folder / source.glue_files[split]
        cols, where = read_glue_file(task, source, path, gdir), str(path)
    else:
        cols = read_hub(task, source, split)
        name = f" ({source.name})" if source.name else ""
        where = f"hub dataset {source.path}{name}, split {split!r}"
    labels = cols[task.label_field]
    if labels and all(as_int(v) == -1 for v in labels):
        raise DataError(f"{where} has no labels (all -1: GLUE test labels are not public); use the validation split")
    return to_examples(task, cols, where)


def read_glue_file(task: TaskConfig, source: HubSource, path: Path, glue_dir: Path) -> dict[str, list[Any]]:
    """The task's columns of one file of a classic GLUE download."""
    if not glue_dir.is_dir():
        raise DataError(f"GLUE folder {glue_dir} not found; point --glue-dir (or GLUE_DIR) at a local GLUE copy")
    if not path.is_file():
        raise DataError(
            f"GLUE file {path} not found; --glue-dir (or GLUE_DIR) must be the folder written by the GLUE "
            f"download script, with {source.glue_folder}/{path.name} in it"
        )
    fields = task_fields(task)
    mapping = {f: source.glue_columns.get(f, f) for f in fields}
    form: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    header = None
    try:
        with open(path, encoding="utf-8-sig", newline="") as f, field_limit():
            lines = RecordLines(f)
            reader = csv.reader(lines, **form)
            index, header = _column_index(reader, source, mapping, path)
            lines.record.clear()
            need = max(index.values()) + 1
            out: dict[str, list[Any]] = {f: [] for f in fields}
            for row in reader:
                lines.record.clear()
                if len(row) < need:
                    continue  # blank or corrupted row: skipped, as the Hugging Face glue loader does
                for field, i in index.items():
                    out[field].append(row[i])
    except csv.Error as e:
        raise csv_error(path, e, lines, form, header) from None
    except UnicodeDecodeError as e:
        raise DataError(f"GLUE file {path} is not UTF-8 (byte {e.start}); re-download the GLUE data") from None
    except OSError as e:
        raise DataError(f"cannot read GLUE file {path}: {e.strerror or e}") from None
    if not out[task.label_field]:
        raise DataError(f"GLUE file {path} has no examples; re-download the GLUE data")
    return out


def _column_index(reader: Any, source: HubSource, mapping: dict[str, Any],
                  path: Path) -> tuple[dict[str, int], list[str] | None]:
    """Task field -> column position: from the header row (read here), or the config's indices; and the header."""
    if not source.glue_header:
        return {field: int(col) for field, col in mapping.items()}, None
    header = next(reader, None)
    if header is None:
        raise DataError(f"GLUE file {path} is empty; re-download the GLUE data")
    for col in mapping.values():
        if col not in header:
            raise DataError(f"column {col!r} not found in GLUE file {path}; columns found: {', '.join(header)}")
    return {field: header.index(col) for field, col in mapping.items()}, header


def read_hub(task: TaskConfig, source: HubSource, split: str) -> dict[str, list[Any]]:
    """The task's columns of one split of a hub dataset; offline or unknown: one DataError line."""
    if source.glue_folder is not None:
        files = ", ".join(f"{source.glue_folder}/{name}" for name in source.glue_files.values())
        advice = (
            f"GLUE task {task.name!r} needs the Hugging Face hub, which is unreachable; point --glue-dir "
            f"(or GLUE_DIR) at a local GLUE copy ({files}, ...)"
        )
    else:
        advice = (
            f"task {task.name!r} needs the Hugging Face hub dataset {source.path!r}, which is unreachable; "
            "use local files instead (--data FILE --text-field COL --label-field COL)"
        )
    try:
        import datasets
    except ImportError:
        raise DataError(advice.replace("which is unreachable", "but the datasets package is not installed")) from None
    try:
        ds = datasets.load_dataset(source.path, source.name, split=split)
    except Exception as e:  # offline, unknown dataset, hub errors: all mean "use local data"
        raise DataError(f"{advice} [{type(e).__name__}]") from None
    fields = task_fields(task)
    for f in fields:
        if f not in ds.column_names:
            raise DataError(
                f"column {f!r} not found in hub dataset {source.path} ({source.name}); "
                f"columns found: {', '.join(ds.column_names)}; fix the task config"
            )
    return {f: list(ds[f]) for f in fields}
