"""Depth x heal: what each heal buys at each depth, on texts no heal saw; and a grid over the heals' options.

The run directory is an analysis (`layerprune analyze`, e.g. the demo's ./lp-run). The original model runs once
over the heal texts export would use (the train split, or its first --heal-examples, and --augment augmented
copies of each), the calibration and the holdout examples (validate.calibration_and_holdout); then each
(depth, heal) is trained as export trains it (`heal.heal_at`, export's options), from the truncated original
(export's depth walk starts a shallower whole-model heal from the deeper one instead). All of them share that
one encoding of the texts.

--top FIELD=V1,V2 and --whole FIELD=V1,V2 set a field of layerprune.options.TopOptions /
WholeOptions to each value in turn (e.g. --top temperature=1,2,4 --top start=kept,top; `none` for an
optional field; on/off for a switch); each heal of that kind is trained once per combination of the values
given, and the options cell names the combination. A flag given twice for one field keeps the last.

Per row: the calibration delta, the gate forecast's lower bound and verdict at --alpha (export's depth walk has
5% without int8, 2.5% with), the holdout delta and the disagreement with the original on calibration and
holdout, the epochs run, the steps and the heal's time; with --fit, the student's disagreement with the original
on its own heal texts, those it trained on and those it held out to choose its epoch (a student that disagrees
where it trained does not fit; one that agrees there but not on the held-out ones does not generalize). The
table is rewritten after every heal.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np

from layerprune.errors import LayerpruneError
from layerprune.files import DEFAULT_RUN_DIR
from layerprune.heal import encode_texts, heal_at, start_layers
from layerprune.heal.texts import heal_texts, with_augmented
from layerprune.models import load_classifier, total_layers
from layerprune.options import ExportOptions, TopOptions, WholeOptions
from layerprune.scoring import compute_metric
from layerprune.validate import forecast

from .common import disagreement, listed, markdown_table, read_run
from .harness import Results

HEALS = ("none", "head", "top", "whole")
MAX_LENGTH = 128  # tokens per text: rt-polarity's sentences fit, and the heals train faster than at 512
HEADER = ["depth", "heal", "options", "starts as layers", "calibration delta", "forecast lower bound", "forecast",
          "holdout delta", "disagreement calibration", "disagreement holdout",
          "heal texts: trained on / held out", "epochs run", "steps", "heal s"]
ALIGN = "llllrrlrrrrrrr"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    parser.add_argument("--depths", type=listed(int), default=[4, 5])
    parser.add_argument("--heals", type=listed(str, HEALS), default=["none", "top", "whole"])
    parser.add_argument("--top", type=grid_flag(TopOptions), action="append", default=[],
                        metavar="FIELD=V1,V2", help="a TopOptions field and its values (the top-layer heal)")
    parser.add_argument("--whole", type=grid_flag(WholeOptions), action="append", default=[],
                        metavar="FIELD=V1,V2", help="a WholeOptions field and its values (the whole-model heal)")
    parser.add_argument("--augment", type=int, default=ExportOptions.augment, help="augmented copies per heal text")
    parser.add_argument("--heal-examples", type=int, help="heal on the first N train texts (default all)")
    parser.add_argument("--alpha", type=float, default=ExportOptions.alpha, help="the forecast's error rate")
    parser.add_argument("--fit", action="store_true", help="score each student on its own heal texts too")
    parser.add_argument("--device", help="cpu, cuda, ... (default: CUDA when present)")


def grid_flag(options: type) -> typing.Callable[[str], tuple[str, list[Any]]]:
    """A flag type: 'FIELD=V1,V2' -> (FIELD, [values]), each value parsed as `options`' FIELD is typed."""
    hints = typing.get_type_hints(options)

    def parse(text: str) -> tuple[str, list[Any]]:
        name, _, values = text.partition("=")
        if name not in hints or not values:
            raise argparse.ArgumentTypeError(f"expected FIELD=V1,V2 with FIELD one of {', '.join(hints)}, got {text!r}")
        try:
            return name, [_value(hints[name], v.strip()) for v in values.split(",")]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{name}: {exc}") from None

    return parse


def _value(hint: Any, text: str) -> Any:
    """`text` as a value of the type `hint` (int, float, bool as on/off, a Literal, or any of them | None)."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    if optional and text == "none":
        return None
    (kind,) = [k for k in typing.get_args(hint) if k is not type(None)] if optional else [hint]
    if typing.get_origin(kind) is typing.Literal:
        if text not in typing.get_args(kind):
            raise ValueError(f"{text!r} is not one of {', '.join(typing.get_args(kind))}")
        return text
    if kind is bool:
        if text not in ("on", "off"):
            raise ValueError(f"{text!r} is not on or off")
        return text == "on"
    return kind(text)


def points(base: Any, grid: list[tuple[str, list[Any]]]) -> list[tuple[Any, str]]:
    """Every combination of the grid's values, as options (`base` with them set) and a cell naming them."""
    fields = dict(grid)  # a field given twice: the last
    if not fields:
        return [(base, "export's")]
    combos = itertools.product(*fields.values())
    return [(dataclasses.replace(base, **dict(zip(fields, values))),
             ", ".join(f"{k} {_shown(v)}" for k, v in zip(fields, values))) for values in combos]


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def run(args: argparse.Namespace, out: Results) -> int:
    run_dir = read_run(args.run_dir)
    task = run_dir.task
    opts = ExportOptions(augment=args.augment, heal_examples=args.heal_examples)
    grids = {"top": points(opts.top, args.top), "whole": points(opts.whole, args.whole)}  # export's, as the base
    model, tokenizer = load_classifier(run_dir.analysis.model, num_labels=task.num_labels, device=args.device)
    total = total_layers(model.config)
    if not all(1 <= d <= total for d in args.depths):
        raise LayerpruneError(f"--depths must be between 1 and {total}, got {','.join(map(str, args.depths))}")
    texts = heal_texts(task, run_dir.glue_dir, opts)  # export's own: the train split, then augmented copies
    if texts.examples is None:
        raise LayerpruneError(f"{task.name} has no train split to heal with")
    train = len(texts.examples)
    if opts.augment:
        texts = with_augmented(texts, task, opts)
    parts = run_dir.parts(opts.max_examples)

    def encode(examples, role):
        return encode_texts(model, tokenizer, examples, batch_size=opts.batch_size, max_length=MAX_LENGTH,
                            desc=f"original, {role}")

    heal, calibration, holdout = (encode(texts.examples, "heal texts"), encode(parts.calibration, "calibration"),
                                  encode(parts.holdout, "holdout"))
    intro = (f"Heal texts: {heal.n} ({train} train + {heal.n - train} augmented); calibration "
             f"{parts.calibration_name} (n={len(parts.calibration)}), holdout {parts.holdout_name} "
             f"(n={len(parts.holdout)}). Deltas in points of {task.metric}; options: the grid's, else export's.")
    rows = []
    for depth in args.depths:
        for mode in args.heals:
            for point, named in grids.get(mode, [(None, "-")]):
                started = time.perf_counter()
                healed = heal_at(mode, model, depth, heal, texts.labels, regression=task.is_regression,
                                 top=point if mode == "top" else opts.top,
                                 whole=point if mode == "whole" else opts.whole, head=opts.head)
                seconds = time.perf_counter() - started
                scores = _scores(task, parts, calibration, holdout, healed, opts.tolerance, args.alpha)
                stats, steps = healed.stats, getattr(healed, "steps", None)
                rows.append([
                    f"{depth} of {total}", mode, named, _starts(mode, depth, total, point), *scores,
                    fit(heal, healed) if args.fit else "-",
                    "-" if stats is None or stats.epochs_run is None else f"{stats.epochs_run} of {point.epochs}",
                    "-" if steps is None else str(steps), "-" if stats is None else f"{seconds:.0f}",
                ])
                print(" | ".join(rows[-1]), flush=True)
                out.write(f"depth x heal: {run_dir.analysis.model} on {task.name}, alpha {args.alpha}",
                          f"{intro}\n\n{markdown_table(HEADER, rows, ALIGN)}")
    return 0


def _scores(task, parts, calibration, holdout, healed, tolerance: float, alpha: float) -> list[str]:
    """A healed model against the original: the cells from the calibration delta to the disagreement on the
    holdout."""
    cal, hold = healed.logits(calibration), healed.logits(holdout)
    guess = forecast(task, parts.calibration.labels, calibration.logits, cal, tolerance, len(parts.holdout), None,
                     alpha)
    delta = (compute_metric(task.metric, parts.holdout.labels, hold, task.is_regression)
             - compute_metric(task.metric, parts.holdout.labels, holdout.logits, task.is_regression))
    return [f"{100 * guess.delta:+.2f}", f"{100 * guess.lower_bound:+.2f}", "passes" if guess.passes else "fails",
            f"{100 * delta:+.2f}", f"{100 * disagreement(calibration.logits, cal):.2f}%",
            f"{100 * disagreement(holdout.logits, hold):.2f}%"]


def _starts(mode: str, depth: int, total: int, point: Any) -> str:
    """The original's layers the student's kept layers start as."""
    if mode == "top":
        layers = start_layers(depth, total, dataclasses.replace(point, heal_layers=min(point.heal_layers, depth)))
    else:
        layers = range(1, depth + 1)
    return ",".join(map(str, layers))


def fit(texts, healed) -> str:
    """The healed model's disagreement with the original on the heal texts it trained on / on the batches
    it held out to choose its epoch ('-' for a heal that trains nothing, or holds nothing out)."""
    held = getattr(healed, "held_out", None)
    if held is None:
        return "-"
    agree = texts.logits.argmax(1) == healed.logits(texts).argmax(1)
    parts = (sorted(set(range(len(texts.batches))) - set(held)), held)
    rates = [100 * (1 - agree[np.concatenate([texts.batches[i].indices for i in part])].mean()) if part else None
             for part in parts]
    return " / ".join("-" if r is None else f"{r:.2f}%" for r in rates)
