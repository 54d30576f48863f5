"""Task configs: which data a task reads, its columns, its labels and its primary metric.

One YAML file per task lives in ``configs/tasks/`` at the repository root (override the folder
with the env var ``LAYERPRUNE_TASKS_DIR``). Each file is validated by :class:`TaskConfig`.
``load_task`` takes a known task name or a path to a YAML file. Schema and YAML only: reading data
(and the config for ``--data FILE``, ``layerprune.data.task_from_files``) is the data package's job.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import TaskError

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
    labelled_test: ClassVar[bool] = False  # GLUE's test labels are not public
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
    """The Rotten Tomatoes sentences of Hutto & Gilbert (2014), with fixed splits (see data/rt_polarity.py)."""

    kind: Literal["rt-polarity"]
    labelled_test: ClassVar[bool] = True

    @property
    def splits(self) -> list[str]:
        return list(RT_POLARITY_SPLITS)


class FileSource(_Strict):
    """Local data files, one per split: .csv, .tsv, .jsonl or .json (JSON lines)."""

    kind: Literal["file"]
    labelled_test: ClassVar[bool] = True  # a test file holds the same columns as the others
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


# Every source: a schema here (its `kind`, its `splits`, whether its test split has labels), its reader in the data
# package (data/load.py's READERS).
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


def validation_message(err: ValidationError) -> str:
    """The first problem pydantic found, on one line (and how many more there are)."""
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
        raise TaskError(f"invalid task config {path}: {validation_message(e)}") from None
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
