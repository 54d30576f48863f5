"""export: analysis run directory -> validated ONNX bundle, in the stages `export_bundle` runs:

1. Texts: calibration and holdout (validate.calibration_and_holdout), heal texts (the train split, or
   --heal-data) with their augmented copies (heal/augment.py), and --heal-data's agreement texts.
2. The original model runs once over all but the holdout (heal.encode_texts): its logits and states are
   what every heal learns from and every depth is scored against.
3. Depth (depth_search): fixed N, or auto, each depth healed as asked (heal/) and forecast on calibration.
4. Build: truncate, install the heal, ONNX through optimum, optimize; with int8 the candidates are scored
   fastest first (int8; int8 with the feed-forward outputs and head in fp32; fp32) and the first whose
   forecast passes is kept.
   With --fallback, the original's graph joins the bundle, and every forecast and the validation are of the
   two served together (layerprune.fallback); with the top-layer heal, only the original's layers above the
   ones the bundle shares with it (layerprune.continuation).
5. Validate the bundle against the original on the disjoint holdout, at the bundle's one max length. The
   bundle and every scratch file are built in one staging folder beside the target, and the bundle renamed
   into place, unless the gate refused it and the target holds a servable bundle: then it goes beside it.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import continuation, onnx_export
from .artifacts import (
    AnalysisReport,
    DepthReport,
    ExportCandidate,
    FallbackRule,
    HealMode,
    Manifest,
    ValidationReport,
    atomic_dir,
    library_versions,
    load_artifact,
    staged_dir,
)
from .bundle import bundle_parts, fallback_options, hash_files, output_labels, seal_manifest, servable_bundle
from .cpu import cpu_kind
from .data import Examples, load_examples, read_texts
from .depth_search import Depths, ErrorBudget, ExportTexts, choose_depth, error_budget
from .errors import LayerpruneError
from .fallback import threshold
from .files import (
    ANALYSIS_FILE, BUNDLE_DIR, CKA_PLOT, CONFIG_FILE, CONTINUATION_MODEL_FILE, DEPTH_FILE, DEPTH_PLOT, FAILED_SUFFIX,
    MANIFEST_FILE, MODEL_DATA_FILE, MODEL_FILE, ORIGINAL_MODEL_FILE, TRUNCATED_DIR, VALIDATION_FILE,
)
from .heal import Heal, TextStates, augment_texts, encode_texts
from .hidden import predict_logits
from .models import architecture, load_classifier, total_layers
from .options import ExportOptions  # options are declared once, with their CLI flags
from .plots import plot_depths
from .prune import truncate
from .runtime import OnnxClassifier, model_max_length
from .scoring import compute_metric
from .tasks import TaskConfig
from .validate import EvalParts, calibration_and_holdout, certifiable_disagreement, compare, forecast

@dataclass(frozen=True)
class ExportResult:
    bundle: Path
    manifest: Manifest
    validation: ValidationReport
    depth: DepthReport
    truncated_checkpoint: Path
    advice: str | None  # what to try next when the gate refused the bundle
    next_candidate: ExportOptions | None  # the same, as options
    kept: Path | None = None  # the servable bundle a refused one did not replace (`bundle` is then beside it)


@dataclass(frozen=True)
class _HealTexts:
    examples: Examples | None  # the texts heals learn from (None: no heal possible)
    labels: np.ndarray | None  # their labels where known (-1 / NaN: augmented), None: unlabeled texts
    agreement: Examples | None  # unlabeled in-domain texts that bound disagreement (never heal or train texts)


# Options that choose and check the cut, never what a heal learns from: exports differing only in them share a Reuse.
_NOT_HEAL_INPUTS = ("keep_layers", "optimize", "quantize", "tolerance", "alpha", "sweep", "max_examples", "resample_seed",
                    "fallback")
_DEFAULTS = ExportOptions()


@dataclass
class Reuse:
    """The work of an export that calibration, holdout and the gate leave unchanged: the original's outputs on
    the heal and agreement texts, and the trained heals by depth (a heal never sees calibration or holdout).
    Passed to `export_bundle` again for the same run directory, and options that differ at most in what
    chooses and checks the cut (another resample, tolerance, int8 or not, depth), it skips that work, as
    benchmarks/bench_auto.py does across resamples; for any other options it starts over."""

    heal_inputs: tuple | None = None
    heal: TextStates | None = None
    agreement: TextStates | None = None
    heals: dict[int, Heal] = field(default_factory=dict)

    def matching(self, run_dir: Path, opts: ExportOptions) -> Reuse:
        """This reuse, emptied first if it was made for other heal inputs."""
        inputs = (Path(run_dir).resolve(), dataclasses.replace(opts, **{k: getattr(_DEFAULTS, k) for k in _NOT_HEAL_INPUTS}))
        if inputs != self.heal_inputs:
            self.heal_inputs, self.heal, self.agreement, self.heals = inputs, None, None, {}
        return self


def export_bundle(run_dir: Path, out: Path | None = None, opts: ExportOptions = ExportOptions(),
                  reuse: Reuse | None = None) -> ExportResult:
    """Build the bundle for the analysis in `run_dir` (default output: RUN_DIR/bundle), reusing `reuse`'s
    work where it was made for the same heal inputs and leaving this export's there."""
    reuse = (reuse or Reuse()).matching(run_dir, opts)
    analysis = load_analysis(run_dir)
    task, glue_dir = analysis.task_config, Path(analysis.glue_dir) if analysis.glue_dir else None
    model, tokenizer = load_classifier(
        analysis.model, num_labels=task.num_labels, device=opts.device, trust_remote_code=opts.trust_remote_code
    )
    total = total_layers(model.config)
    if opts.keep_layers != "auto" and not 1 <= opts.keep_layers <= total:
        raise LayerpruneError(f"--keep-layers must be between 1 and {total} for this model, got {opts.keep_layers}")
    if opts.fallback and task.is_regression:
        raise LayerpruneError(f"--fallback needs a classification task: {task.name}'s regression output has no "
                              "top-class probability to be unsure of")
    max_length = _max_length(model, tokenizer, opts.max_length)

    # 1-2. the texts, and the original's outputs on them
    heal_texts = _heal_texts(task, glue_dir, opts)
    heal = _heal_mode(opts.heal, model, heal_texts)
    if heal in ("distill", "whole") and opts.augment:
        heal_texts = _augmented(heal_texts, task, opts)
    parts = calibration_and_holdout(task, glue_dir, opts.max_examples, opts.resample_seed)
    texts = _encode(model, tokenizer, parts, heal_texts, heal, max_length, opts, analysis.boundary, reuse)
    original_holdout = predict_logits(model, tokenizer, parts.holdout, max_length=max_length)

    # 3. the depth
    budget = error_budget(opts)
    depths = Depths(model, task, texts, heal, opts, n_holdout=len(parts.holdout), trained=reuse.heals)
    depth = choose_depth(depths.passes, analysis.boundary, total, opts.keep_layers, budget.depth)
    probed = list(depths.probed)  # what auto looked at; --sweep scores the rest for the report only
    if opts.sweep:
        for d in range(1, total + 1):
            depths.passes(d, budget.depth)
    note = _nothing_dropped(depths, total, opts) if opts.keep_layers == "auto" and depth == total else None
    bundled = _truncated_and_healed(model, depths.heal(depth), task)
    falls_back = opts.fallback and depth < total  # (at full depth the two graphs are the same model)
    cut = continuation.cut_layer(depth, heal, opts.heal_layers) if falls_back else None

    # 4-5. the bundle: ONNX, the export candidates, validation on the holdout, the artifacts
    target = Path(out) if out is not None else Path(run_dir) / BUNDLE_DIR
    with staged_dir(target, MANIFEST_FILE) as stage:
        tmp, scratch = stage.out, stage.scratch
        _save_checkpoint(bundled, tokenizer, scratch / TRUNCATED_DIR)
        onnx_export.export_onnx(scratch / TRUNCATED_DIR, tmp)
        if cut is not None:  # the states a text sent on continues from: a second output of the bundle's graph
            continuation.add_cut_output(tmp / MODEL_FILE, model.config.to_dict(), cut)
        truncated = predict_logits(bundled, tokenizer, parts.holdout, max_length=max_length)
        exported = _onnx_logits(tmp, parts.holdout, max_length, opts.batch_size)
        parity = onnx_export.max_logit_difference(truncated, exported)
        if opts.optimize:
            onnx_export.optimize_onnx(tmp, opts.optimize)
        cpu = cpu_kind()  # the int8 weights are quantized for this CPU, and the manifest says which
        graphs = None if cut is None else continuation.Continuations(
            _original_onnx(model, tokenizer, scratch) / MODEL_FILE, model.config.to_dict(), cut, scratch, opts.optimize,
            cpu)
        candidates, calibration = (_pick_export(tmp, task, texts, parts, max_length, opts, budget, cpu, graphs)
                                   if opts.quantize else ([], None))
        quantized = next((c.name for c in candidates if c.chosen and c.name != "fp32"), None)
        rule = None
        if falls_back:
            if calibration is None:
                calibration = _onnx_logits(tmp, parts.calibration, max_length, opts.batch_size)
            rule = _add_original(model, tokenizer, tmp, scratch, calibration, opts, graphs, quantized)
        runner = _runner(tmp, max_length, rule)
        served = runner.logits(parts.holdout.texts, parts.holdout.pairs)
        validation = compare(task, parts.holdout, parts.holdout_name, original_holdout, served, opts.tolerance,
                             max_length, parity, runner.sent_on / len(parts.holdout) if rule else None)
        report = depths.report(analysis.boundary, depth, probed, parts.calibration_name, candidates, note)
        _write_reports(tmp, run_dir, validation, report)
        manifest = _manifest(tmp, analysis, task, report, validation, quantized, cpu, opts, rule)
        manifest.save(tmp / MANIFEST_FILE)
        seal_manifest(tmp)
        stage.target = _destination(target, validation.passed)
    # The truncated PyTorch checkpoint, for users who fine-tune or serve it further; not part of the bundle.
    with atomic_dir(Path(run_dir) / TRUNCATED_DIR, CONFIG_FILE) as tmp:
        _save_checkpoint(bundled, tokenizer, tmp)
    advice, retry = (None, None) if validation.passed else _next_candidate(depth, total, quantized, opts)
    kept = target if stage.target != target else None
    return ExportResult(stage.target, manifest, validation, report, Path(run_dir) / TRUNCATED_DIR, advice, retry, kept)


def _destination(target: Path, passed: bool) -> Path:
    """Where the bundle goes: `target`, unless the gate refused it and `target` holds a bundle that serves. A
    failed export never takes a servable bundle's place: it goes beside it, as TARGET.failed."""
    if passed:
        return target
    try:
        servable_bundle(target)
    except LayerpruneError:
        return target  # nothing there that serves: the failed bundle takes its place, marked not servable
    return target.with_name(target.name + FAILED_SUFFIX)


def _encode(model, tokenizer, parts: EvalParts, heal_texts: _HealTexts, heal: HealMode, max_length: int,
            opts: ExportOptions, boundary: int, reuse: Reuse) -> ExportTexts:
    """The original model's outputs on everything export looks at but the holdout (on the heal and agreement
    texts: `reuse`'s, else computed and left there)."""
    kept, spare = _kept_states(heal, opts, boundary, total_layers(model.config))

    def encode(examples: Examples, role: str):
        return encode_texts(model, tokenizer, examples, batch_size=opts.batch_size, max_length=max_length,
                            keep_tokens=kept, spare_tokens=spare, desc=f"original, {role}")

    healing = heal != "none"
    if healing and reuse.heal is None:
        reuse.heal = encode(heal_texts.examples, "heal texts")
    if heal_texts.agreement and reuse.agreement is None:
        reuse.agreement = encode(heal_texts.agreement, "agreement texts")
    return ExportTexts(
        calibration=encode(parts.calibration, "calibration"),
        calibration_labels=parts.calibration.labels,
        heal=reuse.heal if healing else None,
        heal_labels=heal_texts.labels if healing else None,
        agreement=reuse.agreement,
    )


def _kept_states(heal: HealMode, opts: ExportOptions, boundary: int, total: int) -> tuple[set[int], list[int]]:
    """The hidden-state indices whose token states the one pass of the original keeps, and those it keeps too
    where memory allows (heals compute any other index from the nearest kept one below, running the original's
    lower layers over every heal text again: minutes on a 12-layer model). Always the embeddings; for the
    top-layer heal, the inputs of the depths it trains first (the fixed depth, or auto's CKA boundary and the
    depth below it, where the walk goes next when the boundary passes), then those of the depths further down
    the walk, nearest first."""
    indices, spare = {0}, []
    if heal == "distill":
        first = min(max(boundary, 2), total)
        tried = [first, first - 1] if opts.keep_layers == "auto" else [opts.keep_layers]
        indices |= {max(d - opts.heal_layers, 0) for d in tried if d < total}
        if opts.keep_layers == "auto":
            spare = [d - opts.heal_layers for d in range(first - 2, opts.heal_layers, -1)]
    return indices, spare


def _truncated_and_healed(original, heal: Heal, task: TaskConfig):
    """The bundle's model: a copy of the original truncated at the heal's depth with the heal installed, its
    config naming the task's labels whatever the checkpoint said. A copy: heals run the original's lower
    layers, and a reused heal may be asked for a depth above this one."""
    model = truncate(copy.deepcopy(original), heal.depth)
    heal.install(model)
    if task.label_names:
        model.config.id2label = dict(enumerate(task.label_names))
        model.config.label2id = {name: i for i, name in enumerate(task.label_names)}
    return model


def _add_original(original, tokenizer, bundle: Path, scratch: Path, calibration: np.ndarray, opts: ExportOptions,
                  graphs: continuation.Continuations | None, quantized: str | None) -> FallbackRule:
    """The fallback: the original's ONNX graph (exported in `scratch`, optimized as the bundle's) beside the
    bundle's, and the threshold below which the bundle's graph, as exported, sends a text on: the --fallback
    quantile of its top-class probabilities on the calibration texts (`calibration`: its logits there; with
    int8, the very run of the kept candidate its forecast scored). Where the bundle's graph continues
    (`graphs`), only the original's layers above the cut and its head, made as the kept candidate was."""
    below = threshold(calibration, opts.fallback)
    if graphs is not None:
        shutil.move(graphs.graph(quantized), bundle / CONTINUATION_MODEL_FILE)
        return FallbackRule(share=opts.fallback, threshold=below, continue_from=graphs.layer)
    onnx_dir = _original_onnx(original, tokenizer, scratch)
    if opts.optimize:
        onnx_export.optimize_onnx(onnx_dir, opts.optimize)
    if (onnx_dir / MODEL_DATA_FILE).exists():
        raise LayerpruneError("--fallback needs the original's graph in one file (under 2 GB); this one is larger")
    shutil.move(onnx_dir / MODEL_FILE, bundle / ORIGINAL_MODEL_FILE)
    return FallbackRule(share=opts.fallback, threshold=below)


def _original_onnx(original, tokenizer, scratch: Path) -> Path:
    """A folder in `scratch` with the original's ONNX graph as optimum exports it (fp32, unoptimized)."""
    checkpoint, onnx_dir = scratch / "original", scratch / "original-onnx"
    _save_checkpoint(original, tokenizer, checkpoint)
    onnx_export.export_onnx(checkpoint, onnx_dir)
    return onnx_dir


def _runner(bundle: Path, max_length: int, rule: FallbackRule | None) -> OnnxClassifier:
    """The bundle's model as it is served: its graph, and the original's for the texts its fallback sends on."""
    return OnnxClassifier(bundle, max_length=max_length, **fallback_options(bundle, rule, bundle_parts(bundle)))


def _manifest(bundle: Path, analysis: AnalysisReport, task: TaskConfig, report: DepthReport,
              validation: ValidationReport, quantized: str | None, cpu: str, opts: ExportOptions,
              rule: FallbackRule | None) -> Manifest:
    """The bundle's one contract: its files and their hashes, and everything its consumers need."""
    return Manifest(
        files=hash_files(bundle), parts=bundle_parts(bundle), source_checkpoint=analysis.model, task=task.name,
        metric_name=task.metric, labels=output_labels(bundle), depth=report.depth, total_layers=report.total_layers,
        model_type=analysis.model_type, heal=report.heal, max_length=validation.max_length,
        pair_input=task.text_pair_field is not None, resample_seed=opts.resample_seed, optimize=opts.optimize,
        quantize="int8" if quantized else None, quantization_config=quantized, int8_cpu=cpu if quantized else None,
        fallback=rule, servable=validation.passed, versions=library_versions(),
    )


def _write_reports(bundle: Path, run_dir: Path, validation: ValidationReport, report: DepthReport) -> None:
    validation.save(bundle / VALIDATION_FILE)
    report.save(bundle / DEPTH_FILE)
    plot_depths(report, bundle / DEPTH_PLOT)
    shutil.copy(Path(run_dir) / ANALYSIS_FILE, bundle / ANALYSIS_FILE)
    if (Path(run_dir) / CKA_PLOT).is_file():
        shutil.copy(Path(run_dir) / CKA_PLOT, bundle / CKA_PLOT)


def _nothing_dropped(depths: Depths, total: int, opts: ExportOptions) -> str:
    """Why auto kept every layer, in one line: how close the deepest cut looked at came, and what it needed."""
    line = f"nothing can be dropped within tolerance {opts.tolerance:g}: keeping all {total} layers"
    cut = max((d for d in depths.scores if d < total), default=None)
    if cut is None:
        return line
    guess = depths.scores[cut].forecast
    if guess.disagreement is None:
        return f"{line}; depth {cut} came to {100 * guess.lower_bound:+.2f} points at the forecast's lower bound"
    needed = certifiable_disagreement(opts.tolerance, guess.alpha, depths.texts.calibration.n, depths.n_holdout)
    return (f"{line}; depth {cut} (heal {depths.mode}) disagreed with the original on {100 * guess.disagreement:.2f}% "
            f"of {guess.n_agreement} texts (forecast lower bound {100 * guess.lower_bound:+.2f} points); a cut "
            f"this forecast certifies needs about {100 * needed:.1f}% or less, with no loss of {depths.task.metric}")


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


def _heal_texts(task: TaskConfig, glue_dir: Path | None, opts: ExportOptions) -> _HealTexts:
    """The texts heals learn from: --heal-data (unlabeled) or the task's train split, the first
    --heal-examples of them (default: all, --heal-data's agreement texts excepted).

    Agreement texts are the --heal-data texts after the heal texts, never train texts: the original model was
    most likely fine-tuned on those, is surer of them, and a pruned model disagrees with it less there than on
    new texts, which would make the agreement bound optimistic (docs/export.md)."""
    if opts.heal_data is not None:
        pool = read_texts(opts.heal_data, opts.heal_text_field or task.text_field, task.text_pair_field)
        heal = pool.head(opts.heal_examples or len(pool) - min(opts.agreement_examples, len(pool) // 2))
        rest = pool.select(np.arange(len(heal), min(len(pool), len(heal) + opts.agreement_examples)))
        labels = None
    elif task.train_split:
        heal = load_examples(task, task.train_split, glue_dir=glue_dir)
        heal, rest = heal.head(opts.heal_examples or len(heal)), None
        labels = heal.labels
    else:
        return _HealTexts(None, None, None)
    return _HealTexts(heal, labels, rest if rest is not None and len(rest) else None)


def _augmented(texts: _HealTexts, task: TaskConfig, opts: ExportOptions) -> _HealTexts:
    """The heal texts followed by --augment new texts per text (heal/augment.py), which carry no label."""
    new = augment_texts(texts.examples, opts.augment, seed=opts.whole.seed)
    labels = texts.labels
    if labels is not None:
        missing = np.full(len(new), np.nan if task.is_regression else -1)
        labels = np.concatenate([labels.astype(missing.dtype), missing])
    return _HealTexts(texts.examples.concat(new), labels, texts.agreement)


def _heal_mode(asked: HealMode | None, model, texts: _HealTexts) -> HealMode:
    """The heal asked for, checked against the model and the texts; by default the top-layer heal where the
    layers can be trained alone (its layers below stay the original's, and it agreed with the original best
    where measured: docs/results.md), else the head (labels needed), else none."""
    arch = architecture(model.config)
    layers_alone = not (arch.shared_weights or getattr(model.config, "conv_kernel_size", 0))
    labelled = texts.labels is not None
    if asked is None:
        if texts.examples is None:
            return "none"
        return "distill" if layers_alone else ("head" if labelled else "none")
    if asked != "none" and texts.examples is None:
        raise LayerpruneError(f"--heal {asked} needs texts: the task has no train split; give --heal-data FILE")
    if asked == "head" and not labelled:
        raise LayerpruneError("--heal head needs labelled texts; --heal-data texts carry none: use --heal whole")
    if asked in ("distill", "whole") and not layers_alone:
        raise LayerpruneError(f"--heal {asked} cannot train {model.config.model_type} layers alone (shared "
                              "weights or a convolution); use --heal head")
    return asked


def _pick_export(bundle: Path, task: TaskConfig, texts: ExportTexts, parts: EvalParts, max_length: int,
                 opts: ExportOptions, budget: ErrorBudget, cpu: str,
                 graphs: continuation.Continuations | None) -> tuple[list[ExportCandidate], np.ndarray]:
    """Score the export candidates fastest first (int8; int8 with the feed-forward outputs and head in fp32; the
    fp32 model as exported), keep the first whose forecast passes in `bundle`, and report them all, with the
    kept one's logits on the calibration texts. The int8 variants share their part of the error budget; fp32 is
    the depth the walk already chose. Where the bundle's graph continues (`graphs`), each candidate is scored
    with the continuation made as it is."""
    variants: list[tuple[str, list[str] | None]] = [("int8", None), ("int8-safe", onnx_export.sensitive_nodes(bundle))]
    scored: list[tuple[ExportCandidate, np.ndarray, Path | None]] = []  # with its calibration logits and folder
    with tempfile.TemporaryDirectory(prefix=".candidates-", dir=bundle.parent) as staging:
        for label, keep_fp32 in variants:
            folder = Path(staging) / label
            shutil.copytree(bundle, folder)
            name = onnx_export.quantize_onnx(folder, keep_fp32, cpu=cpu)
            second = graphs.graph(name) if graphs else None
            scored.append((*_score_candidate(name, folder, task, texts, parts, max_length, opts, budget.per_variant,
                                             second), folder))
        second = graphs.graph(None) if graphs else None
        scored.append((*_score_candidate("fp32", bundle, task, texts, parts, max_length, opts, budget.depth, second),
                       None))
        chosen, calibration, folder = next((s for s in scored if s[0].forecast.passes), scored[-1])
        chosen.chosen = True
        if folder is not None:
            shutil.copy(folder / MODEL_FILE, bundle / MODEL_FILE)
    return [c for c, _, _ in scored], calibration


def _score_candidate(name: str, folder: Path, task: TaskConfig, texts: ExportTexts, parts: EvalParts, max_length: int,
                     opts: ExportOptions, alpha: float, second: Path | None = None) -> tuple[ExportCandidate, np.ndarray]:
    """A candidate graph's forecast as served, and its own logits on the calibration texts. `second`: the
    continuation made as this candidate is, which answers the texts it sends on (else the original restarts)."""
    runner = OnnxClassifier(folder, max_length=max_length)
    started = time.perf_counter()
    calibration = own = runner.logits(parts.calibration.texts, parts.calibration.pairs, batch_size=opts.batch_size)
    rate = len(parts.calibration) / (time.perf_counter() - started)
    agreement = None
    if texts.agreement is not None:
        examples = texts.agreement.examples
        agreement = runner.logits(examples.texts, examples.pairs, batch_size=opts.batch_size)
    if opts.fallback and second is not None:  # scored as served: continued from this candidate's own states
        cascade = OnnxClassifier(folder, max_length=max_length, continuation=second,
                                 below=threshold(calibration, opts.fallback))
        calibration = cascade.logits(parts.calibration.texts, parts.calibration.pairs, batch_size=opts.batch_size)
        if agreement is not None:
            agreement = cascade.logits(examples.texts, examples.pairs, batch_size=opts.batch_size)
    elif opts.fallback:  # scored as served: the original answers the texts this candidate is least sure of
        calibration, agreement = texts.served(calibration, agreement, opts.fallback)
    unlabeled = None if agreement is None else (texts.agreement.logits, agreement)
    prediction = forecast(task, parts.calibration.labels, texts.calibration.logits, calibration, opts.tolerance,
                          len(parts.holdout), unlabeled, alpha)
    metric = compute_metric(task.metric, parts.calibration.labels, calibration, regression=task.is_regression)
    return ExportCandidate(name=name, metric=metric, forecast=prediction, sentences_per_s=round(rate, 1)), own


def _onnx_logits(bundle: Path, examples: Examples, max_length: int, batch_size: int) -> np.ndarray:
    return OnnxClassifier(bundle, max_length=max_length).logits(examples.texts, examples.pairs, batch_size=batch_size)


def _save_checkpoint(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def load_analysis(run_dir: Path) -> AnalysisReport:
    """The run directory's analysis, or a LayerpruneError that says to run `layerprune analyze` first."""
    path = Path(run_dir) / ANALYSIS_FILE
    if not path.is_file():
        raise LayerpruneError(f"{run_dir} holds no {ANALYSIS_FILE}; run `layerprune analyze` first")
    return load_artifact(AnalysisReport, path)
