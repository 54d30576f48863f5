"""analyze end to end on tiny random models of every supported architecture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SENTENCES, TINY_CONFIGS, TINY_LAYERS
from layerprune import cka as cka_math
from layerprune.analyze import AnalyzeOptions, _token_budget, analyze
from layerprune.artifacts import AnalysisReport, load_artifact
from layerprune.data import task_from_files
from layerprune.errors import DataError, LayerpruneError
from layerprune.hidden import forward_all_layers, make_batches, pool
from layerprune.models import load_classifier


@pytest.fixture
def task(sentiment_csv: Path):
    return task_from_files(sentiment_csv, "text", "label")


def _check_report(report: AnalysisReport, run: Path) -> None:
    size = TINY_LAYERS + 1
    assert report.num_layers == TINY_LAYERS
    assert len(report.cka) == size and all(len(row) == size for row in report.cka)
    assert len(report.clusters) == size
    defined = [i for i in range(size) if report.cka[i][i] is not None]
    for i in defined:
        assert report.cka[i][i] == pytest.approx(1.0)
        for j in defined:
            assert report.cka[i][j] == pytest.approx(report.cka[j][i])
            assert -1e-6 <= report.cka[i][j] <= 1 + 1e-6
    assert report.boundary in defined
    labels = [c for c in report.clusters if c is not None]
    assert labels == sorted(labels), "blocks are contiguous in depth"
    assert report.n_clusters == len(set(labels))
    # The late block, read off the cluster list: the top layers, from the boundary up to the last layer.
    late = [layer for layer, c in enumerate(report.clusters) if c == labels[-1]]
    assert late == list(range(late[0], size)) and report.boundary == late[0]
    assert 1 <= report.recommended_keep_layers <= report.num_layers
    assert 0.0 <= report.metric.value <= 1.0
    on_disk = load_artifact(AnalysisReport, run / "analysis.json")
    assert on_disk == report
    assert (run / "cka.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in run.parent.iterdir() if ".tmp-" in p.name], "no temporary folder left behind"


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_analyze_every_architecture(tiny_models: dict[str, Path], task, tmp_path: Path, model_type: str) -> None:
    run = tmp_path / "run"
    report = analyze(str(tiny_models[model_type]), task, run, AnalyzeOptions(batch_size=5, device="cpu"))
    _check_report(report, run)
    assert report.n_examples == len(SENTENCES)
    assert report.model_type == model_type
    # With cls, layer 0 is the same vector for every input: undefined, null, and out of the clustering.
    assert [u.layer for u in report.undefined_layers] == [0]
    assert report.cka[0] == [None] * (TINY_LAYERS + 1)
    assert report.clusters[0] is None
    raw = json.loads((run / "analysis.json").read_text())
    assert raw["cka"][0][0] is None and "NaN" not in (run / "analysis.json").read_text()


@pytest.mark.parametrize("representation", ["mean", "tokens"])
@pytest.mark.parametrize("estimator", ["linear", "debiased", "minibatch"])
def test_representations_and_estimators(tiny_models, task, tmp_path, representation, estimator) -> None:
    run = tmp_path / "run"
    opts = AnalyzeOptions(representation=representation, estimator=estimator, batch_size=4, device="cpu")
    report = analyze(str(tiny_models["bert"]), task, run, opts)
    if estimator != "minibatch":  # minibatch CKA is noisy on 12 rows; the math tests cover its accuracy
        _check_report(report, run)
    assert report.undefined_layers == []
    assert report.cka_estimator == estimator


def test_analysis_matches_direct_cka(tiny_models, task, tmp_path) -> None:
    """The report's CKA equals CKA computed directly from the model's CLS vectors."""
    report = analyze(str(tiny_models["roberta"]), task, tmp_path / "run", AnalyzeOptions(batch_size=3, device="cpu"))
    model, tokenizer = load_classifier(tiny_models["roberta"], device="cpu")
    from layerprune.data import load_examples

    examples = load_examples(task, task.eval_split)
    batches = make_batches(tokenizer, examples, batch_size=len(examples), max_length=128, sort_by_length=False)
    [(_, _, hidden)] = list(forward_all_layers(model, batches))
    mask = batches[0].encoding["attention_mask"]
    reps = [np.stack(pool(h, mask, "cls")) for h in hidden]
    expected = cka_math.cka_matrix(reps)
    got = np.array([[np.nan if v is None else v for v in row] for row in report.cka])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_max_examples_keeps_first_n_in_order(tiny_models, task, tmp_path) -> None:
    report = analyze(str(tiny_models["bert"]), task, tmp_path / "a", AnalyzeOptions(max_examples=6, device="cpu"))
    assert report.n_examples == 6
    again = analyze(str(tiny_models["bert"]), task, tmp_path / "b", AnalyzeOptions(max_examples=6, batch_size=2, device="cpu"))
    np.testing.assert_allclose(np.array(report.cka, dtype=float), np.array(again.cka, dtype=float), atol=1e-5)


def test_token_budget_takes_examples_in_order() -> None:
    class FakeBatch:
        def __init__(self, indices, lengths):
            import torch

            self.indices = np.array(indices)
            self.lengths = torch.tensor(lengths)

    batches = [FakeBatch([2, 0], [4, 5]), FakeBatch([1], [3])]
    assert _token_budget(batches, 3, 7).tolist() == [5, 2, 0]
    assert _token_budget(batches, 3, 100).tolist() == [5, 3, 4]


def test_tokens_rows_capped(tiny_models, task, tmp_path) -> None:
    opts = AnalyzeOptions(representation="tokens", max_tokens=30, device="cpu")
    report = analyze(str(tiny_models["bert"]), task, tmp_path / "run", opts)
    assert report.n_representations == 30


def test_max_examples_below_two_is_refused_and_writes_nothing(tiny_models, task, tmp_path) -> None:
    with pytest.raises(LayerpruneError, match="at least 2"):
        analyze(str(tiny_models["bert"]), task, tmp_path / "run", AnalyzeOptions(max_examples=1))
    assert [p.name for p in tmp_path.iterdir()] == ["reviews.csv"]


def test_one_example_split_is_refused(tiny_models, tmp_path) -> None:
    one = tmp_path / "one.csv"
    one.write_text('text,label\n"fine",positive\n')
    small = task_from_files(one, "text", "label", label_names=["negative", "positive"])
    with pytest.raises(DataError, match="at least 2"):
        analyze(str(tiny_models["bert"]), small, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_failure_midway_leaves_previous_run_intact(tiny_models, task, tmp_path, monkeypatch) -> None:
    run = tmp_path / "run"
    first = analyze(str(tiny_models["bert"]), task, run, AnalyzeOptions(device="cpu"))

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("layerprune.analyze.plot_cka", broken)
    with pytest.raises(RuntimeError):
        analyze(str(tiny_models["electra"]), task, run, AnalyzeOptions(device="cpu"))
    assert load_artifact(AnalysisReport, run / "analysis.json") == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reviews.csv", "run"]


def test_refuses_to_replace_a_folder_that_is_not_a_run(tiny_models, task, tmp_path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(LayerpruneError, match="refusing to overwrite"):
        analyze(str(tiny_models["bert"]), task, tmp_path, AnalyzeOptions(device="cpu"))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_clusters_forced(tiny_models, task, tmp_path) -> None:
    report = analyze(str(tiny_models["bert"]), task, tmp_path / "run", AnalyzeOptions(clusters=3, device="cpu"))
    assert report.n_clusters == 3 and report.clusters_chosen_by == "user"
    assert sorted({c for c in report.clusters if c is not None}) == [0, 1, 2]
