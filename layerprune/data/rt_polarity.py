"""rt-polarity (``kind: rt-polarity``): the 10,605 Rotten Tomatoes sentences with human sentiment ratings of
Hutto & Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text"
(ICWSM 2014): download, checksum, cache, parse, label, split.

The file ``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt`` ships inside
``additional_resources/hutto_ICWSM_2014.tar.gz`` of the ``vaderSentiment==3.3.2`` source distribution on
PyPI; it is fetched once with ``pip download``, checked against :data:`RT_POLARITY_SHA256`, and cached
(written atomically) under ``$LAYERPRUNE_CACHE`` or ``~/.cache/layerprune``, in ``rt-polarity/``.
``LAYERPRUNE_RT_POLARITY=/path/to/movieReviewSnippets_GroundTruth.txt`` uses a copy you already have (the
hash is still checked).

The file is UTF-8 with CRLF line ends and no final newline; each line is
``id<TAB>mean rating (-4..4)<TAB>sentence``. Sentences write double quotes as two single quotes
(``''Conan''``), some open single quotes with a backtick, and some have runs of spaces where dashes were
removed; the loader turns ``''`` into ``"``, backticks and curly single quotes into ``'``, and collapses
whitespace. The label is the sign of the rating (``negative`` = 0, ``positive`` = 1, the names in
configs/tasks/rt-polarity.yaml): 5,326 negative and 5,242 positive; the 37 sentences rated exactly 0 are
dropped, leaving 10,568. Fixed splits: a permutation from ``numpy.random.default_rng(RT_POLARITY_SEED)``
(seed 2014) of those 10,568, in order **train 8,456 / validation 1,056 / test 1,056** (80/10/10; validation
and test are ``n // 10`` each). Each split keeps the permutation's order, so ``head(n)`` is a random sample.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ..assets import cache_dir, pip_download
from ..errors import DataError
from .examples import Examples, short

RT_POLARITY_ENV = "LAYERPRUNE_RT_POLARITY"

#: sha256 of movieReviewSnippets_GroundTruth.txt from vaderSentiment 3.3.2.
RT_POLARITY_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
RT_POLARITY_SEED = 2014
RT_POLARITY_LINES = 10605
#: sizes of the fixed splits (10,568 sentences with a non-zero rating).
RT_POLARITY_SIZES = {"train": 8456, "validation": 1056, "test": 1056}
RT_POLARITY_FILENAME = "movieReviewSnippets_GroundTruth.txt"
_VADER_REQUIREMENT = "vaderSentiment==3.3.2"
_VADER_INNER_TARBALL = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_MEMBER = "hutto_ICWSM_2014/" + RT_POLARITY_FILENAME



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
            raise DataError(f"line {lineno} of the rt-polarity file has a bad rating {short(parts[1])}") from None
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
