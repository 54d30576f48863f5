"""benchmarks/heal_variants.py's student: the original's layers picked by number, checked against
transformers' own model of that many layers with those layers' weights loaded by hand."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from conftest import SENTENCES, load_benchmark, make_tiny_classifier, reference_with_layers

heal_variants = load_benchmark("heal_variants")


def test_picked_layers_compute_what_a_model_of_those_layers_computes(tmp_path: Path, minilm_dir: Path) -> None:
    # 4 layers; initializer_range 0.3 so that the layers, and so the logits, differ between texts and picks
    path = make_tiny_classifier("bert", tmp_path / "bert", minilm_dir, seed=3, initializer_range=0.3)
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer([text for text, _ in SENTENCES], padding=True, return_tensors="pt")
    for layers in ([1, 2], [1, 2, 4], [1, 3]):
        full, reference = reference_with_layers(path, layers)
        student = heal_variants._with_layers(full.eval(), layers).eval()
        assert student.config.num_hidden_layers == len(layers)
        with torch.inference_mode():
            got, want = student(**inputs).logits, reference(**inputs).logits
            unchanged = full(**inputs).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, unchanged, atol=1e-3)  # the pick changed the model, and the copy only
        assert full.config.num_hidden_layers == 4


def test_start_beside_top_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    """--top's student starts as --top-start says, so a --start beside it would label a row with layers it never
    used: one line on stderr, exit 2, before the run directory is read (it does not exist here)."""
    code = heal_variants.main(["x", "--depth", "2", "--top", "--start", "1,2", "--run-dir", str(tmp_path / "none"),
                               "--out", str(tmp_path / "out.md")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--top-start" in err[0]
    assert not (tmp_path / "out.md").exists()
