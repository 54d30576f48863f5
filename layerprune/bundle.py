"""A bundle on disk: its manifest, file hashes and the gate that decides whether it may be served (the
names of its parts are in `files`). The one reader for the server, `validate` and the Triton export: they
read the manifest (labels, pair input, max length, file names) and re-derive nothing.

Torch-free on purpose: the server imports this module and `runtime`, never training or export code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .architectures import total_layers
from .artifacts import (
    MANIFEST_SCHEMA,
    AnalysisReport,
    BundleParts,
    FallbackRule,
    Manifest,
    ValidationReport,
    declared_version,
    load_artifact,
    parse_artifact,
)
from .cpu import cpu_kind, serves_int8_of
from .errors import LayerpruneError, first_line
from .files import (
    ANALYSIS_FILE,
    CKA_PLOT,
    CONFIG_FILE,
    CONTINUATION_MODEL_FILE,
    DEPTH_FILE,
    DEPTH_PLOT,
    MANIFEST_DIGEST_FILE,
    MANIFEST_FILE,
    MANIFEST_SIGNATURE_FILE,
    MODEL_FILE,
    ORIGINAL_MODEL_FILE,
    TOKENIZER_FILE,
    VALIDATION_FILE,
)
from .runtime import OnnxClassifier

BUNDLE_KEY_ENV = "LAYERPRUNE_BUNDLE_KEY"  # a key the user holds: export signs the manifest with it, serve checks
_SEAL = (MANIFEST_FILE, MANIFEST_DIGEST_FILE, MANIFEST_SIGNATURE_FILE)  # beside the hashed files, never among them


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
    """sha256 of every file under root (relative POSIX paths), the manifest and its seal excepted."""
    return {
        name: sha256_file(root / name)
        for name in (path.relative_to(root).as_posix() for path in sorted(root.rglob("*")) if path.is_file())
        if name not in _SEAL
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
        continuation=CONTINUATION_MODEL_FILE if (root / CONTINUATION_MODEL_FILE).is_file() else None,
    )


def output_labels(root: Path) -> list[str]:
    """The label of each model output, in output order, resolved once at export for the manifest: the
    runtime's reading of config.json (id2label, else LABEL_i for as many outputs as the graph has)."""
    return OnnxClassifier(Path(root), providers=["CPUExecutionProvider"]).labels


def seal_manifest(root: Path) -> None:
    """Write the manifest's seal beside it: its sha256, and with a key in LAYERPRUNE_BUNDLE_KEY its HMAC."""
    root = Path(root)
    data = (root / MANIFEST_FILE).read_bytes()
    (root / MANIFEST_DIGEST_FILE).write_text(f"{hashlib.sha256(data).hexdigest()}  {MANIFEST_FILE}\n")
    key = _bundle_key()
    if key is not None:
        (root / MANIFEST_SIGNATURE_FILE).write_text(_signature(key, data) + "\n")


def read_manifest(root: Path) -> Manifest:
    """The manifest of `root`, its bytes checked against its seal; a manifest of another schema version is
    refused in one line."""
    root = Path(root)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{root} is not a layerprune bundle: no {MANIFEST_FILE}")
    data = path.read_bytes()
    version = declared_version(data)
    if version is not None and version != MANIFEST_SCHEMA:
        raise BundleError(f"{path} has manifest schema v{version}; this layerprune reads v{MANIFEST_SCHEMA}: "
                          "re-run `layerprune export` to rebuild the bundle with this version")
    _check_seal(root, data)
    return parse_artifact(Manifest, data, path)


def verify_bundle(root: Path) -> Manifest:
    """The manifest of a bundle whose manifest is as sealed at export, whose every listed file is inside the
    bundle, present and unaltered, whose every named part is one of them, and whose depth, layer count, labels
    and pair input agree with the files that say them; else a BundleError naming the first thing that does not."""
    root = Path(root)
    manifest = read_manifest(root)
    for part, name in manifest.parts.model_dump().items():
        if name is not None and name not in manifest.files:
            raise BundleError(f"{root / MANIFEST_FILE} names {name} as the bundle's {part} but lists no hash for it")
    inside = root.resolve()
    for name, expected in manifest.files.items():
        path = root / name
        if not path.resolve().is_relative_to(inside):
            raise BundleError(f"bundle file {name} leads outside {root} (a link); a bundle holds its own files")
        if not path.is_file():
            raise BundleError(f"bundle file {name} is missing from {root}")
        if sha256_file(path) != expected:
            raise BundleError(f"bundle file {name} does not match its manifest hash (altered after export)")
    _check_agreement(root, manifest)
    return manifest


def _check_seal(root: Path, data: bytes) -> None:
    """The manifest's bytes against the sha256 sealed beside them, and against its HMAC when a key is set."""
    digest = root / MANIFEST_DIGEST_FILE
    if not digest.is_file():
        raise BundleError(f"{root} has no {MANIFEST_DIGEST_FILE}, the seal of its manifest: re-run `layerprune "
                          "export` to rebuild the bundle with this version")
    if digest.read_text(errors="replace").split()[:1] != [hashlib.sha256(data).hexdigest()]:
        raise BundleError(f"{root / MANIFEST_FILE} does not match {MANIFEST_DIGEST_FILE} (altered after export)")
    key = _bundle_key()
    if key is None:
        return
    signature = root / MANIFEST_SIGNATURE_FILE
    if not signature.is_file():
        raise BundleError(f"{root} is not signed, and {BUNDLE_KEY_ENV} is set: only bundles exported with the key "
                          "are served")
    if not hmac.compare_digest(signature.read_text(errors="replace").strip(), _signature(key, data)):
        raise BundleError(f"{root / MANIFEST_SIGNATURE_FILE} is not the manifest's signature under the key in "
                          f"{BUNDLE_KEY_ENV} (altered after export, or signed with another key)")


def _bundle_key() -> bytes | None:
    key = os.environ.get(BUNDLE_KEY_ENV)
    return key.encode() if key else None


def _signature(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def _check_agreement(root: Path, manifest: Manifest) -> None:
    """What the manifest says of the model against the hashed files that say it too: config.json (the graph's
    layer count and labels) and analysis.json (the source's layer count, the task's pair input). The labels'
    count against the graph's outputs is the runtime's check, when it opens the graph."""
    parts = manifest.parts
    config = _json(root / parts.config)
    analysis = load_artifact(AnalysisReport, root / parts.analysis)
    try:
        says = [
            ("depth", manifest.depth, f"{parts.config}'s layer count", total_layers(config)),
            ("total_layers", manifest.total_layers, f"{parts.analysis}'s total_layers", analysis.total_layers),
            ("labels", manifest.labels, f"{parts.config}'s id2label", _config_labels(config, manifest.labels)),
            ("pair_input", manifest.pair_input, f"{parts.analysis}'s task",
             analysis.task_config.text_pair_field is not None),
        ]
    except (TypeError, ValueError) as exc:  # a layer count or label id that is not a number
        raise BundleError(f"cannot read {root / parts.config}: {first_line(exc)}") from None
    for field, said, where, found in says:
        if said != found:
            raise BundleError(f"{root / MANIFEST_FILE} says {field} {said!r} but {where} says {found!r}: the manifest "
                              "was edited after export; re-export the bundle")


def _config_labels(config: dict[str, Any], labels: list[str]) -> list[str]:
    """config.json's label names in output order; without id2label (transformers leaves out the default two)
    the defaults, LABEL_i, for as many as the manifest lists (their count is checked against the graph)."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return [f"LABEL_{i}" for i in range(len(labels))]
    names = {int(k): str(v) for k, v in id2label.items()}
    return [names[i] for i in sorted(names)]


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {path}: {first_line(exc)}") from None
    if not isinstance(value, dict):
        raise BundleError(f"{path} is not a JSON object")
    return value


def servable_bundle(root: Path, allow_unvalidated: bool = False) -> tuple[Manifest, ValidationReport | None]:
    """Check a bundle before serving it: seal, paths, hashes and agreement always (verify_bundle), the max length
    and the int8 CPU kind; a passed validation unless explicitly waived."""
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
    """OnnxClassifier's fallback options for the bundle in `root`, as its manifest says (fallback_options), the
    layer a text sent on continues from checked against the bundle's depth."""
    rule = manifest.fallback
    if rule is not None and rule.continue_from is not None and not 1 <= rule.continue_from < manifest.depth:
        raise BundleError(f"{Path(root) / MANIFEST_FILE} says a text sent on continues from layer "
                          f"{rule.continue_from}, which is not a layer below the bundle's depth {manifest.depth}")
    return fallback_options(root, rule, manifest.parts)


def fallback_options(root: Path, rule: FallbackRule | None, parts: BundleParts) -> dict[str, Any]:
    """OnnxClassifier's fallback options for a bundle in `root` with fallback `rule` and `parts`, if it has one:
    the threshold, and the graph that answers the texts sent on, as the rule says the fallback runs (the
    continuation's graph, going on from layer `continue_from`; else the original's, restarting them)."""
    if rule is None:
        return {}
    where = Path(root) / MANIFEST_FILE
    if rule.continue_from is None:
        if parts.original is None:
            raise BundleError(f"{where} sets a fallback that restarts the original but names no original graph")
        return {"original": Path(root) / parts.original, "below": rule.threshold}
    if parts.continuation is None:
        raise BundleError(f"{where} sets a fallback that continues from layer {rule.continue_from} but names no "
                          "continuation graph")
    return {"continuation": Path(root) / parts.continuation, "below": rule.threshold}


@dataclass
class OpenBundle:
    """A bundle past the gate, its model loaded exactly as the manifest says (max length, labels)."""

    root: Path
    manifest: Manifest
    validation: ValidationReport | None
    classifier: OnnxClassifier


def open_bundle(root: Path, *, allow_unvalidated: bool = False, **runtime: Any) -> OpenBundle:
    """The gate (servable_bundle), then the runtime on the files the manifest names, at its max length with its
    labels (a label count that is not the model's output count is refused).

    root: the bundle's folder.
    allow_unvalidated: open a bundle whose validation failed or is missing too (its hashes are still checked).
    runtime: OnnxClassifier's further options (e.g. threads, providers).
    Returns the manifest, the validation report and the classifier. Raises LayerpruneError (one line) for a
    bundle that the gate refuses."""
    root = Path(root)
    manifest, validation = servable_bundle(root, allow_unvalidated=allow_unvalidated)
    classifier = OnnxClassifier(root, max_length=manifest.max_length, labels=manifest.labels, parts=manifest.parts,
                                **fallback_of(root, manifest), **runtime)
    return OpenBundle(root, manifest, validation, classifier)
