"""Local data files: ``.csv``, ``.tsv`` (no quoting), ``.jsonl`` / ``.json`` (JSON lines, or one JSON
array of objects), all UTF-8; and the task config for files given on the command line (``--data``)."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from ..errors import DataError, TaskError, first_line
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
    # TSV files quote nothing: a stray quote is part of the text
    form = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if delimiter == "\t" else {}
    with _open_text(path) as f:
        lines = RecordLines(f)
        reader = csv.DictReader(lines, **form)
        header, rows = None, []
        with field_limit():
            try:
                header = list(reader.fieldnames or [])
                lines.record.clear()
                for row in reader:
                    if any(v not in (None, "") for k, v in row.items() if k is not None):
                        rows.append(row)
                    lines.record.clear()
            except csv.Error as e:
                raise csv_error(path, e, lines, form, header) from None
    return header, rows


def _read_json_lines(path: Path) -> Rows:
    with _open_text(path) as f:
        text = f.read()
    stripped = text.lstrip()
    rows: list[tuple[str, Any]]  # (where, row)
    if stripped.startswith("["):
        try:
            rows = [(f"row {i}", row) for i, row in enumerate(json.loads(stripped), start=1)]
        except ValueError as e:  # a JSONDecodeError, or an integer of more digits than Python converts
            raise DataError(f"{path} is not valid JSON (line {getattr(e, 'lineno', '?')}): {_why(e)}") from None
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {lineno}", json.loads(line)))
            except ValueError as e:
                raise DataError(
                    f"line {lineno} of {path} is not valid JSON ({_why(e)}); expected one JSON object per line"
                ) from None
    columns: dict[str, None] = {}
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where} of {path} is not a JSON object; expected one object per line")
        for k, v in row.items():
            check_field(path, where, k, v if isinstance(v, str) else json.dumps(v))
            columns.setdefault(k, None)
    return list(columns), [row for _, row in rows]


def _why(error: ValueError) -> str:
    return error.msg if isinstance(error, json.JSONDecodeError) else first_line(error)


# --- one limit on a field, for every reader of data files -------------------------------------------------------

MAX_FIELD_CHARS = 128 * 1024  # csv's own default; a classifier reads at most 512 tokens, a few thousand characters


def check_field(path: Path, where: str, field: Any, value: str) -> None:
    """Refuse a field longer than MAX_FIELD_CHARS, naming the file, line and field: tokenizing one such text
    takes minutes and gigabytes, for the few hundred tokens the model reads."""
    if len(value) > MAX_FIELD_CHARS:
        raise _too_long(path, where, field, len(value))


def _too_long(path: Path, where: str, field: Any, length: int) -> DataError:
    return DataError(f"{where} of {path}: field {field!r} holds {length:,} characters, more than the "
                     f"{MAX_FIELD_CHARS:,} a field may hold; is it the right file?")


@contextmanager
def field_limit() -> Iterator[None]:
    """csv's limit on a field (process-wide) at MAX_FIELD_CHARS while a file is read, then back as it was."""
    before = csv.field_size_limit(MAX_FIELD_CHARS)
    try:
        yield
    finally:
        csv.field_size_limit(before)


class RecordLines:
    """A text file's lines for csv, counted, keeping those of the record being read (`record`; the reader's
    caller clears it after each record): csv says that a field is too long, not which."""

    def __init__(self, lines: Iterator[str]) -> None:
        self.lines, self.record, self.count = lines, [], 0

    def __iter__(self) -> RecordLines:
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        self.record.append(line)
        self.count += 1
        return line


def csv_error(path: Path, error: csv.Error, lines: RecordLines, form: dict[str, Any],
              header: list[str] | None) -> DataError:
    """The DataError for a csv.Error (inside field_limit) on the last line read: for a field over the limit,
    the one that names the field, found by parsing the record's lines again without the limit."""
    line = lines.count
    if "field limit" not in str(error):
        return DataError(f"cannot parse {path} (line {line}): {error}")
    text = "".join(lines.record)
    csv.field_size_limit(len(text) + 1)  # (field_limit puts it back)
    try:
        values = next((row for row in csv.reader(io.StringIO(text), **form) if row), [text])
    except csv.Error:  # a quoted field still open where the reader stopped: the rest of the record is that field
        values = [text]
    longest = max(range(len(values)), key=lambda i: len(values[i]))
    names = header or []
    field = names[longest] if longest < len(names) else f"column {longest + 1}"
    return _too_long(path, f"line {line}", field, len(values[longest]))


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
