"""What every benchmark run shares: its provenance record, where its table goes, its flags' parser and its
refusals.

A figure means something only beside the command that produced it, the commit it ran, the CPU (int8 speed and
rounding differ between AVX2 and AVX-512 VNNI), the libraries and the time it took. So a run writes two files:
its markdown table, under a header line made from that record, and the record itself as JSON beside it
(`Provenance`). A run that writes its table as it goes (one row at a time) leaves a partial table and a record
with no wall time if it is stopped.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn

from pydantic import BaseModel, ConfigDict

from layerprune.artifacts import library_versions
from layerprune.cpu import cpu_kind, cpu_model
from layerprune.errors import LayerpruneError, first_line
from layerprune.files import RESULTS_DIR, RESULTS_FIGURE, RESULTS_RECORD, RESULTS_TABLE

from .registry import Entry

ROOT = Path(__file__).resolve().parents[1]  # the repository whose commit ran
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' threads beside the benchmarks' own


class Provenance(BaseModel):
    """Where, when and how a benchmark's table was measured (the JSON beside the table)."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = 1
    benchmark: str  # the registry entry, NAME[-VARIANT]
    command: str  # the command line as given
    argv: list[str]  # the arguments the benchmark ran with: the entry's defaults, then those given
    commit: str  # HEAD's full hash, "unknown" outside a git checkout
    dirty: bool  # tracked files differed from that commit
    cpu_model: str
    int8_kind: str  # the CPU kind int8 kernels see (layerprune.cpu.cpu_kind)
    cores: int
    gpu: str | None
    versions: dict[str, str]
    started: datetime  # UTC
    wall_s: float | None = None  # None: the run has not finished

    @classmethod
    def now(cls, benchmark: str, command: str, argv: list[str]) -> Provenance:
        commit, dirty = git_state()
        return cls(benchmark=benchmark, command=command, argv=argv, commit=commit, dirty=dirty, cpu_model=cpu_model(),
                   int8_kind=cpu_kind(), cores=os.cpu_count() or 1, gpu=gpu_name(), versions=library_versions(),
                   started=datetime.now(timezone.utc))

    def line(self, record_name: str) -> str:
        """The table's header line."""
        commit = self.commit[:7] + (" + uncommitted changes" if self.dirty else "")
        wall = "not finished" if self.wall_s is None else f"{self.wall_s:,.0f} s"
        gpu = f"; GPU {self.gpu}" if self.gpu else ""
        torch, ort = (self.versions.get(n, "-") for n in ("torch", "onnxruntime"))
        return (f"`{self.command}`, {self.started:%Y-%m-%d %H:%M} UTC, {wall}; commit {commit}; CPU {self.cpu_model} "
                f"(int8 kind {self.int8_kind}), {self.cores} cores{gpu}; torch {torch}, onnxruntime {ort} (all "
                f"versions: [{record_name}]({record_name})).")


def git_state() -> tuple[str, bool]:
    """HEAD's full hash and whether the tracked files differ from it."""
    try:
        head = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return head, dirty


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name, where nvidia-smi answers (no torch import: the serving benchmark has none)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        names = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                               check=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    return names[0].strip() or None


class Results:
    """A run's table (`table`) and its provenance record beside it; `write` replaces both, atomically."""

    def __init__(self, table: Path, record: Provenance) -> None:
        self.table, self.provenance = Path(table), record
        self.record = self.table.with_name(RESULTS_RECORD.format(name=self.table.stem))
        self._started = time.perf_counter()
        self._text: tuple[str, str] | None = None

    def figure(self, name: str) -> Path:
        """Where a figure of this run goes: beside the table, named after it."""
        return self.table.with_name(RESULTS_FIGURE.format(name=self.table.stem, figure=name))

    def write(self, title: str, body: str) -> None:
        """The table under `# title` and the provenance line; call it again to replace it (a row at a time)."""
        self._text = (title, body)
        self._save()

    def finish(self) -> None:
        """Record the wall time, and print the table."""
        if self._text is None:
            return
        self.provenance.wall_s = round(time.perf_counter() - self._started, 1)
        self._save()
        print("\n" + self.table.read_text(), end="")

    def _save(self) -> None:
        title, body = self._text
        _replace(self.record, self.provenance.model_dump_json(indent=2) + "\n")
        _replace(self.table, f"# {title}\n\n{self.provenance.line(self.record.name)}\n\n{body.strip()}\n")


def _replace(path: Path, text: str) -> None:
    """Write `text` to `path` in one rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


class Parser(argparse.ArgumentParser):
    """A benchmark's flags. A usage error is a LayerpruneError, so it ends in the run's one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise LayerpruneError(f"{message} (see --help)")


def parser(entry: Entry) -> Parser:
    """The entry's benchmark's flags, and the two every run takes: where the table goes."""
    module = importlib.import_module(entry.module)
    p = Parser(prog=f"python -m benchmarks {entry.key}", description=module.__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    module.add_arguments(p)
    where = p.add_argument_group("where the table goes")
    where.add_argument("--variant", help=f"write {RESULTS_DIR}/{entry.name}-VARIANT.md instead of the entry's name")
    where.add_argument("--out", type=Path, help="write the table here instead (its provenance JSON beside it)")
    return p


def run(entry: Entry, given: list[str]) -> int:
    """Run `entry` with its default arguments followed by `given` (a flag given again overrides its default):
    the benchmark's exit code, or a LayerpruneError's as one line on stderr, wherever in the run it is met."""
    try:
        argv = [*entry.args, *given]
        args = parser(entry).parse_args(argv)
        name = entry.key if args.variant is None else f"{entry.name}-{args.variant}"
        table = args.out or RESULTS_DIR / RESULTS_TABLE.format(name=name)
        command = shlex.join(["python", "-m", "benchmarks", entry.key, *given])
        results = Results(table, Provenance.now(name, command, argv))
        code = importlib.import_module(entry.module).run(args, results)
        results.finish()
        return code
    except LayerpruneError as exc:
        print(f"{entry.key}: error: {first_line(exc)}", file=sys.stderr)
        return exc.exit_code
