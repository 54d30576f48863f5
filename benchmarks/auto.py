"""Does the gate agree with auto? `layerprune export --keep-layers auto` repeated over calibration resamples.

The run directory is an analysis (`layerprune analyze`, e.g. the demo's ./lp-run). For each seed the task's labelled
evaluation examples (rt-polarity: validation + test, 2,112 sentences) are pooled and cut into new calibration and
holdout halves (`ExportOptions.resample_seed`); the export runs with the given options (default: the demo's, auto
depth, the top-layer heal, int8 candidates, export's tolerance and its --fallback auto; `--fallback S` sends the
share S of texts the cut is least sure of on to the original, 0 none) into a temporary bundle. A heal never sees
calibration or holdout, so the runs share one `Reuse`: the original's outputs on the heal texts and each depth's
heal are computed by the first run that needs them, and a later run's time is the rest of its export. One row per
run: depth chosen, heal, export kept, calibration delta and the forecast's lower bound, the holdout delta,
pass/fail, time, the share of the holdout sent on, and why not deeper: one layer fewer's disagreement and forecast
bound. The table is rewritten after every run. Exit 1 if any run failed the gate.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from layerprune.artifacts import DepthReport
from layerprune.export import ExportOptions, Reuse, export_bundle
from layerprune.files import BUNDLE_DIR, DEFAULT_RUN_DIR
from layerprune.options import fallback

from .common import listed, markdown_table
from .harness import Results

HEADER = ["quantize", "seed", "depth", "heal", "export", "calibration delta", "forecast lower bound", "holdout delta",
          "holdout 95% CI", "agreement", "passed", "time s", "sent on", "one layer fewer: disagreement, lower bound"]
PASSED = HEADER.index("passed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    parser.add_argument("--seeds", type=listed(int), default=[0, 1, 2, 3, 4])
    parser.add_argument("--quantize", type=listed(str, ("int8", "none")), default=["int8"],
                        help="int8, none, or both in turn (none,int8)")
    parser.add_argument("--tolerance", type=float, default=ExportOptions.tolerance)
    parser.add_argument("--fallback", type=fallback, default=ExportOptions.fallback,
                        help="export --fallback (0: none; auto: the share by cost)")


def run(args: argparse.Namespace, out: Results) -> int:
    title = (f"auto depth vs the holdout gate: {args.run_dir}, tolerance {args.tolerance}, quantize "
             f"{','.join(args.quantize)}, fallback {args.fallback}")
    rows, reuse = [], Reuse()
    for q in args.quantize:  # every seed of one setting, then the next: a partial run still has whole tables
        for seed in args.seeds:
            opts = ExportOptions(quantize=None if q == "none" else "int8", tolerance=args.tolerance,
                                 resample_seed=seed, fallback=args.fallback)
            rows.append([q, *_row(args.run_dir, opts, reuse)])
            print(" | ".join(rows[-1]), flush=True)
            passed = sum(r[PASSED] == "yes" for r in rows)
            out.write(title, f"{markdown_table(HEADER, rows)}\n\n{passed} of {len(rows)} runs passed the gate. Heals "
                             "and the heal texts' encoding are shared: the first run that needs each pays for it.")
    return 0 if all(r[PASSED] == "yes" for r in rows) else 1


def _row(run_dir: Path, opts: ExportOptions, reuse: Reuse) -> list[str]:
    """One export into a temporary bundle, as a table row (after the quantize column)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-auto-") as tmp:
        result = export_bundle(run_dir, Path(tmp) / BUNDLE_DIR, opts, reuse)
    seconds = time.perf_counter() - started
    report, v = result.depth, result.validation  # report: depth.json
    # The forecast of what was exported: the chosen int8/fp32 candidate's, else the depth's own.
    candidate = next((c for c in report.candidates if c.chosen), None)
    chosen = candidate.forecast if candidate else next(s for s in report.scores if s.depth == report.depth).forecast
    return [
        str(opts.resample_seed), f"{report.depth} of {report.total_layers}", report.heal,
        result.manifest.quantization_config or "fp32", f"{chosen.delta:+.4f}", f"{chosen.lower_bound:+.4f}",
        f"{v.delta:+.4f}", f"[{v.delta_ci95[0]:+.4f}, {v.delta_ci95[1]:+.4f}]", f"{v.agreement:.1%}",
        "yes" if v.passed else "NO", f"{seconds:.0f}", "-" if v.sent_on is None else f"{v.sent_on:.1%}",
        one_layer_fewer(report),
    ]


def one_layer_fewer(report: DepthReport) -> str:
    """Why auto did not cut deeper: the forecast of one layer fewer than it kept, where the walk scored it
    ('5: 1.42%, -0.0090': its disagreement with the original as served and the forecast's lower bound)."""
    below = next((s.forecast for s in report.scores if s.depth == report.depth - 1), None)
    if below is None:
        return "-"
    share = "-" if below.disagreement is None else f"{below.disagreement:.2%}"
    return f"{report.depth - 1}: {share}, {below.lower_bound:+.4f}"
