"""analyze end to end on tiny random models of every supported architecture. Minibatch CKA is checked against
an implementation written here from the formulas (HSIC_1 of Song et al. 2012 and the biased HSIC with centered
Gram matrices), on hidden states computed here with transformers: exactly on its own minibatches, and within
a stated bound of exact linear CKA."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import SENTENCES, TINY_CONFIGS, TINY_LAYERS, make_tiny_classifier
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
    assert report.total_layers == TINY_LAYERS
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
    assert 1 <= report.boundary <= report.total_layers
    assert 0.0 <= report.metric.value <= 1.0
    on_disk = load_artifact(AnalysisReport, run / "analysis.json")
    assert on_disk == report
    assert (run / "cka.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")], "no staging folder left behind"


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
    opts = AnalyzeOptions(representation=representation, cka_estimator=estimator, batch_size=4, device="cpu")
    report = analyze(str(tiny_models["bert"]), task, run, opts)
    if estimator != "minibatch":  # minibatch CKA (debiased sums) may leave [0, 1] on 12 rows: checked below
        _check_report(report, run)
    else:
        batches = _hidden_states(tiny_models["bert"], [t for t, _ in SENTENCES], 4, representation)
        np.testing.assert_allclose(_matrix(report), _minibatch_cka(batches), rtol=0, atol=1e-5)
    assert report.undefined_layers == []
    assert report.cka_estimator == estimator


# --- minibatch CKA against the formulas --------------------------------------------------------------------------


def _hsic_biased(k: np.ndarray, l: np.ndarray) -> float:
    """tr(K H L H) / (n-1)^2, H = I - 11^T/n: the HSIC of linear CKA (Kornblith et al. 2019, eq. 3)."""
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def _hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """HSIC_1 (Song et al. 2012, eq. 5), with K~, L~ the Gram matrices with zeroed diagonals:
    [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))."""
    n = k.shape[0]
    k, l, one = k - np.diag(np.diag(k)), l - np.diag(np.diag(l)), np.ones(n)
    return float(np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                 - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def _cka_from_hsic(hsic: np.ndarray) -> np.ndarray:
    """HSIC_ij / sqrt(HSIC_ii HSIC_jj); nan where a representation has no variance (HSIC_ii <= 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = 1 / np.sqrt(np.diag(hsic))
        return hsic * scale[:, None] * scale[None, :]


def _minibatch_cka(batches: list[list[np.ndarray]]) -> np.ndarray:
    """Nguyen et al. 2021, eq. 3: sum_b HSIC_1(K_ib, K_jb) / sqrt(sum_b HSIC_1(K_ib, K_ib) sum_b HSIC_1(K_jb, K_jb))."""
    k = len(batches[0])
    total = np.zeros((k, k))
    for layers in batches:
        grams = [x @ x.T for x in layers]
        total += [[_hsic_unbiased(a, b) for b in grams] for a in grams]
    return _cka_from_hsic(total)


def _linear_cka(layers: list[np.ndarray]) -> np.ndarray:
    grams = [x @ x.T for x in layers]
    return _cka_from_hsic(np.array([[_hsic_biased(a, b) for b in grams] for a in grams]))


def _hidden_states(model_dir: Path, texts: list[str], batch_size: int, representation: str) -> list[list[np.ndarray]]:
    """Per batch of consecutive texts, per layer 0..L: the rows CKA compares (cls: first token; mean: mean of
    the real tokens; tokens: every real token), float64, from transformers' own forward."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], truncation=True, max_length=128, padding=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**enc, output_hidden_states=True).hidden_states
        mask = enc["attention_mask"].numpy()
        layers = []
        for h in (x.double().numpy() for x in hidden):
            if representation == "cls":
                layers.append(h[:, 0])
            elif representation == "mean":
                layers.append((h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))
            else:
                layers.append(np.concatenate([row[: n] for row, n in zip(h, mask.sum(1))]))
        out.append(layers)
    return out


def _matrix(report: AnalysisReport) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in report.cka], dtype=float)


@pytest.fixture(scope="module")
def varied_bert(minilm_dir, tmp_path_factory) -> Path:
    """A tiny BERT whose layers differ (initializer_range 0.3: CKA between its layers spans ~0.01 to 1; with the
    default 0.02 every pair is ~1.0 and any estimator would agree)."""
    return make_tiny_classifier("bert", tmp_path_factory.mktemp("varied") / "bert", minilm_dir, seed=3,
                                initializer_range=0.3)


@pytest.mark.parametrize("representation", ["cls", "mean", "tokens"])
def test_minibatch_cka_is_hsic1_summed_over_its_batches(varied_bert, task, tmp_path, representation) -> None:
    """12 examples in 3 minibatches of 4, in file order: the report is the formula on those batches to 1e-5
    (rounding to 6 decimals and float32 forwards)."""
    opts = AnalyzeOptions(representation=representation, cka_estimator="minibatch", batch_size=4, device="cpu")
    report = analyze(str(varied_bert), task, tmp_path / "run", opts)
    expected = _minibatch_cka(_hidden_states(varied_bert, [t for t, _ in SENTENCES], 4, representation))
    got = _matrix(report)
    if representation == "cls":  # layer 0's first token is the same for every input: undefined, left out
        assert np.isnan(got[0]).all() and [u.layer for u in report.undefined_layers] == [0]
        got, expected = got[1:, 1:], expected[1:, 1:]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert np.nanmin(got) < 0.9  # the layers differ: a matrix of ones would not pass


PREFIXES = ["", "honestly, ", "frankly, ", "well, ", "in short, ", "all told, ", "to be fair, ", "sadly, "]


def test_minibatch_cka_is_close_to_exact_linear_cka(varied_bert, tmp_path) -> None:
    """96 examples (shuffled once) in 3 minibatches of 32, every token a row (~330 rows a batch): minibatch CKA
    within 0.05 of exact linear CKA on all ~1,000 rows (measured 0.014; on batches of 4 it is off by up to 1).
    The exact estimator of the report (estimator linear) equals the formula here to 1e-5."""
    rows = [(p + t, label) for p in PREFIXES for t, label in SENTENCES]
    random.Random(0).shuffle(rows)
    data = tmp_path / "reviews96.csv"
    data.write_text("text,label\n" + "\n".join(f'"{t}",{label}' for t, label in rows) + "\n")
    task96 = task_from_files(data, "text", "label")
    texts = [t for t, _ in rows]
    full = [np.concatenate(layer) for layer in zip(*_hidden_states(varied_bert, texts, 32, "tokens"))]
    exact = _linear_cka(full)
    assert exact.min() < 0.1  # layers that share little: the bound below is not met by a matrix of ones

    opts = dict(representation="tokens", batch_size=32, device="cpu")
    minibatch = analyze(str(varied_bert), task96, tmp_path / "mb", AnalyzeOptions(cka_estimator="minibatch", **opts))
    linear = analyze(str(varied_bert), task96, tmp_path / "linear", AnalyzeOptions(cka_estimator="linear", **opts))
    assert minibatch.n_examples == linear.n_examples == 96 and minibatch.n_representations == len(full[0])
    np.testing.assert_allclose(_matrix(linear), exact, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_matrix(minibatch), exact, rtol=0, atol=0.05)


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
