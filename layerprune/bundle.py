"""A bundle on disk: its manifest, file hashes and the gate that decides whether it may be served (the
names of its parts are in `files`). The one reader for the server, `validate` and the Triton export: they
read the manifest (labels, pair input, max length, file names) and re-derive nothing.

Torch-free on purpose: the server imports this module and `runtime`, never training or export code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import MANIFEST_SCHEMA, BundleParts, Manifest, ValidationReport, load_artifact, schema_version_of
from .cpu import cpu_kind, serves_int8_of
from .errors import LayerpruneError
from .files import (
    ANALYSIS_FILE,
    CKA_PLOT,
    CONFIG_FILE,
    DEPTH_FILE,
    DEPTH_PLOT,
    MANIFEST_FILE,
    MODEL_FILE,
    ORIGINAL_MODEL_FILE,
    TOKENIZER_FILE,
    VALIDATION_FILE,
)
from .runtime import OnnxClassifier


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


def bundle_parts(root: Path) -> BundleParts:
    """The manifest's file names for a bundle being written in `root` (the plots only where present)."""
    root = Path(root)
    return BundleParts(
        model=MODEL_FILE, config=CONFIG_FILE, tokenizer=TOKENIZER_FILE, validation=VALIDATION_FILE,
        depth=DEPTH_FILE, analysis=ANALYSIS_FILE,
        depth_plot=DEPTH_PLOT if (root / DEPTH_PLOT).is_file() else None,
        cka_plot=CKA_PLOT if (root / CKA_PLOT).is_file() else None,
        original=ORIGINAL_MODEL_FILE if (root / ORIGINAL_MODEL_FILE).is_file() else None,
    )


def output_labels(root: Path) -> list[str]:
    """The label of each model output, in output order, resolved once at export for the manifest: the
    runtime's reading of config.json (id2label, else LABEL_i for as many outputs as the graph has)."""
    return OnnxClassifier(Path(root), providers=["CPUExecutionProvider"]).labels


def read_manifest(root: Path) -> Manifest:
    """The manifest of `root`; a manifest of another schema version is refused in one line."""
    root = Path(root)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{root} is not a layerprune bundle: no {MANIFEST_FILE}")
    version = schema_version_of(path)
    if version is not None and version != MANIFEST_SCHEMA:
        raise BundleError(f"{path} has manifest schema v{version}; this layerprune reads v{MANIFEST_SCHEMA}: "
                          "re-run `layerprune export` to rebuild the bundle with this version")
    return load_artifact(Manifest, path)


def verify_bundle(root: Path) -> Manifest:
    """The manifest of a bundle whose every listed file is present and unaltered, and whose every named part
    is one of them; else a BundleError naming the first file that is not."""
    root = Path(root)
    manifest = read_manifest(root)
    for part, name in manifest.parts.model_dump().items():
        if name is not None and name not in manifest.files:
            raise BundleError(f"{root / MANIFEST_FILE} names {name} as the bundle's {part} but lists no hash for it")
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
    name = manifest.parts.validation
    validation_path = Path(root) / name
    report = load_artifact(ValidationReport, validation_path) if validation_path.is_file() else None
    if report is not None and report.max_length != manifest.max_length:
        raise BundleError(f"{root}: the manifest says max length {manifest.max_length}, the bundle was validated at "
                          f"{report.max_length}; what was validated is what is served: re-export it")
    if manifest.int8_cpu and not serves_int8_of(manifest.int8_cpu):
        raise BundleError(f"{root} holds int8 weights for {manifest.int8_cpu} CPUs, which compute differently on this "
                          f"{cpu_kind()} CPU (saturating int16 sums): what was validated is what is served: export "
                          "it on this kind of host, or without --quantize int8")
    if allow_unvalidated:
        return manifest, report
    if report is None:
        raise BundleError(f"{root} has no {name}: validate it first (or --allow-unvalidated)")
    if not (report.passed and manifest.servable):
        raise BundleError(
            f"{root} failed validation ({report.metric_name} {report.bundle:.4f} vs {report.original:.4f}, "
            f"delta {report.delta:+.4f} < -{report.tolerance}); it is not servable"
        )
    return manifest, report


def fallback_of(root: Path, manifest: Manifest) -> dict[str, Any]:
    """OnnxClassifier's fallback options for the bundle in `root`: its original graph and threshold, if any."""
    if manifest.fallback is None:
        return {}
    if manifest.parts.original is None:
        raise BundleError(f"{Path(root) / MANIFEST_FILE} sets a fallback threshold but names no original graph")
    return {"original": Path(root) / manifest.parts.original, "below": manifest.fallback.threshold}


@dataclass
class OpenBundle:
    """A bundle past the gate, its model loaded exactly as the manifest says (max length, labels)."""

    root: Path
    manifest: Manifest
    validation: ValidationReport | None
    classifier: OnnxClassifier


def open_bundle(root: Path, *, allow_unvalidated: bool = False, **runtime: Any) -> OpenBundle:
    """The gate (servable_bundle), then the runtime on the files the manifest names, at its max length with its
    labels (a label count that is not the model's output count is refused). runtime: OnnxClassifier's options."""
    root = Path(root)
    manifest, validation = servable_bundle(root, allow_unvalidated=allow_unvalidated)
    classifier = OnnxClassifier(root, max_length=manifest.max_length, labels=manifest.labels, parts=manifest.parts,
                                **fallback_of(root, manifest), **runtime)
    return OpenBundle(root, manifest, validation, classifier)
