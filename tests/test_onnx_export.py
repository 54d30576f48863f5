"""ONNX export (optimum), graph optimization, int8 quantization, and the torch-free runtime.

The tiny models' logits are small (random heads, |logit| ~ 0.01), so parity is also checked relative to
their size, not only against the absolute bounds a real model would be held to.
"""

from __future__ import annotations

import collections
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import SENTENCES, TINY_CONFIGS, TINY_LAYERS
from layerprune.data import Examples
from layerprune.errors import LayerpruneError
from layerprune import cpu
from layerprune.cpu import cpu_kind, serves_int8_of
from layerprune.onnx_export import (
    export_onnx,
    max_logit_difference,
    optimize_onnx,
    quantization_config,
    quantize_onnx,
    sensitive_nodes,
)
from layerprune.hidden import predict_logits
from layerprune.models import load_classifier
from layerprune.runtime import OnnxClassifier

TEXTS = [text for text, _ in SENTENCES]
PAIRS = list(reversed(TEXTS))
# Pairs only where the ONNX model takes token_type_ids and the tiny model's tokenizer emits them, as in
# the real checkpoints (RoBERTa-likes and DistilBERT/MPNet take no segment ids).
PAIR_TYPES = {"bert", "deberta-v2"}
BUNDLE_FILES = {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.txt"}


@pytest.fixture(scope="module")
def bundles(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny model exported once (fp32); tests that change a bundle work on a copy."""
    root = tmp_path_factory.mktemp("bundles")
    return {mt: export_onnx(path, root / mt).parent for mt, path in tiny_models.items()}


@pytest.fixture(scope="module")
def torch_logits(tiny_models: dict[str, Path]) -> dict[str, np.ndarray]:
    """The PyTorch models' logits on TEXTS (with PAIRS for PAIR_TYPES), as the analysis computes them."""
    out = {}
    for mt, path in tiny_models.items():
        model, tokenizer = load_classifier(path, device="cpu")
        pairs = PAIRS if mt in PAIR_TYPES else None
        out[mt] = predict_logits(model, tokenizer, Examples(TEXTS, pairs, np.zeros(len(TEXTS), dtype=np.int64)))
    return out


def onnx_logits(bundle: Path, model_type: str, **kwargs) -> np.ndarray:
    return OnnxClassifier(bundle).logits(TEXTS, PAIRS if model_type in PAIR_TYPES else None, **kwargs)


def copy_bundle(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    return dest


def op_counts(bundle: Path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(bundle / "model.onnx")).graph.node)


def assert_parity(reference: np.ndarray, logits: np.ndarray, atol: float) -> None:
    diff = max_logit_difference(reference, logits)
    assert diff <= atol, f"max |logit diff| {diff:.2e} > {atol:.0e}"
    assert diff <= 1e-2 * np.abs(reference).max(), f"max |logit diff| {diff:.2e} is large next to the logits"


# --- export -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_export_matches_pytorch(bundles, torch_logits, model_type: str) -> None:
    bundle = bundles[model_type]
    assert BUNDLE_FILES <= {p.name for p in bundle.iterdir()}
    assert not [p for p in bundle.iterdir() if p.name.startswith(".")], "staging folder left behind"
    runner = OnnxClassifier(bundle)
    # dynamic batch and sequence axes, fp32 logits
    assert all(isinstance(dim, str) for i in runner.session.get_inputs() for dim in i.shape)
    assert runner.session.get_outputs()[0].type == "tensor(float)"
    no_segments = {"distilbert", "mpnet", "roberta", "xlm-roberta"}
    assert ("token_type_ids" in runner.input_names) == (model_type not in no_segments)
    assert runner.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    # batch_size 5: three length-sorted batches that must come back in input order
    logits = onnx_logits(bundle, model_type, batch_size=5)
    assert logits.shape == (len(TEXTS), 2) and logits.dtype == np.float32
    assert_parity(torch_logits[model_type], logits, atol=1e-4)


def test_export_is_deterministic_and_quiet(tiny_models, bundles, tmp_path: Path, capfd) -> None:
    again = export_onnx(tiny_models["bert"], tmp_path / "again")
    out, err = capfd.readouterr()
    assert out == "" and err == "", f"export printed: {(out + err)[:300]}"
    for name in sorted(BUNDLE_FILES):
        first, second = (bundles["bert"] / name).read_bytes(), (again.parent / name).read_bytes()
        assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest(), f"{name} differs"


def test_export_into_existing_folder_keeps_other_files(tiny_models, tmp_path: Path) -> None:
    (tmp_path / "pytorch").mkdir()
    (tmp_path / "pytorch" / "keep.txt").write_text("mine")
    assert export_onnx(tiny_models["distilbert"], tmp_path) == tmp_path / "model.onnx"
    assert (tmp_path / "pytorch" / "keep.txt").read_text() == "mine"
    assert {p.name for p in tmp_path.iterdir()} == BUNDLE_FILES | {"pytorch"}


def test_export_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(LayerpruneError, match="no config.json"):
        export_onnx(tmp_path / "ckpt", tmp_path / "out")
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_export_failure_is_one_line_and_leaves_nothing(tiny_models, tmp_path: Path) -> None:
    broken = copy_bundle(tiny_models["bert"], tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LayerpruneError, match="ONNX export of .* failed") as info:
        export_onnx(broken, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert list((tmp_path / "out").iterdir()) == []


# --- optimize -----------------------------------------------------------------------------------

# All eight types optimize at O1-O3 (see onnx_export.py); deberta-v2 and mpnet keep unfused attention.
FUSED_ATTENTION = {"bert": True, "distilbert": True, "deberta-v2": False, "mpnet": False}


@pytest.mark.parametrize(("model_type", "level"), [
    ("bert", "O1"), ("bert", "O2"), ("bert", "O3"), ("distilbert", "O2"), ("deberta-v2", "O2"), ("mpnet", "O1"),
])
def test_optimize_replaces_model_and_keeps_parity(bundles, torch_logits, tmp_path, model_type, level) -> None:
    bundle = copy_bundle(bundles[model_type], tmp_path / "b")
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    optimize_onnx(bundle, level)
    after = {p.name: p.read_bytes() for p in bundle.iterdir()}
    assert set(after) == set(before), "leftover or missing files"
    assert after["model.onnx"] != before["model.onnx"]
    assert all(after[name] == before[name] for name in before if name != "model.onnx"), "config/tokenizer changed"
    ops = op_counts(bundle)
    if level != "O1":
        assert ops["SkipLayerNormalization"] > 0
        assert (ops["Attention"] > 0) == FUSED_ATTENTION[model_type]
    assert_parity(torch_logits[model_type], onnx_logits(bundle, model_type), atol=1e-3)


def test_optimize_needs_an_exported_model(tmp_path: Path) -> None:
    with pytest.raises(LayerpruneError, match="no model.onnx"):
        optimize_onnx(tmp_path, "O1")


# --- quantize -----------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [None, "O2"])
def test_quantize_int8(bundles, tmp_path: Path, level) -> None:
    bundle = copy_bundle(bundles["bert"], tmp_path / "b")
    fp32 = onnx_logits(bundle, "bert")
    if level:
        optimize_onnx(bundle, level)  # fused Attention ops: needs the symbolic shape inference
    name = quantize_onnx(bundle)
    assert name == quantization_config()[0]
    assert {p.name for p in bundle.iterdir()} == BUNDLE_FILES
    ops = op_counts(bundle)
    assert ops["DynamicQuantizeLinear"] > 0 and ops["MatMulInteger"] > 0
    if level:
        assert ops["QAttention"] > 0
    int8 = onnx_logits(bundle, "bert")
    assert np.isfinite(int8).all()
    # argmax agreement means nothing on random tiny models: close-ish logits instead
    assert max_logit_difference(fp32, int8) <= 0.1 * np.abs(fp32).max() + 1e-3


def optimum_reference(cpu_kind_: str):
    """optimum's own configuration for CPU kind `cpu_kind_`, built here, not by layerprune: its avx512_vnni preset on
    VNNI; on AVX2 its avx512 preset (u8 x s8) with 7-bit weights, onnxruntime's advice for CPUs without VNNI."""
    from optimum.onnxruntime import AutoQuantizationConfig

    if cpu_kind_ == "avx512-vnni":
        return AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
    return AutoQuantizationConfig.avx512(is_static=False, per_channel=True, reduce_range=True)


@pytest.mark.parametrize("kind", ["avx512-vnni", "avx2"])
def test_quantize_writes_what_optimum_writes_for_the_plain_export(bundles, tmp_path: Path, kind: str) -> None:
    """The default export's int8 (no --optimize) is the graph optimum's ORTQuantizer writes for the same fp32 graph
    and configuration, called as optimum-cli calls it: the same nodes, initializers and recorded tensor types."""
    from optimum.onnxruntime import ORTQuantizer

    fp32 = bundles["bert"]
    ORTQuantizer.from_pretrained(fp32, file_name="model.onnx").quantize(optimum_reference(kind), tmp_path / "optimum")
    bundle = copy_bundle(fp32, tmp_path / "b")
    quantize_onnx(bundle, cpu=kind)
    paths = (bundle / "model.onnx", tmp_path / "optimum" / "model_quantized.onnx")
    ours, theirs = (onnx.load(str(p)).graph for p in paths)
    assert [n.SerializeToString() for n in ours.node] == [n.SerializeToString() for n in theirs.node]
    assert any(n.op_type == "MatMulInteger" for n in ours.node)
    assert [(t.name, onnx.numpy_helper.to_array(t).tobytes()) for t in ours.initializer] == \
        [(t.name, onnx.numpy_helper.to_array(t).tobytes()) for t in theirs.initializer]
    assert [v.SerializeToString() for v in ours.value_info] == [v.SerializeToString() for v in theirs.value_info]
    assert ours == theirs, "and everything else in the graph"


def test_quantize_keeps_the_feed_forward_outputs_and_head_in_fp32(bundles, tmp_path: Path) -> None:
    bundle = copy_bundle(bundles["bert"], tmp_path / "b")
    keep = sensitive_nodes(bundle)
    ffn_out = {f"/bert/encoder/layer.{i}/output/dense/MatMul" for i in range(TINY_LAYERS)}
    assert ffn_out <= set(keep) and any("/classifier/" in name for name in keep)
    assert not [n for n in keep if "attention" in n or "intermediate" in n], "only the FFN outputs and the head"
    assert quantize_onnx(bundle, keep).endswith("feed-forward outputs and head in fp32")
    nodes = onnx.load(str(bundle / "model.onnx")).graph.node
    integer = [n.name for n in nodes if n.op_type == "MatMulInteger"]
    assert integer and not [n for n in integer if "/classifier/" in n or "/pooler/" in n or "/output/dense/" in n
                            and "attention" not in n]
    assert any(n.op_type == "MatMul" and "/classifier/" in n.name for n in nodes), "the head's product stays float"
    assert any("/attention/output/dense/" in n for n in integer), "the attention output stays int8"


@pytest.mark.parametrize("names", [
    ["/distilbert/transformer/layer.0/ffn/lin2/MatMul", "/distilbert/transformer/layer.0/ffn/lin1/MatMul"],
    ["/albert/encoder/albert_layer_groups.0/albert_layers.0/ffn_output/MatMul",
     "/albert/encoder/albert_layer_groups.0/albert_layers.0/ffn/MatMul"],
])
def test_feed_forward_output_names_per_architecture(names) -> None:
    from layerprune.onnx_export import FFN_OUTPUT, IN_A_LAYER

    assert FFN_OUTPUT.search(names[0]) and not FFN_OUTPUT.search(names[1])
    assert IN_A_LAYER.search(names[0]) and IN_A_LAYER.search(names[1]), "inside a layer, not the head"


@pytest.mark.parametrize(("machine", "flags", "expected"), [
    ("x86_64", "fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni", "avx512-vnni"),
    ("x86_64", "fpu sse2 avx avx2 fma avx512f avx512bw", "avx512"),
    ("x86_64", "fpu sse2 avx avx2 fma f16c", "avx2"),
    ("aarch64", "", "arm64"),
    ("x86_64", "fpu sse2 sse4_2", "x86_64 without avx2"),
])
def test_quantization_config_follows_the_cpu(monkeypatch, tmp_path, machine, flags, expected) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(cpu.platform, "machine", lambda: machine)
    assert cpu_kind(cpuinfo) == expected
    if expected.startswith("x86_64 without"):
        with pytest.raises(LayerpruneError, match="no int8 quantization preset"):
            quantization_config(expected)
        return
    name, config = quantization_config(expected)
    assert name.startswith(expected) and "per-channel" in name
    assert not config.is_static and config.per_channel
    # 7-bit weights wherever the u8 x s8 kernel sums pairs into saturating int16 (x86 without VNNI)
    assert config.reduce_range == (expected in ("avx2", "avx512"))


@pytest.mark.parametrize(("built_for", "host", "same"), [
    ("avx2", "avx512-vnni", True), ("avx512", "avx2", True), ("avx512-vnni", "avx512-vnni", True),
    ("avx512-vnni", "avx512", False), ("avx512-vnni", "avx2", False), ("arm64", "arm64", True),
])
def test_8_bit_weights_serve_only_on_vnni(built_for, host, same) -> None:
    assert serves_int8_of(built_for, host) is same


# --- the bundle elsewhere: optimum and transformers ---------------------------------------------


def test_bundle_runs_in_optimum_pipeline(bundles) -> None:
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer, pipeline

    bundle = bundles["bert"]
    model = ORTModelForSequenceClassification.from_pretrained(bundle)
    classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(bundle))
    predicted = [model.config.label2id[row["label"]] for row in classify(TEXTS)]
    assert predicted == OnnxClassifier(bundle).logits(TEXTS).argmax(axis=1).tolist()


# --- runtime ------------------------------------------------------------------------------------


def test_runtime_does_not_import_torch() -> None:
    code = "import layerprune.runtime, sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-500:]


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_encode_matches_transformers_tokenizer(bundles, model_type: str) -> None:
    from transformers import AutoTokenizer

    bundle = bundles[model_type]
    runner = OnnxClassifier(bundle)
    expected = AutoTokenizer.from_pretrained(bundle)(
        TEXTS, PAIRS, truncation=True, max_length=12, padding=True, return_tensors="np")
    encoding = runner.encode(TEXTS, PAIRS, max_length=12)
    assert list(encoding) == runner.input_names  # only what the session takes
    for name, array in encoding.items():
        assert array.dtype == np.int64
        np.testing.assert_array_equal(array, expected[name], err_msg=name)


def test_max_length_and_truncation(bundles) -> None:
    assert OnnxClassifier(bundles["bert"]).max_length == 160  # max_position_embeddings of the tiny config
    runner = OnnxClassifier(bundles["roberta"])
    assert runner.max_length == 158  # RoBERTa positions start at padding_idx + 1
    long_text = " ".join(["word"] * 400)
    assert runner.encode([long_text], max_length=1000)["input_ids"].shape == (1, 158)
    assert runner.logits([long_text]).shape == (1, 2)
    with pytest.raises(LayerpruneError, match="takes at most 158"):
        runner.encode([long_text], truncation=False)


def test_logits_edge_cases(bundles) -> None:
    runner = OnnxClassifier(bundles["distilbert"])
    assert runner.logits([]).shape == (0, 2)
    one_by_one = np.concatenate([runner.logits([t]) for t in TEXTS])
    np.testing.assert_allclose(runner.logits(TEXTS, batch_size=4), one_by_one, atol=1e-5)
    with pytest.raises(LayerpruneError, match="3 texts but 2 pairs"):
        runner.logits(TEXTS[:3], PAIRS[:2])


def test_runtime_options(bundles) -> None:
    runner = OnnxClassifier(bundles["bert"], providers=["CPUExecutionProvider"], threads=1)
    assert runner.session.get_providers() == ["CPUExecutionProvider"]
    assert runner.session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(LayerpruneError, match="threads must be at least 1"):
        OnnxClassifier(bundles["bert"], threads=0)


def test_runtime_on_broken_bundles(bundles, tmp_path: Path) -> None:
    bundle = copy_bundle(bundles["bert"], tmp_path / "b")
    (bundle / "model.onnx").write_bytes(b"junk")
    with pytest.raises(LayerpruneError, match="onnxruntime cannot load .*model.onnx"):
        OnnxClassifier(bundle)


def test_runtime_without_model_names_the_file(bundles, tmp_path: Path) -> None:
    bundle = copy_bundle(bundles["bert"], tmp_path / "b")
    (bundle / "model.onnx").unlink()
    with pytest.raises(LayerpruneError, match=r"has no model\.onnx"):
        OnnxClassifier(bundle)
    with pytest.raises(LayerpruneError, match=r"has no model\.onnx"):
        OnnxClassifier(tmp_path / "missing")
