"""Do the int8 graphs compute on AVX2 kernels what they compute here? Each int8 graph export can build, scored natively
on this host and on onnxruntime's AVX2 kernels, run under QEMU's user-mode emulator with an AVX2 CPU model.

onnxruntime picks its integer GEMM kernel from CPUID when it loads. QEMU 7.2+ translates AVX2 but not AVX-512, and
under `qemu-x86_64 -cpu Haswell` (AVX2, FMA, no AVX-512, no VNNI) the process's CPUID says so, so the same
onnxruntime build runs its AVX2 u8 x s8 kernel there: VPMADDUBSW, which sums pairs of u8 x s8 products into
saturating int16. A probe proves which kernel ran, natively and under QEMU: one MatMulInteger of 255s by 127s, whose
exact value a kernel that saturates (AVX2, AVX-512 without VNNI) halves; the run refuses to go on unless the native
kernel is exact and the emulated one saturates. (QEMU's /proc/cpuinfo is the host's: `cpu_kind` inside it still says
avx512-vnni; only CPUID changes, and CPUID is what onnxruntime reads.)

The graphs, all from one fp32 export of --checkpoint (`onnx_export.export_onnx`): plain dynamic int8
(`quantize_onnx`) and faithful int8 (`quantize_faithful`, calibrated on --calibration seeded train texts) for CPU
kind avx2 (7-bit weights) and avx512-vnni (8-bit weights). fp32 runs natively only (the reference every disagreement
is counted against): TCG runs float SIMD code far slower than integer code. 7-bit weights keep every int16 pair sum
in range (2 x 255 x 64 < 32767), so their AVX2 logits should differ from the native ones by float noise only (the
float ops run AVX2 instead of AVX-512 code); 8-bit weights can saturate.

Texts: the task's test split (its eval split where it has none); disagreement with fp32 natively on all of it, and
the first --n texts under QEMU, on one thread (TCG runs onnxruntime far slower), all at batch 32
sorted by length.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto, helper

from layerprune.errors import LayerpruneError

if TYPE_CHECKING:
    from .harness import Results

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32
QEMU = "qemu-x86_64"
CPU_MODEL = "Haswell"  # AVX2 + FMA, no AVX-512: what QEMU's TCG can run
# (name, CPU kind whose weights it has, faithful?)
GRAPHS = (("plain int8, 7-bit weights (avx2)", "avx2", False), ("faithful int8, 7-bit weights (avx2)", "avx2", True),
          ("plain int8, 8-bit weights (avx512-vnni)", "avx512-vnni", False),
          ("faithful int8, 8-bit weights (avx512-vnni)", "avx512-vnni", True))
PROBE_K = 64  # the probe's inner size: K/2 saturated pair sums of 2 x 255 x 127


# --- what runs on both kernels (natively, and inside QEMU as a worker) ---------------------------


def probe() -> int:
    """onnxruntime's MatMulInteger of 255s (u8) by 127s (s8), inner size PROBE_K: 255 x 127 x K where the
    kernel is exact (VNNI, or one that widens to int16 first), 32767 x K / 2 where VPMADDUBSW saturates."""
    import onnxruntime as ort

    weights = helper.make_tensor("B", TensorProto.INT8, [PROBE_K, 1], np.full(PROBE_K, 127, np.int8).tobytes(),
                                 raw=True)
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "probe",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, PROBE_K])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [None, 1])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return int(session.run(None, {"A": np.full((4, PROBE_K), 255, np.uint8)})[0][0, 0])


def score(folders: list[str], texts: list[str], pairs: list[str] | None, threads: int) -> dict[str, np.ndarray]:
    """The probe's value and each folder's logits on `texts` (and `pairs`), as the runtime serves them (batch 32,
    by length), on `threads` intra-op threads that do not spin (TCG emulates a spinning thread's every loop)."""
    from layerprune.runtime import OnnxClassifier

    out = {"probe": np.array(probe())}
    for i, folder in enumerate(folders):
        classifier = OnnxClassifier(Path(folder), threads=threads, spinning=False)
        out[f"logits{i}"] = classifier.logits(texts, pairs, batch_size=BATCH)
    return out


def worker(job: str) -> None:
    """Run `score` on a job file ({"folders", "texts", "pairs", "out"}) and save its arrays to "out" (.npz)."""
    spec = json.loads(Path(job).read_text())
    np.savez(spec["out"], **score(spec["folders"], spec["texts"], spec["pairs"], threads=1))


def under_qemu(qemu: str, cpu_model: str, folders: list[str], texts: list[str], pairs: list[str] | None,
               work: Path) -> dict[str, np.ndarray]:
    """`score` in a Python process under `qemu -cpu cpu_model`; QEMU's last line of stderr if it fails."""
    job, out = work / "qemu-job.json", work / "qemu-out.npz"
    job.write_text(json.dumps({"folders": folders, "texts": texts, "pairs": pairs, "out": str(out)}))
    out.unlink(missing_ok=True)  # a file left by an earlier call is no answer of this one
    code = f"from benchmarks.int8_avx2 import worker; worker({str(job)!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([qemu, "-cpu", cpu_model, sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        lines = [line for line in done.stderr.splitlines() if line.strip() and "TCG doesn't support" not in line]
        raise LayerpruneError(f"{qemu} -cpu {cpu_model} {sys.executable} failed (exit {done.returncode}): "
                              f"{lines[-1] if lines else 'no message'}")
    with np.load(out) as arrays:
        return dict(arrays)


def kernel(value: int) -> str:
    """What the probe's value says about the u8 x s8 kernel that ran."""
    if value == 255 * 127 * PROBE_K:
        return "exact int32 sums"
    if value == 32767 * PROBE_K // 2:
        return "saturating int16 pair sums (VPMADDUBSW)"
    return f"unexpected value {value}"


# --- the benchmark -------------------------------------------------------------------------------


def find_qemu(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LayerpruneError(f"{name} is not installed (Debian/Ubuntu: apt-get install qemu-user); this benchmark "
                              "runs onnxruntime's AVX2 kernels under it")
    return path


def build(fp32: Path, work: Path, batches: list[dict[str, np.ndarray]]) -> list[tuple[str, Path]]:
    """Every int8 graph's folder, named, in GRAPHS' order."""
    from layerprune.onnx_export import quantize_faithful, quantize_onnx

    folders = []
    for i, (name, cpu, faithful) in enumerate(GRAPHS):
        folder = shutil.copytree(fp32, work / f"graph{i}")
        if faithful:
            quantize_faithful(folder, batches, cpu=cpu)
        else:
            quantize_onnx(folder, cpu=cpu)
        folders.append((name, folder))
        print(f"  built {name}", file=sys.stderr, flush=True)
    return folders


def table(fp32: np.ndarray, rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], labels: np.ndarray) -> str:
    """One row per int8 graph: (name, native logits on every text, native and AVX2 logits on the first n texts, in
    the same batches: plain int8's activation scale is per batch, so only the same batches compare)."""
    from layerprune.onnx_export import max_logit_difference
    from layerprune.scoring import compute_metric

    from .common import disagreement, markdown_table

    n = len(rows[0][3])
    header = ["graph", f"accuracy native (all {len(fp32)})", "disagree with fp32, native (all)",
              f"disagree with fp32, native (first {n})", f"disagree with fp32, AVX2 (first {n})",
              "max abs logit diff AVX2 vs native", "predictions AVX2 != native"]
    cells = [["fp32 (native only)", f"{compute_metric('accuracy', labels, fp32):.4f}", "-", "-", "-", "-", "-"]]
    for name, native, first, avx2 in rows:
        flips = int((first.argmax(1) != avx2.argmax(1)).sum())
        cells.append([name, f"{compute_metric('accuracy', labels, native):.4f}", f"{disagreement(fp32, native):.2%}",
                      f"{disagreement(fp32[:n], first):.2%}", f"{disagreement(fp32[:n], avx2):.2%}",
                      f"{max_logit_difference(first, avx2):.2e}", f"{flips} of {n}"])
    return markdown_table(header, cells, "lrrrrrr")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="the fine-tuned checkpoint to export")
    parser.add_argument("--run-dir", type=Path, required=True, help="an analysis run directory (the task)")
    parser.add_argument("--n", type=int, default=32, help="test texts scored under QEMU")
    parser.add_argument("--calibration", type=int, default=1000, help="train texts faithful int8 calibrates on")
    parser.add_argument("--qemu", default=QEMU, help="QEMU's x86_64 user-mode emulator")
    parser.add_argument("--cpu-model", default=CPU_MODEL, help="QEMU's CPU model: AVX2 without AVX-512")


def check_kernels(qemu: str, cpu_model: str, work: Path) -> tuple[int, int]:
    """The probe natively and under QEMU (before any graph is built): exact here, saturating there, or a refusal."""
    here, there = probe(), int(under_qemu(qemu, cpu_model, [], [], None, work)["probe"])
    if kernel(here) != "exact int32 sums" or kernel(there) == "exact int32 sums":
        raise LayerpruneError(f"the int8 kernel probe gave {kernel(here)} natively and {kernel(there)} under -cpu "
                              f"{cpu_model}; this compares a VNNI host with an AVX2 CPU model")
    return here, there


def run(args: argparse.Namespace, out: Results) -> int:
    from layerprune.cpu import cpu_model
    from layerprune.data import load_examples
    from layerprune.files import CONFIG_FILE
    from layerprune.onnx_export import export_onnx

    from .common import read_run
    from .int8_methods import calibration_batches

    qemu = find_qemu(args.qemu)
    if min(args.n, args.calibration) < 1:
        raise LayerpruneError("--n and --calibration must be at least 1")
    if not (args.checkpoint / CONFIG_FILE).is_file():
        raise LayerpruneError(f"{args.checkpoint} is not a checkpoint folder (no {CONFIG_FILE})")
    run_dir = read_run(args.run_dir)
    task = run_dir.task
    if task.metric != "accuracy":
        raise LayerpruneError(f"{task.name} is scored by {task.metric}; this benchmark compares predicted classes")
    split = "test" if "test" in task.splits else task.eval_split
    test = load_examples(task, split, glue_dir=run_dir.glue_dir)
    train = load_examples(task, task.train_split, glue_dir=run_dir.glue_dir).texts
    n = min(args.n, len(test.texts))
    with tempfile.TemporaryDirectory(prefix="int8-avx2-") as tmp:
        work = Path(tmp)
        here, there = check_kernels(qemu, args.cpu_model, work)
        fp32 = export_onnx(args.checkpoint, work / "fp32").parent
        graphs = build(fp32, work, calibration_batches(fp32, train, args.calibration))
        folders = [str(folder) for _, folder in graphs]
        native = score([str(fp32), *folders], test.texts, test.pairs, os.cpu_count() or 1)
        first = score(folders, test.texts[:n], test.pairs and test.pairs[:n], threads=1)  # as the worker runs
        print(f"  scored natively; now {n} texts under {qemu} -cpu {args.cpu_model}", file=sys.stderr, flush=True)
        avx2 = under_qemu(qemu, args.cpu_model, folders, test.texts[:n], test.pairs and test.pairs[:n], work)
    rows = [(name, native[f"logits{i + 1}"], first[f"logits{i}"], avx2[f"logits{i}"])
            for i, (name, _) in enumerate(graphs)]
    body = [f"Model: {args.checkpoint}; task {task.name}, {len(test.texts)} {split} texts ({n} under QEMU), batch "
            f"{BATCH} sorted by length. Native: {cpu_model()}. AVX2: `{Path(qemu).name} -cpu {args.cpu_model}` "
            f"on the same host and onnxruntime build. Faithful int8 calibrated on {args.calibration} "
            f"{task.train_split} texts.", "",
            f"Kernel probe (MatMulInteger, 255 x 127, inner size {PROBE_K}; exact {255 * 127 * PROBE_K}): native "
            f"{here} ({kernel(here)}); AVX2 {there} ({kernel(there)}).", "",
            table(native["logits0"], rows, test.labels)]
    out.write(f"int8 on AVX2 kernels: {args.checkpoint.name}, {task.name}", "\n".join(body))
    return 0
