"""The architecture table and checkpoint loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel

from conftest import TINY_CONFIGS, TINY_LAYERS
from layerprune.architectures import position_offset
from layerprune.errors import ModelError
from layerprune.files import CONFIG_FILE
from layerprune.models import (
    ARCHITECTURES,
    layer_list,
    load_classifier,
    resolve_checkpoint,
    total_layers,
)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_table_finds_layers_and_total_layers(tiny_models: dict[str, Path], model_type: str) -> None:
    model, tokenizer = load_classifier(tiny_models[model_type], device="cpu")
    assert model.config.model_type == model_type
    assert total_layers(model.config) == TINY_LAYERS
    layers = layer_list(model)
    assert isinstance(layers, torch.nn.ModuleList)
    # ALBERT shares one layer group across its depth; the others hold one module per layer.
    assert len(layers) == (1 if ARCHITECTURES[model_type].shared_weights else TINY_LAYERS)
    inputs = tokenizer(["a short test"], return_tensors="pt")
    out = model(**{k: v for k, v in inputs.items() if k in tokenizer.model_input_names},
                output_hidden_states=True)
    assert len(out.hidden_states) == TINY_LAYERS + 1


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_table_reads_config_json(tiny_models: dict[str, Path], model_type: str) -> None:
    """The torch-free readers (runtime, benchmarks) get the same layer count and position offset from
    config.json as the model itself has: n_layers for DistilBERT, padding_idx + 1 where positions start
    after padding."""
    model, _ = load_classifier(tiny_models[model_type], device="cpu")
    config = json.loads((tiny_models[model_type] / CONFIG_FILE).read_text())
    assert total_layers(config) == total_layers(model.config) == TINY_LAYERS
    embeddings = getattr(model, ARCHITECTURES[model_type].base).embeddings
    padding_idx = getattr(embeddings, "padding_idx", None)  # only the position-offset models keep it
    assert position_offset(config) == (0 if padding_idx is None else padding_idx + 1)


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=100)
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'.*bert.*roberta"):
        load_classifier(tmp_path)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="checkpoint not found"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(ModelError, match="no config.json"):
        resolve_checkpoint(tmp_path)


def test_unreadable_config(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="cannot read the checkpoint config"):
        load_classifier(tmp_path)


def test_hub_id_offline_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match="Hugging Face hub.*local checkpoint directory"):
        load_classifier("someone/some-model-that-is-not-cached")


def test_offline_copy_of_minilm_resolves(minilm_dir: Path) -> None:
    assert Path(resolve_checkpoint("sentence-transformers/all-MiniLM-L6-v2")) == minilm_dir


def test_model_without_head_is_refused(minilm_dir: Path) -> None:
    with pytest.raises(ModelError, match="no sequence-classification head.*finetune"):
        load_classifier(minilm_dir)


def test_head_can_be_created_for_finetuning(minilm_dir: Path) -> None:
    model, _ = load_classifier(minilm_dir, num_labels=3, require_head=False, device="cpu")
    assert model.config.num_labels == 3
    assert model.classifier.out_features == 3


def test_label_count_mismatch(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match="2 labels but the task has 3"):
        load_classifier(tiny_models["bert"], num_labels=3)


def test_base_model_checkpoint_without_head(tmp_path: Path) -> None:
    config = AutoConfig.for_model("bert", **TINY_CONFIGS["bert"])
    AutoModel.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="architectures: BertModel"):
        load_classifier(tmp_path)


def test_safetensors_saved(tiny_models: dict[str, Path]) -> None:
    assert (tiny_models["bert"] / "model.safetensors").is_file()
    assert not (tiny_models["bert"] / "pytorch_model.bin").exists()
