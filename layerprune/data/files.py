"""Local data files: ``.csv``, ``.tsv`` (no quoting), ``.jsonl`` / ``.json`` (JSON lines, or one JSON
array of objects), all UTF-8; and the task config for files given on the command line (``--data``)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from pydantic import ValidationError

from ..errors import DataError, TaskError
from ..tasks import FileSource, Metric, TaskConfig, validation_message
from .examples import Examples, resolve_labels, texts_of

Rows = tuple[list[str], list[dict[str, Any]]]  # column names, rows


def _open_text(path: Path):
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise DataError(f"data file {path} not found; check the path") from None
    except IsADirectoryError:
        raise DataError(f"data file {path} is a folder; pass a .csv, .tsv, .jsonl or .json file") from None
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None


def _read_delimited(path: Path, delimiter: str) -> Rows:
    with _open_text(path) as f:
        if delimiter == "\t":  # TSV files quote nothing: a stray quote is part of the text
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.DictReader(f)
        rows = [row for row in reader if any(v not in (None, "") for k, v in row.items() if k is not None)]
        columns = list(reader.fieldnames or [])
    return columns, rows


def _read_json_lines(path: Path) -> Rows:
    with _open_text(path) as f:
        text = f.read()
    stripped = text.lstrip()
    rows: list[Any]
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON (line {e.lineno}): {e.msg}") from None
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"line {lineno} of {path} is not valid JSON ({e.msg}); expected one JSON object per line"
                ) from None
    columns: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"row {i + 1} of {path} is not a JSON object; expected one object per line")
        for k in row:
            columns.setdefault(k, None)
    return list(columns), rows


def _read_table(path: Path) -> Rows:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return _read_delimited(path, ",")
        if suffix == ".tsv":
            return _read_delimited(path, "\t")
        if suffix in (".jsonl", ".json"):
            return _read_json_lines(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"cannot parse {path}: {e}") from None
    raise DataError(f"unsupported data file extension {suffix or '(none)'!r} of {path}; use .csv, .tsv, .jsonl or .json")


def read_columns(path: Path, fields: Iterable[str]) -> dict[str, list[Any]]:
    """The given columns of a local .csv/.tsv/.jsonl/.json file, as lists of raw values."""
    path = Path(path)
    fields = list(dict.fromkeys(fields))
    if not path.exists():
        raise DataError(f"data file {path} not found; check the path")
    columns, rows = _read_table(path)
    if not rows:
        raise DataError(f"{path} has no examples; it is empty or has only a header")
    for f in fields:
        if f not in columns:
            raise DataError(
                f"column {f!r} not found in {path}; columns found: {', '.join(map(str, columns)) or '(none)'}; "
                "set the text/label field names to match (e.g. --text-field, --label-field)"
            )
    out: dict[str, list[Any]] = {f: [] for f in fields}
    for i, row in enumerate(rows):
        for f in fields:
            if f not in row or (row[f] is None and path.suffix.lower() in (".csv", ".tsv")):
                raise DataError(f"row {i + 1} of {path} has no value for column {f!r} (fewer fields than the header?)")
            out[f].append(row[f])
    return out


def read_texts(path: Path, text_field: str, text_pair_field: str | None = None) -> Examples:
    """Unlabeled texts (and second texts) of a local file, e.g. in-domain texts to heal a pruned model with.
    The labels are placeholders (zeros): callers that read this know the texts carry none."""
    fields = [text_field] + ([text_pair_field] if text_pair_field else [])
    cols = read_columns(path, fields)
    texts = texts_of(cols[text_field], text_field, str(path))
    pairs = texts_of(cols[text_pair_field], text_pair_field, str(path)) if text_pair_field else None
    return Examples(texts=texts, pairs=pairs, labels=np.zeros(len(texts), dtype=np.int64))


def task_from_files(
    eval_file: str | os.PathLike[str],
    text_field: str,
    label_field: str,
    text_pair_field: str | None = None,
    train_file: str | os.PathLike[str] | None = None,
    label_names: list[str] | None = None,
    metric: Metric | None = None,
    *,
    regression: bool | None = None,
    eval_split: str = "validation",
) -> TaskConfig:
    """A task for local files without a config (``--data FILE [--train-data FILE]``).

    Without ``label_names`` they are inferred from the labels of the files (see
    :func:`~layerprune.data.examples.resolve_labels`); ``regression=True`` forces regression.
    The metric defaults to accuracy for classification and pearson for regression.
    """
    eval_path = Path(eval_file).expanduser().resolve()
    files = {eval_split: str(eval_path)}
    if train_file is not None:
        if eval_split == "train":
            raise TaskError("the eval split of local data cannot be called 'train' when a train file is given")
        files["train"] = str(Path(train_file).expanduser().resolve())
    if regression and label_names is not None:
        raise TaskError("a regression task has no label names; drop --label-names or --regression")

    fields = [text_field] + ([text_pair_field] if text_pair_field else []) + [label_field]
    raw_labels: list[Any] = []
    for path in files.values():
        raw_labels.extend(read_columns(Path(path), fields)[label_field])

    where = " and ".join(str(p) for p in files.values())
    if regression:
        names = None
    elif label_names is not None:
        names = list(label_names)  # checked against the values when a split is loaded
    else:
        names, _ = resolve_labels(raw_labels, where)
    if metric is None:
        metric = "pearson" if names is None else "accuracy"
    try:
        return TaskConfig(
            name=eval_path.stem,
            description=f"local data: {where}",
            source=FileSource(kind="file", files=files),
            text_field=text_field,
            text_pair_field=text_pair_field,
            label_field=label_field,
            label_names=names,
            metric=metric,
            eval_split=eval_split,
            train_split="train" if train_file is not None else None,
        )
    except ValidationError as e:
        raise TaskError(f"cannot use local data {where}: {validation_message(e)}") from None
