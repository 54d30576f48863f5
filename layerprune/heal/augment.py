"""New texts for the heal, made from the heal texts without a hub: the original model labels them itself
(its logits are the targets), so every one is a lesson in agreeing with it on a text it never saw.

TinyBERT augments 20x with BERT's masked-LM and GloVe neighbours; without a hub, three edits that keep the
texts in-domain stand in: a crop (a contiguous run of most of the words), a word swap (some words replaced
by words drawn from the heal texts themselves, in proportion to their frequency), and a splice (the start of
one text and the end of another). Pairs are augmented by word swaps in both texts.
"""

from __future__ import annotations

import numpy as np

from ..data import Examples
from ..options import SEED

SWAP_RATE = 0.15  # share of a text's words swapped (BERT's masking rate)


def augment_texts(examples: Examples, copies: int, seed: int = SEED) -> Examples:
    """`copies` new texts per text of `examples`, cycling crop, swap and splice (swap only for pairs); their
    labels are placeholders (-1), since the original labels them."""
    rng = np.random.default_rng(seed)
    words = [text.split() for text in examples.texts]
    vocabulary = [w for ws in words for w in ws]
    texts: list[str] = []
    pairs: list[str] | None = None if examples.pairs is None else []
    for copy in range(copies):
        for i, ws in enumerate(words):
            if pairs is not None:
                texts.append(_swap(ws, vocabulary, rng))
                pairs.append(_swap(examples.pairs[i].split(), vocabulary, rng))
                continue
            edit = (copy + i) % 3
            if edit == 0:
                texts.append(_crop(ws, rng))
            elif edit == 1:
                texts.append(_swap(ws, vocabulary, rng))
            else:
                texts.append(_splice(ws, words[rng.integers(len(words))], rng))
    return Examples(texts=texts, pairs=pairs, labels=np.full(len(texts), -1, dtype=np.int64))


def _crop(words: list[str], rng: np.random.Generator) -> str:
    """A contiguous run of 50-90% of the words (texts of under 4 words are swapped instead)."""
    if len(words) < 4:
        return " ".join(words)
    n = max(2, int(round(len(words) * rng.uniform(0.5, 0.9))))
    start = int(rng.integers(0, len(words) - n + 1))
    return " ".join(words[start : start + n])


def _swap(words: list[str], vocabulary: list[str], rng: np.random.Generator) -> str:
    """Each word replaced with probability SWAP_RATE (at least one) by a word of the heal texts."""
    if not words:
        return ""
    out = list(words)
    swapped = rng.random(len(out)) < SWAP_RATE
    swapped[rng.integers(len(out))] = True
    for i in np.flatnonzero(swapped):
        out[i] = vocabulary[rng.integers(len(vocabulary))]
    return " ".join(out)


def _splice(words: list[str], other: list[str], rng: np.random.Generator) -> str:
    """The first 30-70% of one text's words followed by the rest of another's."""
    cut = int(round(len(words) * rng.uniform(0.3, 0.7)))
    rest = int(round(len(other) * rng.uniform(0.3, 0.7)))
    return " ".join(words[:cut] + other[rest:]) or " ".join(words)
