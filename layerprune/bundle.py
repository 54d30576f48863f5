"""A bundle on disk: its manifest, file hashes and the gate that decides whether it may be served.

Torch-free on purpose: the server imports this module and `runtime`, never training or export code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .artifacts import Manifest, ValidationReport, load_artifact
from .errors import LayerpruneError

MANIFEST_FILE = "manifest.json"
VALIDATION_FILE = "validation.json"


class BundleError(LayerpruneError):
    """A bundle that is missing files, was altered after export, or did not pass validation."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def size_mb(root: Path) -> float:
    """Total size of the files under root, in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file()) / 1e6


def hash_files(root: Path) -> dict[str, str]:
    """sha256 of every file under root (relative POSIX paths), the manifest itself excepted."""
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }


def verify_bundle(root: Path) -> Manifest:
    """The manifest of a bundle whose every listed file is present and unaltered, else a BundleError
    naming the first file that is not."""
    root = Path(root)
    if not (root / MANIFEST_FILE).is_file():
        raise BundleError(f"{root} is not a layerprune bundle: no {MANIFEST_FILE}")
    manifest = load_artifact(Manifest, root / MANIFEST_FILE)
    for name, expected in manifest.files.items():
        path = root / name
        if not path.is_file():
            raise BundleError(f"bundle file {name} is missing from {root}")
        if sha256_file(path) != expected:
            raise BundleError(f"bundle file {name} does not match its manifest hash (altered after export)")
    return manifest


def servable_bundle(root: Path, allow_unvalidated: bool = False) -> tuple[Manifest, ValidationReport | None]:
    """Check a bundle before serving it: hashes always; a passed validation unless explicitly waived."""
    manifest = verify_bundle(root)
    validation_path = Path(root) / VALIDATION_FILE
    report = load_artifact(ValidationReport, validation_path) if validation_path.is_file() else None
    if allow_unvalidated:
        return manifest, report
    if report is None or VALIDATION_FILE not in manifest.files:
        raise BundleError(f"{root} has no {VALIDATION_FILE}: validate it first (or --allow-unvalidated)")
    if not (report.passed and manifest.servable):
        raise BundleError(
            f"{root} failed validation ({report.metric_name} {report.bundle:.4f} vs {report.original:.4f}, "
            f"delta {report.delta:+.4f} < -{report.tolerance}); it is not servable"
        )
    return manifest, report
