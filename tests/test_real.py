"""Real model, real data: all-MiniLM-L6-v2 (from PyPI) fine-tuned briefly on rt-polarity, then analyzed.

Slow (about a minute on 2 cores); CI runs it. Skip with `-m "not slow"`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from layerprune.analyze import AnalyzeOptions, analyze
from layerprune.finetune import FinetuneOptions, finetune
from layerprune.tasks import load_task

pytestmark = pytest.mark.slow


def test_minilm_on_rt_polarity_shows_blocks(minilm_dir: Path, tmp_path: Path) -> None:
    task = load_task("rt-polarity")
    ckpt = tmp_path / "minilm-rt"
    trained = finetune(str(minilm_dir), task, ckpt,
                       FinetuneOptions(epochs=1, max_train_examples=1500, max_length=64, device="cpu"))
    assert trained.metric.value >= 0.70, "MiniLM should learn sentiment well above chance (0.5)"

    report = analyze(str(ckpt), task, tmp_path / "run", AnalyzeOptions(max_examples=400, device="cpu"))
    assert report.n_examples == 400 and report.num_layers == 6
    assert [u.layer for u in report.undefined_layers] == [0]
    assert report.metric.value >= 0.70
    cka = report.cka
    # Neighbouring layers are more alike than distant ones: the structure the paper reports.
    assert cka[5][6] > cka[1][6] and cka[1][2] > cka[1][6]
    assert 2 <= report.boundary <= 6
    assert report.clusters[report.boundary] == report.n_clusters - 1
