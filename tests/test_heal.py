"""The heals on tiny models of every architecture: the re-tuned layers run on cached inputs compute
exactly what the truncated model computes, and training moves the truncated model towards the original."""

from __future__ import annotations

import copy
import dataclasses
import functools

import numpy as np
import pytest
import torch

from conftest import SENTENCES, TINY_CONFIGS, TINY_LAYERS, make_tiny_classifier, reference_with_layers
from layerprune.data import Examples
from layerprune.errors import LayerpruneError, ModelError
from layerprune.heal import (
    TopOptions, WholeOptions, augment_texts, encode_texts, heal_at, heal_top, heal_whole, layer_map, token_states)
from layerprune.heal.loss import direction_loss, distillation_loss, state_loss
from layerprune.hidden import forward_all_layers, make_batches, predict_logits
from layerprune.models import layer_list, load_classifier, run_layers_on
from layerprune.prune import truncate

LAYERED = [mt for mt in TINY_CONFIGS if mt != "albert"]  # ALBERT shares one set of weights across layers


@pytest.fixture(scope="module")
def examples() -> Examples:
    texts = [t for t, _ in SENTENCES] + [f"honestly, {t}" for t, _ in SENTENCES]
    labels = np.array([int(label == "positive") for _, label in SENTENCES] * 2)
    return Examples(texts=texts, pairs=None, labels=labels)


def _texts(model, tokenizer, examples, depths=frozenset({0})):
    return encode_texts(model, tokenizer, examples, batch_size=8, max_length=64, keep_tokens=set(depths))


@pytest.mark.parametrize("model_type", LAYERED)
@pytest.mark.parametrize("depth,heal_layers", [(3, 1), (2, 2), (4, 1)])
def test_untrained_heal_is_the_truncated_model(tiny_models, examples, model_type, depth, heal_layers) -> None:
    """Zero epochs: the layers run on cached (float16) inputs give the truncated model's logits, and
    installing them into a truncated copy changes nothing."""
    model, tokenizer = load_classifier(tiny_models[model_type], num_labels=2, device="cpu")
    texts = _texts(model, tokenizer, examples)
    healed = heal_top(model, depth, texts, examples.labels, opts=TopOptions(heal_layers=heal_layers, epochs=0))
    truncated = truncate(copy.deepcopy(model), depth)
    reference = predict_logits(truncated, tokenizer, examples, batch_size=8, max_length=64)
    np.testing.assert_allclose(healed.logits(texts), reference, atol=1e-4)
    healed.install(truncated)
    np.testing.assert_allclose(predict_logits(truncated, tokenizer, examples, batch_size=8, max_length=64),
                               reference, atol=1e-6)


@pytest.mark.parametrize("depth,heal_layers", [(2, 1), (3, 2)])
def test_untrained_top_start_is_the_lower_layers_under_the_originals_top_ones(
        tmp_path, minilm_dir, examples, depth, heal_layers) -> None:
    """start="top", zero epochs: layers 1..depth-h of the original, then its top h layers, then its head, as
    transformers computes a fresh BERT of depth layers with exactly those layers' weights loaded."""
    # initializer_range 0.3: the layers differ enough that which ones are picked shows in the logits
    path = make_tiny_classifier("bert", tmp_path / "bert", minilm_dir, seed=3, initializer_range=0.3)
    model, tokenizer = load_classifier(path, num_labels=2, device="cpu")
    total = model.config.num_hidden_layers
    texts = _texts(model, tokenizer, examples)
    opts = TopOptions(heal_layers=heal_layers, epochs=0, start="top")
    healed = heal_top(model, depth, texts, examples.labels, opts=opts)
    picked = [*range(1, depth - heal_layers + 1), *range(total - heal_layers + 1, total + 1)]
    _, reference = reference_with_layers(path, picked)
    expected = predict_logits(reference, tokenizer, examples, batch_size=8, max_length=64)
    np.testing.assert_allclose(healed.logits(texts), expected, atol=1e-2)  # the cached inputs are float16
    truncated = truncate(copy.deepcopy(model), depth)
    kept = predict_logits(truncated, tokenizer, examples, batch_size=8, max_length=64)
    assert np.abs(expected - kept).max() > 0.2, "the top start differs from the kept layers' start"
    healed.install(truncated)
    np.testing.assert_allclose(predict_logits(truncated, tokenizer, examples, batch_size=8, max_length=64),
                               expected, atol=1e-4)


@pytest.mark.parametrize("model_type", ["bert", "mpnet", "distilbert"])
def test_token_states_from_a_lower_depth_match_the_forward_pass(tiny_models, examples, model_type) -> None:
    model, tokenizer = load_classifier(tiny_models[model_type], num_labels=2, device="cpu")
    texts = _texts(model, tokenizer, examples)
    computed = token_states(model, texts, 3)  # run layers 1..3 on the cached embeddings
    assert set(texts.tokens) == {0, 3}, "only the depth asked for is cached, not those passed on the way"
    batches = make_batches(tokenizer, examples, batch_size=8, max_length=64)
    for states, (_, _, hidden) in zip(computed, forward_all_layers(model, batches)):
        torch.testing.assert_close(states.float(), hidden[3], atol=2e-2, rtol=1e-2)  # float16 storage


@pytest.mark.parametrize("memory_for,kept", [(10, {0, 1, 2, 3}), (3, {0, 3, 2}), (1, {0})])
def test_spare_token_states_are_kept_as_memory_allows(tiny_models, examples, monkeypatch, memory_for, kept) -> None:
    """spare_tokens: kept in the order given, as many as half the available memory holds with those asked for
    (here: room for `memory_for` indices of float16 states), each as transformers computes it."""
    model, tokenizer = load_classifier(tiny_models["bert"], num_labels=2, device="cpu")
    batches = make_batches(tokenizer, examples, batch_size=8, max_length=64)
    size = sum(b.encoding["input_ids"].numel() for b in batches) * model.config.hidden_size * 2
    available = type("Memory", (), {"available": 2 * size * memory_for})()
    monkeypatch.setattr("layerprune.heal.states.psutil.virtual_memory", lambda: available)
    texts = encode_texts(model, tokenizer, examples, batch_size=8, max_length=64, keep_tokens={0},
                         spare_tokens=[3, 2, 1])
    assert set(texts.tokens) == kept
    for i, (_, _, hidden) in enumerate(forward_all_layers(model, batches)):
        for index in kept:
            torch.testing.assert_close(texts.tokens[index][i].float(), hidden[index], atol=2e-2, rtol=1e-2)


def test_distillation_brings_the_truncated_model_towards_the_original(tiny_models, examples) -> None:
    model, tokenizer = load_classifier(tiny_models["bert"], num_labels=2, device="cpu")
    texts = _texts(model, tokenizer, examples)
    # A random tiny model's depths all say about the same; a teacher that tells the sentiment apart does not.
    texts.logits = (np.eye(2)[examples.labels] * 4 - 2).astype(np.float32)
    logits_only = TopOptions(feature_weight=0.0)  # the made-up teacher has no states to match
    before = heal_top(model, 2, texts, None, opts=dataclasses.replace(logits_only, epochs=0))
    after = heal_top(model, 2, texts, None, opts=dataclasses.replace(logits_only, epochs=30, lr=3e-3, patience=30))
    gap = lambda healed: float(np.abs(healed.logits(texts) - texts.logits).mean())  # noqa: E731
    assert after.stats.epochs > 0 and after.steps > 0
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
    fast = TopOptions(epochs=30, lr=3e-3, patience=30, label_weight=0.0)
    gap = lambda healed: float(((_top_first_token(healed, texts, model) - texts.first[-1]) ** 2).mean())  # noqa: E731
    before = gap(heal_top(model, 2, texts, None, opts=dataclasses.replace(fast, epochs=0)))
    matched = gap(heal_top(model, 2, texts, None, opts=dataclasses.replace(fast, feature_weight=1.0)))
    assert matched < 0.5 * before, "30 epochs with the feature term halve the squared gap"


def test_warmup_ramps_the_learning_rate_from_zero(tiny_models, examples) -> None:
    """A linear schedule on one batch (one step an epoch), by hand. Warmed up over its only step, the learning
    rate is 0 (and AdamW's decoupled weight decay with it): the layers stay as they were. Warmed up over the
    first of two steps, the second runs at the full rate after a first gradient equal to its own (no dropout,
    unchanged weights), so Adam's bias-corrected moments are those of one step: the student of one
    constant-rate step."""
    model, tokenizer = load_classifier(tiny_models["bert"], num_labels=2, device="cpu")
    texts = encode_texts(model, tokenizer, examples, batch_size=64, max_length=64)
    assert len(texts.batches) == 1 and texts.n < 100  # and no held-out tenth, so the last epoch is kept
    run = lambda **kw: heal_top(model, 2, texts, examples.labels,  # noqa: E731
                               opts=TopOptions(lr=1e-2, dropout=False, **kw)).logits(texts)
    untrained, one_step = run(epochs=0), run(epochs=1)
    np.testing.assert_allclose(run(epochs=1, warmup=1.0), untrained, atol=1e-6)
    np.testing.assert_allclose(run(epochs=2, warmup=0.5), one_step, atol=1e-6)
    assert np.abs(one_step - untrained).max() > 1e-3


def test_dropout_off_trains_without_noise(tiny_models, examples) -> None:
    """dropout=False trains the student a model whose config has no dropout at all trains with dropout on;
    dropout=True (the config's 0.1) trains another one."""
    model, tokenizer = load_classifier(tiny_models["bert"], num_labels=2, device="cpu")
    assert model.config.hidden_dropout_prob > 0
    quiet, _ = load_classifier(tiny_models["bert"], num_labels=2, device="cpu", hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)
    texts = _texts(model, tokenizer, examples)

    def trained(original, dropout: bool) -> np.ndarray:
        opts = TopOptions(epochs=2, lr=1e-3, dropout=dropout)
        return heal_top(original, 2, texts, examples.labels, opts=opts).logits(texts)

    off = trained(model, dropout=False)
    np.testing.assert_allclose(off, trained(quiet, dropout=True), atol=1e-6)
    assert np.abs(off - trained(model, dropout=True)).max() > 1e-5  # the tiny logits are ~1e-2


def test_held_out_tenth_chooses_the_epoch(tiny_models) -> None:
    """With 100+ texts a tenth of the batches is held out (by hand: 120 texts in 15 batches of 8, so 1 batch of 8
    texts), and the heal names it; zero useful epochs keep the weights as they were."""
    model, tokenizer = load_classifier(tiny_models["bert"], num_labels=2, device="cpu")
    many = Examples(texts=[f"{t} {i}" for i in range(10) for t, _ in SENTENCES], pairs=None,
                    labels=np.zeros(120, dtype=np.int64))
    texts = _texts(model, tokenizer, many)
    healed = heal_top(model, 2, texts, None, opts=TopOptions(epochs=1, lr=0.0))
    assert healed.stats.n_held_out == 8 and healed.stats.n_train == 112
    assert len(healed.held_out) == 1 and len(texts.batches[healed.held_out[0]].indices) == 8
    assert healed.stats.epochs == 0, "a zero learning rate never beats epoch 0 on the held-out texts"


def test_distillation_loss_is_zero_at_the_teacher_and_grows_away_from_it() -> None:
    teacher = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    loss = functools.partial(distillation_loss, temperature=2.0, label_weight=0.5)
    assert float(loss(teacher, teacher, None, False)) == pytest.approx(0.0, abs=1e-7)
    assert float(loss(teacher.flip(-1), teacher, None, False)) > 0.1
    with_labels = loss(teacher, teacher, torch.tensor([0, 0]), False)
    ce = torch.nn.functional.cross_entropy(teacher, torch.tensor([0, 0]))
    assert float(with_labels) == pytest.approx(0.5 * float(ce), rel=1e-6), "label term weighted 0.5"
    unlabeled = loss(teacher, teacher, torch.tensor([0, -1]), False)
    ce_first = torch.nn.functional.cross_entropy(teacher[:1], torch.tensor([0]))
    assert float(unlabeled) == pytest.approx(0.5 * float(ce_first), rel=1e-6), "label -1 (augmented) is skipped"
    assert float(loss(teacher[:, :1], teacher[:, :1], None, True)) == 0.0


def test_state_losses_by_hand() -> None:
    """direction_loss = |s/|s| - t/|t||^2 = 2 - 2 cos: 0 for the same direction at any scale, 2 for
    orthogonal rows, 4 for opposite ones; state_loss is the masked MSE over the variance."""
    t = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    assert float(direction_loss(10 * t, t)) == pytest.approx(0.0, abs=1e-7)
    assert float(direction_loss(t.flip(-1), t)) == pytest.approx(2.0)
    assert float(direction_loss(-t, t)) == pytest.approx(4.0)
    student, teacher = torch.zeros(1, 3, 2), torch.ones(1, 3, 2)
    mask = torch.tensor([[1, 1, 0]])
    student[0, 2] = 100.0  # a padding token: not counted
    assert float(state_loss(student, teacher, 0.5, mask)) == pytest.approx(2.0)
    assert float(state_loss(student[:, 0], teacher[:, 0], 4.0)) == pytest.approx(0.25)


def test_albert_layers_cannot_run_alone(tiny_models, examples) -> None:
    model, tokenizer = load_classifier(tiny_models["albert"], num_labels=2, device="cpu")
    with pytest.raises(ModelError, match="cannot be run on their own"):
        with run_layers_on(model, torch.nn.ModuleList()):
            pass
    with pytest.raises(LayerpruneError, match="cannot re-tune 3 layers"):
        heal_top(model, 2, _texts(model, tokenizer, examples), None, opts=TopOptions(heal_layers=3))


# --------------------------------------------------------------------------- the whole-model heal

@pytest.mark.parametrize("depth,total,expected", [(3, 12, [4, 8, 12]), (6, 12, [2, 4, 6, 8, 10, 12]),
                                                  (4, 6, [2, 3, 5, 6]), (5, 6, [1, 2, 4, 5, 6]), (1, 4, [4])])
def test_layer_map_spreads_the_kept_layers_evenly(depth, total, expected) -> None:
    """j * total / depth rounded half up, by hand: the top kept layer always matches the last layer."""
    assert layer_map(depth, total) == expected


@pytest.mark.parametrize("model_type", ["bert", "mpnet", "distilbert"])
def test_untrained_whole_heal_is_the_truncated_model(tiny_models, examples, model_type) -> None:
    """Zero epochs: the student is the original truncated at the depth, as transformers computes it."""
    model, tokenizer = load_classifier(tiny_models[model_type], num_labels=2, device="cpu")
    texts = _texts(model, tokenizer, examples)
    healed = heal_whole(model, 2, texts, examples.labels, opts=WholeOptions(epochs=0))
    truncated = truncate(copy.deepcopy(model), 2)
    reference = predict_logits(truncated, tokenizer, examples, batch_size=8, max_length=64)
    np.testing.assert_allclose(healed.logits(texts), reference, atol=1e-5)
    healed.install(truncated)
    np.testing.assert_allclose(predict_logits(truncated, tokenizer, examples, batch_size=8, max_length=64),
                               reference, atol=1e-6)


def test_whole_heal_trains_every_kept_layer_towards_the_original(tiny_models, examples) -> None:
    """Every kept layer changes (the lower ones are not frozen), the embeddings stay, the original is left
    as it was, and the truncated model's logits move towards the original's (both checked against
    transformers' own forward pass of the installed model)."""
    model, tokenizer = load_classifier(tiny_models["bert"], num_labels=2, device="cpu")
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    texts = _texts(model, tokenizer, examples)
    # A random tiny model's depths all say about the same; a teacher that tells the sentiment apart does not.
    texts.logits = (np.eye(2)[examples.labels] * 4 - 2).astype(np.float32)
    opts = WholeOptions(epochs=30, lr=3e-3, warmup=0.0, label_weight=0.0, first_weight=0.0, token_weight=0.0)
    healed = heal_whole(model, 2, texts, None, opts=opts)
    assert all(v.equal(model.state_dict()[k]) for k, v in before_state.items()), "the original is not changed"
    truncated = truncate(copy.deepcopy(model), 2)
    untrained = predict_logits(truncated, tokenizer, examples, batch_size=8, max_length=64)
    healed.install(truncated)
    for i, (kept, original) in enumerate(zip(layer_list(truncated), layer_list(model))):
        moved = [not a.equal(b) for a, b in zip(kept.parameters(), original.parameters())]
        assert all(moved), f"layer {i + 1}: {moved.count(False)} of its tensors stayed frozen"
    assert truncated.bert.embeddings.word_embeddings.weight.equal(model.bert.embeddings.word_embeddings.weight)
    served = predict_logits(truncated, tokenizer, examples, batch_size=8, max_length=64)
    np.testing.assert_allclose(healed.logits(texts), served, atol=1e-4)
    gap = lambda logits: float(np.abs(logits - texts.logits).mean())  # noqa: E731
    assert gap(served) < 0.5 * gap(untrained), (gap(untrained), gap(served))
    assert healed.stats.heal == "whole" and healed.stats.epochs_run == 30


def test_whole_heal_matches_token_states_when_asked(tiny_models, examples) -> None:
    """With token_weight > 0 the original's token states at the mapped layers are computed (only those),
    and the loss at epoch 0 grows by their gap, which a hand computation gives."""
    model, tokenizer = load_classifier(tiny_models["bert"], num_labels=2, device="cpu")
    texts = _texts(model, tokenizer, examples)
    heal_whole(model, 2, texts, None, opts=WholeOptions(epochs=0, token_weight=1.0))
    assert set(texts.tokens) == {0, *layer_map(2, TINY_LAYERS)}, "the targets alone are cached"
    off = _texts(model, tokenizer, examples)
    heal_whole(model, 2, off, None, opts=WholeOptions(epochs=0, token_weight=0.0))
    assert set(off.tokens) == {0}


def test_whole_heal_matches_the_layers_asked_for(tiny_models, examples) -> None:
    """mapped=[1, 3]: the targets cached are the original's states at layers 1 and 3 (not layer_map's), and a
    list of another length than the depth is refused."""
    model, tokenizer = load_classifier(tiny_models["bert"], num_labels=2, device="cpu")
    texts = _texts(model, tokenizer, examples)
    heal_whole(model, 2, texts, None, opts=WholeOptions(epochs=0, token_weight=1.0), mapped=[1, 3])
    assert set(texts.tokens) == {0, 1, 3} != {0, *layer_map(2, TINY_LAYERS)}
    with pytest.raises(LayerpruneError, match="matches 2 original layers, not 3"):
        heal_whole(model, 2, texts, None, opts=WholeOptions(epochs=0), mapped=[1, 2, 3])


def test_whole_heal_starts_from_a_deeper_heal(tiny_models, examples) -> None:
    model, tokenizer = load_classifier(tiny_models["bert"], num_labels=2, device="cpu")
    texts = _texts(model, tokenizer, examples)
    deeper = heal_whole(model, 3, texts, None, opts=WholeOptions(epochs=5, lr=3e-3))
    started = heal_whole(model, 2, texts, None, opts=WholeOptions(epochs=0), start=deeper)
    for mine, theirs in zip(layer_list(started.student), layer_list(deeper.student)[:2]):
        assert all(a.equal(b) for a, b in zip(mine.parameters(), theirs.parameters()))
    with pytest.raises(LayerpruneError, match="cannot start"):
        heal_whole(model, 3, texts, None, opts=WholeOptions(epochs=0), start=started)


@pytest.mark.parametrize("mode", ["top", "whole"])
def test_a_heal_trains_the_same_whatever_ran_before_it(tiny_models, examples, mode) -> None:
    """Dropout draws from torch's global generator: heals after different draws (seeds 1 and 2) give the same
    logits, and the caller's generator goes on as torch's own sequence for seed 2 does, as if no heal had
    drawn from it."""
    model, tokenizer = load_classifier(tiny_models["bert"], num_labels=2, device="cpu")
    assert model.config.hidden_dropout_prob > 0, "without dropout there is nothing to draw"
    texts = _texts(model, tokenizer, examples, depths={0, 1})
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        heal = heal_at(mode, model, 2, texts, examples.labels, regression=False,
                       top=TopOptions(epochs=2, lr=3e-3), whole=WholeOptions(epochs=2, lr=3e-3))
        runs.append((heal.logits(texts), torch.rand(4)))
    torch.manual_seed(2)
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[1][1].equal(torch.rand(4))


def test_every_heal_meets_the_interface(tiny_models, examples) -> None:
    """none, head, top and whole: logits at the depth equal what the installed truncated model computes."""
    model, tokenizer = load_classifier(tiny_models["bert"], num_labels=2, device="cpu")
    texts = _texts(model, tokenizer, examples, depths={0, 1})
    for mode in ("none", "head", "top", "whole"):
        heal = heal_at(mode, model, 2, texts, examples.labels, regression=False,
                       top=TopOptions(epochs=1), whole=WholeOptions(epochs=1))
        assert heal.depth == 2 and (heal.stats is None) == (mode == "none")
        truncated = truncate(copy.deepcopy(model), 2)
        heal.install(truncated)
        served = predict_logits(truncated, tokenizer, examples, batch_size=8, max_length=64)
        np.testing.assert_allclose(heal.logits(texts), served, atol=2e-3, err_msg=mode)  # fp16 cached inputs


# --------------------------------------------------------------------------- augmentation

def test_augmented_texts_are_new_in_domain_and_unlabeled(examples) -> None:
    new = augment_texts(examples, copies=3, seed=0)
    assert len(new) == 3 * len(examples) and (new.labels == -1).all() and new.pairs is None
    assert augment_texts(examples, copies=3, seed=0).texts == new.texts, "seeded"
    vocabulary = {w for t in examples.texts for w in t.split()}
    assert all(set(t.split()) <= vocabulary for t in new.texts), "only words of the heal texts"
    crops = new.texts[0::3][:len(examples)]  # copy 0 of text 0, 3, ...: the crops
    for i, crop in zip(range(0, len(examples), 3), crops):
        assert f" {crop} " in f" {examples.texts[i]} " or len(examples.texts[i].split()) < 4
    assert sum(t not in set(examples.texts) for t in new.texts) > 0.8 * len(new), "most are new texts"


def test_pairs_are_augmented_on_both_sides() -> None:
    pairs = Examples(texts=["a b c d e", "f g h i"], pairs=["j k l", "m n o p"], labels=np.array([0, 1]))
    new = augment_texts(pairs, copies=2, seed=1)
    assert len(new.texts) == len(new.pairs) == 4
    assert all(len(t.split()) == len(s.split()) for t, s in zip(new.texts, pairs.texts * 2))


def test_the_minutes_cap_shortens_the_schedule_by_hand() -> None:
    """A step costs ~3 held-out forward passes: 1 s for 10 held-out batches -> 0.3 s a step; one minute less
    three held-out passes (3 s) leaves 57 s: 190 of the 300 planned steps."""
    from layerprune.heal.whole import _steps_within_budget

    opts = WholeOptions(epochs=3, minutes=1.0)
    assert _steps_within_budget(opts, train=100, held=10, held_seconds=1.0) == 190
    assert _steps_within_budget(dataclasses.replace(opts, minutes=None), 100, 10, 1.0) == 300
    assert _steps_within_budget(dataclasses.replace(opts, minutes=60.0), 100, 10, 1.0) == 300, "never more"
    assert _steps_within_budget(dataclasses.replace(opts, minutes=1e-4), 100, 10, 1.0) == 1, "at least one"
    assert _steps_within_budget(opts, train=100, held=0, held_seconds=0.0) == 300, "nothing held out: no clock"


def _above_by_hand(model, cut: int, batch, states: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A BERT's layers cut+1.. and head on `states`, called one transformers module at a time."""
    mask = batch.encoding["attention_mask"]
    extended = model.get_extended_attention_mask(mask, mask.shape)
    with torch.no_grad():
        for layer in model.bert.encoder.layer[cut:]:
            states = layer(states, attention_mask=extended)[0]
        logits = model.classifier(model.bert.pooler(states))
    return logits.numpy(), states[:, 0].numpy()


def test_neighbours_are_labelled_by_the_originals_layers_above_the_cut(tiny_models, examples) -> None:
    """The states near the heal texts' own get the original's outputs there: its layers above the cut and its
    head, as transformers' modules compute them called by hand, on the texts' states and on noisy ones."""
    from layerprune.heal.top import _Above

    model, tokenizer = load_classifier(tiny_models["bert"], num_labels=2, device="cpu")
    texts = _texts(model, tokenizer, examples, depths={2})
    inputs = token_states(model, texts, 2)
    above = _Above(model, 2, inputs, texts)
    torch.manual_seed(0)
    for batch, states in zip(texts.batches, inputs):
        for scale in (0.0, 0.5):
            near = above.nearby(states.float(), scale)
            assert (scale == 0) == bool(torch.equal(near, states.float()))
            logits, top = above(batch, near)
            by_hand = _above_by_hand(model, 2, batch, near)
            np.testing.assert_allclose(logits.numpy(), by_hand[0], atol=1e-5)
            np.testing.assert_allclose(top.numpy(), by_hand[1], atol=1e-5)


def test_neighbours_teach_the_original_around_the_heal_texts(tmp_path, minilm_dir, examples) -> None:
    """Trained with neighbours, the re-tuned layer agrees better with the original on noisy states it never saw
    (the original's outputs there computed by hand) than the same heal trained on the texts' states alone."""
    from layerprune.heal.top import _Above

    # initializer_range 0.3: logits near 1 rather than 0.01, so the gaps are the logits' and not the states'
    path = make_tiny_classifier("bert", tmp_path / "bert", minilm_dir, initializer_range=0.3)
    model, tokenizer = load_classifier(path, num_labels=2, device="cpu")
    texts = _texts(model, tokenizer, examples, depths={1})
    inputs = token_states(model, texts, 1)
    spread = _Above(model, 1, inputs, texts).spread
    fast = TopOptions(epochs=150, lr=3e-3, patience=150, label_weight=0.0, dropout=False)

    def gap(opts: TopOptions) -> float:
        healed = heal_top(model, 2, texts, None, opts=opts)
        generator, total = torch.Generator().manual_seed(7), 0.0
        for batch, states in zip(texts.batches, inputs):
            near = states.float() + 0.5 * spread * torch.randn(states.shape, generator=generator)
            with run_layers_on(healed.student, healed.layers) as feed, torch.no_grad():
                feed(near)
                student = healed.student(**batch.encoding).logits.numpy()
            total += float(((student - _above_by_hand(model, 1, batch, near)[0]) ** 2).sum())
        return total

    assert gap(dataclasses.replace(fast, neighbours=0.5)) < 0.9 * gap(fast)


def test_ema_keeps_the_moving_average_of_the_weights(tiny_models, examples) -> None:
    """By hand, on one batch (one step an epoch, no held-out tenth): the average starts as the weights after the
    first step, so a decay of 1 keeps those through two epochs, and a decay of 0 is the weights as trained."""
    model, tokenizer = load_classifier(tiny_models["bert"], num_labels=2, device="cpu")
    texts = encode_texts(model, tokenizer, examples, batch_size=64, max_length=64)
    assert len(texts.batches) == 1 and texts.n < 100
    run = lambda **kw: heal_top(model, 2, texts, examples.labels,  # noqa: E731
                               opts=TopOptions(lr=1e-2, dropout=False, **kw)).logits(texts)
    one_step, two_steps = run(epochs=1), run(epochs=2)
    assert np.abs(one_step - two_steps).max() > 1e-4
    np.testing.assert_allclose(run(epochs=2, ema=1.0), one_step, atol=1e-6)
    np.testing.assert_allclose(run(epochs=2, ema=0.0), two_steps, atol=1e-6)


def test_a_heal_keeping_the_average_stops_when_the_held_out_loss_does(tiny_models) -> None:
    """Patience holds with the moving average too: at a zero learning rate no epoch beats epoch 0 on the held-out
    tenth, so a heal of 5 epochs with patience 1 runs one."""
    model, tokenizer = load_classifier(tiny_models["bert"], num_labels=2, device="cpu")
    many = Examples(texts=[f"{t} {i}" for i in range(10) for t, _ in SENTENCES], pairs=None,
                    labels=np.zeros(120, dtype=np.int64))
    healed = heal_top(model, 2, _texts(model, tokenizer, many), None,
                     opts=TopOptions(epochs=5, lr=0.0, patience=1, ema=0.5))
    assert healed.stats.epochs == 0 and healed.stats.epochs_run == 1
