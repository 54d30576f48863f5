"""export: analysis run directory -> validated ONNX bundle.

1. The original model runs once over the calibration examples, the heal texts and the unlabeled agreement
   texts: its logits, the first-token states of every depth, and the token states distillation starts from.
2. Depth: fixed N, or auto: from the CKA boundary, down while the gate forecast passes, up until it does
   (validate.forecast: a one-sided 95% bound on the holdout delta, or the disagreement bound). Every depth
   looked at is healed as asked: distill (top layers + head, from the original), head (re-fit) or none.
3. Export: truncate, install the heal, ONNX through optimum, optimize; with int8 the candidates are scored
   fastest first (int8; int8 with the feed-forward outputs and head in fp32; fp32) and the first whose forecast
   passes is kept.
4. Validate the bundle against the original on the disjoint holdout, at the bundle's one max length. The
   bundle is built in a temporary folder and renamed into place.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from . import onnx_export
from .artifacts import (
    AnalysisReport,
    DepthReport,
    DepthScore,
    ExportCandidate,
    GateForecast,
    HealMode,
    HealStats,
    Manifest,
    ValidationReport,
    atomic_dir,
    library_versions,
    load_artifact,
)
from .bundle import (
    ANALYSIS_FILE,
    CKA_PLOT,
    DEPTH_FILE,
    DEPTH_PLOT,
    MANIFEST_FILE,
    VALIDATION_FILE,
    bundle_parts,
    hash_files,
    output_labels,
)
from .cpu import cpu_kind
from .data import Examples, load_examples, read_texts
from .errors import LayerpruneError
from .heal import Distilled, TextStates, distill, encode_texts
from .hidden import predict_logits
from .scoring import compute_metric
from .models import architecture, load_classifier, num_layers
from .options import ExportOptions  # options are declared once, with their CLI flags
from .plots import plot_depths
from .prune import HeadFit, depth_logits, fit_head, head_state, load_head, truncate
from .runtime import OnnxClassifier, model_max_length
from .tasks import TaskConfig
from .validate import EvalParts, calibration_and_holdout, compare, forecast

BUNDLE_DIR = "bundle"
TRUNCATED_DIR = "truncated"


@dataclass(frozen=True)
class ExportResult:
    bundle: Path
    manifest: Manifest
    validation: ValidationReport
    depth: DepthReport
    truncated_checkpoint: Path
    advice: str | None  # what to try next when the gate refused the bundle
    next_candidate: ExportOptions | None  # the same, as options


@dataclass
class _Texts:
    """What the original model computed on the texts export looks at (the holdout excepted)."""

    calibration: TextStates
    calibration_labels: np.ndarray
    heal: TextStates | None
    heal_labels: np.ndarray | None  # None: unlabeled heal texts
    agreement: TextStates | None


def export_bundle(run_dir: Path, out: Path | None = None, opts: ExportOptions = ExportOptions()) -> ExportResult:
    """Build the bundle for the analysis in `run_dir` (default output: RUN_DIR/bundle)."""
    analysis = _load_analysis(run_dir)
    task, glue_dir = analysis.task_config, Path(analysis.glue_dir) if analysis.glue_dir else None
    model, tokenizer = load_classifier(
        analysis.model, num_labels=task.num_labels, device=opts.device, trust_remote_code=opts.trust_remote_code
    )
    total = num_layers(model.config)
    if opts.keep_layers != "auto" and not 1 <= opts.keep_layers <= total:
        raise LayerpruneError(f"--keep-layers must be between 1 and {total} for this model, got {opts.keep_layers}")
    max_length = _max_length(model, tokenizer, opts.max_length)
    heal_examples, agreement_examples, labelled = _heal_texts(task, glue_dir, opts)
    heal = _heal_mode(opts.heal, model, heal_examples, labelled)
    parts = calibration_and_holdout(task, glue_dir, opts.max_examples, opts.resample_seed)
    start = analysis.boundary if opts.keep_layers == "auto" else opts.keep_layers
    # Keep the token states where the first distillation starts; other depths are computed from them.
    first_inputs = {0, max(min(start, total) - opts.heal_layers, 0)} if heal == "distill" else {0}

    def encode(examples: Examples, role: str) -> TextStates:
        return encode_texts(model, tokenizer, examples, batch_size=opts.batch_size, max_length=max_length,
                            keep_depths=first_inputs, desc=f"original, {role}")

    texts = _Texts(
        calibration=encode(parts.calibration, "calibration"),
        calibration_labels=parts.calibration.labels,
        heal=encode(heal_examples, "heal texts") if heal != "none" else None,
        heal_labels=heal_examples.labels if heal != "none" and labelled else None,
        agreement=encode(agreement_examples, "agreement texts") if agreement_examples else None,
    )
    original_holdout = predict_logits(model, tokenizer, parts.holdout, max_length=max_length)

    budget = _error_budget(opts)
    depths = _Depths(model, task, texts, heal, opts, n_holdout=len(parts.holdout))
    depth = _choose_depth(depths.passes, analysis.boundary, total, opts.keep_layers, budget.depth)
    probed = list(depths.probed)  # what auto looked at; --sweep scores the rest for the report only
    if opts.sweep:
        for d in range(1, total + 1):
            depths.passes(d, budget.depth)
    note = None
    if opts.keep_layers == "auto" and depth == total:
        note = f"nothing can be dropped within tolerance {opts.tolerance:g}: keeping all {total} layers"

    truncate(model, depth)
    depths.install(model, depth)
    if task.label_names:  # the bundle's config names its labels, whatever the checkpoint said
        model.config.id2label = dict(enumerate(task.label_names))
        model.config.label2id = {name: i for i, name in enumerate(task.label_names)}
    target = Path(out) if out is not None else Path(run_dir) / BUNDLE_DIR
    with tempfile.TemporaryDirectory(prefix="layerprune-truncated-") as scratch, atomic_dir(target, MANIFEST_FILE) as tmp:
        _save_checkpoint(model, tokenizer, Path(scratch))
        onnx_export.export_onnx(Path(scratch), tmp)
        truncated = predict_logits(model, tokenizer, parts.holdout, max_length=max_length)
        parity = onnx_export.max_logit_difference(truncated, _onnx_logits(tmp, parts.holdout, max_length))
        if opts.optimize:
            onnx_export.optimize_onnx(tmp, opts.optimize)
        cpu = cpu_kind()  # the int8 weights are quantized for this CPU, and the manifest says which
        candidates = _pick_export(tmp, task, texts, parts, max_length, opts, budget, cpu) if opts.quantize else []
        chosen = next((c for c in candidates if c.chosen), None)
        quant_name = chosen.name if chosen and chosen.name != "fp32" else None
        served = _onnx_logits(tmp, parts.holdout, max_length)
        validation = compare(task, parts.holdout, parts.holdout_name, original_holdout, served, opts.tolerance,
                             max_length, parity)
        report = depths.report(analysis.boundary, depth, probed, parts, candidates, note, opts)
        validation.save(tmp / VALIDATION_FILE)
        report.save(tmp / DEPTH_FILE)
        plot_depths(report, tmp / DEPTH_PLOT)
        shutil.copy(Path(run_dir) / ANALYSIS_FILE, tmp / ANALYSIS_FILE)
        if (Path(run_dir) / CKA_PLOT).is_file():
            shutil.copy(Path(run_dir) / CKA_PLOT, tmp / CKA_PLOT)
        manifest = Manifest(
            files=hash_files(tmp), parts=bundle_parts(tmp), source_checkpoint=analysis.model, task=task.name,
            metric_name=task.metric, labels=output_labels(tmp), depth=depth, total_layers=total,
            model_type=analysis.model_type,
            heal=heal, max_length=max_length, pair_input=task.text_pair_field is not None,
            resample_seed=opts.resample_seed, optimize=opts.optimize, quantize="int8" if quant_name else None,
            quantization_config=quant_name,
            int8_cpu=cpu if quant_name else None, servable=validation.passed,
            versions=library_versions(),
        )
        manifest.save(tmp / MANIFEST_FILE)
    # The truncated PyTorch checkpoint, for users who fine-tune or serve it further; not part of the bundle.
    with atomic_dir(Path(run_dir) / TRUNCATED_DIR, "config.json") as tmp:
        _save_checkpoint(model, tokenizer, tmp)
    advice, retry = (None, None) if validation.passed else _next_candidate(depth, total, quant_name, opts)
    return ExportResult(target, manifest, validation, report, Path(run_dir) / TRUNCATED_DIR, advice, retry)


def _next_candidate(depth: int, total: int, quantized: str | None,
                    opts: ExportOptions) -> tuple[str | None, ExportOptions | None]:
    """After a bundle the gate refused: what to try next, in words and as options (None: nothing left)."""
    if quantized:
        return ("next candidate: the same depth without --quantize int8",
                dataclasses.replace(opts, keep_layers=depth, quantize=None))
    if depth < total:
        return f"next candidate: --keep-layers {depth + 1}", dataclasses.replace(opts, keep_layers=depth + 1)
    return None, None


def _max_length(model, tokenizer, asked: int | None) -> int:
    """One max length for the bundle: asked, or the model's own limit (what the server would use anyway)."""
    limit = model_max_length(model.config.to_dict(), {"model_max_length": tokenizer.model_max_length})
    if asked is not None and not 2 <= asked <= limit:
        raise LayerpruneError(f"--max-length must be between 2 and {limit} for this model, got {asked}")
    return asked or limit


def _heal_texts(task: TaskConfig, glue_dir: Path | None, opts: ExportOptions) -> tuple[Examples | None, Examples | None, bool]:
    """(heal texts, agreement texts, labelled): from --heal-data (unlabeled) or the task's train split.

    Agreement texts are the --heal-data texts after the heal texts, never train texts: the original model was
    most likely fine-tuned on those, is surer of them, and a pruned model disagrees with it less there than on
    new texts, which would make the agreement bound optimistic. Measured (MiniLM, rt-polarity, the demo's
    int8 bundle): 0.40% disagreement on 4,000 train sentences, 1.04% on the validation split."""
    if opts.heal_data is not None:
        pool = read_texts(opts.heal_data, opts.heal_text_field or task.text_field, task.text_pair_field)
        heal = pool.head(opts.heal_examples)
        rest = pool.select(np.arange(len(heal), min(len(pool), len(heal) + opts.agreement_examples)))
        return heal, (rest if len(rest) else None), False
    if task.train_split:
        return load_examples(task, task.train_split, glue_dir=glue_dir).head(opts.heal_examples), None, True
    return None, None, False


def _heal_mode(asked: HealMode | None, model, texts: Examples | None, labelled: bool) -> HealMode:
    arch = architecture(model.config)
    layers_alone = not (arch.shared_weights or getattr(model.config, "conv_kernel_size", 0))
    if asked is None:
        if texts is None:
            return "none"
        return "distill" if layers_alone else ("head" if labelled else "none")
    if asked != "none" and texts is None:
        raise LayerpruneError(f"--heal {asked} needs texts: the task has no train split; give --heal-data FILE")
    if asked == "head" and not labelled:
        raise LayerpruneError("--heal head needs labelled texts; --heal-data texts carry none: use --heal distill")
    if asked == "distill" and not layers_alone:
        raise LayerpruneError(f"--heal distill cannot re-tune {model.config.model_type} layers alone (shared "
                              "weights or a convolution); use --heal head")
    return asked


class _Depths:
    """Each depth looked at: healed as asked, scored on calibration, and its gate forecast."""

    def __init__(self, model, task: TaskConfig, texts: _Texts, heal: HealMode, opts: ExportOptions, n_holdout: int):
        self.model, self.task, self.texts, self.heal, self.opts = model, task, texts, heal, opts
        self.n_holdout = n_holdout
        self.total = num_layers(model.config)
        self.raw = [self._metric(logits) for logits in depth_logits(model, texts.calibration.first)]
        self.full = self._metric(texts.calibration.logits)
        self.heals: dict[int, HeadFit | Distilled] = {}
        self.scores: dict[int, DepthScore] = {}
        self.heal_runs: list[HealStats] = []
        self.probed: list[int] = []

    def passes(self, depth: int, alpha: float) -> bool:
        """Whether the gate is forecast to pass the model truncated at `depth` (healed as asked), at error
        rate `alpha`; each depth is forecast once."""
        if depth not in self.probed:
            self.probed.append(depth)
        if depth not in self.scores:
            self.scores[depth] = self._score(depth, alpha)
        return self.scores[depth].forecast.passes

    def _score(self, depth: int, alpha: float) -> DepthScore:
        logits = (lambda texts: texts.logits) if depth == self.total else (lambda texts: self._logits(depth, texts))
        calibration = logits(self.texts.calibration)
        agreement = None if self.texts.agreement is None else logits(self.texts.agreement)
        score = DepthScore(depth=depth, metric=self.raw[depth], forecast=self._forecast(calibration, agreement, alpha))
        if self.heal == "head" and depth < self.total:
            score.metric_healed = self._metric(calibration)
        if self.heal == "distill" and depth < self.total:
            score.metric_distilled = self._metric(calibration)
        return score

    def _forecast(self, calibration: np.ndarray, agreement: np.ndarray | None, alpha: float) -> GateForecast:
        unlabeled = None if agreement is None else (self.texts.agreement.logits, agreement)
        return forecast(self.task, self.texts.calibration_labels, self.texts.calibration.logits, calibration,
                        self.opts.tolerance, self.n_holdout, unlabeled, alpha)

    def _logits(self, depth: int, texts: TextStates) -> np.ndarray:
        """The model truncated at `depth`, healed as asked, on `texts`."""
        if self.heal == "none":
            return depth_logits(self.model, texts.first[depth : depth + 1])[0]
        fit = self._heal(depth)
        if isinstance(fit, Distilled):
            return fit.logits(texts, self.model)
        return _with_head(self.model, fit, lambda: depth_logits(self.model, texts.first[depth : depth + 1])[0])

    def _heal(self, depth: int) -> HeadFit | Distilled:
        if depth in self.heals:
            return self.heals[depth]
        heal, labels, started = self.texts.heal, self.texts.heal_labels, time.perf_counter()
        if self.heal == "distill":
            layers = min(self.opts.heal_layers, depth)  # at depth 1 only layer 1 can be re-tuned
            fit = distill(self.model, depth, heal, labels, regression=self.task.is_regression,
                          opts=dataclasses.replace(self.opts.distill, heal_layers=layers))
            stats = HealStats(depth=depth, mode="distill", n_train=fit.n_train, n_held_out=fit.n_held_out,
                              epochs=fit.epochs, epochs_run=fit.epochs_run, seconds=round(fit.seconds, 1))
        else:
            fit = fit_head(self.model, heal.first[depth], labels, regression=self.task.is_regression)
            held = heal.n // 10 if heal.n >= 100 else 0
            stats = HealStats(depth=depth, mode="head", n_train=heal.n - held, n_held_out=held,
                              seconds=round(time.perf_counter() - started, 1))
        self.heals[depth] = fit
        self.heal_runs.append(stats)
        return fit

    def install(self, truncated, depth: int) -> None:
        """Put the heal of `depth` into the model truncated there."""
        fit = self.heals.get(depth)
        if isinstance(fit, Distilled):
            fit.install(truncated)
        elif fit is not None:
            load_head(truncated, fit.state)

    def _metric(self, logits: np.ndarray) -> float:
        return compute_metric(self.task.metric, self.texts.calibration_labels, logits, regression=self.task.is_regression)

    def report(self, boundary: int, depth: int, probed: list[int], parts: EvalParts,
               candidates: list[ExportCandidate], note: str | None, opts: ExportOptions) -> DepthReport:
        scores = [self.scores.get(d) or DepthScore(depth=d, metric=self.raw[d]) for d in range(1, self.total + 1)]
        heal, agreement = self.texts.heal, self.texts.agreement
        return DepthReport(
            mode="auto" if opts.keep_layers == "auto" else "fixed", heal=self.heal, heal_layers=opts.heal_layers,
            boundary=boundary, total_layers=self.total, depth=depth, tolerance=opts.tolerance, full_metric=self.full,
            metric_name=self.task.metric, calibration=parts.calibration_name, n_calibration=len(parts.calibration),
            n_heal=heal.n if heal else 0, heal_labelled=self.texts.heal_labels is not None,
            n_agreement=agreement.n if agreement else 0, probed=probed, scores=scores,
            heal_runs=self.heal_runs, candidates=candidates, note=note,
        )


def _with_head(model, fit: HeadFit, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Run `compute` with a re-fitted head installed, then put the fine-tuned head back."""
    fine_tuned = head_state(model)
    load_head(model, fit.state)
    try:
        return compute()
    finally:
        load_head(model, fine_tuned)


@dataclass(frozen=True)
class _ErrorBudget:
    depth: float  # for the depth walk
    per_variant: float  # for each int8 variant
    variants: int


def _error_budget(opts: ExportOptions, variants: int = 2) -> _ErrorBudget:
    """Split the export's error rate over its forecasts (Bonferroni): export keeps the first int8 variant that
    passes, so each variant is another chance to ship a bundle the gate refuses. With --quantize int8, half
    of alpha goes to the depth walk and half is shared by the int8 variants; without, all of it to the depth."""
    if not opts.quantize:
        return _ErrorBudget(depth=opts.alpha, per_variant=0.0, variants=0)
    return _ErrorBudget(depth=opts.alpha / 2, per_variant=opts.alpha / 2 / variants, variants=variants)


def _choose_depth(passes: Callable[[int, float], bool], boundary: int, total: int, keep: int | Literal["auto"],
                  alpha: float) -> int:
    """Fixed N, or auto: from the CKA boundary, down while the forecast passes (a fixed-sequence test: each
    step at `alpha`), else up until it does. Going up, every depth tried is another chance for a wrong yes,
    so those share `alpha` (Bonferroni over the depths between the boundary and the full model, which
    always passes)."""
    if keep != "auto":
        passes(keep, alpha)
        return keep
    depth = min(max(boundary, 1), total)
    if passes(depth, alpha):
        while depth > 1 and passes(depth - 1, alpha):
            depth -= 1
        return depth
    step = alpha / max(total - depth - 1, 1)
    while depth < total and not passes(depth, step):
        depth += 1
    passes(depth, step)  # scored for the report, the full model included
    return depth


def _pick_export(bundle: Path, task: TaskConfig, texts: _Texts, parts: EvalParts, max_length: int,
                 opts: ExportOptions, budget: _ErrorBudget, cpu: str) -> list[ExportCandidate]:
    """Score the export candidates fastest first (int8; int8 with the feed-forward outputs and head in fp32; the
    fp32 model as exported), keep the first whose forecast passes in `bundle`, and report them all. The
    int8 variants share their part of the error budget; fp32 is the depth the walk already chose."""
    variants: list[tuple[str, list[str] | None]] = [("int8", None), ("int8-safe", onnx_export.sensitive_nodes(bundle))]
    scored: list[tuple[ExportCandidate, Path | None]] = []
    with tempfile.TemporaryDirectory(prefix=".candidates-", dir=bundle.parent) as staging:
        for label, keep_fp32 in variants:
            folder = Path(staging) / label
            shutil.copytree(bundle, folder)
            name = onnx_export.quantize_onnx(folder, keep_fp32, cpu=cpu)
            scored.append((_score_candidate(name, folder, task, texts, parts, max_length, opts, budget.per_variant),
                           folder))
        scored.append((_score_candidate("fp32", bundle, task, texts, parts, max_length, opts, budget.depth), None))
        chosen, folder = next(((c, f) for c, f in scored if c.forecast.passes), scored[-1])
        chosen.chosen = True
        if folder is not None:
            shutil.copy(folder / onnx_export.ONNX_FILE, bundle / onnx_export.ONNX_FILE)
    return [c for c, _ in scored]


def _score_candidate(name: str, folder: Path, task: TaskConfig, texts: _Texts, parts: EvalParts, max_length: int,
                     opts: ExportOptions, alpha: float) -> ExportCandidate:
    runner = OnnxClassifier(folder, max_length=max_length)
    started = time.perf_counter()
    calibration = runner.logits(parts.calibration.texts, parts.calibration.pairs, batch_size=opts.batch_size)
    rate = len(parts.calibration) / (time.perf_counter() - started)
    unlabeled = None
    if texts.agreement is not None:
        examples = texts.agreement.examples
        unlabeled = (texts.agreement.logits, runner.logits(examples.texts, examples.pairs, batch_size=opts.batch_size))
    prediction = forecast(task, parts.calibration.labels, texts.calibration.logits, calibration, opts.tolerance,
                          len(parts.holdout), unlabeled, alpha)
    metric = compute_metric(task.metric, parts.calibration.labels, calibration, regression=task.is_regression)
    return ExportCandidate(name=name, metric=metric, forecast=prediction, sentences_per_s=round(rate, 1))


def _onnx_logits(bundle: Path, examples: Examples, max_length: int) -> np.ndarray:
    return OnnxClassifier(bundle, max_length=max_length).logits(examples.texts, examples.pairs)


def _save_checkpoint(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _load_analysis(run_dir: Path) -> AnalysisReport:
    path = Path(run_dir) / ANALYSIS_FILE
    if not path.is_file():
        raise LayerpruneError(f"{run_dir} holds no {ANALYSIS_FILE}; run `layerprune analyze` first")
    return load_artifact(AnalysisReport, path)
