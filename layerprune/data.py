"""Loading a task's examples: texts (and text pairs) with label ids or regression targets.

Sources (see ``tasks.py`` for the configs):

* **GLUE** (``kind: hub``): with ``glue_dir`` (``--glue-dir``) or the env var ``GLUE_DIR``, the
  classic GLUE layout as the GLUE download script writes it (``SST-2/dev.tsv``, ``CoLA/dev.tsv``
  without header, ``MNLI/dev_matched.tsv``, ...), read as TSV without quoting (MNLI and QNLI
  contain stray quotes). Rows with missing fields are skipped, as the Hugging Face ``glue``
  loader does. Otherwise ``datasets.load_dataset(path, name, split=...)`` from the hub, which
  fails with a clear :class:`DataError` offline.
* **Local files** (``kind: file``): ``.csv``, ``.tsv`` (no quoting), ``.jsonl`` / ``.json``
  (JSON lines, or one JSON array of objects), all UTF-8.
* **rt-polarity** (``kind: rt-polarity``): the 10,605 Rotten Tomatoes sentences with human
  sentiment ratings of Hutto & Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment
  Analysis of Social Media Text" (ICWSM 2014). The file
  ``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt`` ships inside
  ``additional_resources/hutto_ICWSM_2014.tar.gz`` of the ``vaderSentiment==3.3.2`` source
  distribution on PyPI; it is fetched once with ``pip download``, checked against
  :data:`RT_POLARITY_SHA256`, and cached (written atomically) under ``$LAYERPRUNE_CACHE`` or
  ``~/.cache/layerprune``, in ``rt-polarity/``. ``LAYERPRUNE_RT_POLARITY=/path/to/
  movieReviewSnippets_GroundTruth.txt`` uses a copy you already have (the hash is still checked).

  The file is UTF-8 with CRLF line ends and no final newline; each line is
  ``id<TAB>mean rating (-4..4)<TAB>sentence``. Sentences write double quotes as two single
  quotes (``''Conan''``), some open single quotes with a backtick, and some have runs of spaces
  where dashes were removed; the loader turns ``''`` into ``"``, backticks and curly single
  quotes into ``'``, and collapses whitespace. The label is the sign of the rating
  (``negative`` = 0, ``positive`` = 1): 5,326 negative and 5,242 positive; the 37 sentences
  rated exactly 0 are dropped, leaving 10,568. Fixed splits: a permutation from
  ``numpy.random.default_rng(RT_POLARITY_SEED)`` (seed 2014) of those 10,568, in order
  **train 8,456 / validation 1,056 / test 1,056** (80/10/10; validation and test are
  ``n // 10`` each). Each split keeps the permutation's order, so ``head(n)`` is a random sample.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .assets import CACHE_ENV, cache_dir, pip_download  # noqa: F401 (re-exported)
from .errors import DataError
from .tasks import FileSource, HubSource, RTPolaritySource, TaskConfig

__all__ = [
    "Examples",
    "load_examples",
    "read_columns",
    "glue_dir_from_env",
    "RT_POLARITY_SHA256",
    "RT_POLARITY_SEED",
    "RT_POLARITY_LINES",
    "RT_POLARITY_SIZES",
    "rt_polarity_bytes",
    "parse_rt_polarity",
    "label_rt_polarity",
    "split_rt_polarity",
    "rt_polarity_examples",
]

GLUE_DIR_ENV = "GLUE_DIR"
RT_POLARITY_ENV = "LAYERPRUNE_RT_POLARITY"

#: sha256 of movieReviewSnippets_GroundTruth.txt from vaderSentiment 3.3.2.
RT_POLARITY_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
RT_POLARITY_SEED = 2014
RT_POLARITY_LINES = 10605
#: sizes of the fixed splits (10,568 sentences with a non-zero rating).
RT_POLARITY_SIZES = {"train": 8456, "validation": 1056, "test": 1056}
RT_POLARITY_LABELS = ["negative", "positive"]
RT_POLARITY_FILENAME = "movieReviewSnippets_GroundTruth.txt"
_VADER_REQUIREMENT = "vaderSentiment==3.3.2"
_VADER_INNER_TARBALL = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_MEMBER = "hutto_ICWSM_2014/" + RT_POLARITY_FILENAME


# --------------------------------------------------------------------------- Examples


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


# --------------------------------------------------------------------------- entry point


def glue_dir_from_env() -> Path | None:
    env = os.environ.get(GLUE_DIR_ENV)
    return Path(env).expanduser() if env else None


def _fields(task: TaskConfig) -> list[str]:
    return [task.text_field] + ([task.text_pair_field] if task.text_pair_field else []) + [task.label_field]


def load_examples(task: TaskConfig, split: str, *, glue_dir: Path | str | None = None) -> Examples:
    """The examples of one split of a task (``"train"``, ``"validation"``, ``"validation_matched"``, ...)."""
    source = task.source
    splits = task.splits
    if split not in splits:
        extra = "; GLUE test labels are not public" if isinstance(source, HubSource) and split == "test" else ""
        raise DataError(f"task {task.name!r} has no split {split!r}; its splits are: {', '.join(splits)}{extra}")

    if isinstance(source, RTPolaritySource):
        return rt_polarity_examples(rt_polarity_bytes(), split)

    if isinstance(source, FileSource):
        path = Path(source.files[split])
        cols = read_columns(path, _fields(task))
        return _to_examples(task, cols, str(path))

    assert isinstance(source, HubSource)
    gdir = Path(glue_dir).expanduser() if glue_dir is not None else glue_dir_from_env()
    if gdir is not None and source.glue_folder is not None:
        path = gdir / source.glue_folder / source.glue_files[split]
        cols = _read_glue_file(task, source, path, gdir)
        return _to_examples(task, cols, str(path))
    cols = _read_hub(task, source, split)
    name = f" ({source.name})" if source.name else ""
    return _to_examples(task, cols, f"hub dataset {source.path}{name}, split {split!r}")


# --------------------------------------------------------------------------- label / text conversion


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _as_int(v: Any) -> int | None:
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
        idx = _as_int(v)
        if idx is None:
            raise DataError(
                f"unknown label {_short(v)} in row {i + 1} of {where}; "
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
                f"label {_short(v)} in row {i + 1} of {where} is not a number; this is a regression task"
            ) from None
        if not math.isfinite(x):
            raise DataError(f"label {_short(v)} in row {i + 1} of {where} is not a finite number")
        out[i] = x
    return out


def _texts(values: Sequence[Any], column: str, where: str) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if v is None:
            raise DataError(f"row {i + 1} of {where} has no text in column {column!r}")
        out.append(v if isinstance(v, str) else str(v))
    return out


def _to_examples(task: TaskConfig, cols: dict[str, list[Any]], where: str) -> Examples:
    raw_labels = cols[task.label_field]
    if not raw_labels:
        raise DataError(f"{where} has no examples; check the file or the split")
    if isinstance(task.source, HubSource) and all(_as_int(v) == -1 for v in raw_labels):
        raise DataError(
            f"{where} has no labels (all -1: GLUE test labels are not public); use the validation split"
        )
    if task.is_regression:
        labels = _targets(raw_labels, where)
    else:
        assert task.label_names is not None
        labels = _class_ids(raw_labels, task.label_names, where)
    texts = _texts(cols[task.text_field], task.text_field, where)
    pairs = _texts(cols[task.text_pair_field], task.text_pair_field, where) if task.text_pair_field else None
    return Examples(texts=texts, pairs=pairs, labels=labels)


# --------------------------------------------------------------------------- local files


def _open_text(path: Path):
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise DataError(f"data file {path} not found; check the path") from None
    except IsADirectoryError:
        raise DataError(f"data file {path} is a folder; pass a .csv, .tsv, .jsonl or .json file") from None
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None


def _read_delimited(path: Path, delimiter: str) -> tuple[list[str], list[dict[str, Any]]]:
    with _open_text(path) as f:
        if delimiter == "\t":
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.DictReader(f)
        rows = [row for row in reader if any(v not in (None, "") for k, v in row.items() if k is not None)]
        columns = [c for c in (reader.fieldnames or [])]
    return columns, rows


def _read_json_lines(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
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


def _read_table(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
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


# --------------------------------------------------------------------------- GLUE


def read_texts(path: Path, text_field: str, text_pair_field: str | None = None) -> Examples:
    """Unlabeled texts (and second texts) of a local file, e.g. in-domain texts to heal a pruned model with.
    The labels are placeholders (zeros): callers that read this know the texts carry none."""
    fields = [text_field] + ([text_pair_field] if text_pair_field else [])
    cols = read_columns(path, fields)
    texts = _texts(cols[text_field], text_field, str(path))
    pairs = _texts(cols[text_pair_field], text_pair_field, str(path)) if text_pair_field else None
    return Examples(texts=texts, pairs=pairs, labels=np.zeros(len(texts), dtype=np.int64))


def _read_glue_file(task: TaskConfig, source: HubSource, path: Path, glue_dir: Path) -> dict[str, list[Any]]:
    if not glue_dir.is_dir():
        raise DataError(f"GLUE folder {glue_dir} not found; point --glue-dir (or GLUE_DIR) at a local GLUE copy")
    if not path.is_file():
        raise DataError(
            f"GLUE file {path} not found; --glue-dir (or GLUE_DIR) must be the folder written by the GLUE "
            f"download script, with {source.glue_folder}/{path.name} in it"
        )
    fields = _fields(task)
    mapping = {f: source.glue_columns.get(f, f) for f in fields}
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            if source.glue_header:
                header = next(reader, None)
                if header is None:
                    raise DataError(f"GLUE file {path} is empty; re-download the GLUE data")
                index = {}
                for field, col in mapping.items():
                    if col not in header:
                        raise DataError(
                            f"column {col!r} not found in GLUE file {path}; columns found: {', '.join(header)}"
                        )
                    index[field] = header.index(col)
            else:
                index = {field: int(col) for field, col in mapping.items()}
            need = max(index.values()) + 1
            out: dict[str, list[Any]] = {f: [] for f in fields}
            for row in reader:
                if len(row) < need:
                    continue  # blank or corrupted row: skipped, as the Hugging Face glue loader does
                for field, i in index.items():
                    out[field].append(row[i])
    except UnicodeDecodeError as e:
        raise DataError(f"GLUE file {path} is not UTF-8 (byte {e.start}); re-download the GLUE data") from None
    except OSError as e:
        raise DataError(f"cannot read GLUE file {path}: {e.strerror or e}") from None
    if not out[task.label_field]:
        raise DataError(f"GLUE file {path} has no examples; re-download the GLUE data")
    return out


def _read_hub(task: TaskConfig, source: HubSource, split: str) -> dict[str, list[Any]]:
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
    fields = _fields(task)
    for f in fields:
        if f not in ds.column_names:
            raise DataError(
                f"column {f!r} not found in hub dataset {source.path} ({source.name}); "
                f"columns found: {', '.join(ds.column_names)}; fix the task config"
            )
    return {f: list(ds[f]) for f in fields}


# --------------------------------------------------------------------------- rt-polarity


def verify_rt_polarity(data: bytes, where: str) -> None:
    """Refuse bytes that are not the expected movieReviewSnippets_GroundTruth.txt."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != RT_POLARITY_SHA256:
        raise DataError(
            f"{where} is not the rt-polarity file of vaderSentiment 3.3.2 (sha256 {digest[:12]}..., expected "
            f"{RT_POLARITY_SHA256[:12]}...); use hutto_ICWSM_2014/{RT_POLARITY_FILENAME} from that package"
        )


def _fetch_rt_polarity() -> bytes:
    """Download the vaderSentiment sdist with pip and pull the rt-polarity file out of it."""
    advice = (
        f"download {_VADER_REQUIREMENT} (sdist) yourself, extract {_VADER_MEMBER} from its "
        f"additional_resources/hutto_ICWSM_2014.tar.gz, and set {RT_POLARITY_ENV}=/path/to/{RT_POLARITY_FILENAME}"
    )
    with tempfile.TemporaryDirectory(prefix="layerprune-vader-") as tmp:
        pip_download([_VADER_REQUIREMENT], Path(tmp), source=True, what=f"{_VADER_REQUIREMENT} for rt-polarity",
                     advice=advice)
        sdists = sorted(Path(tmp).glob("vaderSentiment-3.3.2.tar.gz")) or sorted(Path(tmp).glob("[vV]ader*"))
        if not sdists:
            raise DataError(f"pip downloaded no {_VADER_REQUIREMENT} source archive; {advice}")
        try:
            with tarfile.open(sdists[0]) as outer:
                inner_f = outer.extractfile(_VADER_INNER_TARBALL)
                if inner_f is None:
                    raise KeyError(_VADER_INNER_TARBALL)
                with tarfile.open(fileobj=io.BytesIO(inner_f.read())) as inner:
                    member = inner.extractfile(_VADER_MEMBER)
                    if member is None:
                        raise KeyError(_VADER_MEMBER)
                    return member.read()
        except (KeyError, tarfile.TarError, OSError) as e:
            raise DataError(f"{sdists[0].name} does not hold {_VADER_MEMBER} ({type(e).__name__}: {e}); {advice}") from None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def rt_polarity_bytes() -> bytes:
    """The verified bytes of movieReviewSnippets_GroundTruth.txt: from $LAYERPRUNE_RT_POLARITY, the cache, or PyPI."""
    env = os.environ.get(RT_POLARITY_ENV)
    if env:
        path = Path(env).expanduser()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{RT_POLARITY_ENV}={path} not found; point it at {RT_POLARITY_FILENAME} or unset it") from None
        except OSError as e:
            raise DataError(f"cannot read {RT_POLARITY_ENV}={path}: {e.strerror or e}") from None
        verify_rt_polarity(data, f"{RT_POLARITY_ENV}={path}")
        return data

    cached = cache_dir() / "rt-polarity" / RT_POLARITY_FILENAME
    try:
        data = cached.read_bytes()
    except OSError:
        data = None
    if data is not None and hashlib.sha256(data).hexdigest() == RT_POLARITY_SHA256:
        return data

    data = _fetch_rt_polarity()
    verify_rt_polarity(data, f"{RT_POLARITY_FILENAME} from {_VADER_REQUIREMENT}")
    try:
        _write_atomic(cached, data)
    except OSError as e:
        warnings.warn(f"could not cache rt-polarity at {cached}: {e}; it will be downloaded again next time")
    return data


def normalize_rt_text(text: str) -> str:
    """Undo the file's quoting quirks: '' -> ", ` and curly single quotes -> ', whitespace runs -> one space."""
    text = text.replace("''", '"').replace("`", "'").replace("\u2018", "'").replace("\u2019", "'")
    return " ".join(text.split())


def parse_rt_polarity(data: bytes | str) -> tuple[list[str], np.ndarray]:
    """Sentences (normalized) and mean ratings (float64) of every line, in file order."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"rt-polarity file is not UTF-8 (byte {e.start}); use the file from {_VADER_REQUIREMENT}") from None
    else:
        text = data
    texts: list[str] = []
    ratings: list[float] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise DataError(f"line {lineno} of the rt-polarity file is not 'id<TAB>rating<TAB>sentence'")
        try:
            rating = float(parts[1])
        except ValueError:
            raise DataError(f"line {lineno} of the rt-polarity file has a bad rating {_short(parts[1])}") from None
        texts.append(normalize_rt_text(parts[2]))
        ratings.append(rating)
    if not texts:
        raise DataError("the rt-polarity file has no sentences")
    return texts, np.asarray(ratings, dtype=np.float64)


def label_rt_polarity(texts: list[str], ratings: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Keep sentences with a non-zero rating; label 1 (positive) if the rating is > 0 else 0 (negative)."""
    keep = np.flatnonzero(ratings != 0)
    labels = (ratings[keep] > 0).astype(np.int64)
    return [texts[i] for i in keep], labels


def split_rt_polarity(n: int, seed: int = RT_POLARITY_SEED) -> dict[str, np.ndarray]:
    """Positions of the train/validation/test splits (80/10/10; validation = test = n // 10)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_eval = n // 10
    n_train = n - 2 * n_eval
    return {
        "train": perm[:n_train],
        "validation": perm[n_train : n_train + n_eval],
        "test": perm[n_train + n_eval :],
    }


def rt_polarity_examples(data: bytes | str, split: str) -> Examples:
    """One split of rt-polarity from the file's content (no hash check: see :func:`rt_polarity_bytes`)."""
    texts, ratings = parse_rt_polarity(data)
    kept, labels = label_rt_polarity(texts, ratings)
    splits = split_rt_polarity(len(kept))
    if split not in splits:
        raise DataError(f"rt-polarity has no split {split!r}; its splits are: {', '.join(splits)}")
    idx = splits[split]
    if idx.size == 0:
        raise DataError(f"rt-polarity split {split!r} is empty")
    return Examples(texts=[kept[i] for i in idx], pairs=None, labels=labels[idx])
