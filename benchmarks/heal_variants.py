"""Whole-model heal variants at one depth: which kept layers the student starts from, which original layers
it matches, the loss weights, the augmented copies and the epochs, measured on texts no heal saw.

    python benchmarks/heal_variants.py NAME --depth 5 [--start 1,2,3,4,6] [--match 1,2,3,4,6] [--augment 2]
                                            [--epochs 1] [--token-weight 1] [--first-weight 1] [--run-dir lp-run]
    python benchmarks/heal_variants.py NAME --depth 5 --start 1,2,3,4,6 --untrained   # the start, not healed
    python benchmarks/heal_variants.py NAME --depth 5 --top   # export's top-layer heal, for comparison
    python benchmarks/heal_variants.py NAME --depth 5 --top --top-start top   # its layer starts as the last
    python benchmarks/heal_variants.py NAME --depth 8 --top --top-start kept,top --heal-layers 1,2 \
                                            --label-weight 0.5,0   # a grid of top-layer heals

The run directory is an analysis (the demo's ./lp-run). The student is the original model's layers
`--start` (default 1..depth, export's truncation) with the fine-tuned head, trained by `heal.heal_whole`
with student layer j matching original layer `--match`[j] (default export's `heal.layer_map`), on the train
split plus `--augment` copies per text, for `--epochs` passes (no time cap, so variants do equal work).
`--top` runs export's top-layer heal instead, once per (`--heal-layers`, `--top-start`, `--label-weight`), all on one
encoding of the texts (a 12-layer model's pass over the heal texts is the slow part). Each student is
scored against the original on the validation split (the calibration: delta, disagreement and the
gate forecast's lower bound at alpha 2.5%, export's depth share with int8) and on the test split (the
holdout). One row per run is appended to benchmarks/results/heal_variants.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # its sibling scripts, run as a module too
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import layerprune.heal.whole as whole  # noqa: E402
from layerprune.artifacts import AnalysisReport, load_artifact  # noqa: E402
from layerprune.export import _augmented, _heal_texts  # noqa: E402
from layerprune.files import ANALYSIS_FILE, DEFAULT_RUN_DIR, RESULTS_DIR  # noqa: E402
from layerprune.heal import (  # noqa: E402
    DistillOptions, WholeModel, WholeOptions, distill, encode_texts, heal_whole, start_layers,
)
from layerprune.models import _encoder, architecture, load_classifier, total_layers  # noqa: E402
from layerprune.options import ExportOptions  # noqa: E402
from layerprune.validate import calibration_and_holdout, forecast  # noqa: E402
from provenance import provenance  # noqa: E402

RESULTS = "heal_variants.md"
HEADER = ("| variant | depth | start layers | matched layers | augment | epochs | token / first weight | steps | "
          "heal s | calibration delta | calibration disagreement | lower bound | test delta | test disagreement |\n"
          "|---|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--start", help="original layers the student starts from, e.g. 1,2,3,4,6 (default 1..depth)")
    p.add_argument("--match", help="original layer each student layer matches (default heal.layer_map)")
    p.add_argument("--augment", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--token-weight", type=float, default=WholeOptions.token_weight)
    p.add_argument("--first-weight", type=float, default=WholeOptions.first_weight)
    p.add_argument("--untrained", action="store_true", help="score the start as it is")
    p.add_argument("--top", action="store_true",
                   help="export's top-layer heal (heal.distill at its defaults) instead, from the top cut")
    p.add_argument("--top-start", type=_starts, default=[DistillOptions.start],
                   help="with --top: the re-tuned layers start as the kept ones (kept) or as the original's top "
                        "ones (top), or both (kept,top)")
    p.add_argument("--heal-layers", type=_layers, default=[DistillOptions.heal_layers],
                   help="with --top: how many top kept layers are re-tuned, e.g. 1,2")
    p.add_argument("--label-weight", type=_weights, default=[DistillOptions.label_weight],
                   help="with --top: the label loss's weight beside the distillation loss, e.g. 0.5,0")
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    p.add_argument("--out", type=Path, default=ROOT / RESULTS_DIR / RESULTS)
    args = p.parse_args(argv)
    if args.top and args.start:
        print("heal_variants: error: --start is for the whole-model heal; with --top, use --top-start", file=sys.stderr)
        return 2
    if args.top and not all(1 <= n <= args.depth for n in args.heal_layers):
        print(f"heal_variants: error: --heal-layers must be between 1 and --depth {args.depth}", file=sys.stderr)
        return 2
    if not (args.run_dir / ANALYSIS_FILE).is_file():
        print(f"heal_variants: error: {args.run_dir} holds no {ANALYSIS_FILE}; run `layerprune analyze` first",
              file=sys.stderr)
        return 2
    analysis = load_artifact(AnalysisReport, args.run_dir / ANALYSIS_FILE)
    task = analysis.task_config
    model, tokenizer = load_classifier(analysis.model, num_labels=task.num_labels, device="cpu")
    total = total_layers(model.config)
    tops = [DistillOptions(start=start, heal_layers=n, label_weight=w)
            for n in args.heal_layers for start in args.top_start for w in args.label_weight]
    start = _layers(args.start) or [*range(1, args.depth + 1)]
    match = _layers(args.match) or whole.layer_map(args.depth, total)
    if not args.top and (len(start) != args.depth or len(match) != args.depth):
        print("heal_variants: error: --start and --match need one layer per kept layer", file=sys.stderr)
        return 2

    def encode(examples, desc):
        return encode_texts(model, tokenizer, examples, batch_size=32, max_length=128, desc=desc)

    parts = calibration_and_holdout(task, None, None)
    calibration, test = parts.calibration, parts.holdout
    scored = [(encode(calibration, "calibration"), calibration), (encode(test, "test"), test)]
    if args.untrained:
        logits = WholeModel(args.depth, _with_layers(model, start), 0, 0.0, None).logits
        _write(args, task, total, scored, logits, start=start, matched="-", epochs="-", weights="-", steps=0, seconds=0.0)
        return 0
    texts, labels = _export_heal_texts(task, args.augment, encode)
    if args.top:
        for top in tops:
            started = time.perf_counter()
            healed = distill(model, args.depth, texts, labels, opts=top)
            name = args.name if len(tops) == 1 else (f"{args.name} ({top.heal_layers} re-tuned, start {top.start}, "
                                                     f"label weight {top.label_weight:g})")
            _write(args, task, total, scored, healed.logits, name=name, start=start_layers(args.depth, total, top),
                   matched="-", epochs=str(top.epochs), weights="-", steps=healed.steps,
                   seconds=time.perf_counter() - started)
        return 0
    whole.layer_map = lambda depth, total: match  # the matched layers asked for
    opts = WholeOptions(epochs=args.epochs, token_weight=args.token_weight, first_weight=args.first_weight)
    started = time.perf_counter()
    begin = WholeModel(args.depth, _with_layers(model, start), 0, 0.0, None)  # heal_whole reads these two
    healed = heal_whole(model, args.depth, texts, labels, opts=opts, start=begin)
    _write(args, task, total, scored, healed.logits, start=start, matched=_join(match), epochs=str(args.epochs),
           weights=f"{args.token_weight:g} / {args.first_weight:g}", steps=healed.steps,
           seconds=time.perf_counter() - started)
    return 0


def _write(args, task, total: int, scored, logits, *, start: list[int], matched: str, epochs: str, weights: str,
           steps: int, seconds: float, name: str | None = None) -> None:
    """Score one student against the original on calibration (with the gate forecast) and test; print and
    append its row."""
    _, test = scored[1]
    cells = []
    for role, (states, examples) in zip(("calibration", "test"), scored):
        candidate = logits(states)
        a, b = states.logits.argmax(1), candidate.argmax(1)
        cells += [f"{100 * ((b == examples.labels).mean() - (a == examples.labels).mean()):+.2f}",
                  f"{100 * (a != b).mean():.2f}%"]
        if role == "calibration":  # the forecast of the gate on the test split, as export makes it
            guess = forecast(task, examples.labels, states.logits, candidate, 0.01, len(test), alpha=0.025)
            cells.append(f"{100 * guess.lower_bound:+.2f}")
    row = (f"| {name or args.name} | {args.depth} of {total} | {_join(start)} | {matched} | {args.augment} | {epochs} | "
           f"{weights} | {steps} | {seconds:.0f} | " + " | ".join(cells) + " |\n")
    print(row, end="", flush=True)
    if not args.out.is_file():
        args.out.write_text(f"# Whole-model heal variants\n\n{provenance()}\n\n"
                            f"{HEADER}")
    with args.out.open("a") as fh:
        fh.write(row)


def _export_heal_texts(task, augment: int, encode):
    """Export's heal texts (the train split, then `augment` copies of each text labelled -1), encoded."""
    opts = ExportOptions(augment=augment)
    texts = _heal_texts(task, None, opts)
    if augment:
        texts = _augmented(texts, task, opts)
    return encode(texts.examples, "heal texts"), texts.labels


def _starts(spec: str) -> list[str]:
    starts = spec.split(",")
    if not set(starts) <= {"kept", "top"}:
        raise argparse.ArgumentTypeError(f"each start is kept or top, got {spec}")
    return starts


def _weights(spec: str) -> list[float]:
    return [float(x) for x in spec.split(",")]


def _layers(spec: str | None) -> list[int] | None:
    return [int(x) for x in spec.split(",")] if spec else None


def _join(layers: list[int]) -> str:
    return ",".join(map(str, layers))


def _with_layers(model, layers: list[int]) -> nn.Module:
    """A copy of `model` whose stack is its layers `layers` (1-based), in that order, with the same head."""
    student = copy.deepcopy(model)
    encoder, attribute = _encoder(student)
    setattr(encoder, attribute, nn.ModuleList([getattr(encoder, attribute)[i - 1] for i in layers]))
    setattr(student.config, architecture(student.config).depth_field, len(layers))
    return student


if __name__ == "__main__":
    sys.exit(main())
