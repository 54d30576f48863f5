"""What the benchmarks that read a run directory share: one without `analysis.json` gets export's own one-line
error and exit 2 before any work, and no results file."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_benchmark


@pytest.mark.parametrize("name, args", [
    ("linear_backends", []),
    ("bench_heals", []),
    ("heal_variants", ["a variant", "--depth", "2"]),
    ("fallback", []),
])
def test_a_folder_without_analysis_is_refused_before_any_work(tmp_path: Path, capsys, name: str,
                                                               args: list[str]) -> None:
    out = tmp_path / "out.md"
    code = load_benchmark(name).main([*args, "--run-dir", str(tmp_path), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"{name}: error: {tmp_path} holds no analysis.json")
    assert not out.exists()
