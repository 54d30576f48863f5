"""Artifacts are the contracts between stages: every JSON file a stage writes is one of these models.

Folders are written atomically: built in a staging folder beside the target, then renamed into place, so an
interrupted or failed stage never leaves a half-written run directory behind, and the staging folder of a run
that was killed is removed by the next run for the same target.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Annotated, ClassVar, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from .cka import CkaEstimator
from .errors import LayerpruneError
from .files import ANALYSIS_FILE, NEW_STAGING_INFIX, REPLACED, SCRATCH, STAGING_INFIX
from .tasks import TaskConfig

Representation = Literal["cls", "mean", "tokens"]


class Artifact(BaseModel):
    """Base of every JSON artifact: strict fields and a schema version."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    schema_version: int = 1
    written_by: ClassVar[str] = "layerprune"  # the command that writes it: what to re-run for another schema version

    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n")


A = TypeVar("A", bound=Artifact)


def load_artifact(cls: type[A], path: Path) -> A:
    """Read and validate an artifact, or a LayerpruneError naming the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LayerpruneError(f"{path} not found") from None
    except OSError as exc:
        raise LayerpruneError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_artifact(cls, data, path)


def parse_artifact(cls: type[A], text: str | bytes, path: Path) -> A:
    """Validate an artifact's JSON text, read from `path`, or a LayerpruneError naming the file."""
    try:
        version, current = declared_version(text), cls.model_fields["schema_version"].default
        if version is not None and version != current:
            raise LayerpruneError(f"{path} has {cls.__name__} schema v{version}; this layerprune reads v{current}: "
                                  f"re-run `{cls.written_by}` to write it with this version")
        return cls.model_validate_json(text)
    except ValidationError as exc:  # its first line says only how many errors: name the first one
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"] if part != "[key]") or "its content"
        message = err["msg"].removeprefix("Value error, ")  # (a validator's own words)
        raise LayerpruneError(f"{path} is not a valid {cls.__name__}: {where}: {message}") from None
    except ValueError as exc:
        raise LayerpruneError(f"{path} is not a valid {cls.__name__}: {str(exc).splitlines()[0]}") from None


def declared_version(text: str | bytes) -> int | None:
    """The schema_version an artifact's JSON text declares; None when it declares none or is not a JSON object."""
    try:
        version = json.loads(text).get("schema_version")
    except (ValueError, AttributeError):
        return None  # not a JSON object: validation names the problem
    return version if isinstance(version, int) else None


class MetricValue(BaseModel):
    name: str
    value: float


class UndefinedLayer(BaseModel):
    layer: int
    reason: str


class AnalysisTimings(BaseModel):
    load_s: float
    forward_s: float
    cka_s: float
    clustering_s: float
    total_s: float


class AnalysisReport(Artifact):
    """analysis.json: layer-by-layer CKA of a fine-tuned checkpoint and where its late block starts."""

    # schema history: CHANGELOG.md
    schema_version: int = 2
    written_by: ClassVar[str] = "layerprune analyze"
    model: str = Field(description="checkpoint directory or hub id that was analyzed")
    model_type: str
    total_layers: int
    task: str
    task_config: TaskConfig = Field(description="the full task, so later stages can reload its data")
    glue_dir: str | None = None
    split: str
    n_examples: int
    n_representations: int = Field(description="rows per layer given to CKA (tokens for 'tokens')")
    representation: Representation
    cka_estimator: CkaEstimator
    cka: list[list[float | None]] = Field(description="(L+1)x(L+1), index 0 = embeddings; null = undefined")
    undefined_layers: list[UndefinedLayer]
    clusters: list[int | None] = Field(description="block id per layer 0..L, null where excluded")
    n_clusters: int
    clusters_chosen_by: str
    laplacian_eigenvalues: list[float]
    boundary: int = Field(description="first layer of the last (late) block")
    metric: MetricValue = Field(description="the full model's task metric on the same examples")
    timings: AnalysisTimings
    device: str
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    versions: dict[str, str]


def load_analysis(run_dir: Path) -> AnalysisReport:
    """The analysis of the run directory `run_dir`, or a LayerpruneError that says to run `layerprune analyze`
    first."""
    path = Path(run_dir) / ANALYSIS_FILE
    if not path.is_file():
        raise LayerpruneError(f"{run_dir} holds no {ANALYSIS_FILE}; run `layerprune analyze` first")
    return load_artifact(AnalysisReport, path)


class TrainingReport(Artifact):
    """training_report.json, written beside a fine-tuned checkpoint."""

    written_by: ClassVar[str] = "layerprune finetune"
    base_model: str
    task: str
    train_split: str
    eval_split: str
    n_train: int
    n_eval: int
    epochs: float
    learning_rate: float
    batch_size: int
    max_length: int
    seed: int
    metric: MetricValue
    train_seconds: float
    device: str
    versions: dict[str, str]


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers, for reproducibility (read without importing)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("layerprune", "torch", "transformers", "numpy", "scikit-learn", "onnx", "onnxruntime",
                 "onnxruntime-gpu", "optimum", "optimum-onnx"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


@dataclass
class Stage:
    """A stage's work in progress beside its target: `out` becomes the target (or `target` where the stage sends
    it instead), `scratch` is room for anything else; both go when the stage ends."""

    out: Path
    scratch: Path
    target: Path


def refuse_foreign(target: Path, marker: str) -> None:
    """A LayerpruneError unless `target` is absent, empty, or an earlier output of the stage (it holds `marker`)."""
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / marker).exists())):
        raise LayerpruneError(f"refusing to overwrite {target}: it exists and holds no {marker}")


@contextmanager
def staged_dir(target: Path, marker: str) -> Iterator[Stage]:
    """Yield a Stage in one folder beside `target`; on success its `out` replaces `stage.target` in one rename.

    `marker` is a file every earlier output of this stage holds: an existing non-empty target without it is
    not ours, and is never replaced. The folder, scratch included, is removed however the stage ends; one left
    by a run that was killed is removed by the next run for the same target (`staging_folder`).
    """
    target = Path(target)
    refuse_foreign(target, marker)
    with staging_folder(target) as folder:
        stage = Stage(out=folder / target.name, scratch=folder / SCRATCH, target=target)
        stage.out.mkdir()
        stage.scratch.mkdir()
        yield stage
        refuse_foreign(stage.target, marker)
        _replace(stage.target, stage.out, folder)


@contextmanager
def atomic_dir(target: Path, marker: str) -> Iterator[Path]:
    """Yield a folder that replaces `target` in one rename on success (`staged_dir`'s `out`)."""
    with staged_dir(target, marker) as stage:
        yield stage.out


@contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A new folder beside `target`, `.TARGET.staging-*`, locked (flock) by this process while it lives, and
    removed when the block ends. The kernel drops a dead process's lock, so the stagings of runs killed before
    they could clean up are found by their name and removed here, and a live run's never are: its lock holds.
    The folder is made and locked under another name first, so no other run ever sees it unlocked."""
    parent, prefix, unlocked = target.parent, f".{target.name}{STAGING_INFIX}", f".{target.name}{NEW_STAGING_INFIX}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_stagings(parent, prefix)
        made = Path(tempfile.mkdtemp(prefix=unlocked, dir=parent))
    except OSError as exc:
        raise LayerpruneError(f"cannot write to {parent}: {exc.strerror or exc}") from None
    lock, folder = os.open(made, os.O_RDONLY), made
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        folder = made.rename(parent / (prefix + made.name.removeprefix(unlocked)))
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(lock)


def _replace(target: Path, new: Path, folder: Path) -> None:
    """Put `new` in `target`'s place; what was there moves into the staging `folder` first, and goes with it (a
    run killed between the two renames leaves it there, and the next run puts it back)."""
    if target.exists():
        replaced = folder / REPLACED / target.name
        replaced.parent.mkdir(exist_ok=True)
        target.rename(replaced)
    new.rename(target)


def _remove_dead_stagings(parent: Path, prefix: str) -> None:
    """Remove the staging folders named `prefix*` in `parent` whose lock nobody holds: their runs are dead."""
    for folder in parent.glob(f"{glob.escape(prefix)}*"):
        try:
            lock = os.open(folder, os.O_RDONLY)
        except OSError:
            continue  # removed meanwhile
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            continue  # a live run's
        try:
            for old in (folder / REPLACED).glob("*"):
                if not (parent / old.name).exists():
                    old.rename(parent / old.name)
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(lock)


# How a truncated model is healed (layerprune/heal/): every kept layer, the top kept layers, the head, or not at all.
HealMode = Literal["whole", "top", "head", "none"]
# export's candidates at the chosen depth (layerprune/candidates.py): plain dynamic int8, faithful int8
# (layerprune/faithful_int8.py: per-token activation scales, GPTQ weights), the fp32 graph
Candidate = Literal["int8", "int8-faithful", "fp32"]


class GateForecast(BaseModel):
    """What calibration predicts the holdout gate will say about one candidate model (see validate.forecast)."""

    delta: float = Field(description="candidate - original on the calibration examples")
    delta_sd: float = Field(description="paired bootstrap standard error of that delta")
    alpha: float = Field(description="the error rate it was made at: one-sided, its share of export's budget")
    lower_bound: float = Field(description="one-sided (1 - alpha) lower bound of the holdout delta")
    disagreement: float | None = Field(description="share of texts where the predictions differ (classification)")
    disagreement_upper: float | None = Field(description="(1 - alpha) upper bound of that share")
    n_agreement: int = Field(description="texts the disagreement was measured on: calibration + unlabeled")
    passes: bool = Field(description="lower_bound >= -tolerance, or disagreement alone keeps the delta in tolerance")
    agreement_lower: float | None = Field(default=None, description=(
        "one-sided 95% lower bound (Wilson) of the share of texts where the predictions agree, as validation.json "
        "reports agreement (classification)"))

    def admissible(self, min_agreement: float | None) -> bool:
        """Whether export may keep what this forecasts: it passes and, with --min-agreement, its agreement's one-sided
        95% lower bound clears that share. The bound is the one validation.json reports, so the demand reads as the
        report does; it only removes configurations the forecast passed, so the walk's and the budget's guarantees
        hold as they are."""
        return self.passes and (min_agreement is None or (self.agreement_lower or 0.0) >= min_agreement)


class ShareScore(BaseModel):
    """One share sent on at one depth, with --fallback auto: its forecast and served cost."""

    share: float
    forecast: GateForecast
    cost: float = Field(description="served cost a text, the full original's = 1 (layerprune.cost)")


class DepthScore(BaseModel):
    """The calibration metric of the model truncated at one depth, per heal mode computed."""

    depth: int
    metric: float = Field(description="head as fine-tuned (the paper's setting: no further tuning)")
    metric_healed: float | None = Field(default=None, description=(
        "healed as the report's `heal` says, with its fallback (None: not healed)"))
    forecast: GateForecast | None = Field(default=None, description=(
        "the gate forecast of the heal mode used; with --fallback auto, of the cheapest share that passes (else "
        "of the largest)"))
    shares: list[ShareScore] = Field(default_factory=list, description="with --fallback auto: each share's forecast")


class LayerCosts(BaseModel):
    """What a text costs the original on this CPU, per part (layerprune.cost): CPU seconds a text."""

    fixed_s: float = Field(description="tokenizing, embeddings and head")
    layer_s: float = Field(description="one encoder layer")
    measured: str = Field(description="how: the model, texts, batch size and clock")


class HealStats(BaseModel):
    """How one depth was healed."""

    depth: int
    heal: HealMode
    n_train: int
    n_held_out: int
    epochs: int | None = Field(default=None, description="top and whole: epochs behind the weights kept (chosen on the held-out tenth)")
    epochs_run: int | None = None
    seconds: float


class ExportCandidate(BaseModel):
    """One way to export a depth, scored against the original before the holdout is looked at."""

    name: str
    depth: int = Field(description="encoder layers it keeps: the walk's depth, or with --fallback auto and int8 one "
                                   "the walk passed above it (depth_search.int8_depths)")
    metric: float = Field(description="on the calibration examples")
    forecast: GateForecast
    sentences_per_s: float = Field(description="onnxruntime on the calibration examples, batch 32, this CPU (the "
                                               "pruned graph alone)")
    share: float = Field(default=0.0, description="share of texts sent on, with which it was forecast")
    cost: float | None = Field(default=None, description=(
        "with --fallback auto: served cost a text, the full fp32 original's = 1 (layerprune.cost)"))
    chosen: bool = False


class DepthReport(Artifact):
    """depth.json: how the depth (the number of encoder layers kept) and the export were chosen.
    Schema history: CHANGELOG.md."""

    schema_version: int = 9
    written_by: ClassVar[str] = "layerprune export"
    search: Literal["auto", "fixed"] = Field(description="how the depth was chosen: searched from the CKA boundary, "
                                                         "or the --keep-layers N asked for")
    heal: HealMode
    heal_layers: int = Field(description="layers the top-layer heal re-tunes (with the head)")
    fallback: float = Field(description="share of texts sent on to the original (0: none); every forecast is the "
                                        "pruned model's with this fallback, or with auto with each of `shares`")
    shares: list[float] = Field(description="the shares sent on export chose among: --fallback's, or auto's grid")
    costs: LayerCosts | None = Field(default=None, description="with --fallback auto: what each cost was made of")
    boundary: int = Field(description="the analysis' CKA boundary, where auto starts")
    total_layers: int
    depth: int = Field(description="encoder layers kept (1..total_layers): what the bundle was exported at")
    tolerance: float
    min_agreement: float | None = Field(default=None, description=(
        "--min-agreement: the share of texts the kept configuration's agreement with the original, one-sided 95% lower "
        "bound (Wilson) on the texts its forecast measured, had to reach (None: no such constraint)"))
    full_metric: float = Field(description="the full model on the calibration examples")
    metric_name: str
    calibration: str = Field(description="which examples chose the depth")
    n_calibration: int
    n_heal: int = Field(description="heal texts (a tenth of them held out to choose the epoch)")
    heal_labelled: bool = Field(description="whether the heal texts carried labels")
    n_agreement: int = Field(description="unlabeled in-domain texts used to measure disagreement")
    probed: list[int] = Field(description="depths auto looked at, in order")
    scores: list[DepthScore]
    heal_runs: list[HealStats] = Field(description="every heal run, chosen or not")
    candidates: list[ExportCandidate] = Field(description="export candidates scored, by depth from the deepest, "
                                                          "each depth's fastest first, the walk's fp32 last")
    note: str | None = None


class ValidationReport(Artifact):
    """validation.json: the exported bundle against the original checkpoint on held-out examples."""

    schema_version: int = 4
    written_by: ClassVar[str] = "layerprune export"
    metric_name: str
    holdout: str = Field(description="which examples validated the bundle (disjoint from calibration)")
    n_examples: int
    original: float
    bundle: float
    delta: float = Field(description="bundle - original")
    delta_ci95: tuple[float, float] = Field(description="paired bootstrap 95% interval of delta")
    agreement: float | None = Field(description="share of identical predictions (classification)")
    agreement_lower95: float | None = Field(
        default=None, description="one-sided 95% lower confidence bound of agreement (Wilson score, n_examples)"
    )
    tolerance: float
    passed: bool = Field(description="delta >= -tolerance")
    max_abs_logit_diff_fp32: float | None = Field(
        default=None, description="truncated PyTorch model vs the fp32 ONNX export, same examples"
    )
    max_length: int = Field(description="tokens per input, for the original and the bundle alike")
    sent_on: float | None = Field(default=None, description="share of the examples the bundle's fallback sent on "
                                                            "to the original (None: no fallback)")


def _inside(name: str) -> str:
    """A file name that stays inside the bundle's folder: a relative POSIX path, normalized, without '..' (a
    link that leads out is bundle.verify_bundle's to refuse: it resolves each path on disk)."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or not path.parts or path.as_posix() != name:
        raise ValueError(f"{name!r} is not a relative path inside the bundle (no '..', not absolute, '/' only)")
    return name


BundlePath = Annotated[str, AfterValidator(_inside)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class BundleParts(BaseModel):
    """Where a bundle's parts are, by their relative file names (bundle.py names them at export)."""

    model_config = ConfigDict(extra="forbid")
    model: BundlePath = Field(description="the ONNX graph that is served")
    config: BundlePath
    tokenizer: BundlePath
    validation: BundlePath
    depth: BundlePath
    analysis: BundlePath
    depth_plot: BundlePath | None = None
    cka_plot: BundlePath | None = None
    original: BundlePath | None = Field(default=None, description="the original model's ONNX graph: the fallback "
                                                                  "that restarts a text sent on")
    continuation: BundlePath | None = Field(default=None, description="the original's layers above the cut and its "
                                                                      "head: the fallback that continues a text sent on")


class FallbackRule(BaseModel):
    """Which texts the original answers instead of the pruned model (layerprune.fallback)."""

    model_config = ConfigDict(extra="forbid")
    share: float = Field(description="the share of calibration texts below the threshold (--fallback)")
    threshold: float = Field(description="the pruned model's top-class probability below which a text is sent on")
    continue_from: int | None = Field(default=None, description=(
        "the layer whose output a text sent on continues from, through the original's layers above it (the "
        "`continuation` part; the bundle's graph outputs those states); None: it restarts the original (the "
        "`original` part) from its tokens"))


MANIFEST_SCHEMA = 7


class Manifest(Artifact):
    """manifest.json: what a bundle holds and where it came from; the server trusts nothing else.

    Labels are resolved once, at export, and `parts` names the files: consumers re-derive neither.
    Schema history: CHANGELOG.md."""

    schema_version: int = MANIFEST_SCHEMA
    written_by: ClassVar[str] = "layerprune export"
    files: dict[BundlePath, Sha256] = Field(description="relative path -> sha256 of every file but this one and "
                                                        "its seal")
    parts: BundleParts
    source_checkpoint: str
    task: str
    metric_name: str
    labels: list[str] = Field(description="one name per model output, in output order: what the server answers")
    depth: int = Field(description="encoder layers kept (1..total_layers): the exported model's depth")
    total_layers: int = Field(description="encoder layers of the source checkpoint")
    model_type: str
    heal: HealMode
    max_length: int = Field(description="tokens per input: validated at this length, served at this length")
    pair_input: bool = Field(description="the model classifies (text, text_pair)")
    resample_seed: int | None = Field(default=None, description="calibration/holdout resample used at export")
    optimize: str | None
    quantize: str | None
    candidate: Candidate = Field(description="the export candidate the bundle's graph is (and its continuation, where "
                                             "the fallback continues)")
    quantization_config: str | None = Field(description="the int8 configuration's name; None: fp32")
    int8_cpu: str | None = Field(default=None, description=(
        "CPU kind the int8 weights were quantized and validated for (layerprune.cpu.cpu_kind); 8-bit "
        "'avx512-vnni' weights compute differently elsewhere, so only VNNI hosts serve them"))
    fallback: FallbackRule | None = Field(default=None, description="None: the pruned model answers every text")
    servable: bool
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    versions: dict[str, str]

    @model_validator(mode="after")
    def _int8_has_a_configuration(self) -> Manifest:
        if (self.candidate == "fp32") != (self.quantization_config is None):
            raise ValueError(f"candidate {self.candidate!r} with quantization_config {self.quantization_config!r}: "
                             "an int8 candidate names its configuration, fp32 none")
        return self
