"""Which int8 keeps fp32's predictions, and at what speed: every int8 method layerprune has, on one model.

The model: --checkpoint (a fine-tuned checkpoint, e.g. the full model) or the run directory's truncated cut
(`RUN_DIR/truncated`, checked against --depth); the task comes from the run directory's analysis. It is exported
to fp32 ONNX once (`onnx_export.export_onnx`) and each row is built from that export:
- fp32 (the reference every disagreement is counted against);
- optimum's plain dynamic int8 for this CPU's preset, no node kept in fp32 (`onnx_export.quantize_onnx`): what
  `optimum-cli onnxruntime quantize` gives a user, and the baseline of the speed ratios;
- int8-safe: the same with each feed-forward output projection and the head in fp32 (`sensitive_nodes`), as
  export builds it;
- `faithful_int8` recipes (per-token activation scales, GPTQ weights; layerprune/faithful_int8.py): its
  defaults (smoothing only where it folds into V, symmetric per-token ranges), the recipe with smoothing by a
  Mul anywhere and an asymmetric Q/K/V input (`smooth_with_mul=True, shared_zero_point=True`), and no smoothing.
  They are calibrated on --calibration random texts of the task's train split (never the texts scored), sorted
  by length in batches of 32; the calibration's CPU seconds are a column.

Disagreement: the share of texts whose top class differs from the fp32 graph's, on the task's test split (its
eval split where it has no test split) and on --n-ood out-of-domain snippets (a seeded sample of the Amazon
review, tweet and NYT editorial snippets of vaderSentiment 3.3.2's hutto_ICWSM_2014 data, read from --ood or
fetched with pip), all at batch 32 sorted by length. Speed: --n texts (half test split, half snippets) at batch
32 sorted by length, tokenization included, every row once per round, --rounds interleaved rounds after a
warm-up; sentences per wall second and per CPU second (time.process_time of this process: onnxruntime's threads
included; sessions with non-spinning threads, so that idle threads burn no CPU); the median over rounds, and the
median of the per-round ratios to the baseline.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from layerprune.architectures import total_layers
from layerprune.assets import pip_download
from layerprune.data import load_examples
from layerprune.errors import LayerpruneError
from layerprune.faithful_int8 import faithful_int8
from layerprune.files import CONFIG_FILE, MODEL_FILE
from layerprune.onnx_export import export_onnx, quantization_config, quantize_onnx, sensitive_nodes
from layerprune.runtime import OnnxClassifier

from .common import disagreement, markdown_table, read_run
from .harness import Results

BATCH = 32
SEED = 0
VADER = "vaderSentiment==3.3.2"
VADER_DATA = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
SNIPPETS = ("amazonReviewSnippets", "tweets", "nytEditorialSnippets")  # {name}_GroundTruth.txt: id, rating, text
RECIPES: dict[str, dict] = {
    "faithful_int8, defaults (smoothing folded into V only, symmetric)": {},
    "faithful_int8, smoothing by Mul anywhere + asymmetric Q/K/V input": dict(smooth_with_mul=True,
                                                                             shared_zero_point=True),
    "faithful_int8, no smoothing": dict(alphas=(None,)),
}


@dataclass
class Row:
    name: str
    folder: Path
    calibration_cpu_s: float | None = None
    test: np.ndarray | None = None  # logits
    ood: np.ndarray | None = None
    wall: list[float] = field(default_factory=list)  # sentences/s per round
    cpu: list[float] = field(default_factory=list)  # sentences per CPU second per round


def snippets(source: Path | None) -> list[str]:
    """The out-of-domain snippets, in SNIPPETS' order: from a hutto_ICWSM_2014 folder, or from the
    vaderSentiment sdist fetched with pip."""
    if source is not None:
        files = {name: Path(source) / f"{name}_GroundTruth.txt" for name in SNIPPETS}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise LayerpruneError(f"--ood {source} is not a hutto_ICWSM_2014 folder (no {missing[0]})")
        return [t for name in SNIPPETS for t in _texts(files[name].read_bytes())]
    advice = f"download {VADER} (sdist) yourself, extract {VADER_DATA} and pass its hutto_ICWSM_2014 folder as --ood"
    with tempfile.TemporaryDirectory(prefix="int8-methods-") as tmp:
        pip_download([VADER], Path(tmp), source=True, what=f"{VADER} for its review snippets", advice=advice)
        try:
            with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as outer:
                with tarfile.open(fileobj=io.BytesIO(outer.extractfile(VADER_DATA).read())) as inner:
                    return [t for name in SNIPPETS
                            for t in _texts(inner.extractfile(f"hutto_ICWSM_2014/{name}_GroundTruth.txt").read())]
        except (StopIteration, KeyError, AttributeError, tarfile.TarError) as exc:
            raise LayerpruneError(f"the {VADER} sdist has no snippets where expected ({exc}); {advice}") from None


def _texts(data: bytes) -> list[str]:
    """The text column of a GroundTruth file (id TAB rating TAB text)."""
    lines = data.decode("utf-8", errors="replace").splitlines()
    return [" ".join(line.split("\t", 2)[2].split()) for line in lines if line.count("\t") >= 2]


def calibration_batches(fp32: Path, texts: list[str], n: int) -> list[dict[str, np.ndarray]]:
    """n seeded random texts, encoded as the runtime encodes them, sorted by length, in batches of BATCH."""
    rng = np.random.default_rng(SEED)
    chosen = [texts[i] for i in rng.choice(len(texts), size=min(n, len(texts)), replace=False)]
    clf = OnnxClassifier(fp32, threads=os.cpu_count())
    rows = clf.tokenize(chosen)
    order = np.argsort([len(r.ids) for r in rows], kind="stable")
    return [clf.pad([rows[i] for i in order[k:k + BATCH]]) for k in range(0, len(order), BATCH)]


def build(fp32: Path, work: Path, batches: list[dict[str, np.ndarray]], every: bool = True) -> tuple[list[Row], str]:
    """Every row's folder (fp32 ONNX + tokenizer); also the baseline's configuration name. `every` False: fp32, the
    baseline and faithful_int8's defaults only (what export builds; on a 12-layer model each recipe costs minutes)."""
    rows = [Row("fp32", fp32)]

    def copy() -> Path:
        return shutil.copytree(fp32, work / f"row{len(rows)}")

    folder = copy()
    preset = quantize_onnx(folder, None)
    rows.append(Row(f"optimum plain dynamic int8, {preset} (baseline)", folder))
    if every:
        folder = copy()
        quantize_onnx(folder, sensitive_nodes(fp32))
        rows.append(Row("layerprune int8-safe (feed-forward outputs + head fp32)", folder))
    model = onnx.load(str(fp32 / MODEL_FILE))
    reduce_range = quantization_config()[1].reduce_range  # 7-bit weights where the baseline has them
    for name, kwargs in list(RECIPES.items())[:None if every else 1]:
        folder = copy()
        started = time.process_time()
        onnx.save(faithful_int8(model, batches, reduce_range=reduce_range, **kwargs), str(folder / MODEL_FILE))
        rows.append(Row(name, folder, time.process_time() - started))
        print(f"  {name}: calibrated in {rows[-1].calibration_cpu_s:.0f} CPU s", file=sys.stderr, flush=True)
    return rows, preset


def measure(rows: list[Row], test: list[str], ood: list[str], timing: list[str], rounds: int) -> None:
    """Logits on the test split and the snippets; then sentences/s (wall, CPU) in interleaved rounds."""
    threads = os.cpu_count()
    models = {r.name: OnnxClassifier(r.folder, threads=threads, spinning=False) for r in rows}
    for r in rows:
        r.test, r.ood = (models[r.name].logits(texts, batch_size=BATCH) for texts in (test, ood))
        print(f"  {r.name}: disagreement test {disagreement(rows[0].test, r.test):.2%}, "
              f"ood {disagreement(rows[0].ood, r.ood):.2%}", file=sys.stderr, flush=True)
    for round_ in range(rounds + 1):  # round 0 warms up
        for r in rows:
            wall, cpu = time.perf_counter(), time.process_time()
            models[r.name].logits(timing, batch_size=BATCH)
            if round_:
                r.wall.append(len(timing) / (time.perf_counter() - wall))
                r.cpu.append(len(timing) / max(time.process_time() - cpu, 1e-9))


def table(rows: list[Row]) -> str:
    base = rows[1]

    def ratio(r: Row, of: Callable[[Row], list[float]]) -> str:
        return f"{np.median(np.array(of(r)) / np.array(of(base))):.2f}"

    header = ["method", "calibration CPU s", "disagree test", "disagree ood", "sent/s (wall)", "x baseline (wall)",
              "sent/CPU-s", "x baseline (CPU)", "MB"]
    cells = [[r.name, "-" if r.calibration_cpu_s is None else f"{r.calibration_cpu_s:.0f}",
              f"{disagreement(rows[0].test, r.test):.2%}", f"{disagreement(rows[0].ood, r.ood):.2%}",
              f"{np.median(r.wall):.0f}", ratio(r, lambda x: x.wall), f"{np.median(r.cpu):.0f}",
              ratio(r, lambda x: x.cpu), f"{(r.folder / MODEL_FILE).stat().st_size / 1e6:.1f}"] for r in rows]
    rounds = "; ".join(f"{r.name}: {' '.join(f'{v:.0f}' for v in r.cpu)}" for r in rows)
    return "\n".join([markdown_table(header, cells, "lrrrrrrrr"), "", f"Sentences per CPU second, by round: {rounds}."])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, required=True, help="an analysis run directory (the task; "
                        "without --checkpoint, its truncated/ cut is the model)")
    parser.add_argument("--checkpoint", type=Path, help="the checkpoint to measure instead of RUN_DIR/truncated")
    parser.add_argument("--depth", type=int, help="the depth RUN_DIR/truncated must have (a check)")
    parser.add_argument("--n", type=int, default=1024, help="texts timed per row and round")
    parser.add_argument("--n-ood", type=int, default=2000, help="out-of-domain snippets scored")
    parser.add_argument("--calibration", type=int, default=1000, help="train texts faithful_int8 calibrates on")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the median is reported)")
    parser.add_argument("--ood", type=Path, help="a hutto_ICWSM_2014 folder (default: fetch vaderSentiment with pip)")
    parser.add_argument("--defaults-only", action="store_true", help="fp32, the baseline and faithful_int8's "
                        "defaults only (int8-safe and the other recipes left out)")


def run(args: argparse.Namespace, out: Results) -> int:
    if min(args.n, args.n_ood, args.calibration, args.rounds) < 1:
        raise LayerpruneError("--n, --n-ood, --calibration and --rounds must be at least 1")
    run_dir = read_run(args.run_dir)
    checkpoint = args.checkpoint or run_dir.dir / "truncated"
    if not (checkpoint / CONFIG_FILE).is_file():
        raise LayerpruneError(f"{checkpoint} is not a checkpoint folder (no {CONFIG_FILE})")
    depth = total_layers(json.loads((checkpoint / CONFIG_FILE).read_text()))
    if args.depth is not None and args.depth != depth:
        raise LayerpruneError(f"{checkpoint} has {depth} layers, not --depth {args.depth}")
    task = run_dir.task
    split = "test" if "test" in task.splits else task.eval_split
    test = load_examples(task, split, glue_dir=run_dir.glue_dir).texts
    train = load_examples(task, task.train_split, glue_dir=run_dir.glue_dir).texts
    pool = snippets(args.ood)
    ood = [pool[i] for i in np.random.default_rng(SEED).permutation(len(pool))[:args.n_ood]]
    timing = test[:args.n // 2] + ood[:args.n - min(len(test), args.n // 2)]
    print(f"{checkpoint} ({depth} layers): {len(test)} {split} texts, {len(ood)} snippets", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="int8-methods-") as tmp:
        fp32 = export_onnx(checkpoint, Path(tmp) / "fp32").parent
        rows, preset = build(fp32, Path(tmp), calibration_batches(fp32, train, args.calibration),
                             every=not args.defaults_only)
        measure(rows, test, ood, timing, args.rounds)
        body = [f"Model: {checkpoint}, {run_dir.analysis.model_type}, {depth} layers; task {task.name}. Disagreement "
                f"with fp32: {len(test)} {split} texts and {len(ood)} out-of-domain snippets (vaderSentiment's "
                f"Amazon, tweet and NYT snippets), batch {BATCH}. faithful_int8 calibrated on {args.calibration} "
                f"{task.train_split} texts. Speed: {len(timing)} texts at batch {BATCH} sorted by length, "
                f"{os.cpu_count()} onnxruntime threads (not spinning), median of {args.rounds} interleaved rounds; "
                f"ratios: median of the per-round ratios to the baseline ({preset}).", "", table(rows)]
    out.write(f"int8 methods: {checkpoint.name} ({depth} layers), {task.name}", "\n".join(body))
    return 0
