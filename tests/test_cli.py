"""The CLI: bad input gets one clear line on stderr, a non-zero exit, and nothing written."""

from __future__ import annotations

import json
import os
import re
import socket
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


PROGRESS_BAR = re.compile(r"\|\s*\d+/\d+ \[")  # tqdm's "| 1/2 [00:01<00:01, 1.28batch/s]", at any rate


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
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
    assert f"recommended: keep {report['boundary']} of {TINY_LAYERS} layers" in out
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


# --- checks before the work: the checkpoint, the hub, every output place, config files ---------


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command gets as far as its work (data, analysis, export, Triton files)."""
    called: list[str] = []

    def refuse(name):
        def work(*args, **kwargs):
            called.append(name)
            raise AssertionError(f"{name} ran although a check should have stopped the command first")
        return work

    import layerprune.analyze
    import layerprune.export
    import layerprune.data.glue
    import layerprune.finetune
    import layerprune.serve.triton

    monkeypatch.setattr(layerprune.data.glue, "read_hub", refuse("hub data"))
    monkeypatch.setattr(layerprune.analyze, "analyze", refuse("analyze"))
    monkeypatch.setattr(layerprune.export, "export_bundle", refuse("export"))
    monkeypatch.setattr(layerprune.finetune, "finetune", refuse("finetune"))
    monkeypatch.setattr(layerprune.serve.triton, "write_triton_repository", refuse("triton"))
    return called


def test_missing_checkpoint_is_named_before_any_data(tmp_path, capsys, no_work) -> None:
    """`analyze /nonexistent --task sst2` names the missing checkpoint before it fetches any data (GLUE from the
    hub takes half a minute of retries offline)."""
    missing = tmp_path / "nonexistent"
    code, _, err = run_cli(["analyze", missing, "--task", "sst2", "--out", tmp_path / "run"], capsys)
    assert code == 2
    assert_one_line_error(code, err, f"checkpoint not found: {missing}")
    assert no_work == []


def test_silent_hub_means_offline_at_once(tmp_path, capsys, monkeypatch, no_work) -> None:
    import layerprune.preflight as preflight

    probes: list[float] = []
    monkeypatch.setattr(preflight, "hub_answers", lambda timeout=3.0: probes.append(timeout) or False)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = run_cli(["analyze", "someorg/no-such-model", "--task", "sst2", "--out", tmp_path / "run"], capsys)
    assert code == 2
    assert_one_line_error(code, err, "'someorg/no-such-model'")
    assert len(probes) == 1  # one probe, not a retry storm
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert no_work == []


def test_silent_hub_console_script(tmp_path) -> None:
    """The real thing in a fresh process (the hub libraries read HF_HUB_OFFLINE at import): the hub endpoint
    is a closed loopback port, so the probe fails at once and nothing retries."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: connections are refused
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{port}"
    result = subprocess.run(
        [sys.executable, "-m", "layerprune.cli", "analyze", "someorg/no-such-model", "--task", "sst2",
         "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'someorg/no-such-model'" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("place", ["under-a-file", "proc"])
@pytest.mark.parametrize("command", ["analyze", "export", "finetune", "triton"])
def test_output_place_checked_before_the_work(command, place, tiny_models, sentiment_csv, tmp_path, capsys,
                                              no_work) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "out" if place == "under-a-file" else Path("/proc/layerprune-test/out")
    data = ["--data", sentiment_csv, "--text-field", "text", "--label-field", "label"]
    args = {
        "analyze": ["analyze", tiny_models["bert"], *data, "--out", out],
        "export": ["export", tmp_path, "--out", out],
        "finetune": ["finetune", tiny_models["bert"], *data, "--out", out],
        "triton": ["triton", tmp_path, out, "--allow-unvalidated"],
    }[command]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert_one_line_error(code, err, "cannot write")
    assert str(out) in err
    assert no_work == []


def test_export_default_bundle_place_checked(tmp_path, capsys, no_work) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "bundle").write_text("a file where the bundle would go")
    code, _, err = run_cli(["export", run], capsys)
    assert_one_line_error(code, err, f"cannot write bundle {run / 'bundle'}: it exists and is not a folder")
    assert code == 2 and no_work == []


@pytest.mark.parametrize("content, words", [
    ("port: [1,\n  host: {\n", "not valid YAML (line 3"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("port: 99999\n", "bad serve setting port"),
])
def test_serve_config_errors_are_one_line(content, words, tmp_path, capsys) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(content)
    code, _, err = run_cli(["serve", tmp_path, "--config", config], capsys)
    assert code == 2
    assert_one_line_error(code, err, words)


def test_serve_config_not_text(tmp_path, capsys) -> None:
    config = tmp_path / "serve.yaml"
    config.write_bytes(b"\xff\xfe\x00")
    code, _, err = run_cli(["serve", tmp_path, "--config", config], capsys)
    assert code == 2
    assert_one_line_error(code, err, "cannot read serve config")


@pytest.mark.parametrize("command, marker", [("analyze", "analysis.json"), ("export", "manifest.json"),
                                             ("finetune", "training_report.json")])
def test_foreign_folder_refused_before_the_work(command, marker, tiny_models, sentiment_csv, tmp_path, capsys,
                                                no_work) -> None:
    """A non-empty folder that is not an earlier output of the stage is never replaced: said at once now,
    not after the work (export: after 187 s)."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone's files")
    data = ["--data", sentiment_csv, "--text-field", "text", "--label-field", "label"]
    args = {"analyze": ["analyze", tiny_models["bert"], *data, "--out", foreign],
            "export": ["export", tmp_path, "--out", foreign],
            "finetune": ["finetune", tiny_models["bert"], *data, "--out", foreign]}[command]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert_one_line_error(code, err, f"refusing to overwrite {foreign}: it exists and holds no {marker}")
    assert no_work == []
    (foreign / marker).write_text("{}")  # an earlier output of this stage: the checks let it through
    from layerprune.preflight import check_output_dir

    check_output_dir(foreign, command, marker)


def test_demo_output_place_checked_before_the_work(tmp_path, capsys, monkeypatch) -> None:
    import layerprune.demo

    ran: list[str] = []
    monkeypatch.setattr(layerprune.demo, "run_demo", lambda *a, **k: ran.append("demo") or 0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(["demo", "--out", blocker / "run"], capsys)
    assert_one_line_error(code, err, "cannot write run directory")
    assert code == 2 and ran == []
    assert run_cli(["demo", "--out", tmp_path / "run"], capsys)[0] == 0 and ran == ["demo"]  # default checkpoint


def test_demo_passes_its_fallback_on_and_checks_its_range(tmp_path, capsys, monkeypatch) -> None:
    import layerprune.demo

    asked: list[tuple] = []
    monkeypatch.setattr(layerprune.demo, "run_demo", lambda *a, **k: asked.append(a) or 0)
    assert run_cli(["demo", "--model", "mpnet", "--fallback", "0.2", "--out", tmp_path / "run"], capsys)[0] == 0
    assert asked[-1][0] == "mpnet" and asked[-1][-1] == 0.2
    assert run_cli(["demo", "--out", tmp_path / "run"], capsys)[0] == 0 and asked[-1][-1] == "auto"
    code, _, err = run_cli(["demo", "--fallback", "1", "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, "--fallback: must be a share of texts in [0, 1)")
    assert code == 2 and len(asked) == 2


def test_demo_asks_for_99_percent_agreement_by_default(tmp_path, capsys, monkeypatch) -> None:
    """The demo promises a bundle that agrees with the original on 99% of texts: its export is held to that bound
    unless asked otherwise; outside (0, 1] is one line."""
    import layerprune.demo

    asked: list[dict] = []
    monkeypatch.setattr(layerprune.demo, "run_demo", lambda *a, **k: asked.append(k) or 0)
    assert run_cli(["demo", "--out", tmp_path / "run"], capsys)[0] == 0 and asked[-1]["min_agreement"] == 0.99
    assert run_cli(["demo", "--min-agreement", "0.9", "--out", tmp_path / "run"], capsys)[0] == 0
    assert asked[-1]["min_agreement"] == 0.9
    code, _, err = run_cli(["demo", "--min-agreement", "1.5", "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, "--min-agreement: must be a share of texts in (0, 1]")
    assert code == 2 and len(asked) == 2


# --- the options objects drive the parser; `tasks` imports no server --------------------


def test_tasks_imports_no_server() -> None:
    code = ("import sys; from layerprune.cli import main; assert main(['tasks']) == 0; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('serve', 'pydantic_settings', 'uvicorn', 'fastapi')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]


def test_flags_become_the_options(monkeypatch) -> None:
    """No flags: the dataclass defaults (the CLI's --device is 'auto'); flags land on their fields."""
    import layerprune.export
    import layerprune.finetune
    from layerprune.options import ExportOptions, FinetuneOptions

    got: list = []
    monkeypatch.setattr("layerprune.cli._preflight", lambda args: None)
    monkeypatch.setattr("layerprune.cli._check_checkpoint", lambda args, name: None)
    monkeypatch.setattr(layerprune.export, "export_bundle", lambda run, out, opts: got.append(opts) or 1 / 0)
    monkeypatch.setattr(layerprune.finetune, "finetune", lambda model, task, out, opts: got.append(opts) or 1 / 0)
    for argv in (["export"], ["export", "--keep-layers", "3", "--heal", "head", "--tolerance", "0.02", "--sweep",
                              "--agreement-examples", "0", "--max-length", "64", "--alpha", "0.1"],
                 ["finetune", "m", "--task", "sst2", "--out", "o", "--lr", "3e-5", "--max-train-examples", "5"]):
        with pytest.raises(ZeroDivisionError):
            main(argv)
    assert got[0] == ExportOptions(device="auto")
    assert got[1] == ExportOptions(keep_layers=3, heal="head", tolerance=0.02, sweep=True, agreement_examples=0,
                                   max_length=64, alpha=0.1, device="auto")
    assert got[2] == FinetuneOptions(learning_rate=3e-5, max_train_examples=5, device="auto")


def test_heal_distill_is_the_top_layer_heal(monkeypatch) -> None:
    """`--heal distill`, what the top-layer heal does, gives the options `--heal top` gives."""
    import layerprune.export
    from layerprune.options import ExportOptions

    got: list = []
    monkeypatch.setattr("layerprune.cli._preflight", lambda args: None)
    monkeypatch.setattr(layerprune.export, "export_bundle", lambda run, out, opts: got.append(opts) or 1 / 0)
    for heal in ("top", "distill"):
        with pytest.raises(ZeroDivisionError):
            main(["export", "--heal", heal])
    assert got == [ExportOptions(heal="top", device="auto")] * 2
    assert ExportOptions(heal="distill").heal == "top", "the alias holds from Python too"
    with pytest.raises(ValueError, match="heal must be one of"):
        ExportOptions(heal="every")  # refused, never trained as another heal


def test_heal_flags_set_the_heals_own_options(monkeypatch) -> None:
    """--heal-layers and --heal-minutes are fields of the top-layer and whole-model heals' options, which export
    trains with as they are (no second copy on ExportOptions)."""
    import dataclasses

    import layerprune.export
    from layerprune.options import ExportOptions, TopOptions, WholeOptions

    got: list = []
    monkeypatch.setattr("layerprune.cli._preflight", lambda args: None)
    monkeypatch.setattr(layerprune.export, "export_bundle", lambda run, out, opts: got.append(opts) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["export", "--heal-layers", "2", "--heal-minutes", "0.5"])
    assert got == [ExportOptions(top=TopOptions(heal_layers=2), whole=WholeOptions(minutes=0.5), device="auto")]
    assert {f.name for f in dataclasses.fields(ExportOptions)}.isdisjoint({"heal_layers", "heal_minutes"})


@pytest.mark.parametrize(("argv", "words"), [
    (["export", "--keep-layers", "0"], "argument --keep-layers: must be a positive integer, got 0"),
    (["export", "--heal", "all"], "argument --heal: invalid choice: 'all'"),
    (["export", "--tolerance", "1.5"], "argument --tolerance: must be a fraction"),
    (["export", "--alpha", "0"], "argument --alpha: must be an error rate in (0, 0.5)"),
    (["analyze", "c", "--cka-estimator", "rbf"], "argument --cka-estimator: invalid choice: 'rbf'"),
    (["serve", "--port", "x"], "argument --port: invalid int value: 'x'"),
])
def test_generated_flags_refuse_bad_values_in_one_line(argv, words, capsys) -> None:
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_line_error(code, err, words)


def test_serve_help_lists_the_server_flags(capsys) -> None:
    code, out, _ = run_cli(["serve", "--help"], capsys)
    assert code == 0 and "--max-batch-size" in out and "--allow-unvalidated" in out
    code, out, _ = run_cli(["export", "--help"], capsys)
    assert code == 0 and "--heal-examples HEAL_EXAMPLES" in out and "(default 4000)" in out


SERVE_FLAGS = {"host", "port", "allow_unvalidated", "max_batch_size", "max_wait_ms", "max_inputs_per_request",
               "max_chars_per_input", "max_queue", "threads", "log_level", "max_batch_tokens", "ray", "replicas",
               "max_replicas", "ray_address", "api_key"}


def test_serve_flags_are_the_settings_fields(monkeypatch, capsys) -> None:
    """One declaration per option: the ServeSettings fields marked cli() are the serve flags (the same set as
    before they were generated); a flag given wins, one not given leaves the environment's and the file's."""
    import layerprune.serve.main
    from layerprune.options import cli_fields
    from layerprune.serve.settings import ServeSettings

    assert set(cli_fields(ServeSettings)) == SERVE_FLAGS
    code, out, _ = run_cli(["serve", "--help"], capsys)
    assert code == 0 and all(f"--{name.replace('_', '-')}" in out for name in SERVE_FLAGS), out
    got: list = []
    monkeypatch.setattr(layerprune.serve.main, "run", lambda bundle, settings: got.append((bundle, settings)) or 0)
    monkeypatch.setenv("LAYERPRUNE_SERVE_MAX_QUEUE", "77")
    monkeypatch.setenv("LAYERPRUNE_SERVE_PORT", "7000")
    argv = ["serve", "b", "--port", "9", "--ray", "--log-level", "debug", "--api-key", "k", "--max-wait-ms", "1.5"]
    assert main(argv) == 0
    bundle, settings = got[0]
    assert bundle == Path("b") and (settings.port, settings.ray, settings.log_level) == (9, True, "debug")
    assert settings.api_key.get_secret_value() == "k" and settings.max_wait_ms == 1.5
    assert settings.max_queue == 77 and settings.allow_unvalidated is False and settings.host == "127.0.0.1"


# --- one line and exit 2 where a traceback was: a device, texts CKA cannot compare, a field too long ------------


@pytest.fixture(scope="module")
def small_run(tiny_models, tmp_path_factory):
    """A run directory and its bundle (depth 3 of 4, no heal), for export's and validate's flags."""
    from conftest import SENTENCES
    from layerprune.analyze import AnalyzeOptions, analyze
    from layerprune.data import task_from_files
    from layerprune.export import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("small-run")
    data = root / "data.csv"
    data.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in SENTENCES * 2))
    analyze(str(tiny_models["bert"]), task_from_files(data, "text", "label"), root / "run",
            AnalyzeOptions(device="cpu", batch_size=8))
    export_bundle(root / "run", None, ExportOptions(keep_layers=3, heal="none", device="cpu", batch_size=8, augment=0))
    return root / "run"


@pytest.mark.parametrize("command", ["analyze", "export", "validate"])
@pytest.mark.parametrize("device", ["bogus", "cuda:x", "gpu0"])
def test_a_device_that_is_none_is_one_line(command, device, analyze_args, small_run, tmp_path, capsys) -> None:
    args = {"analyze": analyze_args(), "export": ["export", small_run, "--out", tmp_path / "bundle"],
            "validate": ["validate", small_run / "bundle"]}[command]
    code, _, err = run_cli([*args, "--device", device], capsys)
    assert code == 2
    assert_one_line_error(code, err, f"--device {device!r}")
    assert not (tmp_path / "run").exists() and not (tmp_path / "bundle").exists()


def test_a_device_this_machine_lacks_is_one_line(analyze_args, monkeypatch, capsys) -> None:
    """A device torch knows but cannot run here (mps on Linux; a GPU missing): torch says why, in one line."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, says in [("cuda:1", "no CUDA device is available"), ("mps", "--device 'mps' cannot run here")]:
        code, _, err = run_cli(analyze_args("--device", device), capsys)
        assert code == 2
        assert_one_line_error(code, err, says)


def test_texts_all_alike_are_one_line(tiny_models, tmp_path, capsys) -> None:
    """Every text the same: every layer's representation is constant, and CKA (0/0) is undefined for all."""
    same = tmp_path / "same.csv"
    same.write_text("text,label\n" + "".join(f"the same words,{'pos' if i % 2 else 'neg'}\n" for i in range(8)))
    code, _, err = run_cli(["analyze", tiny_models["bert"], "--data", same, "--text-field", "text",
                            "--label-field", "label", "--out", tmp_path / "run", "--device", "cpu"], capsys)
    assert code == 2
    assert_one_line_error(code, err, "every layer's representation is the same for all 8 examples")
    assert not (tmp_path / "run").exists()


def test_more_clusters_than_layers_is_one_line(analyze_args, tmp_path, capsys) -> None:
    code, _, err = run_cli(analyze_args("--clusters", TINY_LAYERS + 1, "--device", "cpu"), capsys)
    assert code == 2
    assert_one_line_error(code, err, f"--clusters {TINY_LAYERS + 1} asks for more blocks than the")
    assert not (tmp_path / "run").exists()


def test_a_field_too_long_is_one_line(tiny_models, tmp_path, capsys) -> None:
    data = tmp_path / "long.jsonl"
    rows = [{"text": "fine", "label": "pos"}, {"text": "w " * 100_000, "label": "neg"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, _, err = run_cli(["analyze", tiny_models["bert"], "--data", data, "--text-field", "text",
                            "--label-field", "label", "--out", tmp_path / "run"], capsys)
    assert code == 2
    assert_one_line_error(code, err, f"line 2 of {data}: field 'text' holds 200,000 characters, more than the 131,072")
