"""Checks the CLI runs before any work: output places it can write, and whether the hub answers.

Light on purpose (standard library only): the hub check must run before transformers, datasets and
huggingface_hub are imported, since they read HF_HUB_OFFLINE once, at import.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlsplit

from .errors import LayerpruneError

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")  # what we set; TRANSFORMERS_OFFLINE is read too
_TRUE = {"1", "ON", "YES", "TRUE"}


def check_output_dir(path: Path, what: str = "output", marker: str | None = None) -> None:
    """Raise a one-line LayerpruneError unless a folder can be made (or replaced) at `path`: it is not
    a file, nor (with `marker`) a non-empty folder without that file, which artifacts.atomic_dir would
    refuse to replace at the end of the work; every existing parent is a folder, and the nearest existing
    parent takes a new entry (tried for real: permissions, read-only mounts and /proc say no only when asked)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise LayerpruneError(f"cannot write {what} {path}: it exists and is not a folder")
    if marker and path.is_dir() and any(path.iterdir()) and not (path / marker).exists():
        raise LayerpruneError(f"refusing to overwrite {path}: it exists and holds no {marker}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LayerpruneError(f"cannot write {what} {path}: {parent} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".layerprune-probe-", dir=parent)
    except OSError as exc:
        raise LayerpruneError(f"cannot write {what} {path}: {exc.strerror or exc} in {parent}") from None
    shutil.rmtree(probe, ignore_errors=True)


def offline_requested() -> bool:
    return any(os.environ.get(name, "").upper() in _TRUE for name in (*OFFLINE_VARIABLES, "TRANSFORMERS_OFFLINE"))


def hub_answers(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub endpoint (HF_ENDPOINT or huggingface.co), at most `timeout` seconds
    in all, name lookup included (which has no timeout of its own, hence the thread)."""
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    answered = threading.Event()

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answered.set()
        except OSError:
            pass

    threading.Thread(target=connect, daemon=True, name="hub-probe").start()
    return answered.wait(timeout)


def go_offline_unless_hub_answers(timeout: float = 3.0) -> bool:
    """When the hub does not answer one probe, set the offline variables before the hub libraries are
    imported, so they fail at once instead of retrying with backoff. Returns True when offline."""
    if offline_requested():
        return True
    if hub_answers(timeout):
        return False
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"
    return True
