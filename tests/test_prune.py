"""Truncation, depth scoring and head re-fitting, on tiny random models of every architecture."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from conftest import SENTENCES, TINY_CONFIGS, TINY_LAYERS, make_tiny_classifier
from layerprune.data import Examples
from layerprune.errors import LayerpruneError, ModelError
from layerprune.hidden import forward_all_layers, make_batches, predict_logits
from layerprune.models import (
    ARCHITECTURES,
    head_logits,
    head_modules,
    layer_list,
    load_classifier,
    total_layers,
)
from layerprune.heal import HeadOptions, fit_head
from layerprune.prune import depth_logits, first_token_states, load_head, truncate

ATOL = 1e-4
EXAMPLES = Examples(
    texts=[text for text, _ in SENTENCES],
    pairs=None,
    labels=np.array([int(label == "positive") for _, label in SENTENCES]),
)


def loud_head(model: torch.nn.Module, seed: int = 1) -> None:
    """Re-draw the head's weights large, so logits are O(1) and an atol of 1e-4 tells depths apart."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in head_modules(model).values():
            for param in module.parameters():
                param.normal_(0.0, 0.4)


def batches_of(tokenizer, examples: Examples = EXAMPLES):
    return make_batches(tokenizer, examples, batch_size=5, max_length=32)


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.clone() for name, m in head_modules(model).items() for k, v in m.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- head knowledge


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_head_logits_match_the_model(tiny_models: dict[str, Path], model_type: str) -> None:
    model, tokenizer = load_classifier(tiny_models[model_type], device="cpu")
    loud_head(model)
    model.train()  # head_logits must compute as in eval mode whatever the model's mode
    for _, logits, hidden_states in forward_all_layers(model, batches_of(tokenizer)):
        last = hidden_states[TINY_LAYERS]
        torch.testing.assert_close(head_logits(model, last), logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(head_logits(model, last[:, :1]), logits, atol=ATOL, rtol=0)
    assert not model.training  # forward_all_layers left it in eval; head_logits restored what it found
    assert all(not m.training for m in head_modules(model).values())


def test_head_logits_restore_training_mode(tiny_models: dict[str, Path]) -> None:
    model, _ = load_classifier(tiny_models["roberta"], device="cpu")
    model.train()
    head_logits(model, torch.zeros(2, 3, 32))
    assert all(m.training for m in model.modules())


def test_head_modules_name_the_pooler() -> None:
    expected = {
        "bert": ["bert.pooler", "classifier"],
        "albert": ["albert.pooler", "classifier"],
        "distilbert": ["pre_classifier", "classifier"],
        "deberta-v2": ["pooler", "classifier"],
        "roberta": ["classifier"],
        "electra": ["classifier"],
    }
    for model_type, names in expected.items():
        config = AutoConfig.for_model(model_type, num_labels=2, **TINY_CONFIGS[model_type])
        model = AutoModelForSequenceClassification.from_config(config)
        assert list(head_modules(model)) == names


# --------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_truncated_model_computes_head_of_that_depth(
    tiny_models: dict[str, Path], tmp_path: Path, model_type: str
) -> None:
    full, tokenizer = load_classifier(tiny_models[model_type], device="cpu")
    loud_head(full)
    full_logits = predict_logits(full, tokenizer, EXAMPLES)
    features = first_token_states(full, batches_of(tokenizer), len(EXAMPLES))
    assert features.shape == (TINY_LAYERS + 1, len(EXAMPLES), 32) and features.dtype == np.float32
    by_depth = depth_logits(full, features)
    assert by_depth.shape == (TINY_LAYERS + 1, len(EXAMPLES), 2)
    np.testing.assert_allclose(by_depth[TINY_LAYERS], full_logits, atol=ATOL, rtol=0)
    head_before = state_of(full)
    for depth in range(1, TINY_LAYERS + 1):
        model = truncate(copy.deepcopy(full), depth)
        assert total_layers(model.config) == depth
        assert len(layer_list(model)) == (1 if ARCHITECTURES[model_type].shared_weights else depth)
        assert same_state(state_of(model), head_before)
        logits = predict_logits(model, tokenizer, EXAMPLES)
        np.testing.assert_allclose(logits, by_depth[depth], atol=ATOL, rtol=0)
        if depth < TINY_LAYERS:  # the check has teeth: depths give different logits
            assert np.abs(logits - full_logits).max() > 100 * ATOL

        model.save_pretrained(tmp_path / str(depth))
        reloaded, info = AutoModelForSequenceClassification.from_pretrained(
            tmp_path / str(depth), output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert total_layers(reloaded.config) == depth
        # the same weights; the reloaded model's plain nn.Linear may round otherwise than oneDNN (layerprune.linear)
        np.testing.assert_allclose(predict_logits(reloaded.eval(), tokenizer, EXAMPLES), logits, atol=1e-5, rtol=0)


def test_keeping_every_layer_changes_nothing(tiny_models: dict[str, Path]) -> None:
    model, tokenizer = load_classifier(tiny_models["bert"], device="cpu")
    before = predict_logits(model, tokenizer, EXAMPLES)
    assert truncate(model, TINY_LAYERS) is model
    np.testing.assert_array_equal(predict_logits(model, tokenizer, EXAMPLES), before)


@pytest.mark.parametrize("depth", [0, TINY_LAYERS + 1, -1])
def test_depth_out_of_range(tiny_models: dict[str, Path], depth: int) -> None:
    model, _ = load_classifier(tiny_models["distilbert"], device="cpu")
    with pytest.raises(ModelError, match=f"has {TINY_LAYERS}, so depth must be 1 to {TINY_LAYERS}"):
        truncate(model, depth)
    assert total_layers(model.config) == TINY_LAYERS


@pytest.fixture(scope="module")
def grouped_albert(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """6 layers over 2 weight groups: layers 1-3 use group 0, layers 4-6 group 1."""
    path = tmp_path_factory.mktemp("albert-groups")
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "albert", num_labels=2, **{**TINY_CONFIGS["albert"], "num_hidden_layers": 6, "num_hidden_groups": 2}
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(path)
    return path


def test_albert_with_layer_groups_truncates_only_where_exact(grouped_albert: Path, tmp_path: Path) -> None:
    full, tokenizer = load_classifier(grouped_albert, device="cpu")
    loud_head(full)
    by_depth = depth_logits(full, first_token_states(full, batches_of(tokenizer), len(EXAMPLES)))
    # ALBERT picks layer i's group as int(i / (depth / groups)): at depth 4 with 2 groups, layer 3 would
    # move to group 1, so that depth is refused; the others keep every layer's group.
    refused = r"ALBERT \(2 layer groups of 1 layers\) to 4 layers exactly; depths that work: 1, 2, 3, 5, 6$"
    with pytest.raises(ModelError, match=refused):
        truncate(copy.deepcopy(full), 4)
    for depth, groups in [(1, 1), (2, 1), (3, 1), (5, 2), (6, 2)]:
        model = truncate(copy.deepcopy(full), depth)
        assert (model.config.num_hidden_layers, model.config.num_hidden_groups) == (depth, groups)
        assert len(layer_list(model)) == groups
        np.testing.assert_allclose(predict_logits(model, tokenizer, EXAMPLES), by_depth[depth], atol=ATOL, rtol=0)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(predict_logits(reloaded, tokenizer, EXAMPLES), by_depth[6], atol=ATOL, rtol=0)


REALISTIC_VARIANTS = {
    # DeBERTa-v3's relative attention (buckets, normed relative embeddings, shared keys) plus v2-xlarge's conv
    "deberta-v3": ("deberta-v2", dict(relative_attention=True, position_buckets=16, norm_rel_ebd="layer_norm",
                                      pos_att_type=["p2c", "c2p"], share_att_key=True, position_biased_input=False,
                                      conv_kernel_size=3)),
    "albert-inner-2": ("albert", dict(inner_group_num=2)),
}


@pytest.mark.parametrize("variant", sorted(REALISTIC_VARIANTS))
def test_truncation_identity_in_config_variants(minilm_dir: Path, variant: str) -> None:
    model_type, extra = REALISTIC_VARIANTS[variant]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, num_labels=2, **{**TINY_CONFIGS[model_type], **extra})
    full = AutoModelForSequenceClassification.from_config(config).eval()
    loud_head(full)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    by_depth = depth_logits(full, first_token_states(full, batches_of(tokenizer), len(EXAMPLES)))
    for depth in range(1, TINY_LAYERS + 1):
        if variant == "albert-inner-2" and depth == 1:
            # transformers gives each group depth/groups head-mask slots, and 2 inner layers need 2
            with pytest.raises(ModelError, match="of 2 layers\\) to 1 layers exactly; depths that work: 2, 3, 4"):
                truncate(copy.deepcopy(full), depth)
            continue
        model = truncate(copy.deepcopy(full), depth)
        np.testing.assert_allclose(predict_logits(model, tokenizer, EXAMPLES), by_depth[depth], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- depth scoring


def test_first_token_states_are_in_example_order(tiny_models: dict[str, Path]) -> None:
    model, tokenizer = load_classifier(tiny_models["bert"], device="cpu")
    sorted_batches = batches_of(tokenizer)
    assert not np.array_equal(np.concatenate([b.indices for b in sorted_batches]), np.arange(len(EXAMPLES)))
    states = first_token_states(model, sorted_batches, len(EXAMPLES))
    one = make_batches(tokenizer, EXAMPLES.select([7]), batch_size=1, max_length=32)
    _, _, hidden_states = next(forward_all_layers(model, one))
    expected = torch.stack([h[0, 0] for h in hidden_states]).numpy()
    np.testing.assert_allclose(states[:, 7], expected, atol=1e-5, rtol=0)


def test_first_token_states_need_every_example(tiny_models: dict[str, Path]) -> None:
    model, tokenizer = load_classifier(tiny_models["bert"], device="cpu")
    with pytest.raises(LayerpruneError, match="cover 5 of the 12 examples"):
        first_token_states(model, batches_of(tokenizer)[:1], len(EXAMPLES))


# --------------------------------------------------------------------------- head re-fitting


def low_layer_like(n: int, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Linearly separable features shaped like a low layer's first token: a large shared mean
    (norm ~8) with tiny variation (std 0.002), as MiniLM's layers 1-3 give on real sentences."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, dim))
    labels = (z @ rng.standard_normal(dim) > 0).astype(np.int64)
    mean = rng.standard_normal(dim) * 8 / np.sqrt(dim)
    return (mean + 0.002 * z).astype(np.float32), labels


def accuracy(model, features: np.ndarray, labels: np.ndarray) -> float:
    return float((depth_logits(model, features[None])[0].argmax(-1) == labels).mean())


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_fit_head_repairs_a_scrambled_head(tiny_models: dict[str, Path], model_type: str) -> None:
    model, _ = load_classifier(tiny_models[model_type], device="cpu")
    loud_head(model)
    features, labels = low_layer_like(600)
    train, test = slice(0, 400), slice(400, 600)
    before_state = state_of(model)
    before = accuracy(model, features[test], labels[test])
    fit = fit_head(model, features[train], labels[train], regression=False)
    assert same_state(state_of(model), before_state), "fit_head must not touch the model's head"
    assert fit.steps > 0 and fit.held_out_loss is not None
    load_head(model, fit.state)
    after = accuracy(model, features[test], labels[test])
    assert after >= 0.85 and after >= before + 0.25, (before, after)


def test_fit_head_without_holdout_on_few_examples(tiny_models: dict[str, Path]) -> None:
    model, _ = load_classifier(tiny_models["bert"], device="cpu")
    loud_head(model)
    features, labels = low_layer_like(60)
    before = accuracy(model, features, labels)
    fit = fit_head(model, features, labels, regression=False, opts=HeadOptions(epochs=20))
    assert fit.held_out_loss is None and fit.steps == 20  # one batch per epoch, every epoch run
    load_head(model, fit.state)
    assert accuracy(model, features, labels) >= max(0.9, before + 0.25)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_zero_epochs_return_the_fine_tuned_head(tiny_models: dict[str, Path], model_type: str) -> None:
    """Standardizing the first linear layer's inputs is an exact reparametrization: undone on export."""
    model, _ = load_classifier(tiny_models[model_type], device="cpu")
    loud_head(model)
    features, labels = low_layer_like(150)
    fit = fit_head(model, features, labels, regression=False, opts=HeadOptions(epochs=0))
    assert fit.steps == 0
    before = state_of(model)
    assert fit.state.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(fit.state[key], value, atol=1e-5, rtol=1e-5)


def test_a_good_head_stays_good(tiny_models: dict[str, Path]) -> None:
    model, _ = load_classifier(tiny_models["bert"], device="cpu")
    features, labels = low_layer_like(1000)
    load_head(model, fit_head(model, features[:600], labels[:600], regression=False).state)
    good = accuracy(model, features[600:], labels[600:])
    refit = fit_head(model, features[:600], labels[:600], regression=False, opts=HeadOptions(seed=1))
    load_head(model, refit.state)
    assert accuracy(model, features[600:], labels[600:]) >= good - 0.02


def test_fit_head_is_deterministic(tiny_models: dict[str, Path]) -> None:
    model, _ = load_classifier(tiny_models["electra"], device="cpu")
    features, labels = low_layer_like(200)
    a = fit_head(model, features, labels, regression=False, opts=HeadOptions(epochs=3))
    b = fit_head(model, features, labels, regression=False, opts=HeadOptions(epochs=3))
    assert same_state(a.state, b.state) and a.train_loss == b.train_loss
    c = fit_head(model, features, labels, regression=False, opts=HeadOptions(epochs=3, seed=1))
    assert not same_state(a.state, c.state)


def test_fit_head_regression(tmp_path: Path, minilm_dir: Path) -> None:
    path = make_tiny_classifier("roberta", tmp_path / "stsb", minilm_dir, num_labels=1)
    model, _ = load_classifier(path, device="cpu")
    rng = np.random.default_rng(0)
    features = rng.standard_normal((500, 32)).astype(np.float32)
    targets = np.clip(2.5 + features @ rng.standard_normal(32) * 0.3, 0, 5).astype(np.float32)

    def mse() -> float:
        return float(((depth_logits(model, features[None])[0, :, 0] - targets) ** 2).mean())

    before = mse()
    fit = fit_head(model, features, targets, regression=True)
    load_head(model, fit.state)
    assert mse() < 0.2 * before, (before, mse())
    with pytest.raises(ModelError, match="1 outputs.*classification"):
        fit_head(model, features, targets, regression=False)


def test_fit_head_checks_its_inputs(tiny_models: dict[str, Path]) -> None:
    model, _ = load_classifier(tiny_models["bert"], device="cpu")
    features, labels = low_layer_like(20)
    with pytest.raises(ModelError, match="2 outputs.*regression"):
        fit_head(model, features, labels.astype(np.float32), regression=True)
    with pytest.raises(ModelError, match="width 16 do not fit a head of width 32"):
        fit_head(model, features[:, :16], labels, regression=False)
    with pytest.raises(LayerpruneError, match="class ids 0..1"):
        fit_head(model, features, labels + 1, regression=False)
    with pytest.raises(LayerpruneError, match="n labels"):
        fit_head(model, features, labels[:5], regression=False)


def test_load_head_refuses_another_models_head(tiny_models: dict[str, Path]) -> None:
    bert, _ = load_classifier(tiny_models["bert"], device="cpu")
    roberta, _ = load_classifier(tiny_models["roberta"], device="cpu")
    features, labels = low_layer_like(20)
    state = fit_head(roberta, features, labels, regression=False, opts=HeadOptions(epochs=0)).state
    with pytest.raises(ModelError, match="head"):
        load_head(bert, state)
