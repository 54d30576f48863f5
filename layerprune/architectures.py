"""The one table of the architectures layerprune supports: where each keeps its layers, the config field
with its depth, its classification head, shared weights (ALBERT), position offsets (RoBERTa-likes).

Torch-free on purpose: models.py and prune.py read it next to torch, the runtime and the benchmarks read
it without (a config is a transformers PretrainedConfig or the dict of a config.json; both work here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ModelError


@dataclass(frozen=True)
class Head:
    """A sequence-classification head: it reads only the first token of the last hidden state.

    The modules are applied in order, `activation` between consecutive ones; dropout is left out (eval mode).
    """

    modules: tuple[str, ...]  # dotted names in the *ForSequenceClassification model, pooler included
    first_linear: str  # the nn.Linear that reads the first token (re-fitting works in its input coordinates)
    sequence_input: bool  # the first module takes (B, T, D) and picks token 0 itself; else we pass (B, D)
    activation: str | None = None  # "tanh" or "relu", applied after every module but the last


@dataclass(frozen=True)
class Architecture:
    """Where a model family keeps its stack of layers, the config field that holds its depth, and its head."""

    base: str  # attribute of the *ForSequenceClassification model holding the encoder
    layers: str  # dotted path from `base` to the nn.ModuleList of layers
    depth_field: str  # config field with the number of layers
    head: Head
    shared_weights: bool = False  # ALBERT: one set of weights applied depth times (see albert_groups_to_keep)
    position_offset: bool = False  # position ids start after padding_idx: pad_token_id + 1 positions unusable


# From transformers 4.57's *ForSequenceClassification.forward: BERT pools with bert.pooler (tanh inside),
# ALBERT with albert.pooler + tanh, DistilBERT with pre_classifier + ReLU, DeBERTa-v2 with its ContextPooler;
# RoBERTa, XLM-R, ELECTRA and MPNet have a classifier module that takes features[:, 0, :] itself.
_TOKEN0_CLASSIFIER = Head(("classifier",), "classifier.dense", sequence_input=True)
_LAYERS = "encoder.layer"
_DEPTH = "num_hidden_layers"

ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture("bert", _LAYERS, _DEPTH, Head(("bert.pooler", "classifier"), "bert.pooler.dense", True)),
    "roberta": Architecture("roberta", _LAYERS, _DEPTH, _TOKEN0_CLASSIFIER, position_offset=True),
    "xlm-roberta": Architecture("roberta", _LAYERS, _DEPTH, _TOKEN0_CLASSIFIER, position_offset=True),
    "albert": Architecture(
        "albert", "encoder.albert_layer_groups", _DEPTH,
        Head(("albert.pooler", "classifier"), "albert.pooler", False, activation="tanh"), shared_weights=True,
    ),
    "distilbert": Architecture(
        "distilbert", "transformer.layer", "n_layers",
        Head(("pre_classifier", "classifier"), "pre_classifier", False, activation="relu"),
    ),
    "electra": Architecture("electra", _LAYERS, _DEPTH, _TOKEN0_CLASSIFIER),
    "deberta-v2": Architecture("deberta", _LAYERS, _DEPTH, Head(("pooler", "classifier"), "pooler.dense", True)),
    "mpnet": Architecture("mpnet", _LAYERS, _DEPTH, _TOKEN0_CLASSIFIER, position_offset=True),
}


def _field(config: Any, name: str, default: Any = None) -> Any:
    """A config field from a PretrainedConfig (attribute) or a config.json dict (key)."""
    return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)


def architecture(config: Any) -> Architecture:
    """The table entry for a config's model_type, or a ModelError that lists what is supported."""
    model_type = _field(config, "model_type")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"unsupported architecture '{model_type}'; layerprune supports: {supported}")
    return arch


def total_layers(config: Any) -> int:
    """Number of Transformer layers (hidden_states has this plus one entries: index 0 = embeddings)."""
    return int(_field(config, architecture(config).depth_field))


def position_offset(config: Any) -> int:
    """Positions a model cannot give tokens: pad_token_id + 1 for RoBERTa-likes and MPNet, else 0.
    Unknown model types get 0 (the runtime may read bundles of types this table does not list)."""
    arch = ARCHITECTURES.get(_field(config, "model_type"))
    if arch is None or not arch.position_offset:
        return 0
    return int(_field(config, "pad_token_id") or 1) + 1


# --------------------------------------------------------------------------- ALBERT's shared layer groups


def albert_groups(depth: int, groups: int) -> list[int]:
    """The layer group ALBERT applies at each layer (its own formula: it depends on the depth)."""
    return [int(i / (depth / groups)) for i in range(depth)]


def albert_groups_to_keep(config: Any, depth: int) -> int | None:
    """How many layer groups ALBERT truncated to `depth` needs to compute the original's first depth layers,
    or None where no group count does (or transformers cannot run it)."""
    wanted = albert_groups(_field(config, "num_hidden_layers"), _field(config, "num_hidden_groups"))[:depth]
    groups = wanted[-1] + 1
    if albert_groups(depth, groups) != wanted:
        return None
    # transformers hands each group int(depth / groups) head-mask slots, one per inner layer it indexes.
    return groups if depth // groups >= _field(config, "inner_group_num") else None


