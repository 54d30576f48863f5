"""The CLI: bad input gets one clear line on stderr, a non-zero exit, and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

from conftest import TINY_LAYERS, make_tiny_classifier
from layerprune.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip() and "batch/s" not in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]


def test_tasks_lists_glue_and_rt_polarity(capsys) -> None:
    code, out, _ = run_cli(["tasks"], capsys)
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()]
    for task in ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "rt-polarity"]:
        assert task in names


def test_analyze_local_data_end_to_end(tiny_models, sentiment_csv, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    code, out, err = run_cli([
        "analyze", tiny_models["bert"], "--data", sentiment_csv, "--text-field", "text",
        "--label-field", "label", "--out", run, "--device", "cpu",
    ], capsys)
    assert code == 0, err
    report = json.loads((run / "analysis.json").read_text())
    assert f"keep {report['recommended_keep_layers']} of {TINY_LAYERS} layers" in out
    assert (run / "cka.png").is_file()


@pytest.fixture
def analyze_args(tiny_models, sentiment_csv, tmp_path):
    def build(*extra, model=None):
        return ["analyze", model or tiny_models["bert"], "--data", sentiment_csv, "--text-field", "text",
                "--label-field", "label", "--out", tmp_path / "run", *extra]
    return build


def test_missing_checkpoint(analyze_args, tmp_path, capsys) -> None:
    code, _, err = run_cli(analyze_args(model=tmp_path / "missing"), capsys)
    assert_one_line_error(code, err, "checkpoint not found")
    assert not (tmp_path / "run").exists()


def test_unreadable_checkpoint(analyze_args, tmp_path, capsys) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{")
    code, _, err = run_cli(analyze_args(model=bad), capsys)
    assert_one_line_error(code, err, "cannot read the checkpoint config")


def test_model_without_head(analyze_args, minilm_dir, capsys) -> None:
    code, _, err = run_cli(analyze_args(model=minilm_dir), capsys)
    assert_one_line_error(code, err, "no sequence-classification head")


def test_unsupported_architecture(analyze_args, tmp_path, capsys) -> None:
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=100).save_pretrained(tmp_path / "gpt2")
    code, _, err = run_cli(analyze_args(model=tmp_path / "gpt2"), capsys)
    assert_one_line_error(code, err, "unsupported architecture 'gpt2'")


def test_unknown_task(tiny_models, capsys) -> None:
    code, _, err = run_cli(["analyze", tiny_models["bert"], "--task", "imdb"], capsys)
    assert_one_line_error(code, err, "imdb")
    assert "sst2" in err


def test_missing_text_column(analyze_args, capsys) -> None:
    args = analyze_args()
    args[args.index("--text-field") + 1] = "review"
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "review")


def test_empty_split(tiny_models, tmp_path, capsys) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    code, _, err = run_cli(["analyze", tiny_models["bert"], "--data", empty, "--text-field", "text",
                            "--label-field", "label", "--label-names", "negative,positive",
                            "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, "empty")
    assert not (tmp_path / "run").exists()


def test_max_examples_below_two(analyze_args, tmp_path, capsys) -> None:
    code, _, err = run_cli(analyze_args("--max-examples", "1"), capsys)
    assert_one_line_error(code, err, "at least 2")
    assert not (tmp_path / "run").exists()


def test_label_count_mismatch(minilm_dir, analyze_args, tmp_path, capsys) -> None:
    three = make_tiny_classifier("bert", tmp_path / "three", minilm_dir, num_labels=3)
    code, _, err = run_cli(analyze_args(model=three), capsys)
    assert_one_line_error(code, err, "3 labels but the task has 2")


def test_task_and_data_together(analyze_args, capsys) -> None:
    code, _, err = run_cli(analyze_args("--task", "sst2"), capsys)
    assert_one_line_error(code, err, "either --task or --data")


def test_no_task_at_all(tiny_models, capsys) -> None:
    code, _, err = run_cli(["analyze", tiny_models["bert"]], capsys)
    assert_one_line_error(code, err, "--task NAME")


def test_glue_offline_without_local_copy(tiny_models, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("GLUE_DIR", raising=False)
    code, _, err = run_cli(["analyze", tiny_models["bert"], "--task", "sst2", "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, "--glue-dir")


def test_usage_error_is_one_line(capsys) -> None:
    code, _, err = run_cli(["analyze", "x", "--representation", "pooled"], capsys)
    assert_one_line_error(code, err, "invalid choice")


def test_unwritable_output_place(analyze_args, tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = analyze_args()
    args[args.index("--out") + 1] = blocker / "run"
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "cannot write")


def test_console_script_prints_no_traceback(tmp_path) -> None:
    """The installed entry point, as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "layerprune.cli", "analyze", str(tmp_path / "nope"), "--task", "rt-polarity"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"layerprune: error: checkpoint not found: {tmp_path / 'nope'}"]
