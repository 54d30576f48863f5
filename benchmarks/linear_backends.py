"""torch's linear layers through its BLAS (MKL) or through oneDNN (layerprune.linear), side by side in one run.

    python benchmarks/linear_backends.py [--run-dir lp-run-mpnet] [--n 2048] [--depth 6]
                                         [--out benchmarks/results/linear_backends.md]

First one product of the probe's shape (`linear.PROBE_SHAPE`, a batch of 32 sentences through a BERT-base
feed-forward layer), in GFLOP/s, the best of `linear.PROBE_RUNS`. Then, on the run directory's checkpoint and
its task's first --n train texts, batch 32, on CPU, for each path:
- the original's pass over the texts, every hidden state out (`heal.encode_texts`, export's pass over the heal
  texts), in sentences/s;
- one epoch of export's top-layer heal at --depth (`heal.distill`, its defaults, one epoch), in seconds, and
  the held-out loss it reached (the two paths must train the same model: the loss agrees to rounding).
The BLAS row runs the model with plain nn.Linear layers; the oneDNN row with layerprune's FastLinear forced
onto oneDNN, whatever `linear.onednn_is_faster()` says here (the header gives its answer: what export uses).
The table is written to --out under a header naming the date, CPU and commit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # its sibling modules, run as a module too
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from torch import nn  # noqa: E402

from layerprune import linear  # noqa: E402
from layerprune.artifacts import AnalysisReport  # noqa: E402
from layerprune.data import load_examples  # noqa: E402
from layerprune.errors import LayerpruneError  # noqa: E402
from layerprune.export import load_analysis  # noqa: E402
from layerprune.files import RESULTS_DIR  # noqa: E402
from layerprune.heal import DistillOptions, distill, encode_texts  # noqa: E402
from layerprune.models import load_classifier  # noqa: E402
from provenance import provenance, publish, refuses_in_one_line  # noqa: E402

RESULTS = "linear_backends.md"
BATCH = 32
PATHS = {"torch's BLAS (plain nn.Linear)": nn.Linear, "oneDNN (layerprune.linear)": linear.FastLinear}


def measure(analysis: AnalysisReport, n: int, depth: int) -> list[tuple[str, float, float, float]]:
    """(path, pass sentences/s, heal epoch s, held-out loss) for each path, on the same texts."""
    task = analysis.task_config
    model, tokenizer = load_classifier(analysis.model, num_labels=task.num_labels, device="cpu")
    texts = load_examples(task, task.train_split).head(n)
    opts = DistillOptions(epochs=1)
    linear.onednn_is_faster = lambda: True  # the oneDNN row runs oneDNN here, whatever the probe says
    rows = []
    for name, kind in PATHS.items():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.__class__ = kind
        started = time.perf_counter()
        states = encode_texts(model, tokenizer, texts, batch_size=BATCH, max_length=tokenizer.model_max_length,
                              keep_tokens={0, depth - opts.heal_layers}, desc=f"pass, {name}")
        rate = len(texts) / (time.perf_counter() - started)
        started = time.perf_counter()
        healed = distill(model, depth, states, texts.labels, regression=task.is_regression, opts=opts)
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


@refuses_in_one_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=ROOT / "lp-run-mpnet", help="an analysis run directory")
    parser.add_argument("--n", type=int, default=2048, help="train texts (the first N)")
    parser.add_argument("--depth", type=int, default=6, help="the depth the top-layer heal trains at")
    parser.add_argument("--out", type=Path, default=ROOT / RESULTS_DIR / RESULTS)
    args = parser.parse_args(argv)
    if args.n < 2 or args.depth < 2:
        raise LayerpruneError("--n and --depth must be at least 2")
    analysis = load_analysis(args.run_dir)  # export's own check and message, before any work
    probe = linear.onednn_is_faster()  # before measure() forces it
    products = product_rates()
    rows = measure(analysis, args.n, args.depth)
    base = rows[0]
    lines = [f"# torch's linear layers: BLAS or oneDNN ({args.run_dir.name}, {args.n} train texts, batch {BATCH}, "
             f"heal at depth {args.depth})", "", f"{provenance()}. `linear.onednn_is_faster()` here: {probe}.", "",
             "| path | one product, GFLOP/s |", "|---|---:|",
             *(f"| {name} | {rate:.0f} |" for name, rate in products), "",
             "| path | original's pass, sentences/s | heal epoch s | held-out loss | pass speed-up | heal speed-up |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {rate:.1f} | {epoch:.1f} | {loss:.4f} | {rate / base[1]:.2f}x | {base[2] / epoch:.2f}x |"
              for name, rate, epoch, loss in rows]
    publish("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
