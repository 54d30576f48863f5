"""Atomic stage outputs (artifacts.staged_dir): built in one staging folder beside the target, renamed into place;
the staging folder of a run that was killed is removed by the next run for the same target, a live run's never.
Runs are real processes here, killed with SIGKILL: the kernel, not the code under test, says which are dead."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT
from layerprune.artifacts import atomic_dir, staged_dir
from layerprune.errors import LayerpruneError

HOLD = """
import sys, time
from pathlib import Path

from layerprune.artifacts import staging_folder

target = Path(sys.argv[1])
with staging_folder(target) as folder:
    (folder / "work").write_text("in progress")
    if sys.argv[2] == "between-renames":  # killed where _replace has moved the target away, not yet the new one in
        (folder / "replaced").mkdir()
        target.rename(folder / "replaced" / target.name)
    print(folder, flush=True)
    time.sleep(600)
"""


@contextmanager
def run_holding(target: Path, where: str = "working") -> Iterator[tuple[subprocess.Popen, Path]]:
    """A process inside a stage for `target`, and its staging folder; SIGKILLed when the block ends."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target), where], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        yield proc, Path(proc.stdout.readline().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)


def _write(target: Path, text: str) -> None:
    with atomic_dir(target, "marker") as out:
        (out / "marker").write_text(text)


def test_a_live_runs_staging_stays_and_a_killed_ones_goes(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with run_holding(target) as (proc, live):
        assert live.parent == tmp_path and live.name.startswith(".out.staging-")
        _write(target, "next run")  # beside a live run: its staging folder stays
        assert (live / "work").read_text() == "in progress"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "out"])
    assert proc.returncode == -signal.SIGKILL and live.is_dir(), "SIGKILL: nothing ran to clean up"
    _write(target, "after the kill")
    assert sorted(tmp_path.iterdir()) == [target] and (target / "marker").read_text() == "after the kill"


def test_a_run_killed_between_its_two_renames_gives_the_target_back(tmp_path: Path) -> None:
    target = tmp_path / "out"
    _write(target, "the earlier output")
    with run_holding(target, "between-renames") as (_, dead):
        assert not target.exists()
    with staged_dir(target, "marker") as stage:
        assert (target / "marker").read_text() == "the earlier output", "put back before the new work starts"
        (stage.out / "marker").write_text("new")
    assert sorted(tmp_path.iterdir()) == [target] and (target / "marker").read_text() == "new"
    assert not dead.exists()


def test_a_stage_that_raises_leaves_the_target_and_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "out"
    _write(target, "kept")
    with pytest.raises(LayerpruneError, match="broke"):
        with staged_dir(target, "marker") as stage:
            (stage.scratch / "half").write_text("x")
            (stage.out / "marker").write_text("half")
            raise LayerpruneError("broke")
    assert sorted(tmp_path.iterdir()) == [target] and (target / "marker").read_text() == "kept"


def test_a_stage_may_send_its_output_elsewhere_but_never_over_a_foreign_folder(tmp_path: Path) -> None:
    target, beside = tmp_path / "out", tmp_path / "out.failed"
    _write(target, "kept")
    with staged_dir(target, "marker") as stage:
        (stage.out / "marker").write_text("sent beside")
        stage.target = beside
    assert (target / "marker").read_text() == "kept" and (beside / "marker").read_text() == "sent beside"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("not ours")
    with pytest.raises(LayerpruneError, match="refusing to overwrite .*foreign: it exists and holds no marker"):
        with staged_dir(target, "marker") as stage:
            (stage.out / "marker").write_text("x")
            stage.target = tmp_path / "foreign"
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "out", "out.failed"]
