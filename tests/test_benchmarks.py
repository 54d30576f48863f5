"""The benchmarks' own logic: those that read a run directory refuse one without `analysis.json` with export's
one-line error and exit 2, before any work and with no results file; any later bad input ends in one line too;
bench_auto's why-not-deeper column."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_benchmark


@pytest.mark.parametrize("name, args", [
    ("linear_backends", []),
    ("bench_heals", []),
    ("heal_variants", ["a variant", "--depth", "2"]),
    ("fallback", []),
    ("bench_auto", ["--seeds", "0"]),
    ("int8_cpus", ["--checkpoint", "unused"]),
    ("int8_static", []),
])
def test_a_folder_without_analysis_is_refused_before_any_work(tmp_path: Path, capsys, name: str,
                                                               args: list[str]) -> None:
    out = tmp_path / "out.md"
    code = load_benchmark(name).main([*args, "--run-dir", str(tmp_path), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"{name}: error: {tmp_path} holds no analysis.json")
    assert not out.exists()


def test_bad_input_met_mid_run_is_one_line_and_its_exit_code_and_a_bug_stays_a_traceback(capsys) -> None:
    """As layerprune's own commands: `PROG: error: LINE` for a LayerpruneError whenever it is raised, with the
    error's exit code; any other exception is a bug and keeps its traceback."""
    from layerprune.errors import DataError

    refuses_in_one_line = load_benchmark("provenance").refuses_in_one_line
    work: list[str] = []

    def main(argv: list[str] | None = None) -> int:
        work.append("started")
        if argv == ["bug"]:
            raise KeyError("not bad input")
        error = DataError("row 7 has no label\nsecond line")
        error.exit_code = 3
        raise error

    assert refuses_in_one_line(main)([]) == 3 and work == ["started"]
    assert capsys.readouterr().err == "test_benchmarks: error: row 7 has no label\n"
    with pytest.raises(KeyError):
        refuses_in_one_line(main)(["bug"])


def test_bench_auto_says_why_not_one_layer_deeper_by_hand() -> None:
    """The demo's depth 5 forecast (15 of 1,056 calibration texts disagree, lower bound -0.90 points) read back for
    a run that kept 6; a run whose walk never scored one layer fewer, or a regression task, says so."""
    from types import SimpleNamespace as NS

    one_layer_fewer = load_benchmark("bench_auto").one_layer_fewer
    five = NS(depth=5, forecast=NS(disagreement=15 / 1056, lower_bound=-0.009014))
    six = NS(depth=6, forecast=None)
    assert one_layer_fewer(NS(depth=6, scores=[five, six])) == "5: 1.42%, -0.0090"
    assert one_layer_fewer(NS(depth=5, scores=[five, six])) == "-"
    regression = NS(depth=5, forecast=NS(disagreement=None, lower_bound=-0.02))
    assert one_layer_fewer(NS(depth=6, scores=[regression, six])) == "5: -, -0.0200"
