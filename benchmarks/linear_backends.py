"""torch's linear layers through its BLAS (MKL) or through oneDNN (layerprune.linear), side by side in one run.

First one product of the probe's shape (`linear.PROBE_SHAPE`, a batch of 32 sentences through a BERT-base
feed-forward layer), in GFLOP/s, the best of `linear.PROBE_RUNS`. Then, on the run directory's checkpoint and
its task's first --n train texts, at export's batch size, on CPU, for each path:
- the original's pass over the texts, every hidden state out (`heal.encode_texts`, export's pass over the heal
  texts), in sentences/s;
- one epoch of export's top-layer heal at --depth (`heal.heal_top`, its defaults, one epoch), in seconds, and
  the held-out loss it reached (the two paths must train the same model: the loss agrees to rounding).
The BLAS row runs the model with plain nn.Linear layers; the oneDNN row with layerprune's FastLinear forced
onto oneDNN, whatever `linear.onednn_is_faster()` says here (the table says its answer: what export uses).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from torch import nn

from layerprune import linear
from layerprune.data import load_examples
from layerprune.errors import LayerpruneError
from layerprune.files import DEFAULT_RUN_DIR
from layerprune.heal import TopOptions, encode_texts, heal_top
from layerprune.linear import linear_backend
from layerprune.models import load_classifier
from layerprune.options import ExportOptions

from .common import Run, markdown_table, read_run
from .harness import Results

BATCH = ExportOptions.batch_size  # export's pass over the heal texts
PATHS = {"torch's BLAS (plain nn.Linear)": "blas", "oneDNN (layerprune.linear)": "onednn"}


def measure(run: Run, n: int, depth: int) -> list[tuple[str, float, float, float]]:
    """(path, pass sentences/s, heal epoch s, held-out loss) for each path, on the same texts."""
    task = run.task
    model, tokenizer = load_classifier(run.analysis.model, num_labels=task.num_labels, device="cpu")
    texts = load_examples(task, task.train_split, glue_dir=run.glue_dir).head(n)
    opts = TopOptions(epochs=1)
    rows = []
    for name, backend in PATHS.items():
        with linear_backend(model, backend):
            started = time.perf_counter()
            states = encode_texts(model, tokenizer, texts, batch_size=BATCH, max_length=tokenizer.model_max_length,
                                  keep_tokens={0, depth - opts.heal_layers}, desc=f"pass, {name}")
            rate = len(texts) / (time.perf_counter() - started)
            started = time.perf_counter()
            healed = heal_top(model, depth, states, texts.labels, regression=task.is_regression, opts=opts)
            rows.append((name, rate, time.perf_counter() - started, healed.held_out_loss))
        print(f"  {name}: pass {rate:.1f}/s, heal epoch {rows[-1][2]:.1f} s", file=sys.stderr, flush=True)
    return rows


def product_rates() -> list[tuple[str, float]]:
    """(path, GFLOP/s) of one product of the probe's shape, each path's best of PROBE_RUNS."""
    rows, inputs, outputs = linear.PROBE_SHAPE
    flops = 2 * rows * inputs * outputs
    x, weight, bias = linear.probe_inputs()
    return [(name, flops / linear.best_seconds(fn, x, weight, bias) / 1e9)
            for name, fn in zip(PATHS, (nn.functional.linear, linear.OneDnnLinear.apply))]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="an analysis run directory")
    parser.add_argument("--n", type=int, default=2048, help="train texts (the first N)")
    parser.add_argument("--depth", type=int, default=5, help="the depth the top-layer heal trains at")


def run(args: argparse.Namespace, out: Results) -> int:
    if args.n < 2 or args.depth < 2:
        raise LayerpruneError("--n and --depth must be at least 2")
    run_dir = read_run(args.run_dir)  # export's own check and message, before any work
    probe = linear.onednn_is_faster()  # what export uses here, asked before the rows force either path
    products = product_rates()
    rows = measure(run_dir, args.n, args.depth)
    base = rows[0]
    passes = [[name, f"{rate:.1f}", f"{epoch:.1f}", f"{loss:.4f}", f"{rate / base[1]:.2f}x", f"{base[2] / epoch:.2f}x"]
              for name, rate, epoch, loss in rows]
    body = [f"`linear.onednn_is_faster()` here: {probe}.", "",
            markdown_table(["path", "one product, GFLOP/s"], [[name, f"{rate:.0f}"] for name, rate in products], "lr"),
            "",
            markdown_table(["path", "original's pass, sentences/s", "heal epoch s", "held-out loss", "pass speed-up",
                            "heal speed-up"], passes, "lrrrrr")]
    out.write(f"torch's linear layers: BLAS or oneDNN ({args.run_dir.name}, {args.n} train texts, batch {BATCH}, "
              f"heal at depth {args.depth})", "\n".join(body))
    return 0
