"""The README's Python API block, run as written: the first ```python block after its "## Python API" heading.

It runs in a temporary folder holding a tiny random classifier at the README's checkpoint path
(runs/minilm-rt; seeded, so the outcome is fixed), with one substitution, required to match: the task
becomes a small local CSV task (the README's rt-polarity needs the real data and model). The gate runs at
the README's own tolerance, 0.01, and the block's `assert validate_bundle(...).passed` is the real gate's
verdict. Everything else, imports, calls and prints, is the README's own text. The outcome is checked against onnxruntime and the
tokenizer run directly on the bundle's files, and against the bundle's manifest."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import SENTENCES, TINY_LAYERS, make_tiny_classifier

ROOT = Path(__file__).resolve().parents[1]
TINY_TASK = 'task_from_files(Path("reviews.csv"), "text", "label", train_file=Path("reviews.csv"))'
SUBSTITUTIONS = {'load_task("rt-polarity")': TINY_TASK}


def readme_python_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    heading = re.search(r"^## Python API\s*$", text, flags=re.MULTILINE)
    assert heading, "README.md has no '## Python API' heading"
    block = re.search(r"^```python\n(.*?)^```\s*$", text[heading.end():], flags=re.MULTILINE | re.DOTALL)
    assert block, "no ```python block after README.md's '## Python API' heading"
    return block.group(1)


def test_readme_python_api_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, minilm_dir: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    code = readme_python_block()
    assert "runs/minilm-rt" in code and 'Path("lp-run")' in code, "the test relies on the README's paths"
    for old, new in SUBSTITUTIONS.items():
        assert code.count(old) == 1, f"README's Python API block no longer contains {old!r} exactly once"
        code = code.replace(old, new)

    monkeypatch.chdir(tmp_path)
    make_tiny_classifier("bert", tmp_path / "runs" / "minilm-rt", minilm_dir)
    rows = SENTENCES + [(f"honestly, {t}", label) for t, label in SENTENCES]
    (tmp_path / "reviews.csv").write_text("text,label\n" + "\n".join(f'"{t}",{label}' for t, label in rows) + "\n")

    from layerprune.data import task_from_files

    namespace: dict = {"task_from_files": task_from_files}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    printed = capsys.readouterr().out.strip().splitlines()

    task, result = namespace["task"], namespace["result"]
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    assert Path(result.bundle).resolve() == (tmp_path / "lp-run" / "bundle").resolve() and result.validation.passed
    assert manifest["labels"] == task.label_names == ["negative", "positive"]
    assert 1 <= manifest["depth"] == result.depth.depth <= TINY_LAYERS
    assert printed[0] == f"late block starts at layer {namespace['report'].boundary}"
    assert printed[1].startswith(f"kept {manifest['depth']} layers; holdout delta ")

    # The README's last line printed the labels of its two texts: the same as onnxruntime on the bundle's
    # own graph and tokenizer, labels named by the manifest, computed here without layerprune's runtime.
    import onnxruntime as ort
    from transformers import AutoTokenizer

    texts = ["a gorgeous, witty, seductive movie", "tedious and far too long"]
    assert texts[0] in code and texts[1] in code
    tokenizer = AutoTokenizer.from_pretrained(result.bundle)
    session = ort.InferenceSession(str(result.bundle / manifest["parts"]["model"]), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=manifest["max_length"], return_tensors="np")
    logits = session.run(None, {k: v.astype(np.int64) for k, v in encoded.items() if k in wanted})[0]
    np.testing.assert_allclose(namespace["logits"], logits, atol=1e-4)
    assert printed[-1] == str([manifest["labels"][i] for i in logits.argmax(axis=1)])


DOCUMENTS = ["README.md", "CHANGELOG.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)  # headings in code are none
    found = set()
    for title in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-")
        found.add(slug)
    return found


@pytest.mark.parametrize("document", DOCUMENTS)
def test_relative_links_resolve(document: str) -> None:
    """Every relative link and image of the user documents names a file that exists, and a heading in it."""
    path = ROOT / document
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    broken = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target}: no {file}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading #{anchor} in {file or document}")
    assert not broken, f"{document}: " + "; ".join(broken)


def test_readme_is_a_first_screen() -> None:
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 150
