"""Cost of the analyzer: where `layerprune analyze` spends its time, and CKA estimators as n grows.

(a) `layerprune.analyze.analyze` on the checkpoint with the rt-polarity validation split at the default
    options (cls, exact linear CKA, eigengap), into a temporary run dir: report.timings (load, forward,
    CKA, clustering, total), median over --repeats runs after a warm-up run; then one more run under
    tracemalloc for the peak of traced (Python + numpy) allocations, and the process's peak RSS
    (ru_maxrss: includes torch, which tracemalloc does not see). Part (a) runs first, so the RSS
    figure is not inflated by part (b).
(b) Synthetic representations, 13 layers x width 768 (BERT-base with embeddings), for n in --sizes:
    `cka_matrix(reps, "linear")` (exact; inputs float32, built before timing and excluded from the
    traced peak, their size reported separately) vs `MinibatchCKA` fed batches of 256 generated on the
    fly (inputs never exist at full n; a batch's generation is inside the traced region but not in the
    timed update). Memory: tracemalloc peak during the computation (numpy allocations are traced).
    Exact runs in increasing n; when the previous size's time extrapolated linearly in n says the next
    would exceed --exact-budget-s, it is skipped and said so.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from layerprune.files import DEMO_CHECKPOINTS

from .common import listed, markdown_table
from .harness import Results

LAYERS, WIDTH, BATCH = 13, 768, 256
MIB = 1024 * 1024


def part_a(checkpoint: Path, repeats: int) -> tuple[str, dict]:
    from layerprune.analyze import AnalyzeOptions, analyze
    from layerprune.tasks import load_task

    task = load_task("rt-polarity")
    opts = AnalyzeOptions()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-analyze-") as tmp:
        for i in range(repeats + 1):  # first run: warm-up (file cache, lazy imports)
            t0 = time.perf_counter()
            report = analyze(str(checkpoint), task, Path(tmp) / f"run{i}", opts)
            wall = time.perf_counter() - t0
            if i > 0:
                runs.append((report.timings, wall))
        tracemalloc.start()
        tracemalloc.reset_peak()
        traced = analyze(str(checkpoint), task, Path(tmp) / "traced", opts)
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    med = lambda f: float(np.median([f(t) for t, _ in runs]))  # noqa: E731
    load, fwd, cka, clu, tot = (med(lambda t: t.load_s), med(lambda t: t.forward_s), med(lambda t: t.cka_s),
                                med(lambda t: t.clustering_s), med(lambda t: t.total_s))
    wall = float(np.median([w for _, w in runs]))
    other = tot - load - fwd - cka - clu
    share = (cka + clu) / tot
    lines = [
        f"### (a) `analyze` {checkpoint.name} on rt-polarity/{report.split} (n={report.n_examples}, "
        f"{report.representation}, CKA {report.cka_estimator}, {report.total_layers} layers), "
        f"median of {repeats} runs after a warm-up",
        "",
        markdown_table(["stage", "seconds", "share of total"], [
            ["load (data, model, tokenize)", f"{load:.3f}", f"{load / tot:.1%}"],
            ["forward (all hidden states)", f"{fwd:.3f}", f"{fwd / tot:.1%}"],
            ["CKA (exact linear)", f"{cka:.4f}", f"{cka / tot:.2%}"],
            ["clustering (eigengap)", f"{clu:.4f}", f"{clu / tot:.2%}"],
            ["metric + report + write (rest)", f"{other:.3f}", f"{other / tot:.1%}"],
            ["**total (report.timings.total_s)**", f"**{tot:.3f}**", "100%"]], "lrr"),
        "",
        f"- wall time of the `analyze()` call: {wall:.2f}s (median); boundary {report.boundary}, "
        f"accuracy {report.metric.value:.4f}",
        f"- CKA + clustering = {cka + clu:.3f}s = **{share:.2%}** of analyze time -> goal <= 5%: "
        f"**{'MET' if share <= 0.05 else 'MISSED'}**",
        f"- peak memory: tracemalloc peak during one analyze() (Python + numpy; torch tensors not traced) "
        f"{traced_peak / MIB:.1f} MiB; process peak RSS (ru_maxrss, incl. torch and the model) "
        f"{maxrss_mib:.0f} MiB; traced run's timings: forward {traced.timings.forward_s:.2f}s, CKA "
        f"{traced.timings.cka_s:.3f}s, clustering {traced.timings.clustering_s:.3f}s",
    ]
    return "\n".join(lines), {"share": share}


def _layers_from(z: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """13 correlated float32 'layers': a random walk from a shared base, so CKA varies with layer gap."""
    reps, h = [], z
    for _ in range(LAYERS):
        reps.append(h)
        h = h + 0.6 * rng.standard_normal(z.shape, dtype=np.float32)
    return reps


def exact_case(n: int, seed: int = 0) -> dict:
    from layerprune.cka import cka_matrix

    rng = np.random.default_rng(seed)
    reps = _layers_from(rng.standard_normal((n, WIDTH), dtype=np.float32), rng)
    input_bytes = sum(r.nbytes for r in reps)
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    t0 = time.perf_counter()
    m = cka_matrix(reps, "linear")
    secs = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del reps
    gc.collect()
    return {"secs": secs, "peak": peak - base, "input": input_bytes, "cka_1_12": float(m[1, 12])}


def minibatch_case(n: int, seed: int = 0) -> dict:
    from layerprune.cka import MinibatchCKA

    rng = np.random.default_rng(seed)
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    mb = MinibatchCKA(LAYERS)
    update_s, gen_s, done = 0.0, 0.0, 0
    while done < n:
        m = min(BATCH, n - done)
        t0 = time.perf_counter()
        reps = _layers_from(rng.standard_normal((m, WIDTH), dtype=np.float32), rng)
        t1 = time.perf_counter()
        mb.update(reps)
        update_s += time.perf_counter() - t1
        gen_s += t1 - t0
        done += m
        del reps
    t0 = time.perf_counter()
    res = mb.result()
    update_s += time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"secs": update_s, "gen": gen_s, "peak": peak - base, "batches": mb.num_batches,
            "cka_1_12": float(res[1, 12])}


def part_b(sizes: list[int], exact_budget: float) -> tuple[str, dict]:
    rows, exact_prev = [], None
    flat = []
    for n in sizes:
        ex = None
        if exact_prev is not None and exact_prev[1] * n / exact_prev[0] > exact_budget:
            est = exact_prev[1] * n / exact_prev[0]
            ex_note = (f"skipped: linear extrapolation from n={exact_prev[0]:,} says ~{est:.0f}s "
                       f"> {exact_budget:.0f}s budget (not measured)")
        else:
            ex = exact_case(n)
            exact_prev = (n, ex["secs"])
            ex_note = ""
            print(f"  exact n={n}: {ex['secs']:.1f}s", file=sys.stderr)
        mb = minibatch_case(n)
        print(f"  minibatch n={n}: {mb['secs']:.1f}s", file=sys.stderr)
        flat.append(mb["peak"])
        input_mib = LAYERS * n * WIDTH * 4 / MIB
        exact = ([f"{ex['secs']:.2f}", f"{ex['peak'] / MIB:,.0f}", f"{ex['cka_1_12']:.4f}"] if ex
                 else [ex_note, "-", "-"])
        rows.append([f"{n:,}", f"{input_mib:,.0f}", *exact, f"{mb['secs']:.2f} (+{mb['gen']:.1f} gen)",
                     f"{mb['peak'] / MIB:.1f}", mb["batches"], f"{mb['cka_1_12']:.4f}"])
    spread = (max(flat) - min(flat)) / min(flat)
    lines = [
        f"### (b) CKA estimators on synthetic data: {LAYERS} layers x width {WIDTH}, float32 inputs",
        "",
        markdown_table(["n", "full input (MiB, fp32)", "exact `cka_matrix` linear: s",
                        "exact: traced peak MiB (excl. input)", "exact CKA(1,12)",
                        "minibatch (256/batch): update s (+ batch generation s)",
                        "minibatch: traced peak MiB (incl. one batch's input)", "batches", "minibatch CKA(1,12)"],
                       rows, "rrrrrrrrr"),
        "",
        f"- minibatch peak memory across n: {min(flat) / MIB:.1f}-{max(flat) / MIB:.1f} MiB "
        f"(spread {spread:.1%}) -> goal 'flat in n': **{'MET' if spread <= 0.10 else 'MISSED'}** "
        "(flat = within 10%)",
        "- minibatch CKA is the unbiased (debiased) estimator summed over batches; exact is biased linear CKA: "
        "their values differ by design, not by error.",
    ]
    return "\n".join(lines), {"spread": spread}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINTS["minilm"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", type=listed(int), default=[1000, 5000, 20000, 100000])
    p.add_argument("--exact-budget-s", type=float, default=180.0)
    p.add_argument("--quick", action="store_true", help="1 repeat; sizes 1000,5000")
    p.add_argument("--skip-a", action="store_true")
    p.add_argument("--skip-b", action="store_true")


def run(args: argparse.Namespace, out: Results) -> int:
    if args.quick:
        args.repeats, args.sizes = 1, [1000, 5000]
    body = []
    if not args.skip_a:
        t0 = time.perf_counter()
        text, _ = part_a(args.checkpoint, args.repeats)
        body += [text, "", f"(part a: {time.perf_counter() - t0:.0f}s)", ""]
    if not args.skip_b:
        t0 = time.perf_counter()
        text, _ = part_b(args.sizes, args.exact_budget_s)
        body += [text, "", f"(part b: {time.perf_counter() - t0:.0f}s)", ""]
    out.write("analyzer cost: where `analyze` spends its time, and CKA estimators as n grows", "\n".join(body))
    return 0
