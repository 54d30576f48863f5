"""layerprune.continuation on tiny random models of every architecture whose layers the top-layer heal trains alone:
the bundle's graph (graph A) outputs the original's hidden_states[c], and the continuation (graph B) on those
states gives the original's logits, both against transformers' own models run one text at a time (no padding),
while the graphs run padded batches and sub-batches cut to their longest row.

A pruned model is emulated as the top-layer heal leaves it: truncated at `depth`, its layer `depth` and its head
changed, its layers 1..c (c = depth - 1) the original's.
"""

from __future__ import annotations

import collections
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import SENTENCES, VOCAB, make_tiny_classifier
from layerprune import continuation
from layerprune.errors import LayerpruneError
from layerprune.fallback import unsure
from layerprune.models import head_modules, layer_list
from layerprune.candidates import calibration_batches
from layerprune.data import Examples
from layerprune.onnx_export import export_onnx, optimize_onnx, quantize_onnx
from layerprune.prune import truncate
from layerprune.runtime import STATES, OnnxClassifier

# Rows of different lengths (right padding in a batch); the longest is not among SUB, so a sub-batch is cut.
TEXTS = ["a gorgeous, witty, seductive movie", "tedious",
         "the acting is wooden and the dialogue worse, and i was bored from start to finish", "an ugly, pointless mess",
         "one of the best films of the year", "ok"]
SUB = [0, 3, 5]
FP32 = 1e-5  # graph B runs the original graph's own nodes: what differs is onnxruntime's vs PyTorch's arithmetic
O2 = 1e-4  # onnxruntime's fusions reorder the float sums
DEPTH = 3  # of conftest's 4 layers: the cut is at 2
LAYERS_ALONE = ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "mpnet", "deberta-v2"]


class Built:
    """One architecture: the original (transformers), the emulated pruned model, graph A's folder and graph B's,
    and the references: each text run alone through transformers' original and pruned models."""

    def __init__(self, root: Path, minilm_dir: Path, model_type: str) -> None:
        # initializer_range 0.3: logits that differ between texts by ~1, so a mixed-up row or layer fails clearly
        checkpoint = make_tiny_classifier(model_type, root / "original", minilm_dir, initializer_range=0.3, seed=3)
        self.config = json.loads((checkpoint / "config.json").read_text())
        self.original = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.cut = continuation.cut_layer(DEPTH, "top", 1)
        pruned = top_layer_healed(self.original, DEPTH)
        pruned.save_pretrained(root / "pruned")
        self.tokenizer.save_pretrained(root / "pruned")
        export_onnx(checkpoint, root / "original-onnx")
        self.a_dir = root / "a"
        export_onnx(root / "pruned", self.a_dir)
        continuation.add_cut_output(self.a_dir / "model.onnx", self.config, self.cut)
        self.graphs = {optimize: continuation.Continuations(root / "original-onnx" / "model.onnx", self.config,
                                                            self.cut, root / f"b-{optimize}", optimize, "avx2")
                       for optimize in (None, "O2")}  # graph B as export builds it, per candidate
        self.b_dir = self.graphs[None].graph("fp32").parent
        self.root = root
        self.ref_states, self.ref_logits, self.ref_pruned = [], [], []
        with torch.no_grad():
            for text in TEXTS:
                alone = self.tokenizer([text], return_tensors="pt")
                out = self.original(**alone, output_hidden_states=True)
                self.ref_states.append(out.hidden_states[self.cut][0].numpy())
                self.ref_logits.append(out.logits[0].numpy())
                self.ref_pruned.append(pruned(**alone).logits[0].numpy())
        self.ref_logits, self.ref_pruned = np.stack(self.ref_logits), np.stack(self.ref_pruned)

    def batch(self, session: ort.InferenceSession) -> dict[str, np.ndarray]:
        """The texts as one right-padded batch, the inputs `session` takes."""
        enc = self.tokenizer(TEXTS, padding=True, return_tensors="np")
        return {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}


def top_layer_healed(original, depth: int):
    """The original truncated at `depth` with what the top-layer heal re-tunes changed: layer `depth` and the
    head. The layers below stay the original's."""
    pruned = truncate(copy.deepcopy(original), depth)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in [*head_modules(pruned).values(), layer_list(pruned)[depth - 1]]:
            for p in module.parameters():
                p.add_(0.3 * p.std().nan_to_num(0.1) * torch.randn(p.shape, generator=generator))
    return pruned.eval()


_BUILT: dict[str, Built] = {}


@pytest.fixture
def built(request, tmp_path_factory, minilm_dir) -> Built:
    if request.param not in _BUILT:
        _BUILT[request.param] = Built(tmp_path_factory.mktemp(request.param), minilm_dir, request.param)
    return _BUILT[request.param]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run_a(b: Built, folder: Path) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    session = _session(folder / "model.onnx")
    feeds = b.batch(session)
    logits, states = session.run(["logits", STATES], feeds)
    return logits, states, feeds


def _run_b(folder: Path, feeds: dict[str, np.ndarray], states: np.ndarray) -> np.ndarray:
    session = _session(folder / "model.onnx")
    given = {**feeds, STATES: states}
    return session.run(["logits"], {i.name: given[i.name] for i in session.get_inputs()})[0]


def _lengths(feeds: dict[str, np.ndarray]) -> np.ndarray:
    return feeds["attention_mask"].sum(axis=1)


# --- exactness in fp32 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("built", LAYERS_ALONE, indirect=True)
def test_graph_a_outputs_the_originals_states_at_the_cut(built):
    logits, states, feeds = _run_a(built, built.a_dir)
    assert states.shape == (len(TEXTS), feeds["input_ids"].shape[1], built.original.config.hidden_size)
    for i, n in enumerate(_lengths(feeds)):  # the real tokens of each row (padding is masked, never read)
        np.testing.assert_allclose(states[i, :n], built.ref_states[i], atol=FP32, rtol=0)
    np.testing.assert_allclose(logits, built.ref_pruned, atol=FP32, rtol=0)  # its first output: the pruned model's
    assert np.abs(built.ref_pruned - built.ref_logits).max() > 100 * FP32  # the heal changed what graph A answers


@pytest.mark.parametrize("built", LAYERS_ALONE, indirect=True)
def test_graph_b_continues_to_the_originals_logits(built):
    _, states, feeds = _run_a(built, built.a_dir)
    np.testing.assert_allclose(_run_b(built.b_dir, feeds, states), built.ref_logits, atol=FP32, rtol=0)
    assert np.ptp(built.ref_logits, axis=0).min() > 100 * FP32  # rows differ: a mixed-up row would fail
    weights = onnx.load(str(built.b_dir / "model.onnx")).graph.initializer
    assert all(VOCAB not in w.dims for w in weights)  # it carries no embeddings (MPNet read a shape there)


@pytest.mark.parametrize("built", ["bert", "mpnet", "distilbert"], indirect=True)
def test_the_runtime_continues_the_unsure_rows_as_one_sub_batch(built):
    """OnnxClassifier with the continuation: the rows below the threshold take the original's logits, the others
    the pruned model's; the sent-on rows' sub-batch is cut to their longest row (not the batch's)."""
    confidence = np.sort(np.exp(built.ref_pruned).max(1) / np.exp(built.ref_pruned).sum(1))
    below = float(confidence[2:4].mean())  # between the 3rd and 4th surest: 3 rows go on, 3 stay
    runner = OnnxClassifier(built.a_dir, continuation=built.b_dir / "model.onnx", below=below)
    got = runner.logits(TEXTS, batch_size=len(TEXTS))
    expected = np.where(unsure(built.ref_pruned, below)[:, None], built.ref_logits, built.ref_pruned)
    np.testing.assert_allclose(got, expected, atol=FP32, rtol=0)
    assert runner.sent_on == 3
    everything = OnnxClassifier(built.a_dir, continuation=built.b_dir / "model.onnx", below=2.0)
    np.testing.assert_allclose(everything.logits([TEXTS[i] for i in SUB], batch_size=2), built.ref_logits[SUB],
                               atol=FP32, rtol=0)


# --- what the bundle's optimization and int8 do to the two graphs --------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    return Path(shutil.copytree(src, dst))


@pytest.mark.parametrize("built", ["bert", "mpnet"], indirect=True)
def test_o2_keeps_the_cut_and_every_fusion(built):
    a = _copy(built.a_dir, built.root / "a-O2")
    b = built.graphs["O2"].graph("fp32").parent
    plain = built.root / "plain-a-O2"  # the pruned graph without the second output, optimized alike
    shutil.rmtree(plain, ignore_errors=True)
    export_onnx(built.root / "pruned", plain)
    for folder in (a, plain):
        optimize_onnx(folder, "O2")

    def ops(folder):
        return collections.Counter(n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node)

    assert ops(a) - collections.Counter({"Identity": 1}) == ops(plain)  # the output blocks no fusion
    _, states, feeds = _run_a(built, a)
    for i, n in enumerate(_lengths(feeds)):
        np.testing.assert_allclose(states[i, :n], built.ref_states[i], atol=O2, rtol=0)
    np.testing.assert_allclose(_run_b(b, feeds, states), built.ref_logits, atol=O2, rtol=0)


@pytest.mark.parametrize("built", ["bert"], indirect=True)
def test_int8_continuation_is_quantized_as_the_bundle(built):
    """Under the bundle's int8 configuration, graph B is quantized with it (every product int8), and graph A's
    states output stays float."""
    b = built.graphs[None].graph("int8").parent
    nodes = onnx.load(str(b / "model.onnx")).graph.node
    assert any(n.op_type == "MatMulInteger" for n in nodes)
    assert not any(n.op_type in ("MatMul", "Gemm") for n in nodes)
    a = _copy(built.a_dir, built.root / "a-int8")
    restart = _copy(built.root / "original-onnx", built.root / "original-int8")
    for folder in (a, restart):
        quantize_onnx(folder, cpu="avx2")
    _, states, feeds = _run_a(built, a)
    assert states.dtype == np.float32
    # as close to the original's logits as the original's own graph under the same int8 (a restart) is
    session = _session(restart / "model.onnx")
    restart_error = np.abs(session.run(["logits"], built.batch(session))[0] - built.ref_logits).max()
    assert np.abs(_run_b(b, feeds, states) - built.ref_logits).max() < max(3 * restart_error, 0.05)


@pytest.mark.parametrize("built", ["bert"], indirect=True)
def test_faithful_continuation_answers_the_sent_on_rows_as_the_original(built):
    """int8-faithful's graph B, calibrated on graph A's states on other texts (as export calibrates on heal texts)
    and made from the unoptimized cut even when the bundle is optimized (its products are then in
    MatMulIntegerToFloat all the same): on the original's states at the cut (graph A's, checked above), the rows
    sent on are within 5% of the largest logit of transformers' original, each text run alone."""
    heal = Examples(texts=[text for text, _ in SENTENCES], pairs=None, labels=np.zeros(len(SENTENCES)))
    batches = calibration_batches(built.a_dir, heal, 64, 4)
    states = continuation.states_batches(built.a_dir / "model.onnx", batches)
    assert [s[STATES].shape[:2] for s in states] == [b["input_ids"].shape for b in batches]
    b = built.graphs[None].graph("int8-faithful", states)
    optimized = built.graphs["O2"].graph("int8-faithful", states)

    def integer_products(path: Path) -> int:
        return sum(n.op_type == "MatMulIntegerToFloat" for n in onnx.load(str(path)).graph.node)

    assert integer_products(b) == integer_products(optimized) == 6 * (4 - built.cut)  # Q, K, V, out, FFN in, out
    runner = OnnxClassifier(built.a_dir, continuation=b, below=2.0)  # every row sent on
    got = runner.logits(TEXTS, batch_size=len(TEXTS))
    assert runner.sent_on == len(TEXTS)
    error = np.abs(got - built.ref_logits).max()
    assert error < 0.05 * np.abs(built.ref_logits).max(), error


# --- refusals ------------------------------------------------------------------------------------------------------


def test_a_cut_below_a_convolution_is_refused(tmp_path, minilm_dir):
    """hidden_states[1] of a DeBERTa-v2 with a convolution is the convolution's output, and the convolution reads
    the embeddings too: the layers above layer 1 read more than its LayerNorm's output."""
    checkpoint = make_tiny_classifier("deberta-v2", tmp_path / "model", minilm_dir, conv_kernel_size=3)
    export_onnx(checkpoint, tmp_path / "onnx")
    config = json.loads((checkpoint / "config.json").read_text())
    with pytest.raises(LayerpruneError, match="read the embeddings"):
        continuation.continuation_graph(tmp_path / "onnx" / "model.onnx", config, 1, tmp_path / "refused.onnx")


def test_the_runtime_refuses_a_graph_without_the_states(tmp_path, minilm_dir):
    checkpoint = make_tiny_classifier("bert", tmp_path / "model", minilm_dir)
    export_onnx(checkpoint, tmp_path / "onnx")
    with pytest.raises(LayerpruneError, match="no states for a continuation"):
        OnnxClassifier(tmp_path / "onnx", continuation=tmp_path / "onnx" / "model.onnx", below=0.6)
    with pytest.raises(LayerpruneError, match="one second graph"):
        OnnxClassifier(tmp_path / "onnx", original=tmp_path / "onnx" / "model.onnx",
                       continuation=tmp_path / "onnx" / "model.onnx", below=0.6)


def test_cut_layer():
    assert continuation.cut_layer(4, "top", 1) == 3
    assert continuation.cut_layer(4, "top", 2) == 2
    assert continuation.cut_layer(4, "whole", 1) is None  # every layer re-trained: restart
    assert continuation.cut_layer(4, "head", 1) is None  # (the restart, as before, for the other heals)
    assert continuation.cut_layer(1, "top", 1) is None  # nothing shared but the embeddings
