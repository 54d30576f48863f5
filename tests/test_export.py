"""export + validate: truncate -> ONNX bundle -> validation, on tiny models; the bundle as a contract."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SENTENCES, SERVE_MODEL, TINY_LAYERS, make_tiny_classifier, reseal
from layerprune.analyze import AnalyzeOptions, analyze
from layerprune.artifacts import AnalysisReport, DepthReport, Manifest, ValidationReport, load_artifact
from layerprune.depth_search import choose_depth, error_budget
from layerprune.export import ExportOptions, Reuse, export_bundle
from layerprune.bundle import BundleError, servable_bundle, verify_bundle
from layerprune.cli import main
from layerprune.data import task_from_files
from layerprune.errors import LayerpruneError
from layerprune.heal import TopOptions, WholeOptions
from layerprune.heal.texts import heal_texts, with_augmented
from layerprune.tasks import TaskConfig
from layerprune.validate import calibration_and_holdout, certifiable_disagreement, compare, forecast, validate_bundle

FAST = dict(device="cpu", batch_size=8, augment=0)  # augment: tests below that ask for it


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    """24 labelled sentences (the 12 shared ones, twice with a twist), enough to cut in halves."""
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    rows = [(t, l) for t, l in SENTENCES] + [(f"honestly, {t}", l) for t, l in SENTENCES]
    path.write_text("text,label\n" + "\n".join(f'"{t}",{l}' for t, l in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def run_dir(tiny_models, reviews, tmp_path_factory) -> Path:
    task = task_from_files(reviews, "text", "label", train_file=reviews)
    run = tmp_path_factory.mktemp("runs") / "run"
    analyze(str(tiny_models["bert"]), task, run, AnalyzeOptions(device="cpu", batch_size=8))
    return run


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "b2"
    export_bundle(run_dir, out, ExportOptions(keep_layers=2, heal="none", **FAST))
    return out


def test_bundle_layout_and_hashes(bundle: Path) -> None:
    for name in ["model.onnx", "config.json", "tokenizer.json", "manifest.json", "validation.json",
                 "depth.json", "depth.png", "analysis.json", "cka.png"]:
        assert (bundle / name).is_file(), name
    manifest = verify_bundle(bundle)
    assert manifest.depth == 2 and manifest.total_layers == TINY_LAYERS
    assert set(manifest.files) >= {"model.onnx", "validation.json", "config.json", "tokenizer.json"}
    assert "manifest.json" not in manifest.files
    config = json.loads((bundle / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert config["id2label"] == {"0": "negative", "1": "positive"}, "labels named from the task"


def test_truncated_checkpoint_saved_in_run_dir(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    from layerprune.models import load_classifier

    run = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("truncated", "bundle"))
    result = export_bundle(run, None, ExportOptions(keep_layers=3, heal="none", **FAST))
    assert result.bundle == run / "bundle" and result.truncated_checkpoint == run / "truncated"
    model, _ = load_classifier(run / "truncated", num_labels=2)
    assert model.config.num_hidden_layers == 3
    assert not any(p.suffix == ".safetensors" for p in result.bundle.rglob("*")), "the bundle holds what is served"


def test_fp32_parity_and_validation(bundle: Path) -> None:
    report = load_artifact(ValidationReport, bundle / "validation.json")
    assert report.max_abs_logit_diff_fp32 is not None and report.max_abs_logit_diff_fp32 <= 1e-4
    assert report.n_examples == 12 and "holdout" in report.holdout
    assert report.delta_ci95[0] <= report.delta <= report.delta_ci95[1]
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    assert report.max_length == manifest.max_length == 160, "the tiny models' limit: 160 positions"
    # The numbers against an independent reference: scikit-learn's accuracy of the served ONNX model and of
    # the original checkpoint run by transformers, on the same holdout examples.
    import torch
    from sklearn.metrics import accuracy_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from layerprune.runtime import OnnxClassifier

    analysis = load_artifact(AnalysisReport, bundle / "analysis.json")
    holdout = calibration_and_holdout(analysis.task_config, None, report.n_examples).holdout
    served = OnnxClassifier(bundle, max_length=manifest.max_length).logits(holdout.texts)
    tokenizer = AutoTokenizer.from_pretrained(analysis.model)
    original = AutoModelForSequenceClassification.from_pretrained(analysis.model).eval()
    with torch.no_grad():
        logits = original(**tokenizer(holdout.texts, padding=True, return_tensors="pt")).logits.numpy()
    bundle_acc, original_acc = (accuracy_score(holdout.labels, x.argmax(-1)) for x in (served, logits))
    assert report.bundle == pytest.approx(bundle_acc) and report.original == pytest.approx(original_acc)
    assert report.passed == manifest.servable == (bundle_acc - original_acc >= -report.tolerance)


def test_full_depth_bundle_equals_original(run_dir: Path, tmp_path: Path) -> None:
    result = export_bundle(run_dir, tmp_path / "full", ExportOptions(keep_layers=TINY_LAYERS, heal="none", fallback=0.1,
                                                                    **FAST))
    v = result.validation
    assert v.delta == 0.0 and v.agreement == 1.0 and v.passed
    assert validate_bundle(tmp_path / "full", device="cpu").passed
    assert result.manifest.fallback is None and not (tmp_path / "full" / "original.onnx").exists(), (
        "at full depth there is nothing to fall back to")


def test_validate_recomputes_the_same_numbers(bundle: Path) -> None:
    stored = load_artifact(ValidationReport, bundle / "validation.json")
    again = validate_bundle(bundle, device="cpu")
    assert again.original == pytest.approx(stored.original)
    assert again.bundle == pytest.approx(stored.bundle)


def test_tampered_and_missing_files_are_named(bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="model.onnx does not match"):
        verify_bundle(copy)
    shutil.copytree(bundle, tmp_path / "missing")
    (tmp_path / "missing" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json is missing"):
        verify_bundle(tmp_path / "missing")
    # A hand-edited validation.json that claims a pass is caught by its hash.
    shutil.copytree(bundle, tmp_path / "edited")
    path = tmp_path / "edited" / "validation.json"
    path.write_text(path.read_text().replace('"passed": false', '"passed": true') + " ")
    with pytest.raises(BundleError, match="validation.json does not match"):
        servable_bundle(tmp_path / "edited")


def test_failing_bundle_is_written_but_not_servable(run_dir: Path, tmp_path: Path) -> None:
    # A negative tolerance demands an improvement no truncation gives on the same head: it must fail.
    result = export_bundle(run_dir, tmp_path / "fail", ExportOptions(keep_layers=TINY_LAYERS, heal="none",
                                                                     tolerance=-0.5, **FAST))
    assert not result.validation.passed and not result.manifest.servable
    with pytest.raises(BundleError, match="failed validation"):
        servable_bundle(tmp_path / "fail")
    manifest, _ = servable_bundle(tmp_path / "fail", allow_unvalidated=True)
    assert manifest.depth == TINY_LAYERS
    assert result.next_candidate is None and result.advice is None, "nothing is left after the full fp32 model"
    shallow = export_bundle(run_dir, tmp_path / "fail2", ExportOptions(keep_layers=2, heal="none", tolerance=-0.5, **FAST))
    assert shallow.advice == "next candidate: --keep-layers 3" and shallow.next_candidate.keep_layers == 3


def test_sweep_leaves_what_auto_probed_alone(run_dir: Path, tmp_path: Path) -> None:
    plain = export_bundle(run_dir, tmp_path / "plain", ExportOptions(heal="head", **FAST)).depth
    swept = export_bundle(run_dir, tmp_path / "swept", ExportOptions(heal="head", sweep=True, **FAST)).depth
    assert swept.probed == plain.probed and swept.depth == plain.depth
    assert len(plain.probed) < TINY_LAYERS, "else --sweep adds nothing to tell apart"
    assert sum(s.forecast is not None for s in swept.scores) == TINY_LAYERS


def test_auto_with_heal_records_depths(run_dir: Path, tmp_path: Path) -> None:
    result = export_bundle(run_dir, tmp_path / "auto", ExportOptions(heal="head", sweep=True, **FAST))
    report = load_artifact(DepthReport, tmp_path / "auto" / "depth.json")
    assert report == result.depth and report.search == "auto" and report.heal == "head"
    assert [s.depth for s in report.scores] == list(range(1, TINY_LAYERS + 1))
    assert all(s.metric_healed is not None for s in report.scores[:-1]), "--sweep heals every depth"
    assert report.probed[0] == report.boundary
    assert report.n_heal == 24 and report.heal_labelled and report.n_agreement == 0, "24 train texts, all used to heal"
    chosen = next(s for s in report.scores if s.depth == report.depth)
    assert chosen.forecast.passes, "auto keeps a depth whose gate forecast passes (the full model always does)"
    below = next((s for s in report.scores if s.depth == report.depth - 1), None)
    assert below is None or not below.forecast.passes, "and the depth below it does not"


def test_train_texts_heal_but_never_bound_agreement(run_dir: Path, tmp_path: Path) -> None:
    """Train texts beyond the heal texts are not agreement texts: the original was fine-tuned on them, so
    agreement there says too little about new texts. The forecast counts only the calibration examples."""
    result = export_bundle(run_dir, tmp_path / "h", ExportOptions(keep_layers=2, heal="head", heal_examples=12, **FAST))
    depth = result.depth
    assert depth.n_heal == 12 and depth.n_agreement == 0
    assert depth.scores[1].forecast.n_agreement == depth.n_calibration


def test_top_heal_with_unlabeled_texts(run_dir: Path, tmp_path: Path) -> None:
    texts = tmp_path / "in-domain.jsonl"
    texts.write_text("".join(f'{{"review": "{t}, {w}"}}\n' for t, _ in SENTENCES for w in ("truly", "sadly", "so")))
    opts = ExportOptions(keep_layers=2, heal="top", heal_data=texts, heal_text_field="review", heal_examples=24,
                         top=TopOptions(heal_layers=2, lr=1e-2), **FAST)
    result = export_bundle(run_dir, tmp_path / "d", opts)
    depth = result.depth
    assert depth.heal == "top" and not depth.heal_labelled and depth.n_heal == 24 and depth.n_agreement == 12
    assert [run.depth for run in depth.heal_runs] == [2] and depth.heal_runs[0].n_train == 24
    assert depth.scores[1].metric_healed is not None and result.manifest.heal == "top"
    from layerprune.models import layer_list, load_classifier

    analysis = load_artifact(AnalysisReport, run_dir / "analysis.json")
    original, _ = load_classifier(analysis.model, device="cpu")
    healed, _ = load_classifier(result.truncated_checkpoint, device="cpu")
    changed = [not all(a.equal(b) for a, b in zip(layer_list(original)[i].parameters(), layer_list(healed)[i].parameters()))
               for i in range(2)]
    assert changed == [True, True], "--heal-layers 2 re-tunes both kept layers"
    with pytest.raises(LayerpruneError, match="--heal head needs labelled texts"):
        export_bundle(run_dir, tmp_path / "h", ExportOptions(keep_layers=2, heal="head", heal_data=texts,
                                                             heal_text_field="review", **FAST))
    assert not (tmp_path / "h").exists()


def test_auto_top_heal_trains_every_depth_from_the_one_pass(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The top-layer heals of the auto walk read their inputs from the original's one pass over the texts, not
    from a second run of its lower layers: the first depths always, those further down where memory allows
    (here it does). With the boundary at the full depth, the walk heals depths 3, 2, 1 of 4, whose inputs
    are the original's hidden states 2, 1, 0, as transformers gives them."""
    import shutil

    import torch
    import layerprune.heal.top as top
    from layerprune.models import load_classifier

    run = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("truncated", "bundle"))
    analysis = load_artifact(AnalysisReport, run / "analysis.json")
    analysis.model_copy(update={"boundary": TINY_LAYERS}).save(run / "analysis.json")
    calls = []  # (depth's input index, was it kept by the one pass, the texts)

    def recording(model, texts, index, **kwargs):
        calls.append((index, index in texts.tokens, texts))
        return token_states(model, texts, index, **kwargs)

    token_states = top.token_states
    monkeypatch.setattr(top, "token_states", recording)
    result = export_bundle(run, tmp_path / "a", ExportOptions(heal="top", **FAST))
    assert result.depth.probed == [4, 3, 2, 1], "the walk went down from the full depth"
    assert {index for index, *_ in calls} == {2, 1, 0}
    assert all(kept for _, kept, _ in calls), "a depth ran the original's lower layers again"
    original, tokenizer = load_classifier(analysis.model, device="cpu")
    texts = calls[0][2]
    with torch.inference_mode():
        reference = original(**texts.batches[0].encoding, output_hidden_states=True).hidden_states
    for index in (2, 1):
        torch.testing.assert_close(texts.tokens[index][0].float(), reference[index], atol=2e-3, rtol=2e-3)


def test_agreement_texts_never_overlap_heal_texts(run_dir: Path, tmp_path: Path) -> None:
    """--heal-data: the heal texts and their augmented copies come from the first part of the file, the
    agreement texts from the rest, and no agreement text is a heal text or a copy made from one; the train
    split never bounds agreement. The whole-model heal (the default) trains on all of them."""
    texts = tmp_path / "in-domain.jsonl"
    rows = [f"{t}, {w}" for t, _ in SENTENCES for w in ("truly", "sadly", "so", "oddly")]
    texts.write_text("".join(f'{{"review": "{r}"}}\n' for r in rows))
    opts = ExportOptions(keep_layers=2, heal_data=texts, heal_text_field="review", agreement_examples=16,
                         **{**FAST, "augment": 2})
    task = load_artifact(AnalysisReport, run_dir / "analysis.json").task_config
    plain = heal_texts(task, None, opts)
    assert plain.examples.texts == rows[:32] and plain.agreement.texts == rows[32:], "the file's order, cut once"
    healing = with_augmented(plain, task, opts)
    assert len(healing.examples) == 3 * 32 and healing.labels is None
    assert not set(healing.examples.texts) & set(healing.agreement.texts), "an agreement text was healed on"
    agreement_words = {w for t in plain.agreement.texts for w in t.split()} - {w for t in rows[:32] for w in t.split()}
    assert not any(set(t.split()) & agreement_words for t in healing.examples.texts), "augmentation saw the rest"
    train = heal_texts(task, None, ExportOptions(**FAST))
    assert train.agreement is None and train.labels is not None, "train texts heal, never bound agreement"
    from layerprune.heal import augment_texts

    reseeded = with_augmented(plain, task, dataclasses.replace(opts, augment_seed=1, whole=WholeOptions(seed=5)))
    assert reseeded.examples.texts[32:] == augment_texts(plain.examples, 2, seed=1).texts != healing.examples.texts[32:]
    unmoved = with_augmented(plain, task, dataclasses.replace(opts, whole=WholeOptions(seed=5), top=TopOptions(seed=5)))
    assert unmoved.examples.texts == healing.examples.texts, "the augmentation has its own seed, not a heal's"

    result = export_bundle(run_dir, tmp_path / "w", dataclasses.replace(opts, heal="whole", whole=WholeOptions(epochs=1)))
    depth = result.depth
    assert depth.heal == "whole" == result.manifest.heal and not depth.heal_labelled
    assert depth.n_heal == 96 and depth.n_agreement == 16 and depth.heal_runs[0].heal == "whole"
    assert depth.scores[1].forecast.n_agreement == depth.n_calibration + 16


def test_an_export_reusing_another_is_the_export_of_its_own_resample(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Exports sharing a Reuse across resamples of calibration and holdout (bench_auto): the later one trains
    no heal and encodes no heal text, and its depths, forecasts and validation are those of a fresh export of
    that resample. The original stays whole, so a reused heal can still run its lower layers."""
    import layerprune.depth_search as search
    import layerprune.export as export
    from layerprune.models import layer_list

    opts = ExportOptions(heal="top", top=TopOptions(lr=1e-2), **FAST)
    reuse = Reuse()
    export_bundle(run_dir, tmp_path / "first", opts, reuse)
    assert reuse.heals and all(len(layer_list(h.original)) == TINY_LAYERS for h in reuse.heals.values())

    trained, encoded = [], []
    heal_at, encode_texts = search.heal_at, export.encode_texts
    monkeypatch.setattr(search, "heal_at", lambda *a, **k: trained.append(a[2]) or heal_at(*a, **k))
    monkeypatch.setattr(export, "encode_texts", lambda *a, **k: encoded.append(k["desc"]) or encode_texts(*a, **k))
    resampled = dataclasses.replace(opts, resample_seed=1)
    reused = export_bundle(run_dir, tmp_path / "reused", resampled, reuse)
    assert trained == [] and encoded == ["original, calibration"], "the second export healed or encoded again"
    fresh = export_bundle(run_dir, tmp_path / "fresh", resampled)
    assert trained and "original, heal texts" in encoded, "a fresh export heals and encodes"

    assert reused.depth.depth == fresh.depth.depth and reused.depth.probed == fresh.depth.probed
    for a, b in zip(reused.depth.scores, fresh.depth.scores):
        assert (a.forecast is None) == (b.forecast is None) and a.metric_healed == pytest.approx(b.metric_healed)
        if a.forecast is not None:
            assert a.forecast.lower_bound == pytest.approx(b.forecast.lower_bound, abs=1e-6)
    keys = ("n_examples", "original", "bundle", "delta", "agreement", "passed")
    assert [getattr(reused.validation, k) for k in keys] == pytest.approx([getattr(fresh.validation, k) for k in keys])


def test_a_reuse_starts_over_for_other_heal_inputs(run_dir: Path, tmp_path: Path) -> None:
    """What chooses and checks the cut (resample, tolerance, int8, depth) keeps a Reuse's work; anything a heal
    learns from (its options, the texts, another analysis) empties it."""
    opts = ExportOptions(heal="top", **FAST)
    reuse = Reuse().matching(run_dir, opts)
    reuse.heals[2] = "a heal"
    for same in (dict(resample_seed=3), dict(tolerance=0.02, quantize="int8"), dict(keep_layers=2, sweep=True)):
        assert reuse.matching(run_dir, dataclasses.replace(opts, **same)).heals == {2: "a heal"}, same
    assert reuse.matching(tmp_path, opts).heals == {}, "another run directory"
    for other in (dict(top=TopOptions(lr=1e-2)), dict(augment=1), dict(top=TopOptions(heal_layers=2)), dict(max_length=16)):
        reuse.matching(run_dir, opts).heals[2] = "a heal"
        assert reuse.matching(run_dir, dataclasses.replace(opts, **other)).heals == {}, other


def test_calibration_and_holdout_are_disjoint(reviews: Path) -> None:
    task = task_from_files(reviews, "text", "label")
    parts = calibration_and_holdout(task, None, None)
    assert len(parts.calibration) == len(parts.holdout) == 12
    assert not set(zip(parts.calibration.texts)) & set(zip(parts.holdout.texts))
    again = calibration_and_holdout(task, None, None)
    assert again.calibration.texts == parts.calibration.texts, "the halves are fixed"
    capped = calibration_and_holdout(task, None, 5)
    assert capped.holdout.texts == parts.holdout.texts[:5]


def test_calibration_and_holdout_use_a_separate_test_split(tmp_path: Path, reviews: Path) -> None:
    from layerprune.tasks import load_task

    yaml = tmp_path / "mine.yaml"
    yaml.write_text(f"""name: mine
description: local data with a test split
source: {{kind: file, files: {{validation: {reviews}, test: {reviews}, train: {reviews}}}}}
text_field: text
label_field: label
label_names: [negative, positive]
metric: accuracy
""")
    parts = calibration_and_holdout(load_task(str(yaml)), None, None)
    assert parts.holdout_name == "test split" and len(parts.holdout) == 24


@pytest.mark.parametrize("boundary,passing,expected,probed", [
    (4, {3, 4, 5, 6}, 3, [4, 3, 2]),  # passes at 4: go down while it passes
    (4, {5, 6}, 5, [4, 5]),  # fails at 4: go up until it passes
    (4, {6}, 6, [4, 5, 6]),  # nothing passes below the full model, which is scored too
    (1, {1, 2, 3, 4, 5, 6}, 1, [1]),
    (6, {6}, 6, [6, 5]),
])
def test_auto_search(boundary, passing, expected, probed) -> None:
    seen, alphas = [], {}

    def passes(depth: int, alpha: float) -> bool:
        seen.append(depth)
        alphas.setdefault(depth, alpha)
        return depth in passing

    assert choose_depth(passes, boundary, 6, "auto", 0.04) == expected
    assert list(dict.fromkeys(seen)) == probed
    assert alphas[boundary] == 0.04, "the boundary, and the walk down from it, at the full rate"
    above = [d for d in probed if d > boundary]
    for depth in above:  # going up, the tries share it: 6 - 4 - 1 = 1 try at 4, 4 tries at boundary 1
        assert alphas[depth] == pytest.approx(0.04 / max(6 - boundary - 1, 1))


def test_error_budget_splits_alpha_over_forecasts() -> None:
    plain = error_budget(ExportOptions(alpha=0.05, fallback=0.0))  # one share: nothing to choose among
    assert (plain.depth, plain.variants) == (0.05, 0)
    int8 = error_budget(ExportOptions(alpha=0.05, quantize="int8", fallback=0.0))
    assert int8.depth + int8.variants * int8.per_variant == pytest.approx(0.05)
    assert int8.per_variant == pytest.approx(0.0125)


def test_forecast_is_stricter_at_a_smaller_error_rate() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 1000)
    original = np.eye(2)[labels] * 2.0
    candidate = original.copy()
    flip = rng.choice(1000, 40, replace=False)  # 4% of predictions flipped, half of them to the right answer
    candidate[flip[:20]] = np.eye(2)[1 - labels[flip[:20]]] * 2.0
    original[flip[20:]] = np.eye(2)[1 - labels[flip[20:]]] * 2.0
    loose = forecast(_task(), labels, original, candidate, 0.01, n_holdout=1000, alpha=0.2)
    strict = forecast(_task(), labels, original, candidate, 0.01, n_holdout=1000, alpha=0.0125)
    assert loose.delta == strict.delta == 0.0
    assert (loose.alpha, strict.alpha) == (0.2, 0.0125)
    assert strict.lower_bound < loose.lower_bound
    assert loose.passes and not strict.passes


def test_certifiable_disagreement_by_hand_and_by_the_forecast() -> None:
    """n_c (tol / (z sqrt(1 + n_c / n_h)))^2: 1056 (0.01 / (1.96 sqrt 2))^2 = 1.37% at alpha 2.5%, by hand. A
    candidate with a zero calibration delta passes the labelled forecast a little below it, not a little
    above (half its disagreements right where the original was wrong, half wrong where it was right)."""
    assert certifiable_disagreement(0.01, 0.025, 1056, 1056) == pytest.approx(1056 * (0.01 / (1.959964 * 2 ** 0.5)) ** 2)
    assert certifiable_disagreement(0.01, 0.025, 1056, 1056) == pytest.approx(0.01375, abs=5e-5)
    assert certifiable_disagreement(0.0, 0.05, 1000, 1000) == 0.0
    needed = certifiable_disagreement(0.01, 0.05, 4000, 4000)
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 4000)
    for share, passes in ((0.8 * needed, True), (1.25 * needed, False)):
        original = np.eye(2)[labels] * 2.0
        candidate = original.copy()
        flip = rng.choice(4000, 2 * int(round(share * 2000)), replace=False)
        half = len(flip) // 2
        candidate[flip[:half]] = np.eye(2)[1 - labels[flip[:half]]] * 2.0
        original[flip[half:]] = np.eye(2)[1 - labels[flip[half:]]] * 2.0
        guess = forecast(_task(), labels, original, candidate, 0.01, n_holdout=4000, alpha=0.05)
        assert guess.delta == 0.0 and guess.passes == passes, (share, guess)


def test_compare_pass_and_fail() -> None:
    from layerprune.data import Examples

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    holdout = Examples(texts=["x"] * 400, pairs=None, labels=labels)
    task = TaskConfig.model_validate({
        "name": "t", "description": "d", "source": {"kind": "file", "files": {"validation": "/x.csv"}},
        "text_field": "text", "label_field": "label", "label_names": ["a", "b"], "metric": "accuracy",
        "train_split": None,
    })
    original = np.eye(2)[labels] * 3  # always right
    worse = original.copy()
    worse[:20] = worse[:20, ::-1]  # 20 of 400 wrong: -5 points
    failed = compare(task, holdout, "h", original, worse, tolerance=0.01, max_length=128)
    assert failed.delta == pytest.approx(-0.05) and not failed.passed and failed.agreement == 0.95
    assert failed.delta_ci95[1] < 0, "20 flips in the same direction: the interval excludes 0"
    assert compare(task, holdout, "h", original, worse, tolerance=0.06, max_length=128).passed
    # The one-sided 95% Wilson lower bound of 380 agreeing of 400, by hand: z = 1.6449 (the normal's 95th
    # percentile), (p + z^2/2n - z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n) = 0.9289.
    p, n, z = 0.95, 400, 1.6448536
    wilson = (p + z**2 / (2 * n) - z * (p * (1 - p) / n + z**2 / (4 * n**2)) ** 0.5) / (1 + z**2 / n)
    assert failed.agreement_lower95 == pytest.approx(wilson, abs=1e-6) and wilson == pytest.approx(0.9289, abs=1e-4)
    assert compare(task, holdout, "h", original, original, tolerance=0.01, max_length=128).agreement_lower95 == (
        pytest.approx(n / (n + z**2))), "all agree: the Wilson bound is n / (n + z^2), below 1"


def test_cli_export_and_validate(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli-bundle"
    code = main(["export", str(run_dir), "--keep-layers", "3", "--heal", "none", "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "kept 3 of 4 layers" in printed and "| passed |" in printed
    assert main(["validate", str(out), "--device", "cpu"]) == 0
    assert "validation passed" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--keep-layers", "0"], "positive integer"),
    (["--keep-layers", "9"], "between 1 and 4"),
    (["--fallback", "1"], "a share of texts in [0, 1)"),
])
def test_cli_export_bad_depth(run_dir: Path, tmp_path: Path, capsys, args, message) -> None:
    try:
        code = main(["export", str(run_dir), "--out", str(tmp_path / "x"), *args])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cli_export_without_analysis(tmp_path: Path, capsys) -> None:
    assert main(["export", str(tmp_path)]) == 2
    assert "run `layerprune analyze` first" in capsys.readouterr().err


def test_cli_validate_tampered(bundle: Path, tmp_path: Path, capsys) -> None:
    import shutil

    copy = tmp_path / "t"
    shutil.copytree(bundle, copy)
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    assert main(["validate", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "layerprune: error: bundle file config.json does not match its manifest hash (altered after export)"


def test_failed_export_leaves_nothing(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise LayerpruneError("exporter broke")

    monkeypatch.setattr("layerprune.export.onnx_export.export_onnx", broken)
    with pytest.raises(LayerpruneError):
        export_bundle(run_dir, tmp_path / "b", ExportOptions(keep_layers=2, heal="none", **FAST))
    assert list(tmp_path.iterdir()) == []


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_export_never_takes_a_servable_bundles_place(run_dir: Path, tmp_path: Path) -> None:
    """A refused export goes beside a servable bundle (TARGET.failed, ExportResult.bundle; `kept` names the good
    one), which stays byte for byte; where nothing servable is, it takes the place as before. Then the demo's
    next candidate, passing, replaces the servable bundle."""
    out = tmp_path / "bundle"
    good = export_bundle(run_dir, out, ExportOptions(keep_layers=TINY_LAYERS, heal="none", **FAST))
    assert good.validation.passed and good.bundle == out and good.kept is None
    before = _files(out)
    refused = ExportOptions(keep_layers=2, heal="none", tolerance=-0.5, **FAST)  # asks for a gain: always refused
    failed = export_bundle(run_dir, out, refused)
    assert not failed.validation.passed and failed.advice == "next candidate: --keep-layers 3"
    assert failed.bundle == tmp_path / "bundle.failed" and failed.kept == out
    assert _files(out) == before
    assert servable_bundle(out)[0].depth == TINY_LAYERS
    assert verify_bundle(failed.bundle).depth == 2 and not failed.manifest.servable
    with pytest.raises(BundleError, match="failed validation"):
        servable_bundle(failed.bundle)
    again = export_bundle(run_dir, out, dataclasses.replace(refused, keep_layers=3))
    assert again.bundle == failed.bundle and verify_bundle(failed.bundle).depth == 3, "the failed one is replaced"
    assert _files(out) == before
    passed = export_bundle(run_dir, out, dataclasses.replace(refused, keep_layers=3, tolerance=0.01))
    assert passed.validation.passed and passed.bundle == out and passed.kept is None
    assert servable_bundle(out)[0].depth == 3
    fresh = export_bundle(run_dir, tmp_path / "empty", refused)
    assert fresh.bundle == tmp_path / "empty" and fresh.kept is None, "nothing servable there: it takes the place"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "bundle.failed", "empty"], "no staging left"


def test_cli_export_says_where_a_refused_bundle_went(run_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from layerprune import validate

    out = tmp_path / "bundle"
    export_bundle(run_dir, out, ExportOptions(keep_layers=TINY_LAYERS, heal="none", **FAST))
    before = _files(out)
    # The gate at tolerance -0.5 (a gain no cut gives), which the flag cannot ask for.
    refusing = lambda *args, **kwargs: validate.compare(*args[:5], -0.5, *args[6:], **kwargs)  # noqa: E731
    monkeypatch.setattr("layerprune.export.compare", refusing)
    code = main(["export", str(run_dir), "--keep-layers", "1", "--heal", "none", "--out", str(out), "--device", "cpu"])
    printed, err = capsys.readouterr()
    assert code == 1
    assert f"bundle: {tmp_path / 'bundle.failed'} (" in printed
    assert [line for line in err.splitlines() if "batch/s" not in line and "s/batch" not in line and line.strip()] == [
        f"layerprune: error: the bundle failed validation; it is marked not servable and written to "
        f"{tmp_path / 'bundle.failed'}: {out} keeps the servable bundle it held; next candidate: --keep-layers 2"]
    assert _files(out) == before and servable_bundle(out)[0].depth == TINY_LAYERS


KILLED_EXPORT = """
import sys, time
from pathlib import Path

from layerprune import onnx_export
from layerprune.export import ExportOptions, export_bundle


def stalled(checkpoint, out):  # killed here: the truncated checkpoint is saved, the bundle's graph half made
    Path(out).mkdir(parents=True)
    (Path(out) / "model.onnx").write_bytes(b"half")
    print("exporting", flush=True)
    time.sleep(600)


onnx_export.export_onnx = stalled
export_bundle(Path(sys.argv[1]), Path(sys.argv[2]), ExportOptions(keep_layers=2, heal="none", device="cpu",
                                                                  batch_size=8, augment=0))
"""


def test_a_killed_export_leaves_its_staging_for_the_next_run_to_remove(run_dir: Path, bundle: Path,
                                                                         tmp_path: Path) -> None:
    """SIGKILL mid-export: the bundle in place is untouched; what the run wrote, scratch included, is in one
    staging folder beside it (nothing in the temporary directory); the next export removes it."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    out = shutil.copytree(bundle, tmp_path / "out" / "bundle")
    before, temp = _files(out), tmp_path / "temp"
    temp.mkdir()
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": path}
    subprocess.run([sys.executable, "-c", "import layerprune.export"], env=env, check=True, timeout=600)
    libraries = sorted(temp.iterdir())  # what the libraries keep there from their import on (onnxruntime, torch)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, str(run_dir), str(out)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "exporting"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    (staging,) = [p for p in out.parent.iterdir() if p != out]
    assert staging.name.startswith(".bundle.staging-")
    depth = staging / "scratch" / "layers-2"  # where export makes depth 2's graphs
    assert (depth / "exported" / "model.onnx").read_bytes() == b"half"
    assert (depth / "truncated" / "config.json").is_file(), "scratch lives in the staging folder"
    assert sorted(temp.iterdir()) == libraries
    assert _files(out) == before
    result = export_bundle(run_dir, out, ExportOptions(keep_layers=TINY_LAYERS, heal="none", **FAST))
    assert result.bundle == out and sorted(out.parent.iterdir()) == [out]


def test_demo_serves_a_bundle_on_loopback(run_dir: Path, tmp_path: Path, capsys) -> None:
    """The demo's last stage: the bundled server in a subprocess, asked over HTTP, stopped cleanly."""
    from layerprune.demo import _ask_server

    export_bundle(run_dir, tmp_path / "full", ExportOptions(keep_layers=TINY_LAYERS, heal="none", **FAST))
    _ask_server(tmp_path / "full", ["a moving and beautifully acted story", "tedious"], ["positive", "negative"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("POST http://127.0.0.1:") and len(lines) == 3
    assert all(line.split()[0] in ("positive", "negative") for line in lines[1:])


def _task(metric: str = "accuracy") -> TaskConfig:
    return TaskConfig.model_validate({
        "name": "t", "description": "d", "source": {"kind": "file", "files": {"validation": "/x.csv"}},
        "text_field": "text", "label_field": "label", "label_names": ["a", "b"], "metric": metric,
        "train_split": None,
    })


def test_forecast_labelled_route() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 1000)
    original = np.eye(2)[labels] * 3
    worse = original.copy()
    worse[:30] = worse[:30, ::-1]  # 30 of 1000 broken: -3 points on calibration
    bad = forecast(_task(), labels, original, worse, 0.01, n_holdout=1000)
    assert bad.delta == pytest.approx(-0.03) and bad.lower_bound < -0.03 and not bad.passes
    assert bad.disagreement == pytest.approx(0.03) and bad.n_agreement == 1000
    mixed = original.copy()
    mixed[:10] = mixed[:10, ::-1]
    mixed[10:20] = np.eye(2)[1 - labels[10:20]] * 3  # 10 more broken...
    mixed[20:40] = np.eye(2)[labels[20:40]] * 3  # ...and nothing fixed: still a loss
    assert not forecast(_task(), labels, original, mixed, 0.01, n_holdout=1000).passes
    assert forecast(_task(), labels, original, original, 0.01, n_holdout=1000).passes, "identical models pass"


def test_forecast_agreement_route_needs_no_labels_but_only_bounds_accuracy() -> None:
    """300 labelled examples cannot show a 1-point tolerance holds, 6,000 unlabeled texts that agree can."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    original = np.eye(2)[labels] * 3
    flipped = original.copy()
    flipped[:2] = flipped[:2, ::-1]  # 2 of 300 broken
    alone = forecast(_task(), labels, original, flipped, 0.01, n_holdout=300)
    assert not alone.passes, "the labelled bound alone is too wide on 300 examples"
    unlabeled = np.eye(2)[rng.integers(0, 2, 6000)] * 3
    disagreeing = unlabeled.copy()
    disagreeing[:6] = disagreeing[:6, ::-1]  # 0.1% of the texts differ
    with_texts = forecast(_task(), labels, original, flipped, 0.01, n_holdout=300, unlabeled=(unlabeled, disagreeing))
    assert with_texts.passes and with_texts.n_agreement == 6300 and with_texts.disagreement_upper < 0.004
    f1 = forecast(_task("f1"), labels, original, flipped, 0.01, n_holdout=300, unlabeled=(unlabeled, disagreeing))
    assert not f1.passes, "disagreement bounds accuracy, not F1"


def test_one_max_length_from_export_to_server(run_dir: Path, tmp_path: Path) -> None:
    """The bundle is validated at the manifest's max length and the server truncates at that same length:
    on inputs longer than it, the server's logits are the validated model's, not the model's own limit's."""
    import time

    from fastapi.testclient import TestClient

    from layerprune.runtime import OnnxClassifier
    from layerprune.serve.app import create_app
    from layerprune.serve.model import load_model
    from layerprune.serve.settings import ServeSettings
    from layerprune.serve.triton import write_triton_repository

    out = tmp_path / "short"
    result = export_bundle(run_dir, out, ExportOptions(keep_layers=3, heal="none", max_length=12, tolerance=1.0, **FAST))
    assert result.manifest.max_length == result.validation.max_length == 12
    assert validate_bundle(out, device="cpu").max_length == 12
    long_texts = [" ".join([t] * 4) for t, _ in SENTENCES[:4]]  # 20-40 tokens each
    validated = OnnxClassifier(out, max_length=12).logits(long_texts)
    own_limit = OnnxClassifier(out).logits(long_texts)
    # A random tiny model's logits move little with the input (~1e-5), but float32 noise is ~1e-7.
    assert np.abs(validated - own_limit).max() > 1e-5, "the texts are longer than 12 tokens"
    model = load_model(out)
    assert model.classifier.max_length == 12
    with TestClient(create_app(model, ServeSettings(max_wait_ms=1.0))) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        answer = client.post("/predict", json={"inputs": long_texts, "raw_scores": True}).json()
    labels = [model.classifier.id2label[i] for i in range(2)]
    served = np.array([[{d["label"]: d["score"] for d in row}[name] for name in labels] for row in answer])
    np.testing.assert_allclose(served, validated, rtol=0, atol=2e-6)
    config = (write_triton_repository(out, tmp_path / "triton") / "config.pbtxt").read_text()
    assert 'key: "max_sequence_length"\n  value: { string_value: "12" }' in config


@pytest.mark.parametrize("cpu", ["avx2", "avx512-vnni"])
def test_int8_candidates_fastest_first_on_both_cpu_paths(run_dir: Path, tmp_path: Path, monkeypatch, cpu) -> None:
    """--quantize int8 scores int8, faithful int8 and fp32, with this CPU's configuration (forced here: the AVX-512
    preset's model runs on any x86 CPU), and keeps the first whose forecast passes; what it keeps is what is
    validated and served."""
    import onnx

    monkeypatch.setattr("layerprune.export.cpu_kind", lambda *a: cpu)
    result = export_bundle(run_dir, tmp_path / "q", ExportOptions(keep_layers=3, heal="none", quantize="int8",
                                                                  fallback=0.0, tolerance=1.0, **FAST))
    names = [c.name for c in result.depth.candidates]
    assert names[0].startswith(f"{cpu} dynamic per-channel") and names[1].startswith(f"{cpu} faithful per-token")
    assert names[2] == "fp32" and len(names) == 3
    assert result.depth.candidates[0].chosen, "a tolerance of 1.0 lets the fastest candidate through"
    assert result.manifest.quantization_config == names[0] and result.manifest.quantize == "int8"
    assert result.manifest.candidate == "int8", "the manifest names the candidate it kept"
    assert result.manifest.int8_cpu == cpu, "the manifest names the CPU kind the weights were quantized for"
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops and result.validation.passed
    strict = export_bundle(run_dir, tmp_path / "s", ExportOptions(keep_layers=3, heal="none", quantize="int8",
                                                                  fallback=0.0, tolerance=0.0, **FAST))
    passing = [c.forecast.passes for c in strict.depth.candidates]
    chosen = [c.chosen for c in strict.depth.candidates]
    assert chosen.index(True) == (passing.index(True) if True in passing else 2), "first passing, else fp32"
    assert strict.manifest.candidate == ("int8", "int8-faithful", "fp32")[chosen.index(True)]


def test_validate_checks_the_bundles_own_files_before_the_original(bundle: Path, tmp_path: Path, capsys,
                                                                    monkeypatch) -> None:
    """A broken tokenizer.json whose hash was updated too: one line, exit 2, and the original checkpoint is
    never loaded (that is the slow part)."""
    import shutil

    from layerprune.bundle import hash_files

    copy = tmp_path / "broken"
    shutil.copytree(bundle, copy)
    (copy / "tokenizer.json").write_text("{not json")
    manifest = load_artifact(Manifest, copy / "manifest.json")
    manifest.files = hash_files(copy)
    manifest.save(copy / "manifest.json")
    reseal(copy)

    def never(*args, **kwargs):
        raise AssertionError("the original model was loaded before the bundle's own files were checked")

    monkeypatch.setattr("layerprune.models.load_classifier", never)
    assert main(["validate", str(copy), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("layerprune: error: cannot read") and "tokenizer.json" in err and "\n" not in err


def test_a_fallback_bundle_serves_the_original_for_its_least_sure_texts(run_dir: Path, tmp_path: Path) -> None:
    """--fallback 0.5 (on a head heal: its cut disagrees with the original): the bundle holds the original's graph, hashed; the threshold is the median top-class
    probability of the pruned graph on calibration; the forecast and the validation are of the cascade. All
    checked against a cascade made here from transformers' logits of the original and the truncated model."""
    import torch
    from scipy.special import softmax
    from sklearn.metrics import accuracy_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from layerprune.runtime import OnnxClassifier

    out = tmp_path / "fb"
    result = export_bundle(run_dir, out, ExportOptions(keep_layers=2, heal="head", fallback=0.5, **FAST))
    manifest = verify_bundle(out)
    assert manifest.parts.original == "original.onnx" and "original.onnx" in manifest.files
    assert manifest.fallback.share == 0.5 and result.depth.fallback == 0.5

    analysis = load_artifact(AnalysisReport, run_dir / "analysis.json")
    parts = calibration_and_holdout(analysis.task_config, None, 2000)
    tokenizer = AutoTokenizer.from_pretrained(analysis.model)

    def logits(checkpoint, texts):
        model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
        with torch.no_grad():
            return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()

    def top(x):
        return softmax(x, axis=-1).max(axis=-1)

    below = np.quantile(top(logits(result.truncated_checkpoint, parts.calibration.texts)), 0.5)
    assert manifest.fallback.threshold == pytest.approx(below, abs=1e-5)

    def served(part):
        pruned, original = logits(result.truncated_checkpoint, part.texts), logits(analysis.model, part.texts)
        sent = top(pruned) < below
        return np.where(sent[:, None], original, pruned), original, sent

    calibration, original, _ = served(parts.calibration)
    forecast_ = result.depth.scores[1].forecast
    assert forecast_.disagreement == pytest.approx(np.mean(calibration.argmax(-1) != original.argmax(-1)))
    holdout, original, sent = served(parts.holdout)
    v = result.validation
    assert v.sent_on == pytest.approx(sent.mean()) and 0 < v.sent_on < 1
    assert v.bundle == pytest.approx(accuracy_score(parts.holdout.labels, holdout.argmax(-1)))
    assert v.agreement == pytest.approx(np.mean(holdout.argmax(-1) == original.argmax(-1)))
    assert validate_bundle(out, device="cpu").bundle == pytest.approx(v.bundle), "validate re-checks the cascade"

    # The runtime alone: threshold 0 sends nothing on, above 1 everything (each row cut to its own length).
    alone = OnnxClassifier(out, max_length=manifest.max_length, original=out / "original.onnx", below=0.0)
    everything = OnnxClassifier(out, max_length=manifest.max_length, original=out / "original.onnx", below=1.01)
    np.testing.assert_allclose(everything.logits(parts.holdout.texts, batch_size=5), original, atol=1e-4)
    assert everything.sent_on == len(parts.holdout)
    pruned = logits(result.truncated_checkpoint, parts.holdout.texts)
    np.testing.assert_allclose(alone.logits(parts.holdout.texts), pruned, atol=1e-5)
    assert alone.sent_on == 0

    (out / "original.onnx").write_bytes(b"not a graph")
    with pytest.raises(BundleError, match="original.onnx does not match"):
        servable_bundle(out)


def test_int8_candidates_are_forecast_with_the_fallback(run_dir: Path, tmp_path: Path) -> None:
    """--quantize int8 --fallback 0.5: each candidate's threshold is its own graph's median top-class probability on
    calibration, and its forecast is of that graph with the fallback, as served; checked against optimum's run of
    the int8 graph the bundle kept and transformers' run of the original."""
    import torch
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from scipy.special import softmax
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "q"
    result = export_bundle(run_dir, out, ExportOptions(keep_layers=2, heal="head", quantize="int8", fallback=0.5,
                                                       tolerance=1.0, **{**FAST, "batch_size": 4}))
    chosen = result.depth.candidates[0]
    assert chosen.chosen and result.manifest.quantize == "int8"
    analysis = load_artifact(AnalysisReport, run_dir / "analysis.json")
    texts = calibration_and_holdout(analysis.task_config, None, 2000).calibration.texts
    tokenizer = AutoTokenizer.from_pretrained(analysis.model)
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        original = AutoModelForSequenceClassification.from_pretrained(analysis.model).eval()(**encoded).logits.numpy()
    int8 = ORTModelForSequenceClassification.from_pretrained(out, file_name="model.onnx", provider="CPUExecutionProvider")
    # int8's dynamic scales depend on a run's rows: batches of --batch-size 4, similar lengths together, as run
    order = np.argsort([len(tokenizer(t)["input_ids"]) for t in texts], kind="stable")
    pruned = np.zeros_like(original)
    for start in range(0, len(texts), 4):
        rows = order[start:start + 4]
        pruned[rows] = int8(**tokenizer([texts[i] for i in rows], padding=True, return_tensors="np")).logits
    top = softmax(pruned, axis=-1).max(axis=-1)
    below = np.quantile(top, 0.5)
    assert result.manifest.fallback.threshold == pytest.approx(below, abs=1e-5)
    served = np.where((top < below)[:, None], original, pruned)
    assert chosen.forecast.disagreement == pytest.approx(np.mean(served.argmax(-1) != original.argmax(-1)))
    assert chosen.forecast.disagreement != pytest.approx(np.mean(pruned.argmax(-1) != original.argmax(-1)))


@pytest.fixture(scope="module")
def wide_run_dir(minilm_dir, reviews, tmp_path_factory) -> Path:
    """A run directory of a tiny BERT whose logits differ between texts and between depths by far more than the
    runs' float error (initializer_range 0.3): a row answered by the wrong graph shows."""
    root = tmp_path_factory.mktemp("wide")
    model = make_tiny_classifier("bert", root / "model", minilm_dir, **SERVE_MODEL)
    task = task_from_files(reviews, "text", "label", train_file=reviews)
    analyze(str(model), task, root / "run", AnalyzeOptions(device="cpu", batch_size=8))
    return root / "run"


def test_with_the_top_layer_heal_a_fallback_continues_from_the_shared_layers(wide_run_dir: Path,
                                                                             tmp_path: Path) -> None:
    """--fallback 0.5 with the top-layer heal at depth 2 (layer 1 is the original's): the bundle holds, hashed, a
    continuation graph instead of the original's, and what it serves (validation, validate, the bundle opened)
    is the cascade made here from transformers' runs of the truncated checkpoint and the original."""
    import torch
    from scipy.special import softmax
    from sklearn.metrics import accuracy_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from layerprune.bundle import open_bundle

    run_dir, out = wide_run_dir, tmp_path / "cont"
    result = export_bundle(run_dir, out, ExportOptions(keep_layers=2, heal="top", fallback=0.5, **FAST))
    manifest = verify_bundle(out)
    assert manifest.parts.continuation == "continuation.onnx" and "continuation.onnx" in manifest.files
    assert manifest.parts.original is None and not (out / "original.onnx").exists()
    assert manifest.fallback.continue_from == 1 and manifest.heal == "top"

    analysis = load_artifact(AnalysisReport, run_dir / "analysis.json")
    holdout = calibration_and_holdout(analysis.task_config, None, 2000).holdout
    tokenizer = AutoTokenizer.from_pretrained(analysis.model)

    def logits(checkpoint):
        model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
        with torch.no_grad():
            return model(**tokenizer(holdout.texts, padding=True, return_tensors="pt")).logits.numpy()

    pruned, original = logits(result.truncated_checkpoint), logits(analysis.model)
    sent = softmax(pruned, axis=-1).max(axis=-1) < manifest.fallback.threshold
    assert 0 < sent.sum() < len(sent) and np.abs(pruned - original).max(-1).min() > 1e-2  # a row's answer tells
    served = np.where(sent[:, None], original, pruned)
    opened = open_bundle(out, allow_unvalidated=True)  # (on 12 texts the toy original is no better)
    np.testing.assert_allclose(opened.classifier.logits(holdout.texts, batch_size=3), served, atol=1e-4)
    v = result.validation
    assert v.sent_on == pytest.approx(sent.mean())
    assert v.bundle == pytest.approx(accuracy_score(holdout.labels, served.argmax(-1)))
    assert v.agreement == pytest.approx(np.mean(served.argmax(-1) == original.argmax(-1)))
    assert validate_bundle(out, device="cpu").bundle == pytest.approx(v.bundle), "validate re-checks the cascade"

    (out / "continuation.onnx").write_bytes((out / "continuation.onnx").read_bytes() + b"\0")
    with pytest.raises(BundleError, match="continuation.onnx does not match"):
        servable_bundle(out)


def test_int8_candidates_are_forecast_with_the_continuation_as_served(wide_run_dir: Path, tiny_models, tmp_path: Path,
                                                                     monkeypatch) -> None:
    """--quantize int8 with the top-layer heal and --fallback 0.5: the continuation is quantized as the kept
    candidate is, and each candidate's forecast is of what is served: the texts it sends on continue from its own
    int8 states through the int8 continuation. Checked against a cascade run here with onnxruntime on the bundle's
    two graphs, batch by batch as export runs them, and transformers' run of the original. The continuation is
    cut from another model's graph (same shapes), so that its answers are not the original's: a forecast that took
    the original's answers for the texts sent on would be off."""
    import onnx
    import onnxruntime as ort
    import torch
    from scipy.special import softmax
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from layerprune import continuation
    from layerprune.onnx_export import export_onnx

    export_onnx(tiny_models["bert"], tmp_path / "other")
    cut_from = continuation.continuation_graph
    monkeypatch.setattr(continuation, "continuation_graph", lambda original, config, layer, out: cut_from(
        tmp_path / "other" / "model.onnx", config, layer, out))
    out = tmp_path / "q"
    result = export_bundle(wide_run_dir, out, ExportOptions(keep_layers=2, heal="top", quantize="int8",
                                                            fallback=0.5, tolerance=1.0, **{**FAST, "batch_size": 4}))
    chosen = result.depth.candidates[0]
    assert chosen.chosen and result.manifest.quantize == "int8" and result.manifest.fallback.continue_from == 1
    assert any(n.op_type == "MatMulInteger" for n in onnx.load(str(out / "continuation.onnx")).graph.node)
    analysis = load_artifact(AnalysisReport, wide_run_dir / "analysis.json")
    texts = calibration_and_holdout(analysis.task_config, None, 2000).calibration.texts
    tokenizer = AutoTokenizer.from_pretrained(analysis.model)
    with torch.no_grad():
        original = AutoModelForSequenceClassification.from_pretrained(analysis.model).eval()(
            **tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()
    a, b = (ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
            for name in ("model.onnx", "continuation.onnx"))
    # int8's dynamic scales depend on a run's rows: batches of --batch-size 4, similar lengths together, as run
    order = np.argsort([len(tokenizer(t)["input_ids"]) for t in texts], kind="stable")
    batches = [order[start:start + 4] for start in range(0, len(texts), 4)]
    runs = {}
    for rows in batches:
        feeds = {k: v.astype(np.int64) for k, v in tokenizer([texts[i] for i in rows], padding=True,
                                                             return_tensors="np").items()}
        runs[tuple(rows)] = feeds, *a.run(["logits", "hidden_states"], feeds)
    pruned = np.zeros_like(original)
    for rows, (_, logits, _) in runs.items():
        pruned[list(rows)] = logits
    below = np.quantile(softmax(pruned, axis=-1).max(axis=-1), 0.5)
    assert result.manifest.fallback.threshold == pytest.approx(below, abs=1e-5)
    served = pruned.copy()
    for rows, (feeds, logits, states) in runs.items():
        sent = softmax(logits, axis=-1).max(axis=-1) < below
        if sent.any():  # one sub-batch, cut to its longest row
            width = feeds["attention_mask"][sent].sum(axis=1).max()
            given = {**feeds, "hidden_states": states}
            served[np.array(rows)[sent]] = b.run(["logits"], {i.name: given[i.name][sent, :width]
                                                              for i in b.get_inputs()})[0]
    restarted = np.where((softmax(pruned, axis=-1).max(axis=-1) < below)[:, None], original, pruned)
    assert np.mean(served.argmax(-1) != original.argmax(-1)) != np.mean(restarted.argmax(-1) != original.argmax(-1))
    assert chosen.forecast.disagreement == pytest.approx(np.mean(served.argmax(-1) != original.argmax(-1)))


def test_a_faithful_int8_bundle_serves_the_cascade_transformers_computes(wide_run_dir: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """Plain int8's forecast made to fail: export keeps int8-faithful, made for both graphs from the graphs before
    --optimize O2's fusions (their products in MatMulIntegerToFloat), and the bundle, opened through the gate,
    serves within 5% of the largest logit of the cascade made here from transformers' runs of the truncated
    checkpoint and the original (the rows sent on: those the served graph A is unsure of)."""
    import onnx
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from layerprune import candidates
    from layerprune.bundle import open_bundle
    from layerprune.cpu import cpu_kind
    from layerprune.fallback import unsure
    from layerprune.runtime import OnnxClassifier

    score = candidates.score_candidate

    def plain_int8_fails(name, *args, **kwargs):
        scored = score(name, *args, **kwargs)
        if "dynamic per-channel" in name:
            for candidate, _, _ in scored:
                candidate.forecast = candidate.forecast.model_copy(update={"passes": False})
        return scored

    monkeypatch.setattr(candidates, "score_candidate", plain_int8_fails)
    out = tmp_path / "faithful"
    result = export_bundle(wide_run_dir, out, ExportOptions(keep_layers=2, heal="top", quantize="int8", optimize="O2",
                                                            fallback=0.5, tolerance=1.0, **FAST))
    names = [c.name for c in result.depth.candidates]
    assert names[1].startswith(f"{cpu_kind()} faithful per-token") and [c.chosen for c in result.depth.candidates] == [
        False, True, False]
    assert result.manifest.quantization_config == names[1] and result.manifest.int8_cpu == cpu_kind()
    assert result.manifest.candidate == "int8-faithful"
    for graph in ("model.onnx", "continuation.onnx"):
        assert any(n.op_type == "MatMulIntegerToFloat" for n in onnx.load(str(out / graph)).graph.node), graph
    served = open_bundle(out).classifier
    analysis = load_artifact(AnalysisReport, wide_run_dir / "analysis.json")
    texts = calibration_and_holdout(analysis.task_config, None, 2000).holdout.texts
    tokenizer = AutoTokenizer.from_pretrained(analysis.model)
    with torch.no_grad():
        original, truncated = (AutoModelForSequenceClassification.from_pretrained(path).eval()(
            **tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()
            for path in (analysis.model, result.truncated_checkpoint))
    sent = unsure(OnnxClassifier(out, max_length=served.max_length).logits(texts), served.below)
    assert 0 < sent.sum() < len(texts)
    expected = np.where(sent[:, None], original, truncated)
    error = np.abs(served.logits(texts) - expected).max()
    assert error < 0.05 * np.abs(expected).max(), error


def test_the_whole_heal_falls_back_by_restarting_the_original(run_dir: Path, tmp_path: Path) -> None:
    """The whole heal re-trains every kept layer: no state of the bundle's is the original's, so a text sent on
    restarts the original's graph from its tokens."""
    result = export_bundle(run_dir, tmp_path / "w", ExportOptions(keep_layers=2, heal="whole", fallback=0.5,
                                                                  whole=WholeOptions(epochs=1), **FAST))
    manifest = verify_bundle(tmp_path / "w")
    assert manifest.parts.original == "original.onnx" and manifest.parts.continuation is None
    assert manifest.fallback.continue_from is None and result.validation.sent_on is not None


def test_a_manifest_that_continues_without_its_graph_is_refused(run_dir: Path, tmp_path: Path) -> None:
    """A continuing rule without the continuation part, or from a layer the bundle does not have, is refused when
    the bundle is opened, in one line (the edited manifest resealed by hand: its files check out)."""
    import shutil

    from layerprune.bundle import open_bundle

    built = tmp_path / "built"
    export_bundle(run_dir, built, ExportOptions(keep_layers=2, heal="top", fallback=0.5, **FAST))
    for edit, message in [(dict(parts={"continuation": None}), "names no continuation graph"),
                          (dict(fallback={"continue_from": 2}), "not a layer below the bundle's depth 2")]:
        copy = shutil.copytree(built, tmp_path / message[:8])
        manifest = json.loads((copy / "manifest.json").read_text())
        for field, change in edit.items():
            manifest[field].update(change)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=message):
            open_bundle(reseal(copy), allow_unvalidated=True)


def test_a_fallback_needs_a_classification_task(minilm_dir, tmp_path: Path, capsys) -> None:
    """A regression output has no top-class probability, nor a predicted class to agree on: one clear error
    (from the CLI one line and exit code 2), and nothing written."""
    model = make_tiny_classifier("bert", tmp_path / "model", minilm_dir, num_labels=1, problem_type="regression")
    data = tmp_path / "scores.csv"
    data.write_text("text,score\n" + "\n".join(f'"{t}",{i / 23:.3f}' for i, (t, _) in enumerate(SENTENCES * 2)) + "\n")
    task = task_from_files(data, "text", "score", regression=True)
    analyze(str(model), task, tmp_path / "run", AnalyzeOptions(device="cpu", batch_size=8))
    with pytest.raises(LayerpruneError, match="--fallback needs a classification task"):
        export_bundle(tmp_path / "run", tmp_path / "b", ExportOptions(keep_layers=2, heal="none", fallback=0.1, **FAST))
    assert not (tmp_path / "b").exists()
    capsys.readouterr()
    code = main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "b"), "--fallback", "0",
                 "--min-agreement", "0.99", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--min-agreement needs a classification task" in err
    assert not (tmp_path / "b").exists()
