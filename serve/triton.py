"""Scale-out: a bundle as an NVIDIA Triton Inference Server model repository (onnxruntime backend).

Triton serves tensors: clients tokenize (the bundle's tokenizer.json, e.g. with `tokenizers`) and send
int64 input_ids / attention_mask (/ token_type_ids) of shape [batch, seq]; the model answers fp32 logits,
classified against labels.txt when the client asks for classification output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from layerprune.bundle import open_bundle
from layerprune.errors import LayerpruneError
from layerprune.files import TRITON_CONFIG_FILE, TRITON_LABELS_FILE, TRITON_MODEL_FILE

from .model import public_source

_TRITON_TYPES = {"tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(float)": "TYPE_FP32",
                 "tensor(float16)": "TYPE_FP16"}


def write_triton_repository(
    bundle_dir: Path,
    out_dir: Path,
    model_name: str = "layerprune",
    max_batch_size: int = 32,
    *,
    preferred_batch_sizes: list[int] | None = None,
    max_queue_delay_us: int = 5000,
    instance_count: int = 1,
    kind: str = "KIND_AUTO",
    version: int = 1,
    allow_unvalidated: bool = False,
) -> Path:
    """Write OUT/<model_name>/{config.pbtxt, labels.txt, <version>/model.onnx} for a bundle that passes
    the serving gate. Returns the model directory. kind: KIND_AUTO, KIND_CPU or KIND_GPU."""
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    opened = open_bundle(bundle_dir, allow_unvalidated=allow_unvalidated, providers=["CPUExecutionProvider"])
    manifest, session = opened.manifest, opened.classifier.session
    if manifest.fallback is not None:  # what was validated is what is served: the two graphs together
        raise LayerpruneError(f"{bundle_dir} sends its unsure texts on to the original (--fallback): a Triton model "
                              "serves one graph; serve it with `layerprune serve`, or export it without --fallback")
    if not model_name or not all(c.isalnum() or c in "-_." for c in model_name) or model_name.startswith("."):
        raise LayerpruneError(f"model name {model_name!r}: use letters, digits, '-', '_' and '.'")
    if max_batch_size < 1:
        raise LayerpruneError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if kind not in ("KIND_AUTO", "KIND_CPU", "KIND_GPU"):
        raise LayerpruneError(f"kind must be KIND_AUTO, KIND_CPU or KIND_GPU, got {kind}")
    preferred = sorted({b for b in (preferred_batch_sizes or _powers_of_two(max_batch_size))})
    if any(b < 1 or b > max_batch_size for b in preferred):
        raise LayerpruneError(f"preferred batch sizes {preferred} must lie in 1..{max_batch_size}")

    onnx_file = bundle_dir / manifest.parts.model
    inputs = [_tensor(i, "input") for i in session.get_inputs()]
    outputs = [_tensor(o, "output") for o in session.get_outputs()]
    if len(outputs) != 1:
        raise LayerpruneError(f"{onnx_file} has {len(outputs)} outputs; expected one (logits)")
    labels = _labels(manifest.labels)  # open_bundle checked their count against the outputs

    model_dir = out_dir / model_name
    if model_dir.exists():
        raise LayerpruneError(f"refusing to overwrite {model_dir}")
    try:  # OUT under a file, in /proc, read-only: one line, not a traceback
        (model_dir / str(version)).mkdir(parents=True)
        shutil.copyfile(onnx_file, model_dir / str(version) / TRITON_MODEL_FILE)
        (model_dir / TRITON_LABELS_FILE).write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    except OSError as exc:
        raise LayerpruneError(f"cannot write the model repository {out_dir}: {exc.strerror or exc}") from None

    lines = [
        f'name: "{model_name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {d} ]\n  }}' for n, t, d in inputs),
        "]",
        "output [",
        ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {d} ]\n    label_filename: "{TRITON_LABELS_FILE}"\n  }}'
                   for n, t, d in outputs),
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        f"instance_group [\n  {{\n    count: {instance_count}\n    kind: {kind}\n  }}\n]",
        f"version_policy: {{ specific: {{ versions: [ {version} ] }} }}",
        "parameters {",
        '  key: "layerprune_manifest"',
        f"  value: {{ string_value: {json.dumps(_summary(manifest))} }}",
        "}",
        "parameters {",  # clients tokenize: this is the length the bundle was validated at
        '  key: "max_sequence_length"',
        f'  value: {{ string_value: "{manifest.max_length}" }}',
        "}",
    ]
    (model_dir / TRITON_CONFIG_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return model_dir


def _tensor(arg, what: str) -> tuple[str, str, str]:
    """(name, Triton type, dims without the batch dimension) of an ONNX graph input/output."""
    if arg.type not in _TRITON_TYPES:
        raise LayerpruneError(f"ONNX {what} {arg.name} has type {arg.type}, which this export does not map")
    if len(arg.shape) < 1:
        raise LayerpruneError(f"ONNX {what} {arg.name} has no batch dimension")
    dims = ", ".join(str(d) if isinstance(d, int) and d > 0 else "-1" for d in arg.shape[1:])
    return arg.name, _TRITON_TYPES[arg.type], dims


def _labels(labels: list[str]) -> list[str]:
    """The manifest's labels (resolved at export), one per output."""
    if any("\n" in label for label in labels):
        raise LayerpruneError("a label holds a newline; it cannot go in a Triton labels file")
    return labels


def _powers_of_two(limit: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if 4 <= b <= limit]
    return sizes + ([limit] if limit not in sizes else [])


def _summary(manifest) -> str:
    return json.dumps({"source_checkpoint": public_source(manifest.source_checkpoint), "task": manifest.task,
                       "depth": manifest.depth, "total_layers": manifest.total_layers,
                       "model_type": manifest.model_type, "servable": manifest.servable,
                       "max_length": manifest.max_length})
