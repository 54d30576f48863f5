"""finetune on tiny models: a standard checkpoint with labels and a report comes out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from layerprune.artifacts import TrainingReport, load_artifact
from layerprune.data import task_from_files
from layerprune.errors import TaskError
from layerprune.finetune import FinetuneOptions, finetune
from layerprune.models import has_classification_head, load_classifier, load_config

FAST = FinetuneOptions(epochs=1, batch_size=4, max_length=32, device="cpu")


def test_finetune_writes_a_loadable_classifier(minilm_dir: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    task = task_from_files(sentiment_csv, "text", "label", train_file=sentiment_csv)
    out = tmp_path / "ckpt"
    report = finetune(str(minilm_dir), task, out, FAST)
    assert report.n_train == report.n_eval == 12
    assert 0.0 <= report.metric.value <= 1.0
    assert load_artifact(TrainingReport, out / "training_report.json") == report
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    _, cfg = load_config(out)
    assert has_classification_head(cfg)
    model, _ = load_classifier(out, num_labels=2)  # passes the head and label-count checks
    assert model.config.label2id == {"negative": 0, "positive": 1}


def test_finetune_regression(minilm_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "scores.jsonl"
    rows = [{"a": f"sentence {i}", "b": f"other {i % 3}", "score": i / 3} for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = task_from_files(data, "a", "score", text_pair_field="b", train_file=data)
    assert task.is_regression and task.metric == "pearson"
    report = finetune(str(minilm_dir), task, tmp_path / "ckpt", FAST)
    assert -1.0 <= report.metric.value <= 1.0
    model, _ = load_classifier(tmp_path / "ckpt", num_labels=1)
    assert model.config.problem_type == "regression"


def test_finetune_needs_a_train_split(minilm_dir: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    task = task_from_files(sentiment_csv, "text", "label")
    with pytest.raises(TaskError, match="--train-data"):
        finetune(str(minilm_dir), task, tmp_path / "ckpt", FAST)
    assert not (tmp_path / "ckpt").exists()


def test_the_same_seed_gives_the_same_checkpoint(minilm_dir: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    task = task_from_files(sentiment_csv, "text", "label", train_file=sentiment_csv)
    weights = []
    for run in range(2):
        torch.rand(run + 1)  # a different global RNG state before each run: the seed alone must decide
        finetune(str(minilm_dir), task, tmp_path / f"ckpt{run}", FAST)
        weights.append(load_file(tmp_path / f"ckpt{run}" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
