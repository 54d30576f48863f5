"""Depth x heal: what each heal buys at each depth, on texts no heal saw.

    python benchmarks/bench_heals.py [--run-dir lp-run] [--depths 4,5] [--heals none,distill,whole]

The run directory is an analysis (`layerprune analyze`, e.g. the demo's ./lp-run). The original model runs
once over the heal texts export would use (the train split and its augmented copies, `--augment`), the
calibration and the holdout examples (validate.calibration_and_holdout); then each (depth, heal) is trained
as export trains it, from the truncated original (export's depth walk starts a shallower whole-model heal
from the deeper one instead). Per row: the calibration delta and the gate forecast's lower bound and verdict
(alpha as export's depth walk spends it without int8), the holdout delta and the disagreement with the
original on calibration and holdout, and the heal's time. The table goes to stdout and to
benchmarks/results/heals.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # its sibling modules, run as a module too
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from layerprune.files import DEFAULT_RUN_DIR, RESULTS_DIR  # noqa: E402
from layerprune.export import _augmented, _heal_texts, load_analysis  # noqa: E402
from layerprune.heal import encode_texts, heal_at  # noqa: E402
from layerprune.models import load_classifier  # noqa: E402
from layerprune.options import ExportOptions  # noqa: E402
from layerprune.scoring import compute_metric, predictions  # noqa: E402
from layerprune.validate import calibration_and_holdout, forecast  # noqa: E402
from provenance import provenance, publish, refuses_in_one_line  # noqa: E402

HEALS_RESULTS = "heals.md"


@refuses_in_one_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    parser.add_argument("--depths", default="4,5")
    parser.add_argument("--heals", default="none,distill,whole")
    parser.add_argument("--augment", type=int, default=ExportOptions.augment)
    parser.add_argument("--heal-examples", type=int, default=None, help="first N train texts (default all)")
    parser.add_argument("--heal-minutes", type=float, default=ExportOptions.heal_minutes,
                        help="cap on each whole-model heal's training, as export's")
    parser.add_argument("--out", type=Path, default=ROOT / RESULTS_DIR / HEALS_RESULTS)
    args = parser.parse_args(argv)
    analysis = load_analysis(args.run_dir)
    task = analysis.task_config
    glue_dir = Path(analysis.glue_dir) if analysis.glue_dir else None
    opts = ExportOptions(heal_minutes=args.heal_minutes, augment=args.augment, heal_examples=args.heal_examples)
    opts = dataclasses.replace(opts, whole=dataclasses.replace(opts.whole, minutes=opts.heal_minutes))
    model, tokenizer = load_classifier(analysis.model, num_labels=task.num_labels, device=None)
    heal_texts = _heal_texts(task, glue_dir, opts)  # export's own: the train split, then augmented copies
    if opts.augment:
        heal_texts = _augmented(heal_texts, task, opts)
    heal, labels = heal_texts.examples, heal_texts.labels
    parts = calibration_and_holdout(task, glue_dir, opts.max_examples)
    max_length = 128

    def encode(examples, role):
        return encode_texts(model, tokenizer, examples, batch_size=opts.batch_size, max_length=max_length,
                            desc=f"original, {role}")

    texts, calibration, holdout = encode(heal, "heal texts"), encode(parts.calibration, "calibration"), \
        encode(parts.holdout, "holdout")
    header = ["depth", "heal", "calibration delta", "forecast lower bound", "forecast", "holdout delta",
              "disagreement calibration", "disagreement holdout", "heal s"]
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        for mode in args.heals.split(","):
            started = time.perf_counter()
            healed = heal_at(mode, model, depth, texts, labels, regression=task.is_regression,
                             distill_opts=opts.distill, whole_opts=opts.whole)
            seconds = time.perf_counter() - started
            cal, hold = healed.logits(calibration), healed.logits(holdout)
            guess = forecast(task, parts.calibration.labels, calibration.logits, cal, opts.tolerance,
                             len(parts.holdout), None, opts.alpha)
            delta = (compute_metric(task.metric, parts.holdout.labels, hold, task.is_regression)
                     - compute_metric(task.metric, parts.holdout.labels, holdout.logits, task.is_regression))
            rows.append([
                f"{depth} of {analysis.total_layers}", mode, f"{100 * guess.delta:+.2f}", f"{100 * guess.lower_bound:+.2f}",
                "passes" if guess.passes else "fails", f"{100 * delta:+.2f}",
                f"{100 * _disagreement(calibration.logits, cal):.2f}%", f"{100 * _disagreement(holdout.logits, hold):.2f}%",
                f"{seconds:.0f}" if healed.stats else "-",
            ])
            print(" | ".join(rows[-1]), flush=True)
    lines = [
        f"# depth x heal: {analysis.model} on {task.name}, tolerance {opts.tolerance}, alpha {opts.alpha}",
        "",
        f"{provenance()}.",
        f"Heal texts: {texts.n} ({len(heal) - int((labels < 0).sum())} train + {int((labels < 0).sum())} augmented); "
        f"calibration {parts.calibration_name} (n={len(parts.calibration)}), holdout {parts.holdout_name} "
        f"(n={len(parts.holdout)}). Deltas in points of {task.metric}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    publish("\n".join(lines), args.out)
    return 0


def _disagreement(original: np.ndarray, healed: np.ndarray) -> float:
    return float(np.mean(predictions(original, False) != predictions(healed, False)))


if __name__ == "__main__":
    raise SystemExit(main())
