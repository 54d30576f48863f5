"""The served cost a text, measured on this CPU: what --fallback auto minimises over depth and share sent on.

A bundle of depth d that sends on a share s of texts costs a text, in the original's units,

    fixed + d * layer + s * (continued layers * layer  [+ fixed, where the fallback restarts])

fixed: tokenizing, the embeddings and the head; layer: one encoder layer (every layer of these encoders does the
same work). With the top-layer heal a text sent on continues from layer c = d - heal_layers through the
original's layers c+1..L (layerprune.continuation); other heals restart the original, all L layers and its fixed
part again. Relative to the full original, fixed + L * layer = 1.

Both are measured once per export on the original PyTorch model at depth 1 and at its full depth, on a few
hundred calibration texts at export's batch size: the two differ by L - 1 layers and nothing else. The served
graphs are the same layers exported to ONNX: the share of a text's work a layer takes is what the ranking
needs, and that is the model's shape, not the runtime's. int8 changes the unit, not the shares, for both graphs
of a candidate alike (both are made as it is); across int8 variants candidates.py scales by each one's measured
speed. The clock is this process's CPU time (time.process_time, the intra-op threads included), the least of a
few interleaved rounds: other work on shared cores adds wall time, and less CPU time.
"""

from __future__ import annotations

import copy
import time

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .artifacts import LayerCosts
from .data import Examples
from .hidden import predict_logits
from .models import total_layers
from .prune import truncate

TEXTS = 256  # calibration texts timed: eight batches of 32, seconds of work on a 12-layer model
ROUNDS = 3  # interleaved; the least of each depth's


def measure(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Examples, max_length: int,
            batch_size: int) -> LayerCosts:
    """The original's fixed and per-layer CPU seconds a text, from its times at depth 1 and at full depth on the
    first TEXTS of `examples`."""
    total, sample = total_layers(model.config), examples.head(TEXTS)
    models = {total: model} if total == 1 else {1: truncate(copy.deepcopy(model), 1), total: model}
    seconds = {depth: float("inf") for depth in models}
    for _ in range(ROUNDS):
        for depth, m in models.items():
            started = time.process_time()
            predict_logits(m, tokenizer, sample, batch_size=batch_size, max_length=max_length)
            seconds[depth] = min(seconds[depth], (time.process_time() - started) / len(sample))
    layer = seconds[total] if total == 1 else max(seconds[total] - seconds[1], 0.0) / (total - 1)
    fixed = max(seconds[total] - total * layer, 0.0)
    return LayerCosts(fixed_s=fixed, layer_s=layer, measured=(
        f"PyTorch fp32 at depth 1 and {total}, {len(sample)} calibration texts, batch {batch_size}, CPU time, "
        f"least of {ROUNDS} rounds"))


def text_cost(costs: LayerCosts, total: int, depth: int, share: float, cut: int | None) -> float:
    """The served cost a text of a bundle of `depth` of `total` layers sending on `share` of texts, the full
    original's = 1. `cut`: the layer a text sent on continues from (continuation.cut_layer); None: it restarts."""
    full = costs.fixed_s + total * costs.layer_s
    own = costs.fixed_s + depth * costs.layer_s
    if depth < total and share:
        own += share * (costs.fixed_s + total * costs.layer_s if cut is None else (total - cut) * costs.layer_s)
    return own / full if full > 0 else 1.0
