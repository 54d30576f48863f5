"""The served model: a bundle that passed the start-up gate, loaded with onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layerprune.artifacts import Manifest, ValidationReport
from layerprune.bundle import open_bundle
from layerprune.errors import LayerpruneError
from layerprune.runtime import OnnxClassifier

UNVALIDATED_WARNING = (
    "this bundle is served with --allow-unvalidated: its validation did not pass or is missing, "
    "so its predictions may be worse than the original model's"
)


@dataclass
class ServedModel:
    bundle: Path
    manifest: Manifest
    validation: ValidationReport | None
    classifier: OnnxClassifier
    pair_input: bool  # the task classifies (text, text_pair)
    allow_unvalidated: bool

    @property
    def model_id(self) -> str:
        return Path(self.manifest.source_checkpoint).name or self.manifest.source_checkpoint

    @property
    def source_name(self) -> str:
        return public_source(self.manifest.source_checkpoint)

    @property
    def validated(self) -> bool:
        return self.validation is not None and self.validation.passed and self.manifest.servable

    @property
    def warning(self) -> str | None:
        return None if self.validated else UNVALIDATED_WARNING

    @property
    def labels(self) -> list[str]:
        """Label names in output order, as the manifest says (resolved once, at export)."""
        return list(self.manifest.labels)

    @property
    def multi_label(self) -> bool:
        return self.classifier.config.get("problem_type") == "multi_label_classification"

    def scores(self, logits: np.ndarray, raw: bool) -> np.ndarray:
        """Logits (raw) or probabilities: softmax, sigmoid for multi-label or one-output models."""
        x = np.asarray(logits, dtype=np.float64)
        if raw:
            return x
        if self.multi_label or x.shape[-1] == 1:
            return 1.0 / (1.0 + np.exp(-x))
        x = np.exp(x - x.max(axis=-1, keepdims=True))
        return x / x.sum(axis=-1, keepdims=True)

    def info(self) -> dict[str, Any]:
        m, v = self.manifest, self.validation
        return {
            "id": self.model_id,
            "object": "model",
            "source_checkpoint": self.source_name,
            "task": m.task,
            "model_type": m.model_type,
            "labels": self.labels,
            "pair_input": self.pair_input,
            "max_length": self.classifier.max_length,
            "depth": m.depth,
            "total_layers": m.total_layers,
            "heal": m.heal,
            "optimize": m.optimize,
            "quantize": m.quantize,
            "fallback": None if m.fallback is None else m.fallback.model_dump(),
            "created": m.created,
            "validated": self.validated,
            "validation": None if v is None else {
                "passed": v.passed, "metric": v.metric_name, "original": v.original, "bundle": v.bundle,
                "delta": v.delta, "delta_ci95": list(v.delta_ci95), "tolerance": v.tolerance,
                "agreement": v.agreement, "holdout": v.holdout, "n_examples": v.n_examples,
            },
            "allow_unvalidated": self.allow_unvalidated,
            "warning": self.warning,
        }


def public_source(source_checkpoint: str) -> str:
    """The source checkpoint as clients see it: a hub id as is, a local folder by its name only (its path
    would tell any client about the server's disks)."""
    if Path(source_checkpoint).is_absolute() or source_checkpoint.startswith((".", "~")):
        return Path(source_checkpoint).name or source_checkpoint
    return source_checkpoint


def load_model(bundle: Path, *, allow_unvalidated: bool = False, threads: int | None = None,
               providers: list[str] | None = None, memory_arena: bool = False) -> ServedModel:
    """The start-up gate (hashes, files, validation unless waived), then the onnxruntime session.
    Raises LayerpruneError (BundleError) with one line saying why a bundle is refused."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise LayerpruneError(f"bundle {bundle} is not a directory")
    # No busy-waiting ORT threads: the event loop and tokenization need the same cores. The max length is the
    # one the bundle was validated at: what was validated is what is served. No memory arena by default: an
    # arena keeps the peak of the largest run ever made and never gives it back (figures: see docs/results.md).
    opened = open_bundle(bundle, allow_unvalidated=allow_unvalidated, providers=providers, threads=threads,
                         spinning=False, memory_arena=memory_arena)
    return ServedModel(bundle, opened.manifest, opened.validation, opened.classifier, opened.manifest.pair_input,
                       allow_unvalidated)

