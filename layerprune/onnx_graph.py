"""Reading an ONNX graph by tensor and node names: what makes a tensor, what reads it, its constants, its nodes.

The graph surgery of faithful_int8.py and continuation.py follows tensors by name through a graph whose nodes
only list the names they read and write; these lookups are built once per graph, as dicts. Each is a snapshot of
the graph as it is: after adding or removing nodes or initializers, build it again. Its values are the graph's
own protos, so editing one through a lookup edits the graph. Imports only onnx (torch-free).
"""

from __future__ import annotations

import onnx


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The graph's constant tensors by name."""
    return {t.name: t for t in model.graph.initializer}


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """The node that writes each tensor, by the tensor's name (graph inputs and initializers have none)."""
    return {out: node for node in model.graph.node for out in node.output}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes that read each tensor, in graph order, by the tensor's name (a tensor no node reads is absent)."""
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def nodes_by_name(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """The graph's nodes by their names (the exporter names every node uniquely, after its PyTorch module)."""
    return {node.name: node for node in model.graph.node}
