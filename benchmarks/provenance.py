"""Where and when a benchmark's table was measured, one line for every results file: a figure is only
meaningful beside its date, its CPU (int8 speed and rounding differ between AVX2 and AVX-512 VNNI) and the
commit that produced it. And what every benchmark's `main` shares: its ending (print the table, write it to
`--out`) and its refusals (one line on stderr, as layerprune's own commands)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layerprune.cpu import cpu_kind, cpu_model  # noqa: E402
from layerprune.errors import LayerpruneError, first_line  # noqa: E402


def git_commit() -> str:
    """HEAD's short hash, '+ uncommitted changes' when the tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} + uncommitted changes" if dirty else head


def provenance(device: str | None = None) -> str:
    """'DATE; CPU: MODEL (int8 kind KIND), N cores[; GPU: NAME]; commit HASH', the GPU where `device` is a CUDA
    device (a benchmark that trained there)."""
    gpu = ""
    if device is not None and str(device).startswith("cuda"):
        import torch  # only here: the other benchmarks' provenance needs no torch

        gpu = f"; GPU: {torch.cuda.get_device_name(torch.device(device))}"
    return (f"{date.today().isoformat()}; CPU: {cpu_model()} (int8 kind {cpu_kind()}), {os.cpu_count()} cores{gpu}; "
            f"commit {git_commit()}")


def publish(text: str, out: Path, *, show: bool = True) -> None:
    """Print a benchmark's results (unless `show` is False: a run that rewrites its file after every row) and
    write them to `out`, its folder made."""
    text = text.rstrip("\n") + "\n"
    if show:
        print("\n" + text, end="")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def refuses_in_one_line(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """A benchmark's `main(argv)` that meets bad input (a run folder without its analysis, a folder that is no
    bundle) the way layerprune's commands do: `PROG: error: LINE` on stderr and the error's exit code, not a
    traceback. PROG is the benchmark's file name."""
    prog = Path(main.__code__.co_filename).stem

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except LayerpruneError as exc:
            print(f"{prog}: error: {first_line(exc)}", file=sys.stderr)
            return exc.exit_code

    return wrapped
