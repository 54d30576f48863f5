"""How much agreement does each fallback share buy? The pruned model answers; where it is unsure, the original.

Which share to pass to `export --fallback`: a healed cut disagrees with the original on 1.5-2% of unseen texts
(docs/results.md), and the gate can certify a cut only near 1%. Those disagreements sit where the pruned model
is unsure, so sending its least sure texts on to the original (early exit read backwards, as in DeeBERT) agrees
better for a few more layers per text. This scores several shares on one pruned checkpoint in one run; export
serves one, validated as served.

The run directory is an analysis that export has run on: the pruned model is --pruned, by default its
`truncated/` checkpoint (the last export's pruned and healed PyTorch model; with the top-layer heal the layers
below the re-tuned one are the original's), the original is the analysis' checkpoint. Both run over the task's
calibration and holdout (validation and test splits). For each share s, the threshold is the pruned model's
top-class probability below which s of the calibration texts fall; on the holdout, those texts take the
original's answer (layerprune.fallback, as served). Columns: the share sent on, disagreement with the original,
the metric's delta, and layers run per text (the cut, plus the original's layers for the texts sent on: the
served fallback runs the whole original over them).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layerprune.fallback import cascade, threshold, unsure
from layerprune.files import DEFAULT_RUN_DIR, TRUNCATED_DIR
from layerprune.hidden import predict_logits
from layerprune.models import load_classifier, total_layers
from layerprune.runtime import model_max_length
from layerprune.scoring import compute_metric

from .common import disagreement, listed, markdown_table, read_run
from .harness import Results

HEADER = ["sent on (calibration)", "sent on (holdout)", "disagreement", "delta, points", "layers per text"]


@dataclass(frozen=True)
class Fallback:
    served: np.ndarray  # the logits served: the original's for the texts sent on, else the pruned model's
    sent_on: float  # the share of texts sent on
    disagreement: float  # the share whose served prediction differs from the original's


def fallback(calibration: np.ndarray, pruned: np.ndarray, original: np.ndarray, share: float) -> Fallback:
    """The pruned model's logits `pruned`, with the original's (`original`, same texts) where the pruned model's
    top-class probability is below the `share`-quantile of its probabilities on `calibration` (share 0: none),
    as `export --fallback` serves them (layerprune.fallback)."""
    below = threshold(calibration, share) if share else -np.inf
    served = cascade(pruned, original, below)
    return Fallback(served, float(unsure(pruned, below).mean()), disagreement(original, served))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    parser.add_argument("--pruned", type=Path, help="a pruned checkpoint (default: RUN_DIR/truncated)")
    parser.add_argument("--shares", type=listed(float), default=[0, 2, 5, 10, 15, 20, 30],
                        help="percent of texts sent on to the original")


def run(args: argparse.Namespace, out: Results) -> int:
    run_dir = read_run(args.run_dir)
    task, parts = run_dir.task, run_dir.parts()
    pruned = args.pruned or args.run_dir / TRUNCATED_DIR
    total, (hold_orig,) = _logits(run_dir.analysis.model, task, [parts.holdout])  # the threshold is the pruned's
    depth, (cal_pruned, hold_pruned) = _logits(pruned, task, [parts.calibration, parts.holdout])
    labels = parts.holdout.labels
    rows = []
    for share in args.shares:
        row = fallback(cal_pruned, hold_pruned, hold_orig, share / 100)
        delta = compute_metric(task.metric, labels, row.served) - compute_metric(task.metric, labels, hold_orig)
        layers = depth + row.sent_on * total  # the texts sent on run through the whole original, as served
        rows.append([f"{share:g}%", f"{row.sent_on:.1%}", f"{row.disagreement:.2%}", f"{100 * delta:+.2f}",
                     f"{layers:.2f} of {total}"])
    out.write(f"A fallback to the original: {pruned} (pruned to {depth} of {total}), holdout {parts.holdout_name} "
              f"(n={len(labels)})", f"Delta: {task.metric}, served against the original's.\n\n"
                                    f"{markdown_table(HEADER, rows, 'rrrrr')}")
    return 0


def _logits(checkpoint, task, parts: list) -> tuple[int, list[np.ndarray]]:
    """A checkpoint's layer count, and its logits on each of `parts` at its own max length."""
    model, tokenizer = load_classifier(checkpoint, num_labels=task.num_labels, device="cpu")
    limit = model_max_length(model.config.to_dict(), {"model_max_length": tokenizer.model_max_length})
    return total_layers(model.config), [predict_logits(model, tokenizer, part, max_length=limit) for part in parts]
