"""The house rules of docs/design.md ("What may import what"), checked on the source: what may import what, and
the installed command."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# docs/design.md's list, and depth_search (export's depth search: transformers, heal, prune).
TRAINING_SIDE = {"analyze", "export", "onnx_export", "continuation", "faithful_int8", "finetune", "heal", "hidden",
                 "linear", "models", "prune", "validate", "demo", "cli", "plots", "depth_search"}


def test_the_rules_cited_here_exist() -> None:
    assert "## What may import what" in (ROOT / "docs" / "design.md").read_text()


def _imports(path: Path) -> set[str]:
    """Every module a file imports, absolute (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).parent.parts)  # layerprune, layerprune.data, serve
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def _calls(path: Path) -> set[str]:
    return {node.func.id for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}


@pytest.mark.parametrize("name", ["cka.py", "clustering.py"])
def test_numerics_are_pure(name: str) -> None:
    path = ROOT / "layerprune" / name
    heavy = {m for m in _imports(path) if m.split(".")[0] in ("torch", "transformers", "datasets", "onnxruntime")}
    assert not heavy, f"{name} imports {heavy}"
    assert not {m for m in _imports(path) if m.startswith("layerprune.") and m != "layerprune.errors"}
    assert not _calls(path) & {"open", "print", "input"}, f"{name} does I/O"


@pytest.mark.parametrize("path", sorted((ROOT / "serve").glob("*.py")), ids=lambda p: p.name)
def test_the_server_reads_bundles_only(path: Path) -> None:
    reached = {m.split(".")[1] for m in _imports(path) if m.startswith("layerprune.") and m.count(".") >= 1}
    assert not reached & TRAINING_SIDE, f"serve/{path.name} imports layerprune.{reached & TRAINING_SIDE}"


@pytest.mark.parametrize("path", sorted([*(ROOT / "layerprune").rglob("*.py"), *(ROOT / "serve").glob("*.py")]),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_imports_the_cli(path: Path) -> None:
    if path.name == "cli.py":
        return
    assert not {m for m in _imports(path) if m == "layerprune.cli" or m.startswith("layerprune.cli.")}


def test_tasks_are_schema_and_yaml_only() -> None:
    """Task configs read no data: the data package imports tasks, never the other way round."""
    reached = {m for m in _imports(ROOT / "layerprune" / "tasks.py") if m.startswith("layerprune.")}
    assert reached <= {"layerprune.errors", "layerprune.errors.TaskError"}, reached


def test_installed_console_script() -> None:
    script = Path(sys.executable).parent / "layerprune"
    assert script.is_file(), "install the package (pip install -e .) to get the layerprune command"
    done = subprocess.run([str(script), "tasks"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "rt-polarity" in done.stdout and "sst2" in done.stdout
    bad = subprocess.run([str(script), "export", "/nonexistent-run-dir"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
