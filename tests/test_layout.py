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
                 "linear", "models", "prune", "validate", "compare", "demo", "cli", "plots", "depth_search"}


def test_the_rules_cited_here_exist() -> None:
    assert "## What may import what" in (ROOT / "docs" / "design.md").read_text()


def _package(folder: Path) -> str:
    """The dotted package a folder of the repository is (pyproject.toml's package-dir: serve/ is layerprune.serve)."""
    parts = list(folder.relative_to(ROOT).parts)
    return ".".join(["layerprune", *parts] if parts[:1] == ["serve"] else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, absolute (relative imports resolved against its package)."""
    package = _package(path.parent)  # layerprune, layerprune.data, layerprune.serve
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


PROJECT = ("layerprune", "serve", "benchmarks")  # the packages whose modules may not share private names


def _module(path: Path) -> str:
    """The dotted module name of a source file of the repository (a package's __init__.py: the package)."""
    package = _package(path.parent)
    return package if path.stem == "__init__" else f"{package}.{path.stem}"


def _is_module(name: str) -> bool:
    """Whether a dotted name is a module or package of the repository."""
    parts = name.split(".")
    path = ROOT.joinpath(*(parts[1:] if parts[:2] == ["layerprune", "serve"] else parts))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_uses(path: Path, source: str | None = None) -> list[str]:
    """Where a file of the repository (its text: `source`, else read) reaches for a private name of another
    module of the project, or through a private module: `from X import _name`, `from X._module import name`, or
    `module._name` on a module it imported."""
    own, found = _module(path), []
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    modules: dict[str, str] = {}  # local name -> project module it is bound to
    tree = ast.parse(path.read_text() if source is None else source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base.split(".")[0] not in PROJECT or base == own:
                continue
            if any(_private(part) for part in base.split(".")):
                found.append(f"line {node.lineno}: from {base} import ...")
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"line {node.lineno}: from {base} import {alias.name}")
                elif _is_module(f"{base}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{base}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in PROJECT:  # `import a.b` binds a; `import a.b as c` binds c to a.b
                    modules[alias.asname or top] = alias.name if alias.asname else top
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in modules:
                target = ".".join([modules[value.id], *chain])
                if _is_module(target) and target != own:
                    found.append(f"line {node.lineno}: {target}.{node.attr}")
    return found


@pytest.mark.parametrize("path", sorted(p for root in PROJECT for p in (ROOT / root).rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_crosses_modules(path: Path) -> None:
    """A leading underscore means "this module's own": another module that needs the name needs it public."""
    assert not _private_uses(path), f"{path.relative_to(ROOT)} uses private names of other modules: {_private_uses(path)}"


def test_the_private_name_check_sees_each_form() -> None:
    """The check above on a module that uses each form, beside its own private names, which it may use."""
    source = ("from .export import _heal_texts\nfrom layerprune import linear\nfrom ._x import y\n"
              "import layerprune.models\nlinear._takes(1, 2)\nlayerprune.models._encoder(None)\n"
              "from layerprune.probe import _own\n_own()\n")
    found = _private_uses(ROOT / "layerprune" / "probe.py", source)
    assert [f.split(": ", 1)[1] for f in found] == [
        "from layerprune.export import _heal_texts", "from layerprune._x import ...", "layerprune.linear._takes",
        "layerprune.models._encoder"], found


def test_the_server_installs_under_layerprune() -> None:
    """pyproject.toml installs every package folder, and the server's folder as layerprune.serve: no top-level
    `serve` package in a user's environment."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {_package(p.parent) for root in ("layerprune", "serve") for p in (ROOT / root).rglob("__init__.py")}
    assert sorted(setuptools["packages"]) == sorted(folders)
    assert setuptools["package-dir"] == {"layerprune.serve": "serve"}
    assert all(name.split(".")[0] == "layerprune" for name in setuptools["packages"])


def test_the_server_has_one_name_in_a_clone() -> None:
    """Run from a clone, layerprune.serve is the top-level serve/ folder, and `python -m serve` runs it under
    that one name (no second copy of its modules as `serve.*`)."""
    code = ("import runpy, sys; sys.argv = ['serve', '--help']\n"
            "try:\n    runpy.run_module('serve', run_name='__main__', alter_sys=True)\n"
            "except SystemExit:\n    pass\n"
            "import layerprune.serve.main as m\n"
            "print(m.__file__); print(sorted(n for n in sys.modules if n.startswith('serve.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == [str(ROOT / "serve" / "main.py"), "[]"], done.stdout


def test_installed_console_script() -> None:
    script = Path(sys.executable).parent / "layerprune"
    assert script.is_file(), "install the package (pip install -e .) to get the layerprune command"
    done = subprocess.run([str(script), "tasks"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "rt-polarity" in done.stdout and "sst2" in done.stdout
    bad = subprocess.run([str(script), "export", "/nonexistent-run-dir"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
