"""export: analysis run directory -> validated ONNX bundle, in the stages `export_bundle` runs:

1. Texts: calibration and holdout (validate.calibration_and_holdout), the heal texts with their augmented copies
   and --heal-data's agreement texts (heal/texts.py).
2. The original model runs once over all but the holdout (heal.encode_texts): its logits and states are
   what every heal learns from and every depth is scored against.
3. Depth (depth_search): fixed N, or auto, each depth healed as asked (heal/) and forecast on calibration.
4. Build: truncate, install the heal, ONNX through optimum, optimize; with int8 the export candidates
   (candidates.py) are scored fastest first and the first whose forecast passes (and --min-agreement's bound)
   is kept; with --fallback auto, the cheapest, the int8 ones scored at each depth the walk passed.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import continuation, cost, onnx_export
from .artifacts import (
    AnalysisReport,
    DepthReport,
    ExportCandidate,
    FallbackRule,
    HealMode,
    Manifest,
    Stage,
    ValidationReport,
    atomic_dir,
    library_versions,
    load_analysis,
    staged_dir,
)
from .bundle import bundle_parts, fallback_options, hash_files, output_labels, seal_manifest, servable_bundle
from .candidates import DepthGraphs, onnx_logits, pick_candidate
from .cpu import cpu_kind
from .data import Examples
from .depth_search import Depths, ErrorBudget, ExportTexts, choose_depth, error_budget
from .errors import LayerpruneError
from .fallback import threshold
from .files import (
    ANALYSIS_FILE, BUNDLE_DIR, CKA_PLOT, CONFIG_FILE, CONTINUATION_MODEL_FILE, DEPTH_FILE, DEPTH_PLOT, FAILED_SUFFIX,
    MANIFEST_FILE, MODEL_DATA_FILE, MODEL_FILE, ORIGINAL_MODEL_FILE, TRUNCATED_DIR, VALIDATION_FILE,
)
from .heal import Heal, TextStates, encode_texts
from .heal.texts import HealTexts, heal_texts, with_augmented
from .hidden import predict_logits
from .models import layers_run_alone, load_classifier, total_layers
from .options import Candidate, ExportOptions  # options are declared once, with their CLI flags
from .plots import plot_depths
from .prune import truncate
from .runtime import OnnxClassifier, model_max_length
from .tasks import TaskConfig
from .validate import EvalParts, calibration_and_holdout, certifiable_disagreement, compare


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


# Options that choose and check the cut, never what a heal learns from: exports differing only in them share a Reuse.
_NOT_HEAL_INPUTS = ("keep_layers", "optimize", "quantize", "tolerance", "alpha", "sweep", "max_examples", "resample_seed",
                    "fallback", "min_agreement")
_DEFAULTS = ExportOptions()


@dataclass
class Reuse:
    """The work of an export that calibration, holdout and the gate leave unchanged: the original's outputs on
    the heal and agreement texts, and the trained heals by depth (a heal never sees calibration or holdout).
    Passed to `export_bundle` again for the same run directory, and options that differ at most in what
    chooses and checks the cut (another resample, tolerance, int8 or not, depth), it skips that work, as
    `python -m benchmarks auto` does across resamples; for any other options it starts over."""

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
    """Build the bundle for the analysis in a run directory: truncate, heal, choose the depth, export to ONNX
    (int8 where asked and forecast to pass), validate on the holdout, write the bundle atomically.

    run_dir: the run directory `analyze` wrote (analysis.json); export also writes the truncated PyTorch
        checkpoint there, in `truncated/`.
    out: the bundle's folder (default RUN_DIR/bundle). A bundle the gate refused never replaces a servable one
        there: it goes beside it, as OUT.failed (`ExportResult.bundle` says where it went, `.kept` what stayed).
    opts: the export's options (`ExportOptions`: the CLI's flags, with the same names and defaults).
    reuse: the work of earlier exports of the same run directory (the original's outputs on the heal texts, the
        trained heals), used where it was made for the same heal inputs; this export leaves its own there.
    Returns the bundle's folder, manifest, validation and depth report, and when the gate refused it, what to
    try next. Raises LayerpruneError (one line) for bad input."""
    run_dir = Path(run_dir)
    reuse = (reuse or Reuse()).matching(run_dir, opts)
    source = _open_source(run_dir, opts)

    # 1-2. the texts, and the original's outputs on them
    healing = heal_texts(source.task, source.glue_dir, opts)
    heal = _heal_mode(opts.heal, source.model, healing)
    if heal in ("top", "whole") and opts.augment:
        healing = with_augmented(healing, source.task, opts)
    parts = calibration_and_holdout(source.task, source.glue_dir, opts.max_examples, opts.resample_seed)
    texts = _encode(source, parts, healing, heal, opts, reuse)
    original_holdout = predict_logits(source.model, source.tokenizer, parts.holdout, max_length=source.max_length)

    # 3. the depth
    budget = error_budget(opts)
    costs = (cost.measure(source.model, source.tokenizer, parts.calibration, source.max_length, opts.batch_size)
             if opts.fallback == "auto" else None)
    depths = Depths(source.model, source.task, texts, heal, opts, n_holdout=len(parts.holdout), trained=reuse.heals,
                    costs=costs)
    walk = _walk(depths, source, opts, budget)

    # 4-5. the bundle: ONNX, the export candidates, validation on the holdout, the artifacts
    target = Path(out) if out is not None else run_dir / BUNDLE_DIR
    with staged_dir(target, MANIFEST_FILE) as stage:
        built = _build(stage, source, walk, parts, texts, healing.examples, original_holdout, opts, budget, depths)
        report = depths.report(source.analysis.boundary, built.depth, built.share, walk.probed, parts.calibration_name,
                               built.candidates, walk.note)
        manifest = _write_artifacts(stage.out, run_dir, source, report, built, opts)
        stage.target = _destination(target, built.validation.passed)
    with atomic_dir(run_dir / TRUNCATED_DIR, CONFIG_FILE) as tmp:  # for users who fine-tune or serve it further
        _save_checkpoint(built.model, source.tokenizer, tmp)
    advice, retry = ((None, None) if built.validation.passed
                     else _next_candidate(built.depth, source.total, built.quantized, opts))
    return ExportResult(stage.target, manifest, built.validation, report, run_dir / TRUNCATED_DIR, advice, retry,
                        kept=target if stage.target != target else None)


@dataclass(frozen=True)
class _Source:
    """The original model an export starts from, its task and data, and the bundle's one max length."""

    analysis: AnalysisReport
    task: TaskConfig
    glue_dir: Path | None
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    total: int  # its encoder layers
    max_length: int


def _open_source(run_dir: Path, opts: ExportOptions) -> _Source:
    """The run directory's analysis and the original model it names, with the options checked against them."""
    analysis = load_analysis(run_dir)
    task, glue_dir = analysis.task_config, Path(analysis.glue_dir) if analysis.glue_dir else None
    if opts.min_agreement is not None and task.is_regression:
        raise LayerpruneError(f"--min-agreement needs a classification task: {task.name}'s regression output has no "
                              "predicted class to agree with the original on")
    model, tokenizer = load_classifier(
        analysis.model, num_labels=task.num_labels, device=opts.device, trust_remote_code=opts.trust_remote_code
    )
    total = total_layers(model.config)
    if opts.keep_layers != "auto" and not 1 <= opts.keep_layers <= total:
        raise LayerpruneError(f"--keep-layers must be between 1 and {total} for this model, got {opts.keep_layers}")
    if opts.fallback and task.is_regression:
        raise LayerpruneError(f"--fallback needs a classification task: {task.name}'s regression output has no "
                              "top-class probability to be unsure of")
    return _Source(analysis, task, glue_dir, model, tokenizer, total, _max_length(model, tokenizer, opts.max_length))


@dataclass(frozen=True)
class _Walk:
    depth: int  # what the depth search chose
    share: float  # the share sent on it chose (--fallback's, or with auto the cheapest that passes)
    probed: list[int]  # the depths it looked at, in order (--sweep scores the rest, for the report only)
    note: str | None  # why auto kept every layer


def _walk(depths: Depths, source: _Source, opts: ExportOptions, budget: ErrorBudget) -> _Walk:
    """The depth search: fixed N or auto from the CKA boundary (depth_search.choose_depth)."""
    total = source.total
    depth = choose_depth(depths.passes, source.analysis.boundary, total, opts.keep_layers, budget.depth)
    probed, share = list(depths.probed), opts.fallback
    if depths.costs is not None:  # auto: the cheapest (depth, share) whose walk passed
        depth, share = depths.cheapest(probed, depth)
    if opts.sweep:
        for d in range(1, total + 1):
            depths.passes(d, budget.depth)
    note = _nothing_dropped(depths, total, opts) if opts.keep_layers == "auto" and depth == total else None
    return _Walk(depth, share if depth < total else 0.0, probed, note)


@dataclass(frozen=True)
class _Built:
    """What building the bundle in its staging folder decided."""

    validation: ValidationReport
    candidates: list[ExportCandidate]
    kept: Candidate  # the export candidate kept
    quantized: str | None  # its int8 configuration's name (None: fp32)
    depth: int  # the depth it keeps: the walk's, or with int8 one the walk passed above it
    share: float  # the share sent on it was kept at
    rule: FallbackRule | None
    cpu: str  # the CPU kind its int8 weights were quantized for
    model: PreTrainedModel  # the truncated and healed PyTorch model it was exported from


def _build(stage: Stage, source: _Source, walk: _Walk, parts: EvalParts, texts: ExportTexts, heal: Examples | None,
           original_holdout: np.ndarray, opts: ExportOptions, budget: ErrorBudget, depths: Depths) -> _Built:
    """The bundle's graph in `stage.out` (ONNX, optimized, the export candidate kept, the fallback's original
    or continuation beside it) and its validation against the original's logits on the holdout. `heal`: the heal
    texts, which faithful int8 calibrates on."""
    max_length, cpu = source.max_length, cpu_kind()  # int8 weights are quantized for this CPU; the manifest says which
    # with auto and int8, the candidates may send on a share the walk did not choose
    sends_on = bool(walk.share) or (opts.fallback == "auto" and opts.quantize is not None)
    graphs = _Graphs(stage.scratch, source, depths, opts, cpu, sends_on)
    walked = dataclasses.replace(opts, fallback=walk.share)  # the walk's share, fp32's candidate's
    if opts.quantize:
        picked = pick_candidate(depths.int8_depths(walk.probed, walk.depth), walk.depth, graphs.at, heal, source.task,
                                texts, parts, max_length, walked, budget, cpu, stage.scratch,
                                shares=opts.shares if depths.costs else None,
                                cost=depths.cost if depths.costs else None)
        candidates, calibration, kept, chosen = picked.candidates, picked.calibration, picked.kept, picked.graphs
    else:
        candidates, calibration, kept, chosen = [], None, "fp32", graphs.at(walk.depth)
    depth, tmp = chosen.depth, stage.out
    shutil.copytree(chosen.folder, tmp, dirs_exist_ok=True)
    quantized = next((c.name for c in candidates if c.chosen and c.name != "fp32"), None)
    share = next((c.share for c in candidates if c.chosen), walk.share)
    rule = None
    if share and depth < source.total:  # (at full depth the two graphs are the same model)
        if calibration is None:
            calibration = onnx_logits(tmp, parts.calibration, max_length, opts.batch_size)
        rule = _add_original(graphs, tmp, calibration, opts, share, chosen.continuations, kept)
    elif chosen.continuations is not None:  # a share auto scored but did not keep: the graph answers every text alone
        continuation.drop_cut_output(tmp / MODEL_FILE)
    model = graphs.model(depth)
    truncated = predict_logits(model, source.tokenizer, parts.holdout, max_length=max_length)
    parity = onnx_export.max_logit_difference(truncated, onnx_logits(chosen.unoptimized, parts.holdout, max_length,
                                                                     opts.batch_size))
    runner = _runner(tmp, max_length, rule)
    served = runner.logits(parts.holdout.texts, parts.holdout.pairs)
    validation = compare(source.task, parts.holdout, parts.holdout_name, original_holdout, served, opts.tolerance,
                         max_length, parity, runner.sent_on / len(parts.holdout) if rule else None)
    return _Built(validation, candidates, kept, quantized, depth, share, rule, cpu, model)


@dataclass
class _Graphs:
    """Each depth's fp32 graphs (candidates.DepthGraphs), made in `scratch` the first time they are asked for, and
    the original's ONNX export, made once, that the texts sent on continue into or restart in."""

    scratch: Path
    source: _Source
    depths: Depths
    opts: ExportOptions
    cpu: str
    sends_on: bool  # whether the bundle may send texts on: each graph then hands on the states they continue from
    made: dict[int, DepthGraphs] = field(default_factory=dict)

    def at(self, depth: int) -> DepthGraphs:
        if depth not in self.made:
            self.made[depth] = self._make(depth)
        return self.made[depth]

    def model(self, depth: int) -> PreTrainedModel:
        """The original truncated at `depth` with that depth's heal installed."""
        return _truncated_and_healed(self.source.model, self.depths.heal(depth), self.source.task)

    def original(self) -> Path:
        """A folder in scratch with the original's ONNX graph as optimum exports it (fp32, unoptimized)."""
        checkpoint, onnx_dir = self.scratch / "original", self.scratch / "original-onnx"
        if not onnx_dir.is_dir():
            _save_checkpoint(self.source.model, self.source.tokenizer, checkpoint)
            onnx_export.export_onnx(checkpoint, onnx_dir)
        return onnx_dir

    def _make(self, depth: int) -> DepthGraphs:
        """The depth's graph as exported (with the cut's states as a second output where texts may continue), a
        copy optimized as asked, and the continuations from its cut."""
        source, opts, work = self.source, self.opts, self.scratch / f"layers-{depth}"
        _save_checkpoint(self.model(depth), source.tokenizer, work / TRUNCATED_DIR)
        exported = work / "exported"
        onnx_export.export_onnx(work / TRUNCATED_DIR, exported)
        config = source.model.config.to_dict()
        cut = (continuation.cut_layer(depth, self.depths.heal_mode, opts.top.heal_layers)
               if self.sends_on and depth < source.total else None)
        if cut is not None:  # the states a text sent on continues from: a second output of the bundle's graph
            continuation.add_cut_output(exported / MODEL_FILE, config, cut)
        folder = Path(shutil.copytree(exported, work / "bundle"))
        if opts.optimize:
            onnx_export.optimize_onnx(folder, opts.optimize)
        continuations = None if cut is None else continuation.Continuations(
            self.original() / MODEL_FILE, config, cut, work, opts.optimize, self.cpu)
        return DepthGraphs(depth, folder, exported, continuations)


def _write_artifacts(bundle: Path, run_dir: Path, source: _Source, report: DepthReport, built: _Built,
                     opts: ExportOptions) -> Manifest:
    """The reports, plots and analysis beside the graph, then the manifest that hashes them all, sealed."""
    built.validation.save(bundle / VALIDATION_FILE)
    report.save(bundle / DEPTH_FILE)
    plot_depths(report, bundle / DEPTH_PLOT)
    shutil.copy(run_dir / ANALYSIS_FILE, bundle / ANALYSIS_FILE)
    if (run_dir / CKA_PLOT).is_file():
        shutil.copy(run_dir / CKA_PLOT, bundle / CKA_PLOT)
    manifest = _manifest(bundle, source, report, built, opts)
    manifest.save(bundle / MANIFEST_FILE)
    seal_manifest(bundle)
    return manifest


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


def _encode(source: _Source, parts: EvalParts, heal_texts: HealTexts, heal: HealMode, opts: ExportOptions,
            reuse: Reuse) -> ExportTexts:
    """The original model's outputs on everything export looks at but the holdout (on the heal and agreement
    texts: `reuse`'s, else computed and left there)."""
    kept, spare = _kept_states(heal, opts, source.analysis.boundary, source.total)

    def encode(examples: Examples, role: str):
        return encode_texts(source.model, source.tokenizer, examples, batch_size=opts.batch_size,
                            max_length=source.max_length, keep_tokens=kept, spare_tokens=spare,
                            desc=f"original, {role}")

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
    if heal == "top":
        first = min(max(boundary, 2), total)
        tried = [first, first - 1] if opts.keep_layers == "auto" else [opts.keep_layers]
        layers = opts.top.heal_layers
        indices |= {max(d - layers, 0) for d in tried if d < total}
        if opts.keep_layers == "auto":
            spare = [d - layers for d in range(first - 2, layers, -1)]
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


def _add_original(graphs: _Graphs, bundle: Path, calibration: np.ndarray, opts: ExportOptions, share: float,
                  continuations: continuation.Continuations | None, kept: Candidate) -> FallbackRule:
    """The fallback: the original's ONNX graph (optimized as the bundle's) beside the bundle's, and the threshold
    below which the bundle's graph, as exported, sends a text on: the `share` quantile of its top-class
    probabilities on the calibration texts (`calibration`: its logits there; with int8, the very run of the kept
    candidate its forecast scored). Where the bundle's graph continues (`continuations`), only the original's
    layers above the cut and its head, made as the kept candidate (`kept`) was."""
    below = threshold(calibration, share)
    if continuations is not None:
        shutil.move(continuations.graph(kept), bundle / CONTINUATION_MODEL_FILE)
        return FallbackRule(share=share, threshold=below, continue_from=continuations.layer)
    onnx_dir = graphs.original()
    if opts.optimize:
        onnx_export.optimize_onnx(onnx_dir, opts.optimize)
    if (onnx_dir / MODEL_DATA_FILE).exists():
        raise LayerpruneError("--fallback needs the original's graph in one file (under 2 GB); this one is larger")
    shutil.move(onnx_dir / MODEL_FILE, bundle / ORIGINAL_MODEL_FILE)
    return FallbackRule(share=share, threshold=below)


def _runner(bundle: Path, max_length: int, rule: FallbackRule | None) -> OnnxClassifier:
    """The bundle's model as it is served: its graph, and the original's or the continuation for the texts its
    fallback sends on."""
    return OnnxClassifier(bundle, max_length=max_length, **fallback_options(bundle, rule, bundle_parts(bundle)))


def _manifest(bundle: Path, source: _Source, report: DepthReport, built: _Built, opts: ExportOptions) -> Manifest:
    """The bundle's one contract: its files and their hashes, and everything its consumers need."""
    analysis, task, validation, quantized, cpu = source.analysis, source.task, built.validation, built.quantized, built.cpu
    return Manifest(
        files=hash_files(bundle), parts=bundle_parts(bundle), source_checkpoint=analysis.model, task=task.name,
        metric_name=task.metric, labels=output_labels(bundle), depth=report.depth, total_layers=report.total_layers,
        model_type=analysis.model_type, heal=report.heal, max_length=validation.max_length,
        pair_input=task.text_pair_field is not None, resample_seed=opts.resample_seed, optimize=opts.optimize,
        quantize="int8" if quantized else None, candidate=built.kept, quantization_config=quantized,
        int8_cpu=cpu if quantized else None,
        fallback=built.rule, servable=validation.passed, versions=library_versions(),
    )


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
    return (f"{line}; depth {cut} (heal {depths.heal_mode}) disagreed with the original on {100 * guess.disagreement:.2f}% "
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


def _heal_mode(asked: HealMode | None, model, texts: HealTexts) -> HealMode:
    """The heal asked for, checked against the model and the texts; by default the top-layer heal where the
    layers can be trained alone (its layers below stay the original's, and it agreed with the original best
    where measured: docs/results.md), else the head (labels needed), else none."""
    layers_alone = layers_run_alone(model.config)
    labelled = texts.labels is not None
    if asked is None:
        if texts.examples is None:
            return "none"
        return "top" if layers_alone else ("head" if labelled else "none")
    if asked != "none" and texts.examples is None:
        raise LayerpruneError(f"--heal {asked} needs texts: the task has no train split; give --heal-data FILE")
    if asked == "head" and not labelled:
        raise LayerpruneError("--heal head needs labelled texts; --heal-data texts carry none: use --heal whole")
    if asked in ("top", "whole") and not layers_alone:
        raise LayerpruneError(f"--heal {asked} cannot train {model.config.model_type} layers alone (shared "
                              "weights or a convolution); use --heal head")
    return asked


def _save_checkpoint(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
