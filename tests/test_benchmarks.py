"""The benchmarks (`python -m benchmarks`), run through their entry point on the tiny fixtures: the registry, what a
run writes (its table and provenance), the one-line refusals, and each benchmark's own logic checked against
references it does not compute (transformers' own models, onnxruntime, hand computations). No timing is asserted.
Sections are named after the benchmark they test."""

from __future__ import annotations

import collections
import importlib
import json
import os
import shutil
import subprocess
import sys
import types
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import ROOT, SENTENCES, make_tiny_classifier, reference_with_layers
from layerprune.artifacts import AnalysisReport, load_artifact
from layerprune.cpu import cpu_model
from layerprune.errors import DataError, LayerpruneError
from layerprune.onnx_export import export_onnx, max_logit_difference, quantize_onnx
from layerprune.runtime import OnnxClassifier
from layerprune.validate import calibration_and_holdout

TEXTS = [text for text, _ in SENTENCES]


def benchmark(name: str) -> types.ModuleType:
    """The module a registry entry runs, for unit tests of its helpers."""
    from benchmarks.registry import lookup

    return importlib.import_module(lookup(name).module)


def run(*argv: object) -> int:
    """`python -m benchmarks ARGV...`, in this process."""
    from benchmarks.cli import main

    return main([str(a) for a in argv])


def table_rows(text: str) -> list[dict[str, str]]:
    """The body rows of the first markdown table in `text`, each by its header's cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[start:end]]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def analyzed(model: Path, tmp_path: Path) -> tuple[Path, list[tuple[str, str]]]:
    """A run directory analyzing `model` on the test sentences and their "honestly, " copies (24 rows, which
    are also the train split), and those rows."""
    from layerprune.analyze import AnalyzeOptions, analyze
    from layerprune.data import task_from_files

    reviews = tmp_path / "reviews.csv"
    rows = [(t, lab) for t, lab in SENTENCES] + [(f"honestly, {t}", lab) for t, lab in SENTENCES]
    reviews.write_text("text,label\n" + "\n".join(f'"{t}",{lab}' for t, lab in rows) + "\n")
    task = task_from_files(reviews, "text", "label", train_file=reviews)
    run_dir = tmp_path / "run"
    analyze(str(model), task, run_dir, AnalyzeOptions(device="cpu", batch_size=8))
    return run_dir, rows


# --- the registry and the entry point -----------------------------------------------------------------------------


def test_every_entry_imports_parses_its_arguments_and_is_listed() -> None:
    from benchmarks.harness import parser
    from benchmarks.registry import REGISTRY

    assert len({e.key for e in REGISTRY}) == len(REGISTRY), "one entry per results file"
    for entry in REGISTRY:
        module = importlib.import_module(entry.module)
        assert callable(module.add_arguments) and callable(module.run), entry.key
        parser(entry).parse_args(list(entry.args))  # the defaults are flags the benchmark takes
    listed = subprocess.run([sys.executable, "-m", "benchmarks", "list"], cwd=ROOT, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    keys = [line.split()[0] for line in listed.stdout.splitlines() if line.startswith("    ")]
    assert keys == [e.key for e in REGISTRY]
    bare = subprocess.run([sys.executable, "-m", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert bare.stdout == listed.stdout


def test_all_and_list_pick_entries_by_name_entry_or_model(capsys) -> None:
    from benchmarks.registry import REGISTRY, matching

    assert [e.key for e in matching(["auto"])] == ["auto", "auto-fallback", "auto-mpnet", "auto-mpnet-fallback"]
    assert [e.key for e in matching(["auto-mpnet", "serving"])] == ["auto-mpnet", "serving", "serving-memory"]
    assert {e.model for e in matching(["mpnet"])} == {"mpnet"} and len(matching(["minilm"])) + len(
        matching(["mpnet"])) == len(REGISTRY)
    assert run("all", "nonsense") == 2 and run("list", "nonsense") == 2 and run("nonsense") == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["benchmarks: error: no benchmark, entry or model named 'nonsense'; `python -m benchmarks list` "
                   "lists them"] * 2 + ["benchmarks: error: no benchmark named 'nonsense'; `python -m benchmarks "
                                        "list` lists them"]


def test_a_run_writes_its_table_and_a_provenance_record_of_the_command_and_commit(bundle: Path, tmp_path: Path,
                                                                                   capsys) -> None:
    from benchmarks.harness import Provenance

    out = tmp_path / "results" / "fallback.md"
    before = datetime.now(timezone.utc)
    argv = ["fallback", "--run-dir", bundle.parent / "run", "--shares", "0,50", "--out", out]
    assert run(*argv) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out
    record = Provenance.model_validate_json((tmp_path / "results" / "fallback.json").read_text())
    assert record.command == "python -m benchmarks " + " ".join(map(str, argv))
    assert record.argv == ["--run-dir", "lp-run", *map(str, argv[1:])]  # the entry's default, then those given
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)  # noqa: E731
    assert record.commit == git("rev-parse", "HEAD").stdout.strip()
    assert record.dirty == (git("diff", "--quiet", "HEAD").returncode != 0)
    assert record.cores == os.cpu_count() and record.versions["onnxruntime"] == ort.__version__
    assert before <= record.started <= datetime.now(timezone.utc) and record.wall_s > 0
    title, line = text.splitlines()[0], text.splitlines()[2]
    assert title.startswith("# A fallback to the original")
    assert line.startswith(f"`{record.command}`") and f"commit {record.commit[:7]}" in line
    assert cpu_model() in line and f"{record.wall_s:,.0f} s" in line


def test_variant_names_the_results_file(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # benchmarks/results/ is relative to where the command runs, the repository root
    assert run("fallback", "--run-dir", bundle.parent / "run", "--shares", "0", "--variant", "tiny") == 0
    assert sorted(p.name for p in (tmp_path / "benchmarks" / "results").iterdir()) == ["fallback-tiny.json",
                                                                                       "fallback-tiny.md"]


@pytest.mark.parametrize("name, args", [
    ("linear_backends", []),
    ("heals", []),
    ("fallback", []),
    ("auto", ["--seeds", "0"]),
    ("int8_cpus", ["--checkpoint", "unused"]),
    ("int8_methods", []),
])
def test_a_folder_without_analysis_is_refused_before_any_work(tmp_path: Path, capsys, name: str,
                                                               args: list[str]) -> None:
    out = tmp_path / "out.md"
    code = run(name, *args, "--run-dir", tmp_path, "--out", out)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"{name}: error: {tmp_path} holds no analysis.json")
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.parametrize("argv, says", [
    (["heals", "--top", "nope=1"], "heals: error: argument --top: expected FIELD=V1,V2 with FIELD one of"),
    (["heals", "--whole", "minutes=soon"], "heals: error: argument --whole: minutes: could not convert"),
    (["auto", "--quantize", "int4"], "auto: error: argument --quantize: each must be one of int8, none, got 'int4'"),
    (["depths", "--checkpoint", "missing"], "depths: error: missing holds no config.json: not a checkpoint"),
    (["pruned_vs_int8", "--bundle", "missing"], "pruned_vs_int8: error: missing is not a bundle folder"),
    (["int8_methods", "--run-dir", "unused", "--rounds", "0"], "int8_methods: error: --n, --n-ood, --calibration and"),
    (["int8_avx2", "--checkpoint", "unused", "--run-dir", "unused", "--qemu", "no-such-qemu"],
     "int8_avx2: error: no-such-qemu is not installed (Debian/Ubuntu: apt-get install qemu-user)"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path: Path, capsys, argv: list[str], says: str) -> None:
    assert run(*argv, "--out", tmp_path / "out.md") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(says) and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out.md").exists()


def test_bad_input_met_mid_run_leaves_the_rows_so_far_and_a_bug_stays_a_traceback(tmp_path: Path, capsys,
                                                                                    monkeypatch) -> None:
    """As layerprune's own commands: `NAME: error: LINE` for a LayerpruneError whenever it is raised, with the
    error's exit code; the table written before it stays, its record without a wall time. Any other exception is
    a bug and keeps its traceback."""
    from benchmarks.harness import Provenance

    def fails(args, out) -> int:
        out.write("half a run", "| a |\n|---|\n| 1 |")
        if args.run_dir.name == "bug":
            raise KeyError("not bad input")
        error = DataError("row 7 has no label\nsecond line")
        error.exit_code = 3
        raise error

    monkeypatch.setattr(benchmark("fallback"), "run", fails)
    out = tmp_path / "t.md"
    assert run("fallback", "--out", out) == 3
    assert capsys.readouterr().err == "fallback: error: row 7 has no label\n"
    assert "not finished" in out.read_text().splitlines()[2]
    assert Provenance.model_validate_json(out.with_suffix(".json").read_text()).wall_s is None
    with pytest.raises(KeyError):
        run("fallback", "--run-dir", "bug", "--out", out)


# --- auto -----------------------------------------------------------------------------------------------------------


def test_auto_says_why_not_one_layer_deeper_by_hand() -> None:
    """The demo's depth 5 forecast (15 of 1,056 calibration texts disagree, lower bound -0.90 points) read back for
    a run that kept 6; a run whose walk never scored one layer fewer, or a regression task, says so."""
    from types import SimpleNamespace as NS

    one_layer_fewer = benchmark("auto").one_layer_fewer
    five = NS(depth=5, forecast=NS(disagreement=15 / 1056, lower_bound=-0.009014))
    six = NS(depth=6, forecast=None)
    assert one_layer_fewer(NS(depth=6, scores=[five, six])) == "5: 1.42%, -0.0090"
    assert one_layer_fewer(NS(depth=5, scores=[five, six])) == "-"
    regression = NS(depth=5, forecast=NS(disagreement=None, lower_bound=-0.02))
    assert one_layer_fewer(NS(depth=6, scores=[regression, six])) == "5: -, -0.0200"


def test_auto_rows_are_the_exports_of_each_resample(bundle: Path, tmp_path: Path) -> None:
    """One resample, fp32: the row says what `export_bundle` itself keeps and validates on that resample, and the
    exit code whether it passed."""
    from layerprune.export import ExportOptions, export_bundle

    # a copy: export writes RUN/truncated, which the other tests read as the shared bundle's cut
    run_dir, out = shutil.copytree(bundle.parent / "run", tmp_path / "run"), tmp_path / "auto.md"
    # one share (--fallback 0): auto's choice among shares rests on CPU time measured in each run, so two runs
    # may keep different bundles; the depth walk and its rows are what this checks
    code = run("auto", "--run-dir", run_dir, "--seeds", "1", "--quantize", "none", "--fallback", "0", "--out", out)
    (row,) = table_rows(out.read_text())
    result = export_bundle(run_dir, tmp_path / "bundle", ExportOptions(resample_seed=1, fallback=0.0))
    v = result.validation
    assert code == (0 if v.passed else 1)
    assert (row["seed"], row["depth"], row["export"]) == ("1", f"{result.depth.depth} of 4", "fp32")
    assert (row["holdout delta"], row["agreement"], row["passed"]) == (f"{v.delta:+.4f}", f"{v.agreement:.1%}",
                                                                       "yes" if v.passed else "NO")


# --- heals ----------------------------------------------------------------------------------------------------------


def test_heals_top_grid_writes_a_row_per_point_with_the_layers_each_starts_as(tiny_models, tmp_path: Path) -> None:
    """--top start=kept,top x heal_layers=1,2 at depth 3 of 4: four students from one encoding, each row naming
    the original's layers it starts as (by hand: the kept ones, or the top ones on top)."""
    run_dir, _ = analyzed(tiny_models["bert"], tmp_path)
    out = tmp_path / "heals.md"
    assert run("heals", "--depths", "3", "--heals", "top", "--top", "start=kept,top", "--top",
               "heal_layers=1,2", "--augment", "0", "--run-dir", run_dir, "--out", out) == 0
    rows = table_rows(out.read_text())
    assert [(r["options"], r["starts as layers"]) for r in rows] == [
        ("start kept, heal_layers 1", "1,2,3"), ("start kept, heal_layers 2", "1,2,3"),
        ("start top, heal_layers 1", "1,2,4"), ("start top, heal_layers 2", "1,3,4")]
    assert all(int(r["steps"]) > 0 for r in rows), "every student was trained"


def test_heals_fit_column_is_the_truncated_models_disagreement_on_the_heal_texts(tmp_path: Path,
                                                                                 minilm_dir: Path) -> None:
    """--top epochs=0 over a warmup grid, dropout off: one row per point, named by it; each untrained student
    disagrees with the original on the train texts (fewer than 100: none held out) as often as transformers' own
    2-layer model of layers 1-2 does, and so do the untruncated heal's rows (none) on calibration and holdout."""
    path = make_tiny_classifier("bert", tmp_path / "bert", minilm_dir, seed=3, initializer_range=0.3)
    run_dir, rows = analyzed(path, tmp_path)
    out = tmp_path / "heals.md"
    assert run("heals", "--depths", "2", "--heals", "none,top", "--top", "epochs=0", "--top",
               "warmup=none,0.5", "--top", "dropout=off", "--augment", "0", "--fit", "--run-dir", run_dir,
               "--out", out) == 0
    written = table_rows(out.read_text())
    assert [(r["heal"], r["options"]) for r in written] == [
        ("none", "-"), ("top", "epochs 0, warmup none, dropout off"),
        ("top", "epochs 0, warmup 0.5, dropout off")]
    flips = cut_flips(path, [t for t, _ in rows])
    assert 0 < flips < 1, "the cut changes some predictions, so the column can be wrong"
    assert [r["heal texts: trained on / held out"] for r in written[1:]] == [f"{100 * flips:.2f}% / -"] * 2
    parts = calibration_and_holdout(load_artifact(AnalysisReport, run_dir / "analysis.json").task_config, None, 2000)
    assert written[0]["disagreement calibration"] == f"{100 * cut_flips(path, parts.calibration.texts):.2f}%"
    assert written[0]["disagreement holdout"] == f"{100 * cut_flips(path, parts.holdout.texts):.2f}%"


def test_heals_whole_runs_the_epochs_asked_for(tiny_models, tmp_path: Path) -> None:
    """--whole epochs=1: one pass, by hand 1 step (24 texts in one batch of 32, fewer than 100 so none held out)."""
    run_dir, rows = analyzed(tiny_models["bert"], tmp_path)
    out = tmp_path / "heals.md"
    assert len(rows) == 24
    assert run("heals", "--depths", "3", "--heals", "whole", "--whole", "epochs=1", "--augment", "0",
               "--run-dir", run_dir, "--out", out) == 0
    assert [(r["epochs run"], r["steps"]) for r in table_rows(out.read_text())] == [("1 of 1", "1")]


def test_heals_whole_minutes_cap_runs_fewer_epochs_than_planned(tiny_models, tmp_path: Path) -> None:
    """--whole minutes far below one step's time: 50 epochs planned, the cap leaves time for none, and the heal runs
    its floor of 1 step in 1 pass. The cap is timed on held-out texts, so there must be some: 24 rows and 13 copies
    of each make 336 texts, 11 batches of up to 32, one held out."""
    run_dir, _ = analyzed(tiny_models["bert"], tmp_path)
    out = tmp_path / "heals.md"
    assert run("heals", "--depths", "3", "--heals", "whole", "--whole", "epochs=50", "--whole", "minutes=0.000001",
               "--augment", "13", "--run-dir", run_dir, "--out", out) == 0
    (row,) = table_rows(out.read_text())
    assert row["options"] == "epochs 50, minutes 1e-06" and row["epochs run"] == "1 of 50"


def test_heals_grid_trains_at_each_value_and_a_field_given_twice_keeps_the_last(tiny_models, tmp_path: Path,
                                                                               monkeypatch) -> None:
    """--top temperature=4 then temperature=1,2: two students, each distilled at its own temperature (what
    heal_at was handed), each row named by its point; the other heals get export's options."""
    run_dir, _ = analyzed(tiny_models["bert"], tmp_path)
    heals = benchmark("heals")
    seen, heal_at = [], heals.heal_at
    monkeypatch.setattr(heals, "heal_at", lambda mode, *a, **k: seen.append(
        (mode, k["top"].temperature)) or heal_at(mode, *a, **k))
    out = tmp_path / "heals.md"
    assert run("heals", "--depths", "3", "--heals", "none,top", "--top", "temperature=4", "--top",
               "temperature=1,2", "--augment", "0", "--run-dir", run_dir, "--out", out) == 0
    assert seen == [("none", 2.0), ("top", 1.0), ("top", 2.0)]
    assert [r["options"] for r in table_rows(out.read_text())] == ["-", "temperature 1", "temperature 2"]


def test_heals_whole_fit_column_is_the_truncated_models_disagreement(tmp_path: Path, minilm_dir: Path) -> None:
    """--whole epochs=0: the whole-model student is the original truncated at depth 2, untrained, and its fit column
    is its disagreement with the original on the heal texts (fewer than 100: none held out), as transformers' own
    2-layer model of layers 1-2 computes it."""
    path = make_tiny_classifier("bert", tmp_path / "bert", minilm_dir, seed=3, initializer_range=0.3)
    run_dir, rows = analyzed(path, tmp_path)
    out = tmp_path / "heals.md"
    assert run("heals", "--depths", "2", "--heals", "whole", "--whole", "epochs=0", "--augment", "0", "--fit",
               "--device", "cpu", "--run-dir", run_dir, "--out", out) == 0
    (row,) = table_rows(out.read_text())
    flips = cut_flips(path, [t for t, _ in rows])
    assert 0 < flips < 1, "the cut changes some predictions, so the column can be wrong"
    assert row["heal texts: trained on / held out"] == f"{100 * flips:.2f}% / -"


def cut_flips(path: Path, texts: list[str]) -> float:
    """The share of `texts` whose prediction transformers' own 2-layer model of layers 1-2 of the checkpoint at
    `path` changes."""
    full, reference = reference_with_layers(path, [1, 2])
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        return float((full.eval()(**inputs).logits.argmax(1) != reference(**inputs).logits.argmax(1)).float().mean())


# --- fallback ---------------------------------------------------------------------------------------------------------


def two_class(p_positive: list[float]) -> np.ndarray:
    """Logits whose softmax gives these positive-class probabilities."""
    p = np.asarray(p_positive)
    return np.stack([np.zeros_like(p), np.log(p / (1 - p))], axis=1)


def test_fallback_the_least_sure_texts_take_the_originals_answer() -> None:
    fallback = benchmark("fallback").fallback
    # Calibration: the pruned model's top-class probabilities 0.55 to 0.99 (ten texts; quantile 20%: 0.64).
    calibration = two_class([0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99])
    # Test: five texts; the pruned model is unsure (0.52, 0.58) on the two where it disagrees with the original.
    pruned = two_class([0.52, 0.58, 0.9, 0.2, 0.97])
    original = two_class([0.3, 0.4, 0.8, 0.1, 0.9])
    none = fallback(calibration, pruned, original, 0.0)
    assert none.sent_on == 0 and none.disagreement == 2 / 5
    np.testing.assert_array_equal(none.served, pruned)

    some = fallback(calibration, pruned, original, 0.2)
    assert some.sent_on == 2 / 5 and some.disagreement == 0
    np.testing.assert_array_equal(some.served, np.concatenate([original[:2], pruned[2:]]))

    # At 75% the threshold is 0.8875 (numpy's linear quantile: 0.85 + 0.75 x 0.05): the text whose top class
    # has 0.8 goes too, though it agreed; 0.9 and 0.97 stay.
    most = fallback(calibration, pruned, original, 0.75)
    assert most.sent_on == 3 / 5 and most.disagreement == 0
    np.testing.assert_array_equal(most.served, np.stack([original[0], original[1], pruned[2], original[3], pruned[4]]))


def test_fallback_table_without_a_share_is_the_cuts_disagreement_on_the_holdout(bundle: Path, tmp_path: Path) -> None:
    """Share 0: nothing sent on, the cut's own layers a text, and the disagreement of transformers' own runs of the
    truncated checkpoint and of the original on the holdout."""
    run_dir, out = bundle.parent / "run", tmp_path / "fallback.md"
    assert run("fallback", "--run-dir", run_dir, "--shares", "0", "--out", out) == 0
    (row,) = table_rows(out.read_text())
    analysis = load_artifact(AnalysisReport, run_dir / "analysis.json")
    holdout = calibration_and_holdout(analysis.task_config, None, None).holdout

    def predict(checkpoint) -> np.ndarray:
        encoded = AutoTokenizer.from_pretrained(checkpoint)(holdout.texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            return AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()(**encoded).logits.argmax(-1)

    flips = float((predict(analysis.model) != predict(run_dir / "truncated")).float().mean())
    assert row["sent on (holdout)"] == "0.0%" and row["disagreement"] == f"{flips:.2%}"
    assert row["layers per text"] == "2.00 of 4"


# --- int8_cpus: the VNNI emulator -----------------------------------------------------------------------------------


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


def run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def matmul_integer(a_shape: list[int], n: int, a_zp: np.ndarray | None, b_zp: np.ndarray | None) -> onnx.ModelProto:
    """One MatMulInteger: A (u8 input) x B (s8 input [K, N]), with the zero points given as initializers
    (None: the input left out, or given as '' when the other one follows)."""
    k = a_shape[-1]
    inputs = [helper.make_tensor_value_info("A", TensorProto.UINT8, a_shape),
              helper.make_tensor_value_info("B", TensorProto.INT8, [k, n])]
    initializers, names = [], ["A", "B"]
    for name, zp in (("a_zero_point", a_zp), ("b_zero_point", b_zp)):
        if zp is not None:
            initializers.append(numpy_helper.from_array(zp, name))
        names.append(name if zp is not None else "")
    while names[-1] == "":
        names.pop()
    node = helper.make_node("MatMulInteger", names, ["Y"], name="mmi")
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.INT32, None)],
                              initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("a_shape", "a_zp", "b_zp"), [
    ([2, 3, 64], np.array(3, np.uint8), np.array([-1, 2, 0, 5, -7], np.int8)),  # per tensor x per channel
    ([4, 64], np.array([0, 9, 255, 1], np.uint8), np.array(-3, np.int8)),  # per row of A x per tensor
    ([4, 64], None, np.array([1, -2, 3, 0, 127], np.int8)),  # no a_zero_point: '' before b's
    ([2, 4, 64], None, None),  # no zero points at all
])
def test_int8_cpus_emulated_matmul_integer_is_exact(a_shape, a_zp, b_zp) -> None:
    rng = np.random.default_rng(0)
    n = 5
    # Mostly extremes: 255 x 127 pairs sum to 64,770, past int16's 32,767 (what a non-VNNI kernel saturates).
    a = np.where(rng.random(a_shape) < 0.8, 255, rng.integers(0, 256, a_shape)).astype(np.uint8)
    b = np.where(rng.random((a_shape[-1], n)) < 0.8, 127, rng.integers(-128, 128, (a_shape[-1], n))).astype(np.int8)
    a_c = a.astype(np.int64) - (0 if a_zp is None else (a_zp[:, None] if a_zp.ndim == 1 else a_zp).astype(np.int64))
    b_c = b.astype(np.int64) - (0 if b_zp is None else b_zp.astype(np.int64))
    exact = a_c @ b_c

    model = matmul_integer(a_shape, n, a_zp, b_zp)
    emulated = benchmark("int8_cpus").emulate_vnni(model)
    assert op_counts(emulated)["MatMulInteger"] == 0 and op_counts(model)["MatMulInteger"] == 1, "a copy"
    out = run_onnx(emulated, {"A": a, "B": b})
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, exact)


@pytest.fixture(scope="module")
def int8_7bit(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT, dynamic int8 with per-channel 7-bit weights (the AVX2 configuration)."""
    folder = export_onnx(tiny_models["bert"], tmp_path_factory.mktemp("int8") / "avx2").parent
    quantize_onnx(folder, cpu="avx2")
    return folder


def test_int8_cpus_emulated_7_bit_model_matches_onnxruntime(int8_7bit: Path, tmp_path: Path) -> None:
    model = onnx.load(str(int8_7bit / "model.onnx"))
    assert op_counts(model)["MatMulInteger"] > 0
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    # weight products (B an initializer); attention's activation x activation products have dynamic zero points
    b_zero_points = [weights[n.input[3]] for n in model.graph.node if n.op_type == "MatMulInteger"
                     and n.input[1] in weights]
    assert b_zero_points and all(zp.ndim == 1 and zp.size > 1 for zp in b_zero_points), "per-channel weights"

    emulated_dir = shutil.copytree(int8_7bit, tmp_path / "emulated")
    emulated = benchmark("int8_cpus").emulate_vnni(model)
    assert op_counts(emulated)["MatMulInteger"] == 0
    onnx.checker.check_model(emulated)
    onnx.save(emulated, str(emulated_dir / "model.onnx"))

    native = OnnxClassifier(int8_7bit).logits(TEXTS)
    exact = OnnxClassifier(emulated_dir).logits(TEXTS)
    # 7-bit weights never saturate: the same integers, only float rounding of the rescale may differ
    assert max_logit_difference(native, exact) <= 1e-5 * np.abs(native).max()


def test_int8_cpus_scores_fp32_as_transformers_does_and_every_configuration_both_ways(bundle: Path,
                                                                                       tmp_path: Path) -> None:
    """fp32 scores the truncated checkpoint's accuracy on calibration + holdout as transformers computes it; each
    int8 configuration follows natively and emulated, and on this host both agree for 7-bit weights."""
    run_dir, out = bundle.parent / "run", tmp_path / "int8.md"
    assert run("int8_cpus", "--run-dir", run_dir, "--checkpoint", run_dir / "truncated", "--out", out) == 0
    rows = table_rows(out.read_text())
    configurations = [f"{cpu}, {variant}" for cpu in ("avx2 7-bit", "avx512-vnni 8-bit")
                      for variant in ("all int8", "int8-safe")]
    assert [r["configuration"] for r in rows] == ["fp32"] + [c for c in configurations for _ in range(2)]
    assert [r["kernel"] for r in rows[1:]] == [f"native {cpu_model()}", "emulated VNNI"] * 4
    parts = calibration_and_holdout(load_artifact(AnalysisReport, run_dir / "analysis.json").task_config, None, None)
    examples = parts.calibration.concat(parts.holdout)
    checkpoint = run_dir / "truncated"
    encoded = AutoTokenizer.from_pretrained(checkpoint)(examples.texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        preds = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()(**encoded).logits.argmax(-1)
    assert rows[0]["accuracy"] == f"{np.mean(preds.numpy() == examples.labels):.4f}"
    assert rows[1]["accuracy"] == rows[2]["accuracy"] and rows[3]["accuracy"] == rows[4]["accuracy"]


# --- int8_avx2 -----------------------------------------------------------------------------------------------------


def test_int8_avx2_probe_tells_the_kernel_this_host_runs() -> None:
    """255 x 127 over 64 terms: exact on VNNI (VPDPBUSD adds into int32); 32 saturated int16 pair sums where
    onnxruntime's u8 x s8 kernel is VPMADDUBSW (AVX2, AVX-512 without VNNI). AVX2 hosts with AVX-VNNI run
    VPDPBUSD too, so they are left out."""
    from layerprune.cpu import cpu_kind

    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    expected = {"avx512-vnni": 255 * 127 * 64, "avx512": 32767 * 32, "avx2": 32767 * 32}
    if cpu_kind() not in expected or (cpu_kind() != "avx512-vnni" and "avx_vnni" in flags.split()):
        pytest.skip(f"no known u8 x s8 kernel for {cpu_kind()}")
    module = benchmark("int8_avx2")
    assert module.probe() == expected[cpu_kind()]
    assert module.kernel(255 * 127 * 64) == "exact int32 sums"
    assert module.kernel(32767 * 32) == "saturating int16 pair sums (VPMADDUBSW)"


# --- int8_methods --------------------------------------------------------------------------------------------------


def snippet_folder(folder: Path) -> list[str]:
    """A hutto_ICWSM_2014-like folder: each GroundTruth file has two snippets (id TAB rating TAB text)."""
    folder.mkdir()
    texts = []
    for k, name in enumerate(("amazonReviewSnippets", "tweets", "nytEditorialSnippets")):
        lines = [(f"{k}_{i}", f"{i - 0.5}", TEXTS[2 * k + i]) for i in range(2)]
        (folder / f"{name}_GroundTruth.txt").write_text("\r\n".join("\t".join(line) for line in lines))
        texts += [text for *_, text in lines]
    return texts


def test_int8_methods_reads_the_three_snippet_files_and_refuses_a_folder_without_them(tmp_path: Path) -> None:
    module = benchmark("int8_methods")
    written = snippet_folder(tmp_path / "hutto")
    assert module.snippets(tmp_path / "hutto") == written
    (tmp_path / "hutto" / "tweets_GroundTruth.txt").unlink()
    with pytest.raises(LayerpruneError, match="is not a hutto_ICWSM_2014 folder"):
        module.snippets(tmp_path / "hutto")


def test_int8_methods_scores_each_row_as_onnxruntime_answers_its_batches(bundle: Path, tmp_path: Path) -> None:
    """Every row is built and listed, fp32 disagrees with itself nowhere; and a row's logits (what disagreement
    is counted from) are onnxruntime's on the texts sorted by length in batches of 32 (dynamic int8's answers
    depend on the batch), here for optimum's int8 quantized by the test, on the eval split and the snippets."""
    run_dir, out = bundle.parent / "run", tmp_path / "methods.md"
    ood = snippet_folder(tmp_path / "hutto")
    assert run("int8_methods", "--run-dir", run_dir, "--checkpoint", run_dir / "truncated", "--n", "8", "--n-ood",
               "6", "--calibration", "16", "--rounds", "1", "--ood", tmp_path / "hutto", "--out", out) == 0
    rows = table_rows(out.read_text())
    assert [r["method"].split(",")[0].split(" (")[0] for r in rows] == [
        "fp32", "optimum plain dynamic int8", "layerprune int8-safe", "faithful_int8", "faithful_int8",
        "faithful_int8"]
    assert rows[0]["disagree test"] == rows[0]["disagree ood"] == "0.00%"
    assert run("int8_methods", "--run-dir", run_dir, "--checkpoint", run_dir / "truncated", "--n", "8", "--n-ood",
               "6", "--calibration", "16", "--rounds", "1", "--ood", tmp_path / "hutto", "--out", out,
               "--defaults-only") == 0
    assert [r["method"].split(",")[0].split(" (")[0] for r in table_rows(out.read_text())] == [
        "fp32", "optimum plain dynamic int8", "faithful_int8"]

    module = benchmark("int8_methods")
    int8 = export_onnx(run_dir / "truncated", tmp_path / "int8").parent
    quantize_onnx(int8)
    row = module.Row("int8", int8)
    test = [t for t, _ in SENTENCES] * 3  # 36 texts: two batches
    module.measure([row], test, ood, ood, rounds=1)
    session = ort.InferenceSession(str(int8 / "model.onnx"), providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(int8)
    for texts, got in ((test, row.test), (ood, row.ood)):
        want = np.zeros_like(got)
        order = np.argsort([len(tokenizer(t)["input_ids"]) for t in texts], kind="stable")
        for start in range(0, len(order), 32):
            idx = order[start:start + 32]
            batch = tokenizer([texts[i] for i in idx], padding=True, return_tensors="np")
            want[idx] = session.run(None, {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()})[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# --- linear_backends -----------------------------------------------------------------------------------------------


def test_linear_backends_both_paths_train_the_same_model_and_leave_the_library_as_found(tiny_models,
                                                                                       tmp_path: Path) -> None:
    """On 320 train texts (10 batches of 32, so one is held out), the BLAS and the oneDNN rows reach the same
    held-out loss to rounding: nn.Linear is the reference for the oneDNN path. Afterwards the library's probe is its
    own again."""
    from layerprune import linear
    from layerprune.analyze import AnalyzeOptions, analyze
    from layerprune.data import task_from_files

    probe = linear.onednn_is_faster
    reviews = tmp_path / "reviews.csv"
    rows = [(f"{i} {t}", lab) for i in range(27) for t, lab in SENTENCES]
    reviews.write_text("text,label\n" + "\n".join(f'"{t}",{lab}' for t, lab in rows) + "\n")
    task = task_from_files(reviews, "text", "label", train_file=reviews)
    analyze(str(tiny_models["bert"]), task, tmp_path / "run", AnalyzeOptions(device="cpu", batch_size=8))
    out = tmp_path / "linear.md"
    assert run("linear_backends", "--run-dir", tmp_path / "run", "--n", "320", "--depth", "3", "--out", out) == 0
    body = out.read_text().split("| path | original's pass")[1]
    blas, onednn = table_rows("| path | original's pass" + body)
    assert blas["held-out loss"] != "nan" and abs(float(blas["held-out loss"]) - float(onednn["held-out loss"])) < 2e-4
    assert linear.onednn_is_faster is probe


# --- pruned_vs_int8 ---------------------------------------------------------------------------------------------------

INT8_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul", "QLinearConv", "QLinearAdd"}


def test_pruned_vs_int8_bundle_against_the_full_model_in_fp32_and_plain_int8(bundle: Path, tmp_path: Path,
                                                                            capsys) -> None:
    """The tiny bundle (a 2-of-4-layer BERT): three rows on the bundle's holdout, checked against references the
    benchmark does not compute (transformers' PyTorch forward of the original, the int8 file's graph read with
    onnx, the manifest)."""
    out, keep = tmp_path / "pruned_vs_int8.md", tmp_path / "keep"
    assert run("pruned_vs_int8", "--bundle", bundle, "--n", "40", "--n-batch1", "8", "--rounds", "1", "--out", out,
               "--keep", keep) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out and cpu_model() in text

    manifest = json.loads((bundle / "manifest.json").read_text())
    rows = {r["model"]: r for r in table_rows(text)}
    assert list(rows) == ["full fp32", "full int8", "bundle"]
    assert rows["bundle"]["layers"] == str(manifest["depth"]) == "2"
    assert rows["full fp32"]["layers"] == rows["full int8"]["layers"] == str(manifest["total_layers"]) == "4"
    assert rows["full fp32"]["quantization"] == "fp32" and "dynamic" in rows["full int8"]["quantization"]
    assert rows["full fp32"]["agreement with the original"] == "100.0%"  # the original, exported
    assert rows["full int8"]["speed-up vs full int8 (batch 32)"] == "1.00x"

    # The sentences are the bundle task's holdout, as validation cuts it.
    analysis = load_artifact(AnalysisReport, bundle / "analysis.json")
    holdout = calibration_and_holdout(analysis.task_config, None, None, manifest["resample_seed"]).holdout
    kept = json.loads((keep / benchmark("pruned_vs_int8").PREDICTIONS_FILE).read_text())
    assert kept["texts"] == holdout.texts and kept["labels"] == holdout.labels.tolist()

    # full fp32 = the original checkpoint: transformers' PyTorch forward predicts the same on every sentence.
    source = manifest["source_checkpoint"]
    model = AutoModelForSequenceClassification.from_pretrained(source).eval()
    encoded = AutoTokenizer.from_pretrained(source)(holdout.texts, truncation=True, max_length=manifest["max_length"],
                                                     padding=True, return_tensors="pt")
    with torch.no_grad():
        torch_preds = model(**encoded).logits.argmax(-1).numpy()
    assert kept["predictions"]["full fp32"] == torch_preds.tolist()
    assert rows["full fp32"]["accuracy"] == f"{np.mean(torch_preds == holdout.labels):.4f}"
    agreement = np.mean(np.array(kept["predictions"]["bundle"]) == torch_preds)
    assert rows["bundle"]["agreement with the original"] == f"{100 * agreement:.1f}%"

    # Would the gate certify the full int8: validate.forecast on the calibration half of the bundle's run, the
    # original by transformers, the kept int8 graph by onnxruntime at batch 32, at the export's tolerance and 1.25%
    # (export's 5%: half to the depth walk, half shared by its two int8 variants).
    from layerprune.validate import forecast

    calibration = calibration_and_holdout(analysis.task_config, None, None, manifest["resample_seed"]).calibration
    encoded = AutoTokenizer.from_pretrained(source)(calibration.texts, truncation=True, padding=True,
                                                     max_length=manifest["max_length"], return_tensors="pt")
    with torch.no_grad():
        original = model(**encoded).logits.numpy()
    int8 = OnnxClassifier(keep / "int8", max_length=manifest["max_length"]).logits(calibration.texts, batch_size=32)
    expected = forecast(analysis.task_config, calibration.labels, original, int8, 0.01, len(holdout), None, 0.0125)
    line = next(x for x in text.splitlines() if x.startswith("Would the gate certify the full int8?"))
    assert line.startswith(f"Would the gate certify the full int8? {'yes' if expected.passes else 'no'}: ")
    assert f"alpha 1.25%, delta {100 * expected.delta:+.2f} points, lower bound {100 * expected.lower_bound:+.2f}" \
        in line
    assert f"disagreement {expected.disagreement:.2%}" in line and f"on {len(calibration)} " in line

    # full int8 is really quantized (integer products), its fp32 source is not.
    ops = {name: op_counts(onnx.load(str(keep / name / "model.onnx"))) for name in ("fp32", "int8")}
    assert INT8_OPS & set(ops["int8"]) and not INT8_OPS & set(ops["fp32"])
    assert ops["int8"]["MatMulInteger"] > 0 and ops["int8"]["MatMul"] < ops["fp32"]["MatMul"]


def test_pruned_vs_int8_refuses_a_folder_that_is_no_bundle(tmp_path: Path, capsys) -> None:
    for bad in (tmp_path / "missing", tmp_path):  # no folder; a folder that is no bundle
        assert run("pruned_vs_int8", "--bundle", bad, "--out", tmp_path / "t.md") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pruned_vs_int8: error: ") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "t.md").exists()


def test_pruned_vs_int8_a_fallback_bundle_is_measured_as_served_and_its_pruned_graph_alone(bundle: Path,
                                                                                          tmp_path: Path) -> None:
    """With a fallback, the bundle row is the cascade as served and a fourth row is the pruned graph alone: their
    predictions are those of optimum's run of the pruned graph, with the original's (transformers) for the
    rows below the manifest's threshold in the bundle row."""
    from scipy.special import softmax

    from conftest import SERVE_KEEP_LAYERS, Reference
    from layerprune.export import ExportOptions, export_bundle

    alone = benchmark("pruned_vs_int8").ALONE
    fb, out, keep = tmp_path / "fb", tmp_path / "t.md", tmp_path / "keep"
    manifest = export_bundle(bundle.parent / "run", fb, ExportOptions(
        keep_layers=SERVE_KEEP_LAYERS, heal="none", fallback=0.5, device="cpu", batch_size=8)).manifest
    assert run("pruned_vs_int8", "--bundle", fb, "--n", "16", "--n-batch1", "4", "--rounds", "1", "--out", out,
               "--keep", keep) == 0
    rows = {r["model"]: r for r in table_rows(out.read_text())}
    assert list(rows) == ["full fp32", "full int8", "bundle", alone]
    assert rows[alone]["layers"] == rows["bundle"]["layers"] == str(SERVE_KEEP_LAYERS)
    kept = json.loads((keep / "predictions.json").read_text())
    pruned = Reference(fb).logits(kept["texts"])
    source = manifest.source_checkpoint
    encoded = AutoTokenizer.from_pretrained(source)(kept["texts"], padding=True, return_tensors="pt")
    with torch.no_grad():
        original = AutoModelForSequenceClassification.from_pretrained(source).eval()(**encoded).logits.numpy()
    sent = softmax(pruned, axis=-1).max(axis=-1) < manifest.fallback.threshold
    assert 0 < sent.sum() < len(sent)
    assert kept["predictions"][alone] == pruned.argmax(-1).tolist()
    assert kept["predictions"]["bundle"] == np.where(sent, original.argmax(-1), pruned.argmax(-1)).tolist()
    # The line on the full int8 model in the original's place: its answers on the unsure rows, the pruned graph's
    # on the rest, against full fp32 (transformers' answers).
    int8 = np.array(kept["predictions"]["full int8"])
    what_if = np.where(sent, int8, pruned.argmax(-1))
    line = next(x for x in out.read_text().splitlines() if x.startswith("Had the texts"))
    assert f"agreement with the original {100 * np.mean(what_if == original.argmax(-1)):.1f}%" in line
    assert f"accuracy {np.mean(what_if == np.array(kept['labels'])):.4f}" in line


def test_cascade_continued_and_restarted_serve_the_same_answers_in_fp32(bundle: Path, tmp_path: Path) -> None:
    """A fp32 continuation bundle: at each share, the continued and the restarted fallback send the same texts on
    and both answer them with the original's predictions (the table's agreement, against the original's fp32
    graph); the layers a text differ by the share sent on times the layers below the cut."""
    from conftest import SERVE_KEEP_LAYERS
    from layerprune.export import ExportOptions, export_bundle

    run_dir = shutil.copytree(bundle.parent / "run", tmp_path / "run", ignore=shutil.ignore_patterns("truncated"))
    export_bundle(run_dir, tmp_path / "cont", ExportOptions(keep_layers=SERVE_KEEP_LAYERS, heal="top",
                                                             fallback=0.5, device="cpu", batch_size=8))
    out = tmp_path / "cascade.md"
    assert run("cascade-mpnet", "--bundle", tmp_path / "cont", "--shares", "25,75", "--n", "30", "--rounds", "1",
               "--out", out) == 0
    rows = table_rows(out.read_text())
    assert [(r["sent on (calibration)"], r["fallback"]) for r in rows] == [
        ("25%", "continued"), ("25%", "restarted (fp32)"), ("75%", "continued"), ("75%", "restarted (fp32)")]
    for continued, restarted in (rows[:2], rows[2:]):
        assert continued["sent on (these texts)"] == restarted["sent on (these texts)"] != "0.0%"
        assert continued["agreement with the original"] == restarted["agreement with the original"]
        sent = float(continued["sent on (these texts)"].rstrip("%")) / 100
        assert float(restarted["layers a text"]) - float(continued["layers a text"]) == pytest.approx(
            sent * (SERVE_KEEP_LAYERS - 1), abs=0.01)
    assert run("cascade-mpnet", "--bundle", bundle, "--out", out) == 2  # no fallback: refused in one line


def test_pruned_vs_int8_the_int8_what_if_line_by_hand() -> None:
    """Four texts, two of them below the threshold: the line serves the full int8 model's answers there and the
    pruned graph's elsewhere, scored against the original (worked out by hand; the original's own answers would
    give 100% agreement and accuracy 0.75)."""
    from types import SimpleNamespace

    from layerprune.tasks import load_task

    module = benchmark("pruned_vs_int8")
    logits = {
        module.FULL_INT8: [[0, 1], [0, 1], [1, 0], [1, 0]],
        module.ALONE: [[2, 0], [0.1, 0], [0, 2], [0, 0.1]],  # top-class probability 0.88, 0.52, 0.88, 0.52
    }
    result = SimpleNamespace(logits={k: np.array(v, dtype=float) for k, v in logits.items()},
                             original=np.array([[1, 0], [0, 1], [0, 1], [0, 1]], dtype=float),
                             manifest=SimpleNamespace(fallback=SimpleNamespace(threshold=0.8)),
                             texts=SimpleNamespace(task=load_task("rt-polarity"),
                                                   holdout=SimpleNamespace(labels=np.array([0, 1, 1, 0]))))
    line = module._to_int8(result)
    assert "accuracy 1.0000" in line and "agreement with the original 75.0%" in line


# --- the shared timing --------------------------------------------------------------------------------------------


def test_timed_rounds_interleave_the_candidates_after_one_warm_up_each() -> None:
    from layerprune.timing import timed_rounds

    calls = []
    timings = timed_rounds({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, 3,
                           {"a": lambda: calls.append("a warm")})
    assert calls == ["a warm", "b", "a", "b", "a", "b", "a", "b"]
    assert timings["a"].results == [1, 1, 1] and timings["b"].results == [2, 2, 2]
    assert all(len(t.seconds) == len(t.cpu_seconds) == 3 and t.median >= 0 and t.cpu_median >= 0
               for t in timings.values())
