"""The continuation: a text the fallback sends on continues from the hidden state the bundle's graph already
computed, through the original's layers above it and its head, instead of restarting the original from the
embeddings (DeeBERT's early exit with continuation, one exit, batched).

It holds where the pruned model's lower layers ARE the original's: the top-layer heal (`top`) re-tunes
layers c+1..depth and the head, c = depth - heal_layers, and leaves layers 1..c as they were. A heal that changes
the lower layers (`whole`) gives states the original's upper layers were never trained on: it keeps the restart.

onnxruntime runs a graph to its end (no early exit inside one graph), so the cascade is two graphs, both cut from
optimum's fp32 exports before any optimization or quantization (their node names still follow the PyTorch
modules then: '/bert/encoder/layer.3/output/LayerNorm/LayerNormalization'):

- graph A, the bundle's graph: the pruned graph with a second output `hidden_states`, the token states after
  layer c (an Identity of the exporter's tensor, so the name is the same for every architecture);
- graph B, the continuation: the original's graph from that tensor to its logits (onnx.utils.Extractor), the
  tensor renamed `hidden_states`, plus whichever of the original's inputs the layers above the cut still read
  (the attention mask always; input_ids where the exporter takes the batch's shape from it).

Graph B is the original graph's own nodes above the cut (same ops, same weights, the same fusions for
onnxruntime's optimizer), so on the states graph A hands it, it computes what the original's graph computes.
Both are then made as each export candidate is (`Continuations`): optimized, quantized, or faithful int8 from
the unoptimized graph. A cut the graph does not split at is refused (`_check_split`), never silently recomputed.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import helper

from . import onnx_export
from .architectures import architecture, total_layers
from .errors import LayerpruneError
from .files import CONFIG_FILE, MODEL_DATA_FILE, MODEL_FILE
from .faithful_int8 import Feeds
from .onnx_graph import producers
from .options import Candidate
from .runtime import LOGITS, STATES


def cut_layer(depth: int, heal: str, heal_layers: int) -> int | None:
    """The layer c whose output a sent-on text continues from, for a bundle of `depth` layers healed by `heal`:
    the highest layer the bundle's model shares with the original, for the top-layer heal. None: the fallback
    restarts (another heal; or c = 0, where continuing would be restarting from the embeddings)."""
    shared = depth - heal_layers if heal == "top" else 0
    return shared if shared > 0 else None


def _layer_scope(config: dict, index: int) -> str:
    """The exporter's name prefix for the 0-based layer `index` ('/bert/encoder/layer.3/'): the PyTorch module
    path of architectures.py's table with '/' for '.'."""
    arch = architecture(config)
    return f"/{arch.base}/{arch.layers.replace('.', '/')}.{index}/"


def layer_output(model: onnx.ModelProto, config: dict, layer: int) -> str:
    """The name of the tensor that is hidden_states[layer] (1-based: the output of the layer-th layer) in an
    optimum export of a model of `config`, as yet unoptimized.

    Every architecture of the table is post-LN: a layer ends in a LayerNorm (one LayerNormalization node at
    opset >= 17), the last one inside its module scope. ALBERT applies one module again and again; the exporter
    names the n-th call's nodes with a suffix ('full_layer_layer_norm_2'), so its layer-th output is the
    (layer * inner_group_num)-th full-layer LayerNorm in graph order (optimum's graphs are topologically sorted)."""
    if not 1 <= layer <= total_layers(config):
        raise LayerpruneError(f"no layer {layer} in a model of {total_layers(config)} layers")
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    if architecture(config).shared_weights:
        scope = _layer_scope(config, 0).rsplit(".", 1)[0]  # '/albert/encoder/albert_layer_groups'
        ends = [n for n in norms if n.name.startswith(scope) and re.search(r"/full_layer_layer_norm(_\d+)?/", n.name)]
        index = layer * int(config.get("inner_group_num", 1)) - 1
        found = ends[index:index + 1]
    else:
        found = [n for n in norms if n.name.startswith(_layer_scope(config, layer - 1))][-1:]
    if not found:
        raise LayerpruneError(f"cannot find layer {layer}'s output in the exported graph (no LayerNorm named for it)")
    return found[0].output[0]


# --- graph A: the bundle's graph with the cut's states as a second output ---------------------------------------


def add_cut_output(path: Path, config: dict, layer: int) -> None:
    """Give the exported (unoptimized) graph at `path` a second output `hidden_states`: the token states after
    `layer`, (batch, sequence, hidden) float, by an Identity of the exporter's tensor (in place). Its logits stay
    the first output, which is what every other reader of the graph takes."""
    model = onnx.load(str(path))
    if any(o.name == STATES for o in model.graph.output):
        raise LayerpruneError(f"{path} already has an output {STATES}")
    tensor = layer_output(model, config, layer)
    model.graph.node.append(helper.make_node("Identity", [tensor], [STATES], name=f"/{STATES}/Identity"))
    model.graph.output.append(_states_info(model, config))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def drop_cut_output(path: Path) -> None:
    """Take the second output `hidden_states` (add_cut_output) off the graph at `path`, optimized or quantized, and
    the Identity that made it, in place: a bundle that sends no text on answers from its logits alone."""
    model = onnx.load(str(path))
    outputs = [o for o in model.graph.output if o.name != STATES]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    nodes = [n for n in model.graph.node if not (n.op_type == "Identity" and list(n.output) == [STATES])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(path))


def _states_info(model: onnx.ModelProto, config: dict) -> onnx.ValueInfoProto:
    """The value info of the cut's states: float, (batch, sequence) dims named as the graph's input_ids', hidden."""
    ids = next(i for i in model.graph.input if i.name == "input_ids")
    batch, sequence = (d.dim_param or d.dim_value for d in ids.type.tensor_type.shape.dim)
    hidden = config.get("hidden_size") or config.get("dim")  # DistilBERT calls it dim
    return helper.make_tensor_value_info(STATES, onnx.TensorProto.FLOAT, [batch, sequence, hidden])


# --- graph B: the original's graph from the cut to its logits ---------------------------------------------------


def continuation_graph(original: Path, config: dict, layer: int, out: Path) -> list[str]:
    """Write to `out` the original's exported (unoptimized) graph at `original` from the output of `layer` to its
    logits, that tensor as the input `hidden_states`; return the graph's input names.

    Its other inputs are the original's graph inputs that the nodes above the cut still read (found by walking
    back from the logits to the cut). A walk that reaches the work of the layers at or below the cut, or of the
    embeddings, means the graph does not split there: refused (`_check_split`). One file under 2 GB (onnx's
    in-memory shape inference needs that)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(original)))
    tensor = layer_output(model, config, layer)
    _shapes_from_cut(model, config, layer, tensor)
    needed, nodes = _read_above(model, tensor)
    _check_split(model, nodes, config, layer)
    inputs = [name for name in (i.name for i in model.graph.input) if name in needed]
    extracted = onnx.utils.Extractor(model).extract_model([tensor, *inputs], [LOGITS])
    _rename(extracted.graph, tensor, STATES)
    extracted.graph.input[0].CopyFrom(_states_info(model, config))
    del extracted.graph.value_info[:]  # shapes inferred for the whole graph; onnxruntime infers its own
    onnx.checker.check_model(extracted)
    onnx.save(extracted, str(out))
    return [STATES, *inputs]


def _shapes_from_cut(model: onnx.ModelProto, config: dict, layer: int, cut: str) -> None:
    """Make the Shape nodes above the cut that read a hidden state below it read the cut instead (in place).

    Every hidden state, the first layer's input through the cut's, is (batch, sequence, hidden): the same shape.
    MPNet's encoder takes the sequence length for its relative position bias from the embeddings' output; read
    from there, graph B would carry the embeddings (the word-embedding matrix: 94 MB of mpnet-base) to compute
    a shape. ALBERT is left as it is (its first layer's input is mapped from a narrower embedding)."""
    if architecture(config).shared_weights:
        return
    made_by = producers(model)
    first = _layer_scope(config, 0)
    inputs = {i for n in model.graph.node if n.name.startswith(first) for i in n.input
              if i in made_by and not made_by[i].name.startswith(first) and made_by[i].op_type == "LayerNormalization"}
    below = inputs | {layer_output(model, config, j) for j in range(1, layer)}
    _, above = _read_above(model, cut)
    for node in above:
        if node.op_type == "Shape" and node.input[0] in below:
            node.input[0] = cut


def _read_above(model: onnx.ModelProto, cut: str) -> tuple[set[str], list[onnx.NodeProto]]:
    """The graph inputs and the nodes the logits depend on, walking back and stopping at the tensor `cut`."""
    made_by = producers(model)
    graph_inputs = {i.name for i in model.graph.input}
    seen, stack, needed, nodes = set(), [LOGITS], set(), []
    while stack:
        name = stack.pop()
        if name in seen or name == cut:
            continue
        seen.add(name)
        if name in graph_inputs:
            needed.add(name)
        elif name in made_by:
            nodes.append(made_by[name])
            stack.extend(i for i in made_by[name].input if i)
    return needed, nodes


def _check_split(model: onnx.ModelProto, nodes: list[onnx.NodeProto], config: dict, layer: int) -> None:
    """Refuse a cut the graph does not split at: the layers' matrix products the logits need must be exactly those
    of the layers above the cut, none of the layers at or below it, and nothing of the embeddings (either would
    mean the upper layers read more than the cut's output). Counted by name scope, so it holds for shared layers."""
    embeddings = f"/{architecture(config).base}/embeddings/"
    if any(n.input and n.name.startswith(embeddings) for n in nodes):  # (constants are shared across scopes)
        raise LayerpruneError(f"the layers above {layer} read the embeddings, not only layer {layer}'s output: "
                              "cannot continue from there")
    scope = _layer_scope(config, 0).rsplit(".", 1)[0] + "."

    def products(in_nodes) -> int:
        return sum(n.op_type in ("MatMul", "Gemm") and n.name.startswith(scope) for n in in_nodes)

    total, in_layers = total_layers(config), products(model.graph.node)
    if in_layers % total:
        raise LayerpruneError(f"{in_layers} matrix products in {total} layers: cannot tell where layer {layer} ends")
    expected, found = in_layers // total * (total - layer), products(nodes)
    if found != expected:
        raise LayerpruneError(f"the layers above {layer} need {found} of their matrix products, {expected} expected: "
                              "the graph does not split at that layer's output")


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename the tensor `old` to `new` everywhere in `graph` (inputs, outputs, node inputs and outputs)."""
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        node.output[:] = [new if o == old else o for o in node.output]


# --- export: graph B made as each candidate of the bundle's graph is -----------------------------------------------


@dataclass
class Continuations:
    """Graph B for a bundle whose graph continues from `layer`, made as each export candidate of the bundle's graph
    is made (options.CANDIDATES): cut from the original's unoptimized export `original` (its config beside it);
    fp32 optimized at `optimize`; int8 quantized from that under the same configuration as the bundle's graph;
    int8-faithful transformed from the unoptimized cut (the transform reads the MatMul + bias pattern that
    onnxruntime's fusions hide), calibrated on graph B's inputs as graph A hands them on heal texts
    (`states_batches`). Each is built once, in its own folder under `work`, when first asked for."""

    original: Path
    config: dict
    layer: int
    work: Path
    optimize: str | None
    cpu: str
    _built: dict[str, Path] = field(default_factory=dict)

    def graph(self, candidate: Candidate, batches: list[Feeds] | None = None) -> Path:
        """Graph B's path for the export candidate named `candidate`; int8-faithful is calibrated on `batches`
        (graph B's feeds: `states_batches`), which only it needs."""
        if candidate not in self._built:
            folder = self.work / f"continuation-{candidate}"
            if candidate == "fp32":
                shutil.copytree(self._cut().parent, folder)
                if self.optimize:
                    onnx_export.optimize_onnx(folder, self.optimize)
            elif candidate == "int8":
                shutil.copytree(self.graph("fp32").parent, folder)
                onnx_export.quantize_onnx(folder, cpu=self.cpu)
            elif candidate == "int8-faithful":
                if batches is None:
                    raise LayerpruneError("the faithful int8 continuation needs calibration batches")
                shutil.copytree(self._cut().parent, folder)
                onnx_export.quantize_faithful(folder, batches, cpu=self.cpu)
            else:
                raise LayerpruneError(f"no export candidate named {candidate!r}")
            if (folder / MODEL_DATA_FILE).exists():
                raise LayerpruneError("--fallback needs the continuation's graph in one file (under 2 GB); this one "
                                      "is larger")
            self._built[candidate] = folder / MODEL_FILE
        return self._built[candidate]

    def _cut(self) -> Path:
        """Graph B as cut from the original's export, fp32 and unoptimized (built once)."""
        folder = self.work / "continuation-cut"
        if not folder.is_dir():
            folder.mkdir(parents=True)
            shutil.copy(self.original.parent / CONFIG_FILE, folder / CONFIG_FILE)  # the optimizer reads its type
            continuation_graph(self.original, self.config, self.layer, folder / MODEL_FILE)
        return folder / MODEL_FILE


def states_batches(graph_a: Path, batches: list[Feeds]) -> list[Feeds]:
    """Graph B's feeds for `batches` of graph A's feeds: the states graph A (at `graph_a`, with its `hidden_states`
    output) outputs for them, beside their token inputs (graph B reads the attention mask, sometimes input_ids)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph_a), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [{**feeds, STATES: session.run([STATES], {k: feeds[k] for k in names})[0]} for feeds in batches]
