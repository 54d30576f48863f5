"""benchmarks/heal_variants.py's student: the original's layers picked by number, checked against
transformers' own model of that many layers with those layers' weights loaded by hand."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from conftest import SENTENCES, load_benchmark, make_tiny_classifier, reference_with_layers

heal_variants = load_benchmark("heal_variants")


def test_picked_layers_compute_what_a_model_of_those_layers_computes(tmp_path: Path, minilm_dir: Path) -> None:
    # 4 layers; initializer_range 0.3 so that the layers, and so the logits, differ between texts and picks
    path = make_tiny_classifier("bert", tmp_path / "bert", minilm_dir, seed=3, initializer_range=0.3)
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer([text for text, _ in SENTENCES], padding=True, return_tensors="pt")
    for layers in ([1, 2], [1, 2, 4], [1, 3]):
        full, reference = reference_with_layers(path, layers)
        student = heal_variants._with_layers(full.eval(), layers).eval()
        assert student.config.num_hidden_layers == len(layers)
        with torch.inference_mode():
            got, want = student(**inputs).logits, reference(**inputs).logits
            unchanged = full(**inputs).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, unchanged, atol=1e-3)  # the pick changed the model, and the copy only
        assert full.config.num_hidden_layers == 4


def test_start_beside_top_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    """--top's student starts as --top-start says, so a --start beside it would label a row with layers it never
    used: one line on stderr, exit 2, before the run directory is read (it does not exist here)."""
    code = heal_variants.main(["x", "--depth", "2", "--top", "--start", "1,2", "--run-dir", str(tmp_path / "none"),
                               "--out", str(tmp_path / "out.md")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--top-start" in err[0]
    assert not (tmp_path / "out.md").exists()


def test_top_grid_writes_a_row_per_pair_with_the_layers_each_starts_as(tiny_models, tmp_path: Path) -> None:
    """--top over --top-start kept,top and --heal-layers 1,2 at depth 3 of 4: four students from one encoding,
    each row naming the original's layers it starts as (by hand: the kept ones, or the top ones on top)."""
    run, _ = _analyzed(tiny_models["bert"], tmp_path)
    out = tmp_path / "variants.md"
    code = heal_variants.main(["grid", "--depth", "3", "--top", "--top-start", "kept,top", "--heal-layers", "1,2",
                               "--augment", "0", "--run-dir", str(run), "--out", str(out)])
    written = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| grid")]
    assert code == 0 and [(r[0], r[2]) for r in written] == [
        ("| grid (1 re-tuned, start kept, label weight 0.5)", "1,2,3"),
        ("| grid (1 re-tuned, start top, label weight 0.5)", "1,2,4"),
        ("| grid (2 re-tuned, start kept, label weight 0.5)", "1,2,3"),
        ("| grid (2 re-tuned, start top, label weight 0.5)", "1,3,4")]
    steps = {r[0]: int(r[7]) for r in written}
    assert all(s > 0 for s in steps.values()), "every student was trained"


def test_fit_column_is_the_truncated_models_disagreement_on_the_heal_texts(tmp_path: Path, minilm_dir: Path) -> None:
    """--top --epochs 0 over a --warmup x --dropout grid: one row per point, named by its settings, under a
    header that names the run; each untrained student disagrees with the original on the train texts (fewer
    than 100: none held out) as often as transformers' own 2-layer model of layers 1-2 does."""
    path = make_tiny_classifier("bert", tmp_path / "bert", minilm_dir, seed=3, initializer_range=0.3)
    run, rows = _analyzed(path, tmp_path)
    out = tmp_path / "variants.md"
    code = heal_variants.main(["fit", "--depth", "2", "--top", "--epochs", "0", "--warmup", "none,0.5", "--dropout",
                               "off", "--augment", "0", "--run-dir", str(run), "--out", str(out)])
    flips = _cut_flips(path, rows)
    text = out.read_text()
    written = [line.split(" | ") for line in text.splitlines() if line.startswith("| fit")]
    assert code == 0 and [r[0] for r in written] == [
        "| fit (1 re-tuned, start kept, label weight 0.5, no dropout)",
        "| fit (1 re-tuned, start kept, label weight 0.5, warmup 0.5, linear decay, no dropout)"]
    assert all(r[-1] == f"{100 * flips:.2f}% / - |" for r in written)
    assert text.count("| variant |") == 1 and "commit" in text.split("| variant |")[0]


def test_whole_heal_without_epochs_runs_one_pass(tiny_models, tmp_path: Path) -> None:
    """No --epochs: the whole-model heal makes one pass, by hand 1 step (24 texts in one batch of 32, fewer than
    100 so none held out)."""
    run, rows = _analyzed(tiny_models["bert"], tmp_path)
    out = tmp_path / "variants.md"
    assert len(rows) == 24
    code = heal_variants.main(["whole", "--depth", "3", "--augment", "0", "--run-dir", str(run), "--out", str(out)])
    written = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| whole")]
    assert code == 0 and [(r[5], r[7]) for r in written] == [("1", "1")]


def _cut_flips(path: Path, rows: list[tuple[str, str]]) -> float:
    """The share of `rows` whose prediction transformers' own 2-layer model of layers 1-2 of the checkpoint at
    `path` changes, which must be neither none nor all for a fit column to be tested by it."""
    full, reference = reference_with_layers(path, [1, 2])
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer([t for t, _ in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        flips = float((full.eval()(**inputs).logits.argmax(1) != reference(**inputs).logits.argmax(1)).float().mean())
    assert 0 < flips < 1, "the cut changes some predictions, so the column can be wrong"
    return flips


def _analyzed(model: Path, tmp_path: Path) -> tuple[Path, list[tuple[str, str]]]:
    """A run directory analyzing `model` on the test sentences and their "honestly, " copies (24 rows, which
    are also the train split), and those rows."""
    from layerprune.analyze import AnalyzeOptions, analyze
    from layerprune.data import task_from_files

    reviews = tmp_path / "reviews.csv"
    rows = [(t, l) for t, l in SENTENCES] + [(f"honestly, {t}", l) for t, l in SENTENCES]
    reviews.write_text("text,label\n" + "\n".join(f'"{t}",{l}' for t, l in rows) + "\n")
    task = task_from_files(reviews, "text", "label", train_file=reviews)
    run = tmp_path / "run"
    analyze(str(model), task, run, AnalyzeOptions(device="cpu", batch_size=8))
    return run, rows


def test_whole_heal_fit_column_is_the_truncated_models_disagreement(tmp_path: Path, minilm_dir: Path) -> None:
    """--epochs 0: the whole-model student is the original truncated at depth 2, untrained, and its fit column is
    its disagreement with the original on the heal texts (fewer than 100: none held out), as transformers' own
    2-layer model of layers 1-2 computes it."""
    path = make_tiny_classifier("bert", tmp_path / "bert", minilm_dir, seed=3, initializer_range=0.3)
    run, rows = _analyzed(path, tmp_path)
    out = tmp_path / "variants.md"
    code = heal_variants.main(["whole0", "--depth", "2", "--epochs", "0", "--augment", "0", "--device", "cpu",
                               "--run-dir", str(run), "--out", str(out)])
    flips = _cut_flips(path, rows)
    written = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| whole0")]
    assert code == 0 and len(written) == 1 and written[0][-1] == f"{100 * flips:.2f}% / - |"


def test_whole_heal_minutes_cap_runs_fewer_steps_than_planned(tiny_models, tmp_path: Path) -> None:
    """--minutes far below one step's time: 50 epochs planned, the cap leaves time for none, and the heal runs
    its floor of 1 step in 1 pass; the epochs cell says so. The cap is timed on held-out texts, so there must be
    some: 24 rows and 13 copies of each make 336 texts, 11 batches of up to 32, one held out."""
    run, _ = _analyzed(tiny_models["bert"], tmp_path)
    out = tmp_path / "variants.md"
    code = heal_variants.main(["capped", "--depth", "3", "--epochs", "50", "--minutes", "0.000001", "--augment", "13",
                               "--run-dir", str(run), "--out", str(out)])
    written = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| capped")]
    assert code == 0 and [r[5] for r in written] == ["1 of 50 (1e-06-min cap)"]


def test_top_grid_over_temperature_trains_at_each(tiny_models, tmp_path: Path, monkeypatch) -> None:
    """--temperature 1,2: two students, each distilled at its own temperature (what heal.distill was handed), each
    row named by the grid's point and, off the default, its temperature."""
    run, _ = _analyzed(tiny_models["bert"], tmp_path)
    seen, distill = [], heal_variants.distill
    monkeypatch.setattr(heal_variants, "distill", lambda *a, **k: seen.append(k["opts"].temperature) or distill(*a, **k))
    out = tmp_path / "variants.md"
    code = heal_variants.main(["t", "--depth", "3", "--top", "--temperature", "1,2", "--augment", "0",
                               "--run-dir", str(run), "--out", str(out)])
    names = [line.split(" | ")[0] for line in out.read_text().splitlines() if line.startswith("| t")]
    point = "1 re-tuned, start kept, label weight 0.5"
    assert code == 0 and seen == [1.0, 2.0]
    assert names == [f"| t ({point}, temperature 1)", f"| t ({point})"]
