"""The torch-free runtime tokenizes as transformers does beyond WordPiece: a byte-level BPE (RoBERTa-style,
`<s> A </s></s> B </s>`) and SentencePiece-style Unigrams (ALBERT-style with segment ids, XLM-R-style
without), trained here with `tokenizers` and saved as transformers fast tokenizers. Each sits in a folder
with a stub model.onnx whose logits are padding-free sums of its inputs, so `logits()` is checked too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from conftest import SENTENCES
from layerprune.runtime import OnnxClassifier

CORPUS = [text for text, _ in SENTENCES] + ["Ünïcode café, naïve – “curly quotes” and ``backticks''"]
TEXTS = ["a gorgeous, witty movie", "Ünïcode café naïve – “quotes” ``here''", "", "  spaces   and\ttabs ",
         "word " * 80, "the <mask> is [MASK] nothing", "tedious and far too long"]
PAIRS = ["the plot", "one of the best films of the year " * 6, "b", "", "y", "mess", "moving " * 40]
POSITIONS = 66  # max_position_embeddings of every stub config


def stub_model(path: Path, inputs: list[str]) -> None:
    """logits = [sum(input_ids * mask) + sum(token_type_ids * mask), sum(mask)]: independent of padding."""
    values = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"]) for name in inputs]
    nodes = [helper.make_node("Mul", [name, "attention_mask"], [f"{name}_m"]) for name in inputs if name != "attention_mask"]
    total = nodes[0].output[0]
    if len(nodes) == 2:
        nodes.append(helper.make_node("Add", [nodes[0].output[0], nodes[1].output[0]], ["ids_and_types"]))
        total = "ids_and_types"
    nodes += [
        helper.make_node("ReduceSum", [total, "axis"], ["id_sum"], keepdims=1),
        helper.make_node("ReduceSum", ["attention_mask", "axis"], ["length"], keepdims=1),
        helper.make_node("Concat", ["id_sum", "length"], ["sums"], axis=1),
        helper.make_node("Cast", ["sums"], ["logits"], to=TensorProto.FLOAT),
    ]
    axis = helper.make_tensor("axis", TensorProto.INT64, [1], [1])
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])
    graph = helper.make_graph(nodes, "stub", values, [output], [axis])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def roberta_bpe(folder: Path) -> list[str]:
    from transformers import RobertaTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    RobertaTokenizerFast(tokenizer_object=tok, **dict(zip(
        ["bos_token", "pad_token", "eos_token", "unk_token", "mask_token"], specials))).save_pretrained(folder)
    _config(folder, "roberta", pad_token_id=1)
    return ["input_ids", "attention_mask"]


def _unigram(specials: list[str], unk: str, normalizer: normalizers.Normalizer) -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=200, special_tokens=specials, unk_token=unk))
    return tok


def albert_unigram(folder: Path) -> list[str]:
    """ALBERT's layout: lower-cased, accents stripped, [CLS] A [SEP] B [SEP] with segment ids 0/1."""
    from transformers import AlbertTokenizerFast

    specials = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    tok = _unigram(specials, "<unk>", normalizers.Sequence([
        normalizers.Replace("``", '"'), normalizers.Replace("''", '"'), normalizers.NFKD(),
        normalizers.StripAccents(), normalizers.Lowercase()]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    AlbertTokenizerFast(tokenizer_object=tok, **dict(zip(
        ["pad_token", "unk_token", "cls_token", "sep_token", "mask_token"], specials))).save_pretrained(folder)
    _config(folder, "albert", pad_token_id=0)
    return ["input_ids", "attention_mask", "token_type_ids"]


def xlmr_unigram(folder: Path) -> list[str]:
    """XLM-R's layout: cased NFKC, <s> A </s></s> B </s>, no segment ids."""
    from transformers import XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = _unigram(specials, "<unk>", normalizers.NFKC())
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("<s>", "</s>")])
    XLMRobertaTokenizerFast(tokenizer_object=tok, **dict(zip(
        ["bos_token", "pad_token", "eos_token", "unk_token", "mask_token"], specials))).save_pretrained(folder)
    _config(folder, "xlm-roberta", pad_token_id=1)
    return ["input_ids", "attention_mask"]


def _config(folder: Path, model_type: str, pad_token_id: int) -> None:
    config = {"model_type": model_type, "max_position_embeddings": POSITIONS, "pad_token_id": pad_token_id}
    (folder / "config.json").write_text(json.dumps(config))


BUILDERS = {"roberta-bpe": roberta_bpe, "albert-unigram": albert_unigram, "xlmr-unigram": xlmr_unigram}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, build in BUILDERS.items():
        folder = tmp_path_factory.mktemp(name)
        stub_model(folder / "model.onnx", build(folder))
        out[name] = folder
    return out


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("max_length", [6, 16, None])
@pytest.mark.parametrize("with_pairs", [False, True], ids=["single", "pairs"])
def test_encode_matches_transformers(folders, name: str, max_length: int | None, with_pairs: bool) -> None:
    from transformers import AutoTokenizer

    runner = OnnxClassifier(folders[name])
    expected_limit = POSITIONS - (2 if name != "albert-unigram" else 0)  # RoBERTa-likes: positions from 2
    assert runner.max_length == expected_limit
    reference = AutoTokenizer.from_pretrained(folders[name])
    assert type(reference).__name__ != "PreTrainedTokenizerFast"  # the model's own class, with its own init
    pairs = PAIRS if with_pairs else None
    expected = reference(TEXTS, pairs, truncation=True, max_length=max_length or expected_limit, padding=True,
                         return_tensors="np")
    encoding = runner.encode(TEXTS, pairs, max_length=max_length)
    assert list(encoding) == runner.input_names
    assert encoding["input_ids"].shape[1] == (max_length or expected["input_ids"].shape[1])  # "word " * 80 is cut
    for key, array in encoding.items():
        np.testing.assert_array_equal(array, expected[key], err_msg=f"{name} {key}")
    if with_pairs and name == "albert-unigram":
        assert expected["token_type_ids"].max() == 1  # the second segment is marked, and matched above

    # logits(): tokenized again, sorted by length, batched, un-sorted; the stub's sums ignore padding.
    mask = expected["attention_mask"]
    sums = (expected["input_ids"] * mask).sum(1) + (expected.get("token_type_ids", 0 * mask) * mask).sum(1)
    np.testing.assert_array_equal(runner.logits(TEXTS, pairs, batch_size=3, max_length=max_length),
                                  np.stack([sums, mask.sum(1)], axis=1).astype(np.float32))


def test_left_truncation_follows_the_tokenizer(folders, tmp_path: Path) -> None:
    """A tokenizer saved with truncation_side left keeps the ends of long texts, in both."""
    from transformers import AutoTokenizer

    folder = shutil.copytree(folders["xlmr-unigram"], tmp_path / "left")
    config_path = folder / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "truncation_side": "left"}))
    expected = AutoTokenizer.from_pretrained(folder)(TEXTS, PAIRS, truncation=True, max_length=10, padding=True,
                                                     return_tensors="np")
    encoding = OnnxClassifier(folder).encode(TEXTS, PAIRS, max_length=10)
    for key, array in encoding.items():
        np.testing.assert_array_equal(array, expected[key], err_msg=key)
    right = OnnxClassifier(folders["xlmr-unigram"]).encode(TEXTS, PAIRS, max_length=10)
    assert not np.array_equal(right["input_ids"], encoding["input_ids"])  # the setting changed something


# --- long texts and pairs: cut before the tokenizer builds overflow pieces, exactly as transformers cuts ---------

WORDS = ["a", "movie", "unbelievably", "Ünïcode", "naïve", "中文", "😀", "[MASK]", "<mask>", ",", "tedious",
         "x" * 30, "well-made"]


@pytest.fixture(scope="module")
def truncating(folders, minilm_dir, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Every tokenizer of this module and the real MiniLM WordPiece (512 positions), each with right and left
    truncation (tokenizer_config's truncation_side, which both transformers and the runtime read)."""
    minilm = tmp_path_factory.mktemp("minilm")
    for name in ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]:
        shutil.copy(minilm_dir / name, minilm / name)
    (minilm / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 512}))
    stub_model(minilm / "model.onnx", ["input_ids", "attention_mask", "token_type_ids"])
    out = {}
    for name, folder in {**folders, "minilm-wordpiece": minilm}.items():
        out[name, "right"] = folder
        left = shutil.copytree(folder, tmp_path_factory.mktemp(f"{name}-left"), dirs_exist_ok=True)
        config_path = left / "tokenizer_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "truncation_side": "left"}))
        out[name, "left"] = left
    return out


def _rows_match(runner: OnnxClassifier, reference, texts: list[str], pairs: list[str] | None, max_length: int) -> None:
    """The runtime's rows against transformers' (AutoTokenizer, truncation=True: longest_first), row by row."""
    rows = runner.tokenize(texts, pairs, max_length=max_length)
    for i, row in enumerate(rows):
        want = reference(texts[i], None if pairs is None else pairs[i], truncation=True, max_length=max_length)
        assert list(row.ids) == want["input_ids"], (i, max_length)
        assert list(row.attention_mask) == want["attention_mask"], (i, max_length)
        if "token_type_ids" in want:
            assert list(row.type_ids) == want["token_type_ids"], (i, max_length)


_side = st.lists(st.sampled_from(WORDS), max_size=120).map(" ".join)
# transformers drops an empty second text (`if text_pair`) and encodes the first alone; the server refuses
# empty texts (400), so pairs here have a word or more on each side.
_pair_side = st.lists(st.sampled_from(WORDS), min_size=1, max_size=120).map(" ".join)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", sorted([*BUILDERS, "minilm-wordpiece"]))
def test_truncation_matches_transformers_on_any_lengths(truncating, name: str, side: str) -> None:
    """Generated texts and pairs of 0 to 120 words (ties included: a pair of one text twice), budgets odd and
    even from 5 tokens up to the model's: the same ids, segment ids and mask as transformers'."""
    from transformers import AutoTokenizer

    folder = truncating[name, side]
    runner, reference = OnnxClassifier(folder), AutoTokenizer.from_pretrained(folder)
    assert reference.truncation_side == side

    @settings(max_examples=120, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data(), max_length=st.one_of(st.integers(5, 40), st.just(runner.max_length)))
    def check(data, max_length: int) -> None:
        if data.draw(st.booleans()):
            texts, pairs = data.draw(st.lists(_side, min_size=1, max_size=4)), None
        else:
            texts = data.draw(st.lists(_pair_side, min_size=1, max_size=4))
            pairs = data.draw(st.one_of(st.just(texts), st.lists(_pair_side, min_size=len(texts), max_size=len(texts))))
        _rows_match(runner, reference, texts, pairs, max_length)

    check()


@pytest.mark.parametrize("side", ["right", "left"])
def test_long_pairs_match_transformers(truncating, side: str) -> None:
    """Pairs of 10,000 characters against short ones, in both orders, and against each other, at the
    real MiniLM's 512 tokens and at an odd budget: as transformers cuts them."""
    from transformers import AutoTokenizer

    folder = truncating["minilm-wordpiece", side]
    runner, reference = OnnxClassifier(folder), AutoTokenizer.from_pretrained(folder)
    long, other, short = ("w " * 5000)[:10000], ("moving " * 1500)[:10000], "a short premise"
    texts, pairs = [long, short, long, long, short], [short, long, long, other, short]
    for max_length in (512, 257):
        _rows_match(runner, reference, texts, pairs, max_length)
        _rows_match(runner, reference, [long, other], None, max_length)


def test_too_long_without_truncation_is_refused(truncating) -> None:
    from transformers import AutoTokenizer

    from layerprune.runtime import TooManyTokens

    folder = truncating["minilm-wordpiece", "right"]
    runner, reference = OnnxClassifier(folder), AutoTokenizer.from_pretrained(folder)
    texts, pairs = ["a short premise", "w " * 300], ["and its hypothesis", "w " * 300]
    rows = runner.tokenize(texts[:1], pairs[:1], truncation=False)
    assert list(rows[0].ids) == reference(texts[0], pairs[0])["input_ids"]
    with pytest.raises(TooManyTokens) as refused:
        runner.tokenize(texts, pairs, truncation=False)
    assert (refused.value.index, refused.value.tokens) == (1, len(reference(texts[1], pairs[1])["input_ids"]))
