"""The options of each command, written once: a field's name, type and default drive both the library call
and the CLI flag (`add_options` reads the `cli(...)` metadata); fields without it are library-only. The
server's settings (serve/settings.py, pydantic-settings) declare their flags the same way.

Light on purpose (standard library and the artifact types): the CLI builds its parser from these classes
before any work, and the hub libraries must not be imported then (see preflight.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .artifacts import Candidate, CkaEstimator, HealMode, Representation

# Values several options share, each named once.
ALPHA = 0.05  # export's error budget: the chance it ships a bundle the holdout gate then refuses
BATCH_SIZE = 32  # inputs per forward pass (analyze, export) and examples per fine-tuning step
MAX_LENGTH = 128  # tokens per input where a short cap is enough: fine-tuning, and analysis (CKA compares layers)
WEIGHT_DECAY = 0.01  # AdamW's decay in every training here, fine-tuning and the heals (BERT's fine-tuning value)
WARMUP = 0.06  # share of the steps the learning rate warms up over, then decays to zero (RoBERTa's fine-tuning value)
SEED = 0  # the draws of the heals (held-out tenth, order, dropout) and of the augmentation
# the shares --fallback auto chooses among: each is one more forecast at every depth, and the forecasts share the
# walk's error rate (depth_search.error_budget), so a few, a tenth apart; a tenth more sent on costs a tenth of
# the layers it runs again, and past 0.3 a cut sends on so much that one layer more costs less
SHARES = (0.0, 0.1, 0.2, 0.3)

# --quantize int8's export candidates (artifacts.Candidate), scored fastest first (layerprune/candidates.py)
CANDIDATES: tuple[Candidate, ...] = ("int8", "int8-faithful", "fp32")
FAITHFUL_TEXTS = 2048  # heal texts faithful int8 calibrates on (never the calibration, agreement or holdout texts)
# the demo's --min-agreement: it promises a bundle that agrees with the original on at least 99% of texts
DEMO_MIN_AGREEMENT = 0.99


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction of the metric in [0, 1), e.g. 0.01 = 1 point; got {text}")
    return value


def share(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a share of texts in [0, 1), e.g. 0.1; got {text}")
    return value


def agreement(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a share of texts in (0, 1], e.g. 0.99; got {text}")
    return value


def fallback(text: str) -> float | str:
    return text if text == "auto" else share(text)


def error_rate(text: str) -> float:
    value = float(text)
    if not 0 < value < 0.5:
        raise argparse.ArgumentTypeError(f"must be an error rate in (0, 0.5), e.g. 0.05; got {text}")
    return value


def keep_layers(text: str) -> int | str:
    return text if text == "auto" else positive(text)


def heal_mode(text: str) -> str:
    return "top" if text == "distill" else text  # what the top-layer heal does: distil the top layers


def cli(help: str | None = None, *, flag: str | None = None, parse: Callable[[str], Any] | None = None,
        choices: list[str] | None = None, show_default: bool = True) -> dict[str, Any]:
    """Field metadata that makes the field a CLI flag: --field-name (or `flag`), parsed by `parse` (default:
    from the field's type), `choices`, and "(default X)" added to `help` (default: a pydantic field's
    description) unless show_default is False. A dataclass field takes it as `field(metadata=cli(...))`, a
    pydantic field as `Annotated[type, cli(...)]`."""
    return {"cli": {"help": help, "flag": flag, "parse": parse, "choices": choices, "show_default": show_default}}


def add_options(parser: argparse.ArgumentParser, options: type, *, layered: bool = False) -> None:
    """One flag per field of `options` (an options dataclass or a pydantic settings class) that carries `cli`
    metadata, and per such field of the options dataclasses it nests (ExportOptions.top's heal_layers):
    dest = the field's dotted name (`heal_layers`, `top.heal_layers`), flag --field-name (its own name's) unless
    the metadata names one, parsed and restricted as its type says unless the metadata says otherwise.
    default: the field's; layered (settings that also come from the environment or a file): None, so a flag not
    given overrides nothing (the help still names the field's default). `from_flags` builds the options back."""
    for name, hint, default, spec, description in _cli_fields(options):
        kind, literals = _flag_type(hint)
        text = spec["help"] or description
        shown = f"(default {default})" if spec["show_default"] and default not in (None, False) else ""
        kwargs: dict[str, Any] = {"dest": name, "default": None if layered else default,
                                  "help": " ".join(filter(None, [text, shown])) or None}
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = spec["parse"] or (kind if kind in (int, float, Path) else None)
            kwargs["choices"] = spec["choices"] or (literals if spec["parse"] is None else None)
        flag = spec["flag"] or "--" + name.rpartition(".")[2].replace("_", "-")
        if "." in name and kind is not bool:  # a nested field's value is named by its flag, not its dotted dest
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag, **kwargs)


def from_flags(options: type, args: argparse.Namespace, prefix: str = "") -> Any:
    """The options dataclass from parsed flags (`add_options`): every field whose dotted name the namespace holds
    (the CLI's --device, --trust-remote-code and --glue-dir too), the options it nests built the same way, the
    rest at their defaults."""
    hints, values = typing.get_type_hints(options), {}
    for f in dataclasses.fields(options):
        if _nested(hints[f.name]):
            values[f.name] = from_flags(hints[f.name], args, f"{prefix}{f.name}.")
        elif hasattr(args, prefix + f.name):
            values[f.name] = getattr(args, prefix + f.name)
    return options(**values)


def cli_fields(options: type) -> list[str]:
    """The (dotted) names of the fields of `options` that are CLI flags."""
    return [name for name, *_ in _cli_fields(options)]


def _nested(hint: Any) -> bool:
    """Whether a field's type is an options dataclass of its own (ExportOptions.top)."""
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _cli_fields(options: type, prefix: str = "") -> list[tuple[str, Any, Any, dict[str, Any], str | None]]:
    """(dotted name, type annotation, default, cli metadata, description) of each field that carries `cli`
    metadata, in declaration order, those of nested options dataclasses where they are nested."""
    if dataclasses.is_dataclass(options):
        hints, found = typing.get_type_hints(options), []
        for f in dataclasses.fields(options):
            if _nested(hints[f.name]):
                found += _cli_fields(hints[f.name], f"{prefix}{f.name}.")
            elif "cli" in f.metadata:
                found.append((prefix + f.name, hints[f.name], f.default, f.metadata["cli"], None))
        return found
    found = []  # a pydantic model: the metadata rides in Annotated, kept in FieldInfo.metadata
    for name, info in options.model_fields.items():
        spec = next((m["cli"] for m in info.metadata if isinstance(m, dict) and "cli" in m), None)
        if spec is not None:
            found.append((name, info.annotation, info.default, spec, info.description))
    return found


def _flag_type(hint: Any) -> tuple[Any, list[str] | None]:
    """(the type without None, the Literal's values or None) of a field's annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (
        typing.Union, types.UnionType) else [hint]
    literals = [v for a in args if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
    plain = [a for a in args if typing.get_origin(a) is not typing.Literal]
    return (plain[0] if plain else str), (literals or None)


@dataclass(frozen=True)
class FinetuneOptions:
    # the demo's checkpoints are fine-tuned with these (their metric: training_report.json); a sentence
    # classifier needs few epochs (BERT's paper: 2 to 4)
    epochs: float = field(default=2.0, metadata=cli("training epochs"))
    learning_rate: float = field(default=1e-4, metadata=cli("peak learning rate", flag="--lr"))
    batch_size: int = field(default=BATCH_SIZE, metadata=cli("examples per step", parse=positive))
    max_length: int = field(default=MAX_LENGTH, metadata=cli("tokens per input", parse=positive))
    max_train_examples: int | None = field(default=None, metadata=cli("train on the first N examples only",
                                                                       parse=positive))
    seed: int = field(default=42, metadata=cli("random seed"))  # any fixed seed: a fine-tuning is repeatable
    warmup: float = WARMUP
    weight_decay: float = WEIGHT_DECAY
    device: str | None = None
    trust_remote_code: bool = False
    glue_dir: Path | None = None


@dataclass(frozen=True)
class AnalyzeOptions:
    split: str | None = field(default=None, metadata=cli("split to analyze (default: the task's evaluation split)"))
    # a sample of the split: the exact estimators' memory and time grow with n squared
    max_examples: int | None = field(default=2000, metadata=cli("analyze the first N examples of the split, in order",
                                                                parse=int))
    representation: Representation = field(default="cls", metadata=cli(
        "cls: first token (as in Phang et al.); mean: mask-aware mean; tokens: all tokens"))
    cka_estimator: CkaEstimator = field(default="linear", metadata=cli(
        "linear: exact; debiased: unbiased HSIC; minibatch: memory flat in n"))
    clusters: int | None = field(default=None, metadata=cli("number of layer blocks (default: eigengap)",
                                                            parse=positive))
    max_clusters: int = 6  # the eigengap is looked for among 2..6 blocks: a 12-layer model's blocks are few
    batch_size: int = field(default=BATCH_SIZE, metadata=cli("inputs per forward pass", parse=positive))
    max_length: int = field(default=MAX_LENGTH, metadata=cli("tokens per input", parse=positive))
    # --representation tokens compares token rows, tens per text: capped so the matrices stay in memory
    max_tokens: int = field(default=20_000, metadata=cli("row cap for --representation tokens", parse=positive))
    device: str | None = None
    trust_remote_code: bool = False
    glue_dir: Path | None = None


@dataclass(frozen=True)
class HeadOptions:
    """The head heal (heal/head.py): the head alone re-fitted on the depth's first-token states (seconds of work)."""

    epochs: int = 30  # a head alone is small: many cheap passes, the held-out tenth stops them
    lr: float = 1e-3  # AdamW's usual rate for a small layer on fixed features, not fine-tuning's
    weight_decay: float = WEIGHT_DECAY
    batch_size: int = 64  # rows are precomputed features, not texts: larger batches cost little
    patience: int = 5  # epochs without a better held-out loss before stopping
    seed: int = SEED


@dataclass(frozen=True)
class TopOptions:
    """The top-layer heal (heal/top.py): the top kept layers and the head re-tuned by distillation."""

    heal_layers: int = field(default=1, metadata=cli("top kept layers re-tuned by --heal top (with the head)",
                                                     parse=positive))
    epochs: int = 3  # the held-out tenth keeps the best epoch (0, the layers as they were, included)
    lr: float = 5e-5  # fine-tuning's range (BERT's paper: 2e-5 to 5e-5): the layers start trained
    temperature: float = 2.0  # softened targets carry the original's second choices (Hinton et al. 2015)
    label_weight: float = 0.5  # weight of the label cross-entropy beside the distillation loss
    feature_weight: float = 1.0  # weight of matching the original's top first-token state (what the head reads)
    patience: int = 1  # epochs without a better held-out loss before stopping
    # where the re-tuned layers start: the kept ones (depth-heal_layers+1..depth), or the original's top
    # heal_layers, whose outputs the fine-tuned head was trained on (docs/results.md measures both)
    start: Literal["kept", "top"] = "kept"
    # None: a constant learning rate; a share of the steps: warm up over it, then decay linearly to zero by the
    # last epoch (TinyBERT's schedule). Which agrees better is measured in docs/results.md.
    warmup: float | None = None
    dropout: bool = True  # dropout on while training (as fine-tuning does); off: the student sees no noise
    # > 0: each training batch is also fed with its input states plus Gaussian noise of this many times their
    # per-dimension spread, labelled by the original's own layers above the cut (logits and top state): the
    # student learns the original's function around the heal texts, not only at them. 0: off.
    neighbours: float = 0.0
    # an exponential moving average of the trained weights with this decay per step is what is scored and kept
    # (None: the weights as trained)
    ema: float | None = None
    weight_decay: float = WEIGHT_DECAY
    seed: int = SEED


@dataclass(frozen=True)
class WholeOptions:
    """The whole-model heal (heal/whole.py): every kept layer and the head trained from the original."""

    epochs: int = 3  # the held-out tenth keeps the best epoch
    # a cap on one heal's training (fewer steps, the same schedule; None: all epochs): a 12-layer model's heal
    # of tens of thousands of texts runs for hours on a CPU otherwise
    minutes: float | None = field(default=10.0, metadata=cli(
        "cap on each whole-model heal's training, in minutes (fewer steps, the same schedule)", flag="--heal-minutes",
        parse=float))
    lr: float = 1e-4
    warmup: float = WARMUP
    temperature: float = 1.0  # the original's own probabilities (the state terms carry the rest)
    label_weight: float = 0.1  # weight of the label cross-entropy: agreement with the original is the aim
    first_weight: float = 1.0  # weight of each kept layer's first-token state matching the original's
    token_weight: float = 1.0  # weight of each kept layer's token states matching the original's (0: off)
    weight_decay: float = WEIGHT_DECAY
    seed: int = SEED


@dataclass(frozen=True)
class ExportOptions:
    # the user's request ("auto" or N); the outcome, the layers kept, is `depth` in depth.json and the manifest
    keep_layers: int | Literal["auto"] = field(default="auto", metadata=cli(
        "auto (the smallest depth whose gate forecast passes, searched from the CKA boundary) or N",
        parse=keep_layers))
    # default: top where there are heal texts (head for ALBERT and DeBERTa-v2's convolution), else none
    heal: HealMode | None = field(default=None, metadata=cli(
        "top: re-tune only the top --heal-layers kept layers and the head, distilled from the original (default "
        "where there are heal texts; `distill` says the same); whole: train every kept layer and the head from the "
        "original; head: re-fit only the head (labels needed); none: the paper's setting",
        parse=heal_mode, choices=list(typing.get_args(HealMode))))
    # each heal's own options; --heal-layers and --heal-minutes set fields of `top` and `whole`
    top: TopOptions = field(default_factory=TopOptions)
    whole: WholeOptions = field(default_factory=WholeOptions)
    head: HeadOptions = field(default_factory=HeadOptions)
    heal_data: Path | None = field(default=None, metadata=cli(
        "in-domain texts to heal with, labels not needed (CSV/TSV/JSONL; default: the train split)"))
    heal_text_field: str | None = field(default=None, metadata=cli(
        "column of --heal-data with the text (default: the task's text field)"))
    heal_examples: int | None = field(default=None, metadata=cli(
        "heal with the first N texts (default: all of the train split, or --heal-data but its agreement texts)",
        parse=positive))
    # a train split is what the original was fine-tuned on: new texts around it show the heal where the two
    # models may differ, at the cost of one more pass of the original per copy
    augment: int = field(default=2, metadata=cli(
        "new texts per heal text (crops, word swaps, splices), labelled by the original (0: none)", parse=int))
    augment_seed: int = SEED  # the augmented copies' draws (heal/augment.py)
    # disagreement is a share, bounded by its count: a few thousand texts bound it to tenths of a point
    agreement_examples: int = field(default=4000, metadata=cli(
        "further --heal-data texts on which agreement with the original is measured (never train texts: the "
        "original was fine-tuned on them)", parse=int))
    # auto by default: the cheapest bundle the forecast certifies, which may be one graph (share 0) or a cascade
    fallback: float | Literal["auto"] = field(default="auto", metadata=cli(
        "share of texts the original answers instead of the pruned model: those the pruned model is least sure of "
        f"(the bundle then holds both graphs; 0: none); auto: the depth and share of {', '.join(map(str, SHARES))} "
        "whose served cost a text, measured on this CPU, is least among those whose forecast passes",
        parse=fallback, show_default=False))
    optimize: Literal["O1", "O2", "O3"] | None = field(default=None, metadata=cli(
        "onnxruntime graph optimization level"))
    quantize: Literal["int8"] | None = field(default=None, metadata=cli(
        "try dynamic int8 for this CPU (then faithful int8, calibrated on heal texts, then fp32) and keep the first "
        "whose gate forecast passes"))
    # one point of the metric (accuracy, F1, ...): the loss against the original a user accepts by default
    tolerance: float = field(default=0.01, metadata=cli(
        "largest allowed metric drop, as a fraction (0.01 = 1 point)", parse=fraction))
    alpha: float = field(default=ALPHA, metadata=cli(
        "the chance, one-sided, that export ships a bundle the holdout gate refuses; split over its forecasts",
        parse=error_rate))
    # a user who needs the bundle to answer as the original does, not only to score as well: a second constraint,
    # beside the gate's forecast (which stays as it is), on what export may keep (classification only)
    min_agreement: float | None = field(default=None, metadata=cli(
        "keep only a configuration whose agreement with the original, one-sided 95 percent lower bound on the texts "
        "its forecast measured (as validation.json reports it), is at least this share (e.g. 0.99; default: none)",
        parse=agreement))
    sweep: bool = field(default=False, metadata=cli("score every depth 1..L (auto probes only some)"))
    # each part's cap: the gate's bounds tighten with n, its cost (the original's pass) grows with it
    max_examples: int | None = field(default=2000, metadata=cli("cap on calibration and on holdout examples, each",
                                                                parse=positive))
    batch_size: int = field(default=BATCH_SIZE, metadata=cli("inputs per forward pass", parse=positive))
    max_length: int | None = field(default=None, metadata=cli(
        "tokens per input, validated and served alike (default: the model's own limit)", parse=positive))
    device: str | None = None
    trust_remote_code: bool = False
    resample_seed: int | None = None  # re-cut calibration/holdout (benchmarks)

    @property
    def shares(self) -> tuple[float, ...]:
        """The shares sent on that export may choose among: --fallback's, or with auto the grid SHARES."""
        return SHARES if self.fallback == "auto" else (self.fallback,)

    def __post_init__(self) -> None:
        # the flag's alias holds from Python too, and a mode no heal has is refused here, not trained as another
        if self.heal is not None:
            object.__setattr__(self, "heal", heal_mode(self.heal))
            if self.heal not in typing.get_args(HealMode):
                raise ValueError(f"heal must be one of {', '.join(typing.get_args(HealMode))}, got {self.heal!r}")
        if self.min_agreement is not None and not 0 < self.min_agreement <= 1:
            raise ValueError(f"min_agreement must be a share of texts in (0, 1], got {self.min_agreement!r}")
