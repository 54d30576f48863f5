"""--fallback auto: the served cost a text (layerprune.cost) and the export that minimises it among the (depth,
share sent on) whose gate forecast passes; on tiny models, against hand computations."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from scipy.stats import binomtest
from transformers import AutoConfig

from conftest import SENTENCES
from layerprune import candidates, cost
from layerprune.analyze import AnalyzeOptions, analyze
from layerprune.artifacts import (
    DepthReport, DepthScore, ExportCandidate, GateForecast, LayerCosts, ShareScore, load_artifact,
)
from layerprune.bundle import verify_bundle
from layerprune.cli import main
from layerprune.data import Examples, task_from_files
from layerprune.depth_search import Depths, choose_depth, error_budget
from layerprune.files import MODEL_FILE
from layerprune.options import SHARES, ExportOptions
from layerprune.tasks import load_task
from layerprune.validate import forecast

UNIT = LayerCosts(fixed_s=0.0, layer_s=1.0, measured="by hand")


@pytest.fixture(scope="module")
def run_dir(tiny_models, tmp_path_factory) -> Path:
    """A tiny BERT (4 layers) analyzed on 24 labelled sentences, its train split the same file."""
    root = tmp_path_factory.mktemp("cost")
    rows = [(t, l) for t, l in SENTENCES] + [(f"honestly, {t}", l) for t, l in SENTENCES]
    (root / "reviews.csv").write_text("text,label\n" + "\n".join(f'"{t}",{l}' for t, l in rows) + "\n")
    task = task_from_files(root / "reviews.csv", "text", "label", train_file=root / "reviews.csv")
    analyze(str(tiny_models["bert"]), task, root / "run", AnalyzeOptions(device="cpu", batch_size=8))
    return root / "run"


def test_text_cost_by_hand() -> None:
    costs = LayerCosts(fixed_s=2.0, layer_s=1.0, measured="by hand")  # the full original of 6 layers: 2 + 6 = 8
    assert cost.text_cost(costs, 6, 6, 0.3, 5) == 1.0, "at full depth nothing is sent on"
    assert cost.text_cost(costs, 6, 4, 0.0, 3) == pytest.approx(6 / 8)
    assert cost.text_cost(costs, 6, 4, 0.2, 3) == pytest.approx((6 + 0.2 * 3) / 8), "continues: layers 4..6"
    assert cost.text_cost(costs, 6, 4, 0.2, None) == pytest.approx((6 + 0.2 * 8) / 8), "restarts: all of it again"


def test_measure_splits_fixed_and_layer_work(monkeypatch) -> None:
    """A clock that advances as a model of known fixed and per-layer work would: depth d costs 3 + 2 d a text."""
    clock = [0.0]

    def predict(model, tokenizer, examples, batch_size, max_length):
        clock[0] += len(examples) * (3.0 + 2.0 * model.config.num_hidden_layers)

    class Config:
        def __init__(self, layers):
            self.num_hidden_layers = layers

    class Model:
        def __init__(self, layers=6):
            self.config = Config(layers)

    monkeypatch.setattr(cost, "predict_logits", predict)
    monkeypatch.setattr(cost, "total_layers", lambda config: config.num_hidden_layers)
    monkeypatch.setattr(cost, "truncate", lambda model, depth: Model(depth))
    monkeypatch.setattr(cost.time, "process_time", lambda: clock[0])
    examples = Examples(texts=["a"] * 300, pairs=None, labels=np.zeros(300, dtype=np.int64))
    measured = cost.measure(Model(), None, examples, 128, 32)
    assert (measured.fixed_s, measured.layer_s) == (pytest.approx(3.0), pytest.approx(2.0))
    assert f"{cost.TEXTS} calibration texts" in measured.measured


def _forecast(passes: bool) -> GateForecast:
    return GateForecast(delta=0.0, delta_sd=0.0, alpha=0.01, lower_bound=0.0 if passes else -1.0, disagreement=None,
                        disagreement_upper=None, n_agreement=0, passes=passes)


def _walk(passing: set[tuple[int, float]], costs: LayerCosts, heal: str, boundary: int = 3,
          keep_layers="auto", forecast_at=None, min_agreement: float | None = None) -> tuple[int, float, list[int]]:
    """auto's walk over a 4-layer model whose forecast passes exactly at `passing` (depth, share), or is
    `forecast_at(depth, share, alpha)`, and the (depth, share) it keeps (export._walk's two steps)."""
    depths = Depths.__new__(Depths)  # the walk's bookkeeping only: no model, no texts
    depths.opts = ExportOptions(fallback="auto", min_agreement=min_agreement)
    depths.costs, depths.total, depths.heal_mode = costs, 4, heal
    depths.scores, depths.alive, depths.probed = {}, {}, []
    forecast_at = forecast_at or (lambda depth, share, alpha: _forecast((depth, share) in passing or depth == 4))

    def score(depth, alpha):
        return DepthScore(depth=depth, metric=0.0, shares=[
            ShareScore(share=s, forecast=forecast_at(depth, s, alpha), cost=depths.cost(depth, s)) for s in SHARES])

    depths._score = score
    depth = choose_depth(depths.passes, boundary, 4, keep_layers, 0.01)
    probed = list(depths.probed)
    return (*depths.cheapest(probed, depth), probed)


def test_the_cheaper_of_two_certified_configurations_is_kept() -> None:
    """Two configurations pass: 3 layers alone, and 1 layer with 30% sent on. By hand, with a fixed part f and
    layers of 1, restarting the original: 3 layers cost f + 3, 1 layer with 30% restarted f + 1 + 0.3 (f + 4) =
    1.3 f + 2.2. At f = 0 the second is cheaper (2.2 < 3); at f = 10 the first (13 < 15.2)."""
    passing = {(3, 0.0), (3, 0.3), (2, 0.3), (1, 0.3)}  # the 30% share walks down to 1; share 0 stops at 3
    cheap_fixed = LayerCosts(fixed_s=0.0, layer_s=1.0, measured="by hand")
    dear_fixed = LayerCosts(fixed_s=10.0, layer_s=1.0, measured="by hand")
    assert _walk(passing, cheap_fixed, "none") == (1, 0.3, [3, 2, 1])
    assert _walk(passing, dear_fixed, "none") == (3, 0.0, [3, 2, 1])
    # the top-layer heal continues from the layer below the cut: 2 layers with 30% continued through layers 2..4
    # cost f + 2 + 0.3 * 3 = 12.9 < 13 at f = 10; 1 layer shares none with the original, so it restarts (15.2)
    assert _walk(passing, dear_fixed, "top")[:2] == (2, 0.3)


def test_a_share_counts_only_where_it_passed_at_every_depth_above() -> None:
    """Each share walks down as a fixed share does: 10% passes at 2 but failed at 3, so (2, 0.1), the cheapest
    that passes, is not kept; the walk stops where no share's walk goes on."""
    passing = {(3, 0.2), (2, 0.1), (2, 0.2)}
    assert _walk(passing, UNIT, "none") == (2, 0.2, [3, 2, 1])
    assert _walk({(3, 0.2), (2, 0.1)}, UNIT, "none") == (3, 0.2, [3, 2])
    assert _walk(set(), UNIT, "none") == (4, 0.0, [3, 4]), "nothing passes below: up to the full model"


def _agreement_lower(agree: int, n: int) -> float:
    """The reference: the one-sided 95% Wilson lower bound of a share agree/n, scipy's two-sided 90% interval."""
    return float(binomtest(agree, n).proportion_ci(confidence_level=0.90, method="wilson").low)


def test_min_agreement_keeps_a_cut_whose_agreement_bound_clears_it() -> None:
    """Synthetic calibration logits on 1,000 texts, labelled as the original answers: a cut differs from it on
    `differ` of them. The gate's forecast (tolerance 5 points) passes every cut that differs on 6 or fewer, so
    without --min-agreement auto keeps 2 layers with 10% sent on (6 differ), the cheapest. Its agreement's one-sided
    95% lower bound, by Wilson's formula (scipy), is under 99%: with --min-agreement 0.99 auto keeps 2 layers with
    20% sent on (3 differ), the cheapest whose bound clears it."""
    n, alpha = 1000, 0.01
    differ = {(3, 0.0): 60, (3, 0.1): 6, (3, 0.2): 1, (3, 0.3): 0,
              (2, 0.0): 60, (2, 0.1): 6, (2, 0.2): 3, (2, 0.3): 1}
    assert [_agreement_lower(n - k, n) >= 0.99 for k in (6, 3, 2, 1, 0)] == [False, True, True, True, True]
    original = np.random.default_rng(0).normal(size=(n, 2))
    labels, task, made = original.argmax(axis=1), load_task("rt-polarity"), {}

    def forecast_at(depth: int, share: float, at: float) -> GateForecast:
        k = 0 if depth == 4 else differ.get((depth, share), n // 2)
        if (k, at) not in made:  # the first k texts answered the other way
            made[k, at] = forecast(task, labels, original, np.vstack([original[:k, ::-1], original[k:]]), 0.05, n,
                                   alpha=at)
        return made[k, at]

    assert forecast_at(3, 0.1, alpha).passes and forecast_at(2, 0.1, alpha).passes
    assert not forecast_at(3, 0.0, alpha).passes
    assert _walk(set(), UNIT, "none", forecast_at=forecast_at) == (2, 0.1, [3, 2, 1]), "no constraint: the cheapest"
    assert _walk(set(), UNIT, "none", forecast_at=forecast_at, min_agreement=0.99) == (2, 0.2, [3, 2, 1])
    # at 99.6% only a cut that differs on none clears it: 3 layers with 30% sent on, where the walk stops
    assert _agreement_lower(n - 1, n) < 0.996 <= _agreement_lower(n, n)
    assert _walk(set(), UNIT, "none", forecast_at=forecast_at, min_agreement=0.996) == (3, 0.3, [3, 2])


def test_int8_walks_the_depths_the_walk_passed_and_the_cheapest_is_kept(monkeypatch, tmp_path: Path) -> None:
    """With --fallback auto the int8 variants walk the depths the fp32 walk passed, from the boundary down (3, then
    2), each (variant, share) a fixed sequence of its own: scored at 2 only where it passed at 3, each step at the
    variant's error rate. By hand, 4 layers of cost 1 and no fixed part, a text sent on continuing from the layer
    below the cut, int8 at half fp32's CPU time a text: int8 at 3 with 10% sent on costs (3 + 0.1 * 2) / 4 * 0.5 =
    0.4, fp32 at the walk's (2, 10%) (2 + 0.1 * 3) / 4 = 0.575; int8 at 2 fails. int8 at 3 is kept, a layer above
    the walk's depth, and its graph is the one in that depth's folder."""
    passes = {("int8", 3, 0.1), ("int8", 3, 0.2), ("fp32", 2, 0.1)}  # int8-faithful fails at every share at 3
    speed = {"int8": 0.5, "int8-faithful": 0.6, "fp32": 1.0}  # CPU seconds a text
    scored: list[tuple[str, int, tuple[float, ...], float]] = []

    def row(label, depth, share, folder):
        c = ExportCandidate(name=label, depth=depth, metric=0.0, forecast=_forecast((label, depth, share) in passes),
                            sentences_per_s=1.0, share=share)
        return candidates._Scored(label, c, np.zeros((1, 2)), folder, speed[label])

    def int8(label, graphs, folder, heal, task, texts, parts, max_length, opts, alpha, cpu, shares):
        folder.mkdir()
        (folder / MODEL_FILE).write_text(f"{label} at {graphs.depth}")
        scored.append((label, graphs.depth, shares, alpha))
        return [row(label, graphs.depth, s, folder) for s in shares]

    def fp32(name, depth, folder, task, texts, parts, max_length, opts, alpha, second=None, shares=None):
        scored.append((name, depth, (opts.fallback,), alpha))
        r = row(name, depth, opts.fallback, None)
        return [(r.candidate, r.calibration, r.cpu_s)]

    def make(depth):
        folder = tmp_path / f"layers-{depth}"
        folder.mkdir(exist_ok=True)
        (folder / MODEL_FILE).write_text(f"fp32 at {depth}")
        return candidates.DepthGraphs(depth, folder, folder, None)

    monkeypatch.setattr(candidates, "_int8", int8)
    monkeypatch.setattr(candidates, "score_candidate", fp32)
    monkeypatch.setattr(candidates, "OnnxClassifier", lambda folder, max_length: folder)
    monkeypatch.setattr(candidates, "_own_logits", lambda runner, parts, batch_size: (None, speed["fp32"], 1.0))
    budget = error_budget(ExportOptions(quantize="int8", fallback="auto"))
    walked = ExportOptions(quantize="int8", fallback=0.1)
    picked = candidates.pick_candidate([3, 2], 2, make, "heal texts", None, None, None, 128, walked, budget, "avx512",
                                       tmp_path, shares=SHARES, cost=lambda d, s: (d + s * (4 - (d - 1))) / 4)
    v = budget.per_variant
    assert scored == [("int8", 3, SHARES, v), ("int8-faithful", 3, SHARES, v), ("int8", 2, (0.1, 0.2), v),
                      ("fp32", 2, (0.1,), budget.depth)]
    chosen = [c for c in picked.candidates if c.chosen]
    assert [(c.name, c.depth, c.share) for c in chosen] == [("int8", 3, 0.1)] and picked.kept == "int8"
    assert chosen[0].cost == pytest.approx((3 + 0.1 * 2) / 4 * 0.5)
    assert next(c.cost for c in picked.candidates if c.name == "fp32") == pytest.approx((2 + 0.1 * 3) / 4)
    assert picked.graphs.depth == 3 and (picked.graphs.folder / MODEL_FILE).read_text() == "int8 at 3"


def test_auto_shares_the_error_budget_over_its_shares() -> None:
    auto = error_budget(ExportOptions(alpha=0.05, quantize="int8", fallback="auto"))
    assert auto.depth == pytest.approx(0.05 / 2 / len(SHARES))
    assert auto.per_variant == pytest.approx(0.05 / 2 / 2 / len(SHARES))
    assert error_budget(ExportOptions(alpha=0.05, fallback=0.2)).depth == 0.05


def test_cli_fallback_auto_end_to_end(run_dir: Path, tmp_path: Path, capsys) -> None:
    """--fallback auto --quantize int8 at depth 2 with the top-layer heal: every (candidate, share) is costed, the
    bundle keeps the cheapest that passes (its cost: the fp32 pair's by hand, scaled by its speed), validates, and
    holds a second graph exactly when it sends texts on."""
    out = tmp_path / "auto"
    code = main(["export", str(run_dir), "--keep-layers", "2", "--heal", "top", "--fallback", "auto", "--quantize",
                 "int8", "--tolerance", "0.5", "--augment", "0", "--batch-size", "8", "--out", str(out),
                 "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "fallback auto:" in printed and "| sent on 30% |" in printed and "| cost a text |" in printed
    report = load_artifact(DepthReport, out / "depth.json")
    assert report.shares == list(SHARES) and report.costs is not None
    int8 = report.candidates[0].name
    assert {(c.name, c.share) for c in report.candidates} >= {(int8, s) for s in SHARES}
    costs, fp32 = report.costs, report.candidates[-1]
    unit = costs.fixed_s + 4 * costs.layer_s
    assert fp32.cost == pytest.approx((costs.fixed_s + 2 * costs.layer_s + fp32.share * 3 * costs.layer_s) / unit,
                                      abs=1e-3), "fp32 at the walk's share: 2 layers, and layers 2..4 for those sent on"
    chosen = next(c for c in report.candidates if c.chosen)
    assert chosen.cost == min(c.cost for c in report.candidates if c.forecast.passes)
    manifest = verify_bundle(out)
    outputs = [o.name for o in onnx.load(str(out / "model.onnx")).graph.output]
    if chosen.share:
        assert manifest.fallback.share == chosen.share and manifest.parts.continuation == "continuation.onnx"
        assert outputs == ["logits", "hidden_states"]
    else:
        assert manifest.fallback is None and manifest.parts.continuation is None and outputs == ["logits"]
    assert main(["validate", str(out), "--device", "cpu"]) == 0


def test_cli_auto_depth_scores_int8_at_each_depth_the_walk_passed(run_dir: Path, tmp_path: Path, capsys) -> None:
    """--keep-layers auto --fallback auto --quantize int8 (tolerance 50 points: every depth passes): the int8
    candidates are scored at the depths the walk passed, from the boundary down, and the bundle keeps the
    cheapest that passes, at its own depth: its graph (counted in onnx's node names, as optimum exports them) and
    the truncated checkpoint (transformers' config) have that many layers."""
    out = tmp_path / "depths"
    assert main(["export", str(run_dir), "--heal", "top", "--fallback", "auto", "--quantize", "int8", "--tolerance",
                 "0.5", "--augment", "0", "--batch-size", "8", "--out", str(out), "--device", "cpu"]) == 0
    report = load_artifact(DepthReport, out / "depth.json")
    walked = [d for d in report.probed if d < report.total_layers]
    assert len(walked) >= 2, f"the walk passed at one depth only: {report.probed}"
    int8 = [c for c in report.candidates if c.name != "fp32"]
    assert [c.depth for c in int8] == sorted((c.depth for c in int8), reverse=True)
    assert {c.depth for c in int8} <= set(walked) and int8[0].depth == walked[0]
    assert ("| export candidate | layers |" in capsys.readouterr().out) == (len({c.depth for c in int8}) > 1)
    fp32, walk = report.candidates[-1], [s for score in report.scores if score.depth in walked for s in score.shares]
    assert fp32.name == "fp32" and fp32.cost == pytest.approx(min(s.cost for s in walk if s.forecast.passes), abs=1e-3)
    chosen = next(c for c in report.candidates if c.chosen)
    assert chosen.cost == min(c.cost for c in report.candidates if c.forecast.passes)
    assert report.depth == chosen.depth == verify_bundle(out).depth
    names = [n.name for n in onnx.load(str(out / "model.onnx")).graph.node]
    layers = {int(m.group(1)) for m in map(re.compile(r"/layer\.(\d+)/").search, names) if m}
    assert layers == set(range(chosen.depth))
    assert AutoConfig.from_pretrained(run_dir / "truncated").num_hidden_layers == chosen.depth


def test_cli_min_agreement_keeps_only_candidates_whose_bound_clears_it(run_dir: Path, tmp_path: Path, capsys) -> None:
    """On 24 calibration texts no candidate's agreement can be bounded above 99% (Wilson, scipy: under 90% even
    where none differ), so with --min-agreement 0.99 the fp32 candidate, the walk's, is kept though the int8
    ones pass the gate's forecast (tolerance 50 points), and the note says what was ruled out."""
    out = tmp_path / "least"
    code = main(["export", str(run_dir), "--keep-layers", "2", "--heal", "top", "--fallback", "auto", "--quantize",
                 "int8", "--tolerance", "0.5", "--augment", "0", "--batch-size", "8", "--min-agreement", "0.99",
                 "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = load_artifact(DepthReport, out / "depth.json")
    assert report.min_agreement == 0.99
    f = report.candidates[0].forecast
    best = _agreement_lower(f.n_agreement, f.n_agreement)  # the bound where none differ
    assert f.agreement_lower <= best + 1e-9 and best < 0.99
    assert any(c.forecast.passes for c in report.candidates if c.name != "fp32"), "the gate alone allowed int8"
    assert [c.name for c in report.candidates if c.chosen] == ["fp32"]
    assert "--min-agreement 0.99 ruled out" in report.note and "agreement < 0.99" in printed
    assert verify_bundle(out).quantize is None


def test_fallback_zero_is_one_graph(run_dir: Path, tmp_path: Path) -> None:
    from layerprune.export import export_bundle

    out = tmp_path / "zero"
    result = export_bundle(run_dir, out, ExportOptions(keep_layers=2, heal="top", fallback=0.0, device="cpu",
                                                       batch_size=8, augment=0))
    manifest = verify_bundle(out)
    assert manifest.fallback is None and manifest.parts.continuation is None and manifest.parts.original is None
    assert [o.name for o in onnx.load(str(out / "model.onnx")).graph.output] == ["logits"]
    assert result.depth.costs is None and result.depth.shares == [0.0]


@pytest.mark.parametrize("value,message", [("-1", "a share of texts in [0, 1)"), ("abc", "--fallback")])
def test_cli_bad_fallback(run_dir: Path, tmp_path: Path, capsys, value, message) -> None:
    try:
        code = main(["export", str(run_dir), "--out", str(tmp_path / "x"), "--fallback", value])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
