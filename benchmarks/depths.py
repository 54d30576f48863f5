"""What users run today (transformers pipeline, PyTorch) vs layerprune ONNX models at every kept depth.

One run, one machine, the same sentences (rt-polarity test split, 1,056 real sentences):
- `pipeline("text-classification")` on the full fine-tuned checkpoint (PyTorch), batch 1 and batch 32
  (pipeline batches in input order, as users call it);
- the full checkpoint exported by optimum (`layerprune.onnx_export.export_onnx`), run with `OnnxClassifier`,
  batch 32 length-sorted (as the server and `OnnxClassifier.logits` do) and unsorted (input order);
- `layerprune.prune.truncate` at every depth 1..L (fine-tuned head, NO healing), exported fp32, then
  `optimize_onnx(.., "O2")`, and `quantize_onnx(..)` (int8 dynamic, on the fp32 export, as bundles are);
- the real auto bundle (`lp-run/bundle`, healed head) when it exists, with its validation.json.

Per model: sentences/s at batch 1 (first --bs1-n sentences, one call per sentence: tokenize + run) and
at batch 32 (all sentences: tokenize + pad + run per batch, sort cost included), p50/p99 per-call latency
(pooled over repeats), accuracy on all sentences. Throughput: median over --repeats passes, after a
warm-up on the first 64 sentences. The table has two figures beside it: accuracy against throughput, and
latency against kept depth.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from layerprune.architectures import total_layers
from layerprune.data import load_examples
from layerprune.errors import LayerpruneError
from layerprune.files import CONFIG_FILE, DEFAULT_BUNDLE, DEMO_CHECKPOINTS, MANIFEST_FILE, VALIDATION_FILE
from layerprune.runtime import OnnxClassifier
from layerprune.tasks import load_task

from .common import markdown_table, timed_rounds
from .harness import Results


@dataclass
class Row:
    name: str
    kind: str  # pipeline | onnx-full | fp32 | O2 | int8 | bundle
    depth: int
    bs1_sps: float = float("nan")
    bs1_p50: float = float("nan")
    bs1_p99: float = float("nan")
    bs32_sps: float = float("nan")
    bs32_p50: float = float("nan")
    bs32_p99: float = float("nan")
    bs32_sec: float = float("nan")  # median seconds for one pass over all sentences
    accuracy: float = float("nan")
    note: str = ""
    extra: dict = field(default_factory=dict)


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000.0, q)) if xs else float("nan")


def _passes(one_pass, repeats: int) -> tuple[list[float], list[float], object]:
    """Warm-up (one_pass(warm=True): the first 64 sentences), then `repeats` timed passes.
    one_pass() -> (latencies, result). Returns (pass seconds, pooled latencies, last result)."""
    timing = timed_rounds({"pass": one_pass}, repeats, {"pass": lambda: one_pass(warm=True)})["pass"]
    return timing.seconds, [x for lat, _ in timing.results for x in lat], timing.results[-1][1]


# --------------------------------------------------------------------------- ONNX


def bench_onnx(row: Row, model_dir: Path, texts: list[str], labels: np.ndarray, bs1_n: int, repeats: int,
               sort: bool = True, do_bs1: bool = True) -> Row:
    clf = OnnxClassifier(model_dir)
    n = len(texts)

    def pass32(warm=False):
        if warm:
            clf.logits(texts[:64], batch_size=32)
            return [], None
        lat = []
        out = np.zeros((n, clf.num_labels), dtype=np.float32)
        if sort:  # what OnnxClassifier.logits / the server do: batch by token length
            lengths = [len(row.ids) for row in clf.tokenize(texts)]
            order = np.argsort(lengths, kind="stable")
        else:
            order = np.arange(n)
        for start in range(0, n, 32):
            idx = order[start : start + 32]
            t0 = time.perf_counter()
            logits = clf.run(clf.encode([texts[i] for i in idx]))
            lat.append(time.perf_counter() - t0)
            out[idx] = logits
        return lat, out

    secs, lats, logits = _passes(pass32, repeats)
    row.bs32_sec = float(np.median(secs))
    row.bs32_sps = n / row.bs32_sec
    row.bs32_p50, row.bs32_p99 = _pct(lats, 50), _pct(lats, 99)
    row.accuracy = float((logits.argmax(1) == labels).mean())

    if do_bs1:
        _time_batch1(row, texts[:bs1_n], lambda t: clf.run(clf.encode([t])), repeats)
    return row


def _time_batch1(row: Row, sub: list[str], predict_one, repeats: int) -> None:
    """Batch-1 throughput and latency: one sentence per call, over `sub` (warm-up on its first 16)."""

    def pass1(warm=False):
        lat = []
        for t in sub[:16] if warm else sub:
            t0 = time.perf_counter()
            predict_one(t)
            lat.append(time.perf_counter() - t0)
        return lat, None

    secs, lats, _ = _passes(pass1, repeats)
    row.bs1_sps = len(sub) / float(np.median(secs))
    row.bs1_p50, row.bs1_p99 = _pct(lats, 50), _pct(lats, 99)


# --------------------------------------------------------------------------- PyTorch pipeline


def bench_pipeline(checkpoint: Path, texts: list[str], labels: np.ndarray, bs1_n: int, repeats: int,
                   total: int) -> Row:
    import torch
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(checkpoint), device=-1)
    label2id = {k: int(v) for k, v in pipe.model.config.label2id.items()}
    n = len(texts)
    row = Row("transformers pipeline (PyTorch fp32, full)", "pipeline", total)
    row.extra["torch_threads"] = torch.get_num_threads()

    def pass32(warm=False):
        lat, preds = [], []
        with torch.inference_mode():
            for start in range(0, 64 if warm else n, 32):  # input order, padded to each batch's longest, as users call it
                chunk = texts[start : start + 32]
                t0 = time.perf_counter()
                out = pipe(chunk, batch_size=32, truncation=True)
                lat.append(time.perf_counter() - t0)
                preds.extend(label2id[o["label"]] for o in out)
        return lat, np.asarray(preds)

    secs, lats, preds = _passes(pass32, repeats)
    row.bs32_sec = float(np.median(secs))
    row.bs32_sps = n / row.bs32_sec
    row.bs32_p50, row.bs32_p99 = _pct(lats, 50), _pct(lats, 99)
    row.accuracy = float((preds == labels).mean())

    with torch.inference_mode():
        _time_batch1(row, texts[:bs1_n], lambda t: pipe(t, truncation=True), repeats)
    return row


# --------------------------------------------------------------------------- building the models


def build_models(checkpoint: Path, depths: list[int], total: int, work: Path) -> tuple[Path, dict, dict]:
    """Full export + per depth fp32 / O2 / int8 folders. Returns (full_dir, {(depth, kind): dir}, build secs)."""
    from layerprune.onnx_export import export_onnx, optimize_onnx, quantize_onnx
    from layerprune.models import load_classifier
    from layerprune.prune import truncate

    build: dict[str, float] = {}
    t0 = time.perf_counter()
    full = export_onnx(checkpoint, work / "full").parent
    build["export full"] = time.perf_counter() - t0
    dirs: dict[tuple[int, str], Path] = {}
    for k in depths:
        t0 = time.perf_counter()
        if k == total:  # truncate(model, L) is the identity: same graph as the full export
            fp32 = work / f"d{k}-fp32"
            shutil.copytree(full, fp32)
        else:
            model, tokenizer = load_classifier(str(checkpoint), num_labels=2, device="cpu")
            truncate(model, k)
            ckpt = work / f"d{k}-ckpt"
            model.save_pretrained(ckpt, safe_serialization=True)
            tokenizer.save_pretrained(ckpt)
            fp32 = export_onnx(ckpt, work / f"d{k}-fp32").parent
            shutil.rmtree(ckpt)
        t1 = time.perf_counter()
        o2 = work / f"d{k}-O2"
        shutil.copytree(fp32, o2)
        optimize_onnx(o2, "O2")
        t2 = time.perf_counter()
        q = work / f"d{k}-int8"
        shutil.copytree(fp32, q)
        quantize_onnx(q)
        t3 = time.perf_counter()
        dirs[(k, "fp32")], dirs[(k, "O2")], dirs[(k, "int8")] = fp32, o2, q
        build[f"depth {k}: export / O2 / int8"] = (t1 - t0, t2 - t1, t3 - t2)
        print(f"  built depth {k}: export {t1 - t0:.1f}s, O2 {t2 - t1:.1f}s, int8 {t3 - t2:.1f}s", file=sys.stderr)
    return full, dirs, build


# --------------------------------------------------------------------------- report


def fmt(x: float, d: int = 1) -> str:
    return "n/a" if x != x else f"{x:.{d}f}"


def table(rows: list[Row], pipe32: float) -> str:
    header = ["model", "depth", "batch 1 sent/s", "b1 p50 ms", "b1 p99 ms", "batch 32 sent/s", "b32 p50 ms",
              "b32 p99 ms", "x pipeline (b32)", "accuracy", "note"]
    return markdown_table(header, [
        [r.name, r.depth, fmt(r.bs1_sps), fmt(r.bs1_p50, 2), fmt(r.bs1_p99, 2), fmt(r.bs32_sps), fmt(r.bs32_p50),
         fmt(r.bs32_p99), fmt(r.bs32_sps / pipe32, 2), fmt(r.accuracy, 4), r.note] for r in rows], "lrrrrrrrrrl")


def depth_fit(rows: list[Row], kind: str, total: int, attr: str) -> dict:
    """latency(k) = a + b k, least squares over k = 1..L; per-sentence latency from `attr`."""
    sel = sorted((r for r in rows if r.kind == kind), key=lambda r: r.depth)
    if len(sel) < 2 or sel[-1].depth != total:
        return {}
    k = np.array([r.depth for r in sel], dtype=float)
    if attr == "bs32":
        lat = np.array([1000.0 * r.bs32_sec / 1.0 for r in sel])  # ms per pass over all sentences
    else:
        lat = np.array([1000.0 / r.bs1_sps for r in sel])  # ms per sentence at batch 1
    b, a = np.polyfit(k, lat, 1)
    lat_l = lat[-1]
    ratio = lat / lat_l
    brief = k / total + a / lat_l  # the brief's reference: k/L + a/latency(L)
    model = (a + b * k) / lat_l  # the fitted line itself, normalized
    return {
        "kind": kind, "attr": attr, "k": k.tolist(), "lat": lat.tolist(), "a": float(a), "b": float(b),
        "a_frac": float(a / lat_l), "ratio": ratio.tolist(),
        "dev_brief": float(np.max(np.abs(ratio - brief) / brief)),
        "dev_fit": float(np.max(np.abs(ratio - model) / model)),
    }


def plots(rows: list[Row], fits: list[dict], total: int, out: Results) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"pipeline": ("k", "X"), "onnx-full": ("tab:gray", "s"), "fp32": ("tab:blue", "o"),
              "O2": ("tab:green", "^"), "int8": ("tab:red", "v"), "bundle": ("tab:purple", "*")}
    for kind, (color, marker) in styles.items():
        sel = sorted((r for r in rows if r.kind == kind), key=lambda r: r.depth)
        if not sel:
            continue
        xs, ys = [r.bs32_sps for r in sel], [r.accuracy for r in sel]
        ax.plot(xs, ys, marker=marker, color=color, linestyle="-" if len(sel) > 1 else "none",
                markersize=12 if kind == "bundle" else 7, label=kind if kind not in ("fp32", "O2", "int8")
                else f"truncated {kind} (no heal)")
        for r in sel:
            if kind in ("fp32", "O2", "int8"):
                ax.annotate(str(r.depth), (r.bs32_sps, r.accuracy), textcoords="offset points", xytext=(4, 4),
                            fontsize=8, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("sentences/s at batch 32 (log)")
    ax.set_ylabel("accuracy, rt-polarity test (n=1,056)")
    ax.set_title("accuracy vs throughput (labels: kept layers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out.figure("frontier")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(p)

    fig, ax = plt.subplots(figsize=(7, 5))
    ks = np.arange(0, total + 1)
    ax.plot(ks, ks / total, "k--", label="ideal k/L")
    colors = {"fp32": "tab:blue", "O2": "tab:green", "int8": "tab:red"}
    for f in fits:
        ls = "-" if f["attr"] == "bs32" else ":"
        c = colors[f["kind"]]
        ax.plot(f["k"], f["ratio"], marker="o", color=c, linestyle=ls,
                label=f"{f['kind']} batch {'32' if f['attr'] == 'bs32' else '1'} (a = {f['a_frac']:.0%} of L)")
    ax.set_xlabel("kept layers k")
    ax.set_ylabel("latency(k) / latency(L)")
    ax.set_xlim(0, total + 0.2)
    ax.set_ylim(0, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("latency vs kept depth (ONNX Runtime, CPU)")
    fig.tight_layout()
    p = out.figure("latency")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(p)
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINTS["minilm"])
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--bs1-n", type=int, default=200, help="sentences for the batch-1 measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="depths 2, 4 and all only; 1 repeat; 50 batch-1 sentences")


def run(args: argparse.Namespace, out: Results) -> int:
    if args.quick:
        args.repeats, args.bs1_n = 1, min(args.bs1_n, 50)

    config = args.checkpoint / CONFIG_FILE
    if not config.is_file():
        raise LayerpruneError(f"{args.checkpoint} holds no {CONFIG_FILE}: not a checkpoint (`make demo` makes "
                              f"{DEMO_CHECKPOINTS['minilm']})")
    total = total_layers(json.loads(config.read_text()))  # n_layers for DistilBERT
    examples = load_examples(load_task("rt-polarity"), "test")
    texts, labels = list(examples.texts), np.asarray(examples.labels)
    depths = sorted({d for d in (2, 4, total) if d <= total}) if args.quick else list(range(1, total + 1))

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-depths-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        full, dirs, _ = build_models(args.checkpoint, depths, total, work)
        build_s = time.perf_counter() - t0
        print(f"built {len(dirs) + 1} ONNX models in {build_s:.0f}s", file=sys.stderr)

        t0 = time.perf_counter()
        pipe = bench_pipeline(args.checkpoint, texts, labels, args.bs1_n, args.repeats, total)
        pipe.note = f"torch {pipe.extra['torch_threads']} threads, batches in input order"
        rows.append(pipe)
        print(f"pipeline done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)

        rows.append(bench_onnx(Row("optimum ONNX fp32, full, sorted batches", "onnx-full", total, note="length-sorted"),
                               full, texts, labels, args.bs1_n, args.repeats))
        rows.append(bench_onnx(Row("optimum ONNX fp32, full, unsorted batches", "onnx-full-unsorted", total,
                                   note="input order; batch-1 n/a (same as sorted)"),
                               full, texts, labels, args.bs1_n, args.repeats, sort=False, do_bs1=False))
        for kind in ("fp32", "O2", "int8"):
            for k in depths:
                t0 = time.perf_counter()
                rows.append(bench_onnx(Row(f"truncated {kind}", kind, k, note="no heal"), dirs[(k, kind)], texts,
                                       labels, args.bs1_n, args.repeats))
                print(f"{kind} depth {k} done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)

    bundle_info = None
    if (args.bundle / MANIFEST_FILE).is_file():
        man = json.loads((args.bundle / MANIFEST_FILE).read_text())
        val = json.loads((args.bundle / VALIDATION_FILE).read_text())
        bundle_info = (man, val)
        name = (f"auto bundle {args.bundle.parent.name}/{args.bundle.name} (heal {man['heal']}, optimize {man['optimize']}, "
                f"quantize {man['quantize']})")
        rows.append(bench_onnx(Row(name, "bundle", int(man["depth"]),
                                   note=f"validation {'passed' if val['passed'] else 'FAILED'}: "
                                        f"{val['bundle']:.4f} vs {val['original']:.4f}, tol {val['tolerance']}"),
                               args.bundle, texts, labels, args.bs1_n, args.repeats))

    pipe32 = rows[0].bs32_sps
    title = (f"speed by depth: rt-polarity test (n={len(texts)}), batch 1 on the first {args.bs1_n}, "
             f"{args.repeats} timed passes (median) after a warm-up on 64 sentences")
    md = ["Accuracy of truncated rows uses the fine-tuned head "
          "WITHOUT healing; the bundle row uses its healed head. Latencies are per call "
          "(batch 1: one sentence; batch 32: one batch incl. tokenize + pad).",
          "",
          table(rows, pipe32), ""]

    fits = [f for f in (depth_fit(rows, kind, total, attr) for kind in ("fp32", "O2", "int8")
                        for attr in ("bs32", "bs1")) if f]
    if fits:
        header = ["model", "batch", "a (embeddings + head + overhead)", "a / latency(L)", "b per layer",
                  "max dev. from k/L + a/lat(L)", "within 5%?", "max dev. from fitted line"]
        cells = [[f"truncated {f['kind']}", "32" if f["attr"] == "bs32" else "1",
                  f"{f['a']:.2f} {'ms/pass of 1,056' if f['attr'] == 'bs32' else 'ms/sentence'}", f"{f['a_frac']:.1%}",
                  f"{f['b']:.2f}", f"{f['dev_brief']:.1%}", "yes" if f["dev_brief"] <= 0.05 else "no",
                  f"{f['dev_fit']:.1%}"] for f in fits]
        md += ["### latency(k) = a + b k (least squares over the kept depths)", "",
               markdown_table(header, cells, "llrrrrlr")]
        md.append("")

    # Speedups and the target.
    onnx_full = next(r for r in rows if r.kind == "onnx-full")
    unsorted = next(r for r in rows if r.kind == "onnx-full-unsorted")
    best = max((r for r in rows if r.kind in ("fp32", "O2", "int8", "bundle")), key=lambda r: r.bs32_sps)
    md += ["### speedups at batch 32", "",
           f"- optimum ONNX full fp32 vs pipeline: {onnx_full.bs32_sps / pipe32:.2f}x; "
           f"length-sorted vs unsorted batches: {onnx_full.bs32_sps / unsorted.bs32_sps:.2f}x",
           f"- fastest ONNX row ({best.name}, depth {best.depth}, accuracy {best.accuracy:.4f}): "
           f"{best.bs32_sps:.0f} sent/s = {best.bs32_sps / pipe32:.2f}x the pipeline"]
    if bundle_info:
        man, val = bundle_info
        b = rows[-1]
        speed = b.bs32_sps / pipe32
        tol_ok = val["passed"] and abs(b.accuracy - pipe.accuracy) <= val["tolerance"]
        verdict = "MET" if speed >= 5 and tol_ok else "MISSED"
        md.append(
            f"- target (auto bundle, int8 where validation passes, >= 5x the pipeline at batch 32, metric within "
            f"tolerance): bundle depth {man['depth']}/{man['total_layers']} {man['quantize'] or 'fp32'}: "
            f"{b.bs32_sps:.0f} vs {pipe32:.0f} sent/s = **{speed:.2f}x**; accuracy here {b.accuracy:.4f} vs "
            f"pipeline {pipe.accuracy:.4f} (delta {b.accuracy - pipe.accuracy:+.4f}, tolerance "
            f"{val['tolerance']}; validation.json: {val['bundle']:.4f} vs {val['original']:.4f}, passed="
            f"{val['passed']}) -> **{verdict}**")
    else:
        md.append(f"- no bundle at {args.bundle}: the 5x target cannot be judged")
    md.append("")
    md.append(f"Model build (exports, O2, int8): {build_s:.0f}s.")

    out.write(title, "\n".join(md))
    for path in plots(rows, fits, total, out):
        print(f"wrote {path}", file=sys.stderr)
    return 0
