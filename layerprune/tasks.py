"""Task configs: which data a task reads, its columns, its labels and its primary metric.

One YAML file per task lives in ``configs/tasks/`` at the repository root (override the folder
with the env var ``LAYERPRUNE_TASKS_DIR``). Each file is validated by :class:`TaskConfig`.
``load_task`` takes a known task name or a path to a YAML file; ``task_from_files`` builds a
config for local data files given on the command line (``--data FILE --text-field ...``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import DataError, TaskError

Metric = Literal["accuracy", "f1", "matthews", "pearson", "spearman"]
REGRESSION_METRICS: frozenset[str] = frozenset({"pearson", "spearman"})
RT_POLARITY_SPLITS: tuple[str, ...] = ("train", "validation", "test")
DATA_SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".jsonl", ".json")

TASKS_DIR_ENV = "LAYERPRUNE_TASKS_DIR"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HubSource(_Strict):
    """A Hugging Face hub dataset, with (for GLUE) the layout of the classic GLUE download."""

    kind: Literal["hub"]
    path: str = Field(description="hub dataset id, e.g. nyu-mll/glue")
    name: str | None = Field(default=None, description="hub config name, e.g. sst2")
    glue_folder: str | None = Field(
        default=None, description="folder of this task in a classic GLUE download (e.g. SST-2); None: no offline copy"
    )
    glue_files: dict[str, str] = Field(
        default_factory=dict, description="split name -> file inside glue_folder (e.g. validation: dev.tsv)"
    )
    glue_header: bool = Field(default=True, description="False for headerless GLUE files (CoLA)")
    glue_columns: dict[str, Union[int, str]] = Field(
        default_factory=dict,
        description="task field -> GLUE column name (or 0-based index when glue_header is false); "
        "fields not listed use the same column name",
    )

    @model_validator(mode="after")
    def _check(self) -> "HubSource":
        if self.glue_folder is None and (self.glue_files or self.glue_columns):
            raise ValueError("glue_files/glue_columns need glue_folder")
        if self.glue_folder is not None and not self.glue_files:
            raise ValueError("glue_folder needs glue_files (split -> file name)")
        for field, col in self.glue_columns.items():
            if self.glue_header and isinstance(col, int):
                raise ValueError(f"glue_columns.{field}: a column index needs glue_header: false")
            if not self.glue_header and not isinstance(col, int):
                raise ValueError(f"glue_columns.{field}: a headerless file needs a column index")
            if isinstance(col, int) and col < 0:
                raise ValueError(f"glue_columns.{field}: column index must be >= 0")
        return self

    @property
    def splits(self) -> list[str]:
        """Splits with labels: those of glue_files, else the usual three."""
        return list(self.glue_files) if self.glue_files else ["train", "validation", "test"]


class RTPolaritySource(_Strict):
    """The Rotten Tomatoes sentences of Hutto & Gilbert (2014), with fixed splits (see data.py)."""

    kind: Literal["rt-polarity"]

    @property
    def splits(self) -> list[str]:
        return list(RT_POLARITY_SPLITS)


class FileSource(_Strict):
    """Local data files, one per split: .csv, .tsv, .jsonl or .json (JSON lines)."""

    kind: Literal["file"]
    files: dict[str, str] = Field(
        description="split name -> path; relative paths in a YAML file are relative to that file"
    )

    @model_validator(mode="after")
    def _check(self) -> "FileSource":
        if not self.files:
            raise ValueError("files must name at least one split")
        for split, path in self.files.items():
            suffix = Path(path).suffix.lower()
            if suffix not in DATA_SUFFIXES:
                raise ValueError(
                    f"files.{split}: unsupported extension {suffix or '(none)'!r}; use {', '.join(DATA_SUFFIXES)}"
                )
        return self

    @property
    def splits(self) -> list[str]:
        return list(self.files)


Source = Annotated[Union[HubSource, RTPolaritySource, FileSource], Field(discriminator="kind")]


class TaskConfig(_Strict):
    """A text-classification (or regression) task."""

    name: str = Field(min_length=1)
    description: str = ""
    source: Source
    text_field: str = Field(min_length=1)
    text_pair_field: str | None = None
    label_field: str = Field(min_length=1)
    label_names: list[str] | None = Field(description="class names in label-id order; null for regression")
    metric: Metric = Field(description="primary metric")
    secondary_metrics: list[Metric] = Field(default_factory=list)
    eval_split: str = "validation"
    train_split: str | None = "train"

    @model_validator(mode="after")
    def _check(self) -> "TaskConfig":
        if self.label_names is not None:
            if len(self.label_names) < 2:
                raise ValueError("label_names needs at least 2 names (use null for a regression task)")
            if len(set(self.label_names)) != len(self.label_names):
                raise ValueError(f"label_names has duplicates: {self.label_names}")
        for m in [self.metric, *self.secondary_metrics]:
            if self.is_regression and m not in REGRESSION_METRICS:
                raise ValueError(f"metric {m!r} needs class labels; a regression task (label_names: null) uses pearson or spearman")
            if not self.is_regression and m in REGRESSION_METRICS:
                raise ValueError(f"metric {m!r} is for regression; set label_names: null or use accuracy, f1 or matthews")
        fields = [self.text_field, self.label_field] + ([self.text_pair_field] if self.text_pair_field else [])
        if len(set(fields)) != len(fields):
            raise ValueError("text_field, text_pair_field and label_field must be different columns")
        splits = self.source.splits
        if self.eval_split not in splits:
            raise ValueError(f"eval_split {self.eval_split!r} is not one of the source's splits: {', '.join(splits)}")
        if self.train_split is not None and self.train_split not in splits:
            raise ValueError(f"train_split {self.train_split!r} is not one of the source's splits: {', '.join(splits)}")
        if isinstance(self.source, HubSource):
            unknown = set(self.source.glue_columns) - set(fields)
            if unknown:
                raise ValueError(f"source.glue_columns names fields the task does not use: {', '.join(sorted(unknown))}")
            if self.source.glue_folder is not None and not self.source.glue_header:
                unmapped = [f for f in fields if f not in self.source.glue_columns]
                if unmapped:
                    raise ValueError(f"headerless GLUE file: glue_columns must give an index for {', '.join(unmapped)}")
        return self

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def splits(self) -> list[str]:
        """The split names this task's source provides."""
        return self.source.splits


# --------------------------------------------------------------------------- loading configs


def tasks_dir() -> Path:
    """The folder of the shipped task configs (``$LAYERPRUNE_TASKS_DIR`` overrides it)."""
    env = os.environ.get(TASKS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "configs" / "tasks"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _validation_message(err: ValidationError) -> str:
    errors = err.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p is not None)
    msg = first.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    text = f"{loc}: {msg}" if loc else msg
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return _one_line(text)


def _config_from_file(path: Path) -> TaskConfig:
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskError(f"task config file {path} not found; pass a known task name or an existing YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"cannot read task config {path}: {_one_line(e)}") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise TaskError(f"task config {path} is not valid YAML{where}: {_one_line(problem)}") from None
    if not isinstance(data, dict):
        raise TaskError(f"task config {path} must be a YAML mapping (name:, source:, text_field:, ...)")
    try:
        task = TaskConfig.model_validate(data)
    except ValidationError as e:
        raise TaskError(f"invalid task config {path}: {_validation_message(e)}") from None
    if isinstance(task.source, FileSource):
        base = path.resolve().parent
        files = {s: str((base / Path(p).expanduser()).resolve()) for s, p in task.source.files.items()}
        task = task.model_copy(update={"source": task.source.model_copy(update={"files": files})})
    return task


def _config_files() -> list[Path]:
    d = tasks_dir()
    if not d.is_dir():
        raise TaskError(f"task config folder {d} not found; set {TASKS_DIR_ENV} to the folder of task YAML files")
    return sorted(p for p in d.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def list_tasks() -> list[TaskConfig]:
    """All shipped task configs, sorted by name."""
    tasks = []
    for path in _config_files():
        task = _config_from_file(path)
        if task.name != path.stem:
            raise TaskError(f"task config {path} has name {task.name!r}; it must match the file name {path.stem!r}")
        tasks.append(task)
    return sorted(tasks, key=lambda t: t.name)


def task_names() -> list[str]:
    """Names of the shipped tasks, sorted."""
    return sorted(p.stem for p in _config_files())


def load_task(name_or_path: str | os.PathLike[str]) -> TaskConfig:
    """A shipped task by name (e.g. ``sst2``), or a task YAML file by path."""
    text = os.fspath(name_or_path)
    p = Path(text).expanduser()
    if p.suffix.lower() in (".yaml", ".yml") or os.sep in text or "/" in text or p.is_file():
        return _config_from_file(p)
    files = {f.stem: f for f in _config_files()}
    key = text if text in files else text.lower()
    if key not in files:
        known = ", ".join(sorted(files)) or "(none)"
        raise TaskError(
            f"unknown task {text!r}; known tasks: {known}; or pass a task YAML file, "
            "or local data with --data FILE --text-field COL --label-field COL"
        )
    task = _config_from_file(files[key])
    if task.name != key:
        raise TaskError(f"task config {files[key]} has name {task.name!r}; it must match the file name {key!r}")
    return task


# --------------------------------------------------------------------------- configs for local files


def _infer_labels(values: list[Any], where: str) -> tuple[list[str] | None, str]:
    """Label names (None for regression) and the kind ("names", "ids", "regression") of raw labels."""
    cleaned: list[Any] = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            v = v.strip()
        if v is None or v == "":
            raise DataError(f"missing label in row {i + 1} of {where}; every example needs a label")
        cleaned.append(v)
    if any(isinstance(v, bool) for v in cleaned):
        cleaned = [int(v) if isinstance(v, bool) else v for v in cleaned]

    numbers: list[float] = []
    for v in cleaned:
        if isinstance(v, (int, float)):
            numbers.append(float(v))
            continue
        if isinstance(v, str):
            try:
                numbers.append(float(v))
                continue
            except ValueError:
                pass
        break
    if len(numbers) == len(cleaned) and all(math.isfinite(x) for x in numbers):
        if all(x.is_integer() for x in numbers):
            lo, hi = int(min(numbers)), int(max(numbers))
            if lo < 0:
                raise DataError(
                    f"integer labels in {where} must be ids 0..K-1, found {lo}; map them to 0..K-1 or use label names"
                )
            if hi < 1:
                raise DataError(
                    f"all labels in {where} are 0, so the number of classes is unknown; pass the label names (--label-names)"
                )
            return [str(i) for i in range(hi + 1)], "ids"
        return None, "regression"
    names = sorted({str(v) for v in cleaned})
    if len(names) < 2:
        raise DataError(
            f"only one label ({names[0]!r}) found in {where}; pass all label names (--label-names) in id order"
        )
    return names, "names"


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

    Without ``label_names`` they are inferred from the labels of the files: string labels give
    their sorted unique names; integer labels give ids 0..max named "0", "1", ...; non-integer
    numbers make a regression task (metric pearson). ``regression=True`` forces regression.
    The metric defaults to accuracy for classification and pearson for regression.
    """
    from .data import read_columns  # data imports tasks; import here to avoid a cycle

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
        cols = read_columns(Path(path), fields)
        raw_labels.extend(cols[label_field])

    where = " and ".join(str(p) for p in files.values())
    if regression:
        names = None
    elif label_names is not None:
        names = list(label_names)
    else:
        names, _ = _infer_labels(raw_labels, where)
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
        raise TaskError(f"cannot use local data {where}: {_validation_message(e)}") from None
