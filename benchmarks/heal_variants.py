"""Whole-model heal variants at one depth: which kept layers the student starts from, which original layers
it matches, the loss weights, the augmented copies and the epochs, measured on texts no heal saw.

    python benchmarks/heal_variants.py NAME --depth 5 [--start 1,2,3,4,6] [--match 1,2,3,4,6] [--augment 2]
                                            [--epochs 1] [--token-weight 1] [--first-weight 1] [--run-dir lp-run]
    python benchmarks/heal_variants.py NAME --depth 5 --start 1,2,3,4,6 --untrained   # the start, not healed
    python benchmarks/heal_variants.py NAME --depth 5 --top   # export's top-layer heal, for comparison
    python benchmarks/heal_variants.py NAME --depth 5 --top --top-start top   # its layer starts as the last
    python benchmarks/heal_variants.py NAME --depth 8 --top --top-start kept,top --heal-layers 1,2 \
                                            --label-weight 0.5,0   # a grid of top-layer heals
    python benchmarks/heal_variants.py NAME --depth 8 --top --warmup none,0.06 --dropout on,off --lr 5e-5,1e-4

The run directory is an analysis (the demo's ./lp-run). The student is the original model's layers
`--start` (default 1..depth, export's truncation) with the fine-tuned head, trained by `heal.heal_whole`
with student layer j matching original layer `--match`[j] (default export's `heal.layer_map`), on the train
split plus `--augment` copies per text, for `--epochs` passes (no time cap, so variants do equal work, unless
`--minutes` sets export's cap). The model runs on `--device` (CUDA when present).
`--top` runs export's top-layer heal instead, once per combination of `--heal-layers`, `--top-start`,
`--label-weight`, `--lr`, `--warmup`, `--dropout`, `--neighbours` and `--ema`, all on one encoding of the texts (a 12-layer model's
pass over the heal texts is the slow part). Each student is scored against the original on the validation
split (the calibration: delta, disagreement and the gate forecast's lower bound at alpha 2.5%, export's
depth share with int8) and on the test split (the holdout). A trained student is also scored on its own heal
texts, the part it trained on and the tenth it held out: a student that disagrees on the texts it trained on
does not fit, one that agrees there but not on the held-out tenth does not generalize. One row per run is
appended to benchmarks/results/heal_variants.md, under a header that names the date, CPU and commit.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # its sibling scripts, run as a module too
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from layerprune.errors import LayerpruneError  # noqa: E402
from layerprune.export import _augmented, _heal_texts, load_analysis  # noqa: E402
from layerprune.files import DEFAULT_RUN_DIR, RESULTS_DIR  # noqa: E402
from layerprune.heal import (  # noqa: E402
    DistillOptions, WholeModel, WholeOptions, distill, encode_texts, heal_whole, layer_map, start_layers,
)
from layerprune.models import _encoder, architecture, load_classifier, total_layers  # noqa: E402
from layerprune.options import ExportOptions  # noqa: E402
from layerprune.validate import calibration_and_holdout, forecast  # noqa: E402
from provenance import provenance, refuses_in_one_line  # noqa: E402

RESULTS = "heal_variants.md"
HEADER = ("| variant | depth | start layers | matched layers | augment | epochs | token / first weight | steps | "
          "heal s | calibration delta | calibration disagreement | lower bound | test delta | test disagreement | "
          "heal-text disagreement, trained on / held out |\n"
          "|---|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
WHOLE_EPOCHS = 1  # the whole-model heal's passes here unless --epochs says otherwise (the top heal: its default)


@refuses_in_one_line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--start", help="original layers the student starts from, e.g. 1,2,3,4,6 (default 1..depth)")
    p.add_argument("--match", help="original layer each student layer matches (default heal.layer_map)")
    p.add_argument("--augment", type=int, default=2)
    p.add_argument("--heal-examples", type=int, help="heal with the first N train texts (default all, as export)")
    p.add_argument("--epochs", type=int, help=f"passes over the heal texts (default {WHOLE_EPOCHS}; with --top, "
                                              f"{DistillOptions.epochs})")
    p.add_argument("--token-weight", type=float, default=WholeOptions.token_weight)
    p.add_argument("--first-weight", type=float, default=WholeOptions.first_weight)
    p.add_argument("--minutes", type=float, help="cap on the whole-model heal's training (export's --heal-minutes; "
                                                 "default none: every epoch runs)")
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
    p.add_argument("--lr", type=_weights, default=[DistillOptions.lr], help="with --top: learning rates, e.g. 5e-5,1e-4")
    p.add_argument("--temperature", type=_weights, default=[DistillOptions.temperature],
                   help="with --top: the logits' distillation temperature, e.g. 1,2,4 (high: closer to matching "
                        "the logits themselves)")
    p.add_argument("--warmup", type=_optional_floats, default=[DistillOptions.warmup],
                   help="with --top: none (a constant learning rate) or the share of steps warmed up over before a "
                        "linear decay to zero, e.g. none,0.06")
    p.add_argument("--dropout", type=_switches, default=[DistillOptions.dropout],
                   help="with --top: dropout on or off while training, e.g. on,off")
    p.add_argument("--neighbours", type=_weights, default=[DistillOptions.neighbours],
                   help="with --top: noise scales of the input states the original relabels (0: off), e.g. 0,0.3")
    p.add_argument("--ema", type=_optional_floats, default=[DistillOptions.ema],
                   help="with --top: none (keep the weights as trained) or the decay of the weights' moving "
                        "average kept instead, e.g. none,0.999")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ...")
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    p.add_argument("--out", type=Path, default=ROOT / RESULTS_DIR / RESULTS)
    args = p.parse_args(argv)
    if args.top and args.start:
        raise LayerpruneError("--start is for the whole-model heal; with --top, use --top-start")
    if args.top and not all(1 <= n <= args.depth for n in args.heal_layers):
        raise LayerpruneError(f"--heal-layers must be between 1 and --depth {args.depth}")
    analysis = load_analysis(args.run_dir)
    task = analysis.task_config
    model, tokenizer = load_classifier(analysis.model, num_labels=task.num_labels, device=args.device)
    args.provenance = provenance(model.device)  # once: every row of this run under one header, with its commit
    total = total_layers(model.config)
    epochs = args.epochs if args.epochs is not None else (DistillOptions.epochs if args.top else WHOLE_EPOCHS)
    tops = [DistillOptions(start=start, heal_layers=n, label_weight=w, lr=lr, warmup=warmup, dropout=dropout,
                           epochs=epochs, neighbours=near, ema=ema, temperature=t)
            for n in args.heal_layers for start in args.top_start for w in args.label_weight
            for lr in args.lr for warmup in args.warmup for dropout in args.dropout
            for near in args.neighbours for ema in args.ema for t in args.temperature]
    start = _layers(args.start) or [*range(1, args.depth + 1)]
    match = _layers(args.match) or layer_map(args.depth, total)
    if not args.top and (len(start) != args.depth or len(match) != args.depth):
        raise LayerpruneError("--start and --match need one layer per kept layer")

    def encode(examples, desc):
        return encode_texts(model, tokenizer, examples, batch_size=32, max_length=128, desc=desc)

    parts = calibration_and_holdout(task, None, None)
    calibration, test = parts.calibration, parts.holdout
    scored = [(encode(calibration, "calibration"), calibration), (encode(test, "test"), test)]
    if args.untrained:
        logits = WholeModel(args.depth, _with_layers(model, start), 0, 0.0, None, []).logits
        _write(args, task, total, scored, logits, start=start, matched="-", epochs="-", weights="-", steps=0, seconds=0.0)
        return 0
    texts, labels = _export_heal_texts(task, args.augment, args.heal_examples, encode)
    if args.top:
        for top in tops:
            started = time.perf_counter()
            healed = distill(model, args.depth, texts, labels, opts=top)
            seconds = time.perf_counter() - started
            _write(args, task, total, scored, healed.logits, name=_top_name(args.name, top, len(tops) > 1),
                   start=start_layers(args.depth, total, top), matched="-", epochs=str(top.epochs), weights="-",
                   steps=healed.steps, seconds=seconds, fit=_fit(texts, healed.logits(texts), healed.held_out))
        return 0
    opts = WholeOptions(epochs=epochs, minutes=args.minutes, token_weight=args.token_weight,
                        first_weight=args.first_weight)
    started = time.perf_counter()
    begin = WholeModel(args.depth, _with_layers(model, start), 0, 0.0, None, [])  # heal_whole reads these two
    healed = heal_whole(model, args.depth, texts, labels, opts=opts, start=begin, mapped=match)
    ran = str(epochs) if args.minutes is None else f"{healed.stats.epochs_run} of {epochs} ({args.minutes:g}-min cap)"
    _write(args, task, total, scored, healed.logits, start=start, matched=_join(match), epochs=ran,
           weights=f"{args.token_weight:g} / {args.first_weight:g}", steps=healed.steps,
           seconds=time.perf_counter() - started, fit=_fit(texts, healed.logits(texts), healed.held_out))
    return 0


def _write(args, task, total: int, scored, logits, *, start: list[int], matched: str, epochs: str, weights: str,
           steps: int, seconds: float, name: str | None = None, fit: str = "-") -> None:
    """Score one student against the original on calibration (with the gate forecast) and test; print and
    append its row, under a new header where the file's last one is not this run's."""
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
           f"{weights} | {steps} | {seconds:.0f} | " + " | ".join(cells) + f" | {fit} |\n")
    print(row, end="", flush=True)
    if not args.out.is_file():
        args.out.write_text("# Whole-model heal variants\n")
    written = args.out.read_text()
    last = written.rfind(HEADER)
    with args.out.open("a") as fh:
        if last < 0 or not written[:last].endswith(f"{args.provenance}\n\n"):
            fh.write(f"\n{args.provenance}\n\n{HEADER}")
        fh.write(row)


def _top_name(name: str, top: DistillOptions, grid: bool) -> str:
    """A top-layer heal's row name: the grid's point where there is a grid, and every setting off the default."""
    settings = [f"{top.heal_layers} re-tuned, start {top.start}, label weight {top.label_weight:g}"] if grid else []
    settings += [f"lr {top.lr:g}"] if top.lr != DistillOptions.lr else []
    settings += [f"temperature {top.temperature:g}"] if top.temperature != DistillOptions.temperature else []
    settings += [f"warmup {top.warmup:g}, linear decay"] if top.warmup is not None else []
    settings += ["no dropout"] if not top.dropout else []
    settings += [f"neighbours at {top.neighbours:g} spread"] if top.neighbours else []
    settings += [f"weights' moving average, decay {top.ema:g}"] if top.ema is not None else []
    return f"{name} ({', '.join(settings)})" if settings else name


def _fit(texts, logits, held: list[int]) -> str:
    """Disagreement with the original on the heal texts the student trained on / on the batches `held` it held
    out to choose its epoch."""
    train = sorted(set(range(len(texts.batches))) - set(held))
    agree = texts.logits.argmax(1) == logits.argmax(1)
    rates = [100 * (1 - agree[np.concatenate([texts.batches[i].indices for i in part])].mean()) if part else None
             for part in (train, held)]
    return " / ".join("-" if r is None else f"{r:.2f}%" for r in rates)


def _export_heal_texts(task, augment: int, heal_examples: int | None, encode):
    """Export's heal texts (the train split or its first `heal_examples`, then `augment` copies of each text
    labelled -1), encoded."""
    opts = ExportOptions(augment=augment, heal_examples=heal_examples)
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


def _optional_floats(spec: str) -> list[float | None]:
    return [None if x == "none" else float(x) for x in spec.split(",")]


def _switches(spec: str) -> list[bool]:
    switches = spec.split(",")
    if not set(switches) <= {"on", "off"}:
        raise argparse.ArgumentTypeError(f"each is on or off, got {spec}")
    return [x == "on" for x in switches]


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
