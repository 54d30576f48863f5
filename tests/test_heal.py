"""Distillation heal on tiny models of every architecture: the re-tuned layers run on cached inputs compute
exactly what the truncated model computes, and training moves the truncated model towards the original."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from conftest import SENTENCES, TINY_CONFIGS
from layerprune.data import Examples
from layerprune.errors import LayerpruneError, ModelError
from layerprune.heal import DistillOptions, distill, distillation_loss, encode_texts, token_states
from layerprune.hidden import forward_all_layers, make_batches, predict_logits
from layerprune.models import load_classifier, run_layers_on
from layerprune.prune import truncate

LAYERED = [mt for mt in TINY_CONFIGS if mt != "albert"]  # ALBERT shares one set of weights across layers


@pytest.fixture(scope="module")
def examples() -> Examples:
    texts = [t for t, _ in SENTENCES] + [f"honestly, {t}" for t, _ in SENTENCES]
    labels = np.array([int(label == "positive") for _, label in SENTENCES] * 2)
    return Examples(texts=texts, pairs=None, labels=labels)


def _texts(model, tokenizer, examples, depths=frozenset({0})):
    return encode_texts(model, tokenizer, examples, batch_size=8, max_length=64, keep_depths=set(depths))


@pytest.mark.parametrize("model_type", LAYERED)
@pytest.mark.parametrize("depth,heal_layers", [(3, 1), (2, 2), (4, 1)])
def test_untrained_heal_is_the_truncated_model(tiny_models, examples, model_type, depth, heal_layers) -> None:
    """Zero epochs: the layers run on cached (float16) inputs give the truncated model's logits, and
    installing them into a truncated copy changes nothing."""
    model, tokenizer = load_classifier(tiny_models[model_type], num_labels=2, device="cpu")
    texts = _texts(model, tokenizer, examples)
    healed = distill(model, depth, texts, examples.labels, opts=DistillOptions(heal_layers=heal_layers, epochs=0))
    truncated = truncate(copy.deepcopy(model), depth)
    reference = predict_logits(truncated, tokenizer, examples, batch_size=8, max_length=64)
    np.testing.assert_allclose(healed.logits(texts, model), reference, atol=1e-4)
    healed.install(truncated)
    np.testing.assert_allclose(predict_logits(truncated, tokenizer, examples, batch_size=8, max_length=64),
                               reference, atol=1e-6)


@pytest.mark.parametrize("model_type", ["bert", "mpnet", "distilbert"])
def test_token_states_from_a_lower_depth_match_the_forward_pass(tiny_models, examples, model_type) -> None:
    model, tokenizer = load_classifier(tiny_models[model_type], num_labels=2, device="cpu")
    texts = _texts(model, tokenizer, examples)
    computed = token_states(model, texts, 3)  # run layers 1..3 on the cached embeddings
    assert set(texts.tokens) == {0, 1, 2, 3}, "every depth passed on the way is cached"
    batches = make_batches(tokenizer, examples, batch_size=8, max_length=64)
    for states, (_, _, hidden) in zip(computed, forward_all_layers(model, batches)):
        torch.testing.assert_close(states.float(), hidden[3], atol=2e-2, rtol=1e-2)  # float16 storage


def test_distillation_brings_the_truncated_model_towards_the_original(tiny_models, examples) -> None:
    model, tokenizer = load_classifier(tiny_models["bert"], num_labels=2, device="cpu")
    texts = _texts(model, tokenizer, examples)
    # A random tiny model's depths all say about the same; a teacher that tells the sentiment apart does not.
    texts.logits = (np.eye(2)[examples.labels] * 4 - 2).astype(np.float32)
    logits_only = DistillOptions(feature_weight=0.0)  # the made-up teacher has no states to match
    before = distill(model, 2, texts, None, opts=dataclasses.replace(logits_only, epochs=0))
    after = distill(model, 2, texts, None, opts=dataclasses.replace(logits_only, epochs=30, lr=3e-3, patience=30))
    gap = lambda healed: float(np.abs(healed.logits(texts, model) - texts.logits).mean())  # noqa: E731
    assert after.epochs > 0 and after.steps > 0
    assert gap(after) < 0.5 * gap(before), "30 epochs of distillation halve the logit gap to the teacher"
    original = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(original, model.parameters())), "the original is untouched"


def _top_first_token(healed, texts, original) -> np.ndarray:
    """The healed model's top first-token state (what its head reads), per text."""
    inputs = token_states(original, texts, healed.depth - healed.heal_layers)
    out = np.zeros((texts.n, original.config.hidden_size), dtype=np.float32)
    with run_layers_on(healed.student, healed.layers) as feed, torch.inference_mode():
        for batch, states in zip(texts.batches, inputs):
            feed(states.float())
            hidden = healed.student(**batch.encoding, output_hidden_states=True).hidden_states[-1]
            out[batch.indices] = hidden[:, 0].numpy()
    return out


def test_feature_loss_brings_the_top_state_towards_the_originals_last_layer(tiny_models, examples) -> None:
    """The feature term matches what the head reads: the truncated model's top first-token state moves
    towards the original's last-layer one (texts.first[-1]); without it, it need not."""
    model, tokenizer = load_classifier(tiny_models["bert"], num_labels=2, device="cpu")
    texts = _texts(model, tokenizer, examples)
    fast = DistillOptions(epochs=30, lr=3e-3, patience=30, label_weight=0.0)
    gap = lambda healed: float(((_top_first_token(healed, texts, model) - texts.first[-1]) ** 2).mean())  # noqa: E731
    before = gap(distill(model, 2, texts, None, opts=dataclasses.replace(fast, epochs=0)))
    matched = gap(distill(model, 2, texts, None, opts=dataclasses.replace(fast, feature_weight=1.0)))
    assert matched < 0.5 * before, "30 epochs with the feature term halve the squared gap"


def test_held_out_tenth_chooses_the_epoch(tiny_models) -> None:
    """With 100+ texts a tenth of the batches is held out; zero useful epochs keep the weights as they were."""
    model, tokenizer = load_classifier(tiny_models["bert"], num_labels=2, device="cpu")
    many = Examples(texts=[f"{t} {i}" for i in range(10) for t, _ in SENTENCES], pairs=None,
                    labels=np.zeros(120, dtype=np.int64))
    texts = _texts(model, tokenizer, many)
    healed = distill(model, 2, texts, None, opts=DistillOptions(epochs=1, lr=0.0))
    assert healed.n_held_out > 0 and healed.n_train + healed.n_held_out == 120
    assert healed.epochs == 0, "a zero learning rate never beats epoch 0 on the held-out texts"


def test_distillation_loss_is_zero_at_the_teacher_and_grows_away_from_it() -> None:
    teacher = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    opts = DistillOptions()
    assert float(distillation_loss(teacher, teacher, None, False, opts)) == pytest.approx(0.0, abs=1e-7)
    assert float(distillation_loss(teacher.flip(-1), teacher, None, False, opts)) > 0.1
    with_labels = distillation_loss(teacher, teacher, torch.tensor([0, 0]), False, opts)
    ce = torch.nn.functional.cross_entropy(teacher, torch.tensor([0, 0]))
    assert float(with_labels) == pytest.approx(0.5 * float(ce), rel=1e-6), "label term weighted 0.5"
    assert float(distillation_loss(teacher[:, :1], teacher[:, :1], None, True, opts)) == 0.0


def test_albert_layers_cannot_run_alone(tiny_models, examples) -> None:
    model, tokenizer = load_classifier(tiny_models["albert"], num_labels=2, device="cpu")
    with pytest.raises(ModelError, match="cannot be run on their own"):
        with run_layers_on(model, torch.nn.ModuleList()):
            pass
    with pytest.raises(LayerpruneError, match="cannot re-tune 3 layers"):
        distill(model, 2, _texts(model, tokenizer, examples), None, opts=DistillOptions(heal_layers=3))
