"""The library names the benchmarks need that are not public yet, in one place: when the library makes them
public, each line below becomes an import of the public name and no benchmark changes.

- `load_analysis(run_dir)`: the run directory's analysis, or export's one-line refusal. Public as
  `layerprune.artifacts.load_analysis`.
- `heal_texts(task, glue_dir, opts)` and `with_augmented(texts, task, opts)`: the texts export heals with, and
  the same with its augmented copies. Public as `layerprune.heal.texts.heal_texts` / `with_augmented`.
- `export_heal_options(opts)`: the heal options export's depth walk trains with (depth_search applies
  `heal_layers` and `heal_minutes` to them). No public function gives them yet.
- `linear_backend(model, backend)`: run a model's linear layers through torch's BLAS or through oneDNN whatever
  `layerprune.linear`'s probe says. No public switch exists yet; this one swaps the layers' class and the probe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from layerprune import linear
from layerprune.export import _augmented as with_augmented  # noqa: F401  (re-exported)
from layerprune.export import _heal_texts as heal_texts  # noqa: F401
from layerprune.export import load_analysis  # noqa: F401
from layerprune.options import DistillOptions, ExportOptions, WholeOptions


def export_heal_options(opts: ExportOptions) -> tuple[DistillOptions, WholeOptions]:
    """The top-layer and whole-model heal options export trains each depth with under `opts`."""
    return (dataclasses.replace(opts.distill, heal_layers=opts.heal_layers),
            dataclasses.replace(opts.whole, minutes=opts.heal_minutes))


@contextmanager
def linear_backend(model, backend: Literal["blas", "onednn"]) -> Iterator[None]:
    """Within the block, `model`'s linear layers run through torch's BLAS (plain nn.Linear) or through oneDNN
    (layerprune's FastLinear, its probe answered True); afterwards they are as loaded, and the probe answers as
    measured."""
    from torch import nn

    probe = linear.onednn_is_faster
    loaded = {m: type(m) for m in model.modules() if type(m) in (nn.Linear, linear.FastLinear)}
    for layer in loaded:
        layer.__class__ = nn.Linear if backend == "blas" else linear.FastLinear
    linear.onednn_is_faster = lambda: True
    try:
        yield
    finally:
        linear.onednn_is_faster = probe
        for layer, kind in loaded.items():
            layer.__class__ = kind
