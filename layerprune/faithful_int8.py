"""Faithful dynamic int8: one activation scale per token, GPTQ-rounded weights, optional activation smoothing.

A pure transform of an fp32 ONNX classifier (optimum's export) into a graph whose constant-weight MatMuls run
in onnxruntime's integer kernel (com.microsoft MatMulIntegerToFloat: u8 activations x s8 weights, int32 sums).

Why plain dynamic int8 moves predictions: onnxruntime's DynamicQuantizeLinear gives a whole activation tensor
(every token of every text in the batch) ONE scale from its min and max. LayerNorm outputs and GELU outputs of
BERT-like encoders carry a few channels and a few tokens 10-100x larger than the rest (Bondarenko et al. 2021),
so that one scale rounds everything else coarsely, and a text's result even depends on its batch.

What this does instead, for each activation X (tokens x K) read by products Y = X W + b (W: K x N):

- per-token scales: token m is quantized with its own scale t_m (and zero point z_m) from its own range,
  q_m = round(x_m / t_m) + z_m in 0..255, so no other token or text enters its rounding. The kernel takes one
  activation scale per tensor, so it runs with scale 1 and the graph applies t afterwards:

      Y[m, n] = t_m ws_n sum_k (q[m, k] - z_m) Wq[k, n] + b_n
              = t_m (ws_n (q Wq)[m, n]) - (t_m z_m) (ws_n colsum(Wq)_n) + b_n

  The last two terms are one MatMul of inner size 2: [-(t z), 1] @ [ws * colsum Wq ; b].
  Three modes per activation: 'sym' (max|x|, zero point 128, no correction), the default; 'asym' (min/max
  range, the zero point per token as above) for activations read by several products (Q, K and V share the
  correction's cost) with shared_zero_point; 'shift' after a GELU: GELU(x) >= -c (c = 0.17), so x is quantized
  with zero point z = floor(255 c / (max_m + c)) (at least 1) and step t = c / z: t z = c exactly, the
  correction is the constant c ws colsum(Wq), folded into the bias, and the whole 0..255 range covers
  [-c, max_m] at no cost over the product's own passes.
- GPTQ weights (Frantar et al. 2022): symmetric per output column, Wq in [-qmax, qmax] with scale
  ws = max|W[:, n]| / qmax, but rounded one input row at a time with each row's rounding error spread over the
  rows not yet rounded through the Cholesky factor of (X^T X)^-1 (X: calibration tokens), so that X Wq tracks
  X W rather than Wq tracking W.
- smoothing (SmoothQuant, Xiao et al. 2023), per activation by measurement: Y = (X diag(1/s)) (diag(s) W) with
  s_j = max|X_j|^alpha / max|W_j.|^(1 - alpha); alpha from a grid (None: no smoothing) by the least emulated
  error ||Q(X / s) Q(s W) - X W||^2 on sampled calibration tokens. 1/s folds exactly into V's columns and bias
  where the activation is the attention context (softmax(Q K^T) V is linear in V's columns), which is the only
  place the default smooths; elsewhere it would be one Mul by a constant vector (post-LN encoders also feed the
  LayerNorm's output to the residual), a pass over the activation that costs more speed than its fidelity
  buys (benchmarks/results/int8_methods*.md), taken only with smooth_with_mul (then a GELU's shift is an Add
  before the Mul, on zero point 0).

The head (Gemm on one row per text) and attention's activation x activation products stay fp32. With
quantize=False the transform stops after the exact part (shifts and smoothing, nothing rounded): that graph
computes the fp32 logits up to float rounding, which is how the folds are checked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from layerprune.errors import LayerpruneError
from layerprune.onnx_graph import consumers, initializers, nodes_by_name, producers

Feeds = dict[str, np.ndarray]

ALPHAS: tuple[float | None, ...] = (None, 0.3, 0.5, 0.7)  # smoothing exponents searched per activation
GELU_FLOOR = 0.17  # GELU(x) >= -0.16997 for every x (its minimum, at x = -0.7518)
GELU_OPS = ("Gelu", "BiasGelu", "FastGelu")
PASS_THROUGH = ("Reshape", "Transpose")  # head split/merge ops between V and the attention context
OPSET = 21  # QuantizeLinear with one scale per block (here per token: the block is the whole row)
SAMPLE_TOKENS = 4096  # token rows kept per activation for the smoothing search


@dataclasses.dataclass(frozen=True)
class Site:
    """One activation tensor and the constant-weight MatMuls that read it. value: the V projection MatMul whose
    columns and bias absorb 1/s exactly (when the activation is an attention context), else None."""

    tensor: str
    matmuls: tuple[str, ...]
    value: str | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one site is quantized: mode 'asym', 'sym' or 'shift' (see the module's docstring), the smoothing
    scales s (None: none) and the shift added before quantizing (0 unless 'shift')."""

    mode: str
    scales: np.ndarray | None = None
    shift: float = 0.0


@dataclasses.dataclass
class Stats:
    """Calibration statistics of one activation over real (unmasked) tokens: per-channel min and max, the Gram
    matrix X^T X and column sums (GPTQ's Hessian), the token count and a sample of token rows."""

    lo: np.ndarray
    hi: np.ndarray
    gram: np.ndarray
    total: np.ndarray
    n: int
    sample: np.ndarray

    def gram_of(self, plan: Plan) -> np.ndarray:
        """Gram matrix of the prepared activation (x + c) / s: D (G + c (t 1^T + 1 t^T) + n c^2) D, D = diag(1/s)."""
        c = plan.shift
        g = self.gram + c * (self.total[:, None] + self.total[None, :]) + self.n * c ** 2
        inv = 1.0 / (plan.scales if plan.scales is not None else np.ones(len(self.lo)))
        return g * inv[:, None] * inv[None, :]


def faithful_int8(model: onnx.ModelProto, batches: Sequence[Feeds], reduce_range: bool = False,
                  alphas: Sequence[float | None] = ALPHAS, quantize: bool = True, smooth_with_mul: bool = False,
                  shared_zero_point: bool = False) -> onnx.ModelProto:
    """`model` (fp32) as faithful dynamic int8, calibrated on `batches` (session feeds with an attention_mask,
    as runtime.OnnxClassifier.encode makes them; never the texts the result is validated on).

    reduce_range: 7-bit weights (qmax 64, onnxruntime's reduce_range) for CPUs without VNNI, whose u8 x s8 kernel
    sums pairs of products in int16. alphas: the smoothing exponents searched per activation ((None,): no
    smoothing). quantize=False: the exact fp32 preparation only (shifts and smoothing folded, nothing rounded).
    smooth_with_mul: also smooth activations whose 1/s does not fold into V, by a Mul (one more pass over the
    activation). shared_zero_point: 'asym' for activations read by several products (Q, K, V), with its rank-1
    correction, instead of 'sym'."""
    model = untie(model)
    sites = find_sites(model)
    if not sites:
        raise LayerpruneError("faithful int8 found no MatMul with a constant weight to quantize in this graph")
    qmax = 64 if reduce_range else 127
    stats = site_statistics(model, batches, sites)
    plans = [make_plan(model, site, stats[site.tensor], qmax,
                       alphas if smooth_with_mul or site.value is not None else (None,), shared_zero_point)
             for site in sites]
    prepared, prepared_sites = prepare(model, sites, plans)
    if not quantize:
        return prepared
    return per_token_int8(prepared, prepared_sites, plans, [stats[s.tensor] for s in sites], qmax)


# --- the graph: sites ----------------------------------------------------------------------------------------


def _array(inits: dict, name: str) -> np.ndarray:
    return numpy_helper.to_array(inits[name]).astype(np.float32)


def _set(inits: dict, name: str, value: np.ndarray) -> None:
    inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def untie(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` in which every initializer is read by one node under its own name (Identity of an
    initializer becomes an initializer): the exporter shares identical tensors, and rescaling one reader's
    weights must not rescale another's."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = initializers(out)
    for node in [n for n in g.node if n.op_type == "Identity" and n.input[0] in inits]:
        g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[node.input[0]]), node.output[0]))
        g.node.remove(node)
    inits = initializers(out)
    for name, readers in consumers(out).items():
        if name in inits and len(readers) > 1:
            value = numpy_helper.to_array(inits[name])
            for k, node in enumerate(readers[1:], 1):
                g.initializer.append(numpy_helper.from_array(value, f"{name}_untied{k}"))
                node.input[:] = [f"{name}_untied{k}" if i == name else i for i in node.input]
    return out


def find_sites(model: onnx.ModelProto) -> list[Site]:
    """The MatMuls with a constant 2-D weight whose output goes to one bias Add (what dynamic int8 quantizes),
    grouped by the activation they read (Q, K and V share one), in graph order."""
    inits, users = initializers(model), consumers(model)
    groups: dict[str, list[str]] = {}
    for node in model.graph.node:
        if (node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2
                and _bias_add(users, inits, node) is not None):
            groups.setdefault(node.input[0], []).append(node.name)
    return [Site(tensor, tuple(names), _value_projection(model, tensor)) for tensor, names in groups.items()]


def _bias_add(users: dict, inits: dict, matmul: onnx.NodeProto) -> onnx.NodeProto | None:
    """The Add of a constant that alone reads the MatMul's output, or None."""
    readers = users.get(matmul.output[0], [])
    if len(readers) == 1 and readers[0].op_type == "Add" and sum(i in inits for i in readers[0].input) == 1:
        return readers[0]
    return None


def _value_projection(model: onnx.ModelProto, context: str) -> str | None:
    """The V projection MatMul whose output reaches `context` only through Reshape/Transpose (keeping the last
    axis last), its bias Add, and one MatMul with the attention probabilities, every tensor on the way read by
    nothing else but Shape nodes; None when `context` is not an attention context. Then
    context[:, c] = sum_t P[t] (X W_v + b_v)[t, c], so scaling column c of W_v and b_v scales channel c."""
    made_by, users, inits = producers(model), consumers(model), initializers(model)

    def only_reader(name: str) -> bool:
        return len([n for n in users.get(name, []) if n.op_type != "Shape"]) == 1

    def walk_back(name: str) -> onnx.NodeProto | None:
        node = made_by.get(name)
        while node is not None and node.op_type in PASS_THROUGH:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if node.op_type == "Transpose" and (perm is None or perm[-1] != len(perm) - 1):
                return None
            if not only_reader(node.input[0]):
                return None
            node = made_by.get(node.input[0])
        return node

    probs_v = walk_back(context)
    if probs_v is None or probs_v.op_type != "MatMul" or probs_v.input[1] in inits:
        return None
    bias_add = walk_back(probs_v.input[1])
    if bias_add is None or bias_add.op_type != "Add" or sum(i in inits for i in bias_add.input) != 1:
        return None
    value = made_by.get(next(i for i in bias_add.input if i not in inits))
    if value is None or value.op_type != "MatMul" or value.input[1] not in inits or not only_reader(value.output[0]):
        return None
    return value.name


def _gelu_output(model: onnx.ModelProto, tensor: str) -> bool:
    """Whether `tensor` is a GELU's output: a fused Gelu op, or the erf form x * 0.5 * (1 + erf(x / sqrt 2))
    whose last Mul has an Erf at most four nodes up."""
    made_by = producers(model)
    node = made_by.get(tensor)
    if node is None:
        return False
    if node.op_type in GELU_OPS:
        return True
    frontier = [node]
    for _ in range(4):
        frontier = [made_by[i] for n in frontier for i in n.input if i in made_by]
        if any(n.op_type == "Erf" for n in frontier):
            return node.op_type == "Mul"
    return False


def _site_weight(model: onnx.ModelProto, site: Site) -> np.ndarray:
    """The site's weights side by side (K x sum N)."""
    inits = initializers(model)
    nodes = nodes_by_name(model)
    return np.concatenate([_array(inits, nodes[m].input[1]) for m in site.matmuls], axis=1)


# --- calibration ---------------------------------------------------------------------------------------------


def site_statistics(model: onnx.ModelProto, batches: Iterable[Feeds], sites: Sequence[Site], seed: int = 0
                    ) -> dict[str, Stats]:
    """Stats of every site's activation from one fp32 onnxruntime run per batch, over the tokens the attention
    mask keeps; a uniform sample of at most SAMPLE_TOKENS token rows each."""
    import onnxruntime as ort

    tensors = [s.tensor for s in sites]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    rng = np.random.default_rng(seed)
    acc: dict[str, dict] = {}
    for feeds in batches:
        mask = feeds["attention_mask"].astype(bool)
        for name, value in zip(tensors, session.run(tensors, {k: feeds[k] for k in names})):
            rows = value[mask] if value.ndim == mask.ndim + 1 else value.reshape(-1, value.shape[-1])
            a = acc.setdefault(name, dict(lo=rows.min(0), hi=rows.max(0), gram=0.0, total=0.0, n=0, rows=[]))
            a["lo"], a["hi"] = np.minimum(a["lo"], rows.min(0)), np.maximum(a["hi"], rows.max(0))
            # A batch's sums in float32 (a few thousand tokens: relative error ~1e-6), batches summed in float64.
            a["gram"] = a["gram"] + (rows.T @ rows).astype(np.float64)
            a["total"] = a["total"] + rows.sum(0, dtype=np.float64)
            a["n"] += len(rows)
            a["rows"].append(rows[rng.random(len(rows)) < 0.25])  # bounded memory: a quarter, then the sample
    if not acc:
        raise LayerpruneError("faithful int8 needs at least one calibration batch")
    out = {}
    for name, a in acc.items():
        rows = np.concatenate(a["rows"])
        out[name] = Stats(a["lo"], a["hi"], a["gram"], a["total"], a["n"],
                          rows[rng.permutation(len(rows))[:SAMPLE_TOKENS]])
    return out


def smoothing_scales(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_j.|^(1 - alpha), 1 where a channel or weight row is all zero,
    clipped to [1e-4, 1e4] so that no weight row over- or underflows."""
    x, w = np.asarray(x_absmax, np.float64), np.asarray(w_absmax, np.float64)
    s = np.ones_like(x)
    live = (x > 0) & (w > 0)
    s[live] = x[live] ** alpha / w[live] ** (1.0 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def quantize_per_token(x: np.ndarray, plan: Plan) -> np.ndarray:
    """What the per-token graph keeps of prepared activation rows x (tokens x K, already divided by s),
    dequantized; rounding half to even, as QuantizeLinear."""
    if plan.mode == "sym":
        t = np.maximum(np.abs(x).max(axis=1, keepdims=True) / 127, 1e-12)
        return np.round(x / t) * t
    if plan.mode == "shift" and plan.scales is None:  # step c / z, z the zero point (see per_token_int8)
        zero = np.clip(np.floor(255 * plan.shift / (x.max(axis=1, keepdims=True) + plan.shift)), 1, 255)
        t = plan.shift / zero
        return (np.clip(np.round(x / t) + zero, 0, 255) - zero) * t
    if plan.mode == "shift":
        c = plan.shift / plan.scales
        t = np.maximum((x + c).max(axis=1, keepdims=True) / 255, 1e-12)
        return np.clip(np.round((x + c) / t), 0, 255) * t - c
    lo, hi = np.minimum(x.min(axis=1, keepdims=True), 0), np.maximum(x.max(axis=1, keepdims=True), 0)
    t = np.maximum((hi - lo) / 255, 1e-12)
    zero = np.round(-lo / t)
    return (np.clip(np.round(x / t) + zero, 0, 255) - zero) * t


def _round_to_nearest(w: np.ndarray, qmax: int) -> np.ndarray:
    """w (K x N) rounded symmetric per output column to [-qmax, qmax], dequantized."""
    scale = np.abs(w).max(axis=0, keepdims=True) / qmax
    scale[scale == 0] = 1.0
    return np.clip(np.round(w / scale), -qmax, qmax) * scale


def make_plan(model: onnx.ModelProto, site: Site, stats: Stats, qmax: int,
              alphas: Sequence[float | None], shared_zero_point: bool = True) -> Plan:
    """The site's mode ('shift' after a GELU, 'asym' when several products read it and shared_zero_point, else
    'sym') and its
    smoothing: the alpha whose per-token int8 product, emulated on the sampled tokens with round-to-nearest
    weights, is closest to the fp32 one."""
    if _gelu_output(model, site.tensor) and stats.lo.min() >= -GELU_FLOOR:
        mode, shift = "shift", GELU_FLOOR
    else:
        mode, shift = ("asym" if shared_zero_point and len(site.matmuls) > 1 else "sym"), 0.0
    w = _site_weight(model, site)
    x = stats.sample.astype(np.float32)
    y = x @ w
    best, best_error = Plan(mode, None, shift), np.inf
    for alpha in alphas:
        s = None if alpha is None else smoothing_scales(np.maximum(-stats.lo, stats.hi), np.abs(w).max(axis=1), alpha)
        plan = Plan(mode, s, shift)
        xs, ws = (x, w) if s is None else (x / s, w * s[:, None])
        error = float(((quantize_per_token(xs, plan) @ _round_to_nearest(ws, qmax) - y) ** 2).sum())
        if error < best_error:
            best, best_error = plan, error
    return best


def gptq(w: np.ndarray, gram: np.ndarray, qmax: int, damp: float = 0.01, block: int = 128
         ) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ for symmetric per-output-column integer weights: round w (K x N) one input row at a time, in order
    of decreasing gram diagonal, spreading each row's error over the rows not yet rounded through the upper
    Cholesky factor of (X^T X + damp mean(diag) I)^-1. Column scales max|w_col| / qmax, as round-to-nearest.
    Returns (integers as float64, column scales)."""
    w = np.asarray(w, np.float64).copy()
    k = w.shape[0]
    scale = np.abs(w).max(axis=0) / qmax
    scale[scale == 0] = 1.0
    h = np.array(gram, np.float64, copy=True)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    order = np.argsort(-np.diag(h))
    w, h = w[order], h[np.ix_(order, order)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(w)
    for start in range(0, k, block):  # GPTQ's lazy batch: rows past the block get its errors in one product
        end = min(start + block, k)
        errors = np.empty((end - start, w.shape[1]))
        for i in range(start, end):
            q[i] = np.clip(np.round(w[i] / scale), -qmax, qmax)
            errors[i - start] = (w[i] - q[i] * scale) / u[i, i]
            w[i + 1:end] -= np.outer(u[i, i + 1:end], errors[i - start])
        w[end:] -= u[start:end, end:].T @ errors
    out = np.empty_like(q)
    out[order] = q
    return out, scale


# --- the transform -------------------------------------------------------------------------------------------


def prepare(model: onnx.ModelProto, sites: Sequence[Site], plans: Sequence[Plan]
            ) -> tuple[onnx.ModelProto, list[Site]]:
    """The exact fp32 part: per site, x + shift (bias - shift * colsum W) for 'shift' plans, then x / s with the
    weight rows * s (folded into V for an attention context, else a Mul). Returns the new model and its sites
    (same order; a site's tensor renamed where a node was inserted before its MatMuls)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits, users = initializers(out), consumers(out)
    nodes = nodes_by_name(out)
    new_sites = []
    for k, (site, plan) in enumerate(zip(sites, plans)):
        x, inserted = site.tensor, []
        if plan.shift and plan.scales is not None:  # unsmoothed, the shift is the zero point (per_token_int8)
            for m in site.matmuls:  # x W + b = (x + c) W + (b - c colsum W)
                bias = _bias_of(users, inits, nodes[m])
                _set(inits, bias, _array(inits, bias) - plan.shift * _array(inits, nodes[m].input[1]).sum(axis=0))
            g.initializer.append(numpy_helper.from_array(np.float32(plan.shift), f"fi8_{k}_shift"))
            inserted.append(helper.make_node("Add", [x, f"fi8_{k}_shift"], [f"fi8_{k}_shifted"], name=f"fi8_{k}_shift"))
            x = f"fi8_{k}_shifted"
        if plan.scales is not None:
            s = plan.scales.astype(np.float32)
            for m in site.matmuls:
                _set(inits, nodes[m].input[1], _array(inits, nodes[m].input[1]) * s[:, None])
            if site.value is not None and not plan.shift:  # V' = X (W_v / s) + b_v / s
                value = nodes[site.value]
                _set(inits, value.input[1], _array(inits, value.input[1]) / s[None, :])
                bias = _bias_of(users, inits, value)
                _set(inits, bias, _array(inits, bias) / s)
            else:
                g.initializer.append(numpy_helper.from_array(1.0 / s, f"fi8_{k}_inv_s"))
                inserted.append(helper.make_node("Mul", [x, f"fi8_{k}_inv_s"], [f"fi8_{k}_smoothed"],
                                                 name=f"fi8_{k}_smooth"))
                x = f"fi8_{k}_smoothed"
        for m in site.matmuls:
            nodes[m].input[0] = x
        position = min(i for i, n in enumerate(g.node) if n.name in site.matmuls)
        for n in reversed(inserted):
            g.node.insert(position, n)
        new_sites.append(Site(x, site.matmuls, site.value))
    return out, new_sites


def _bias_of(users: dict, inits: dict, matmul: onnx.NodeProto) -> str:
    add = _bias_add(users, inits, matmul)
    return next(name for name in add.input if name in inits)


def per_token_int8(model: onnx.ModelProto, sites: Sequence[Site], plans: Sequence[Plan],
                   stats: Sequence[Stats], qmax: int = 127) -> onnx.ModelProto:
    """A `prepare`d model's sites (with their plans and the original activations' stats, in the same order)
    rewritten as per-token dynamic int8 with GPTQ weights, as the module's docstring writes the product; the
    graph converted to opset 21 for QuantizeLinear's per-block scales."""
    out = version_converter.convert_version(model, OPSET)
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    g = out.graph
    inits, users = initializers(out), consumers(out)
    nodes = nodes_by_name(out)

    def const(name: str, value, dtype=np.float32) -> str:
        g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    one, tiny, zero = const("fi8_one", 1.0), const("fi8_tiny", 1e-12), const("fi8_zero", 0.0)
    z128, z128_row = const("fi8_z128", 128, np.uint8), const("fi8_z128_row", np.full((1, 1, 1), 128), np.uint8)
    last_axis, ones_row = const("fi8_last_axis", [-1], np.int64), const("fi8_ones_row", np.ones((1, 1, 1)))
    for k, (site, plan, st) in enumerate(zip(sites, plans, stats)):
        p, new = f"fi8_{k}_", []

        def op(op_type: str, inputs: list[str], name: str, out_name: str | None = None, **attrs) -> str:
            new.append(helper.make_node(op_type, inputs, [out_name or p + name], name=p + name, **attrs))
            return out_name or p + name

        w = _site_weight(out, site)
        x, width = site.tensor, w.shape[0]
        wq, ws = gptq(w, st.gram_of(plan), qmax)
        # One scale (and zero point) per token: QuantizeLinear's blocked form, the block a whole row.
        if plan.mode == "sym":  # max |x| from two reductions: no pass that writes |x|
            peak = op("Max", [op("ReduceMax", [x, last_axis], "max", keepdims=1),
                              op("Neg", [op("ReduceMin", [x, last_axis], "min", keepdims=1)], "neg_min")], "peak")
            t = op("Max", [op("Mul", [peak, const(p + "inv127", 1 / 127)], "t0"), tiny], "t")
            zp = op("Expand", [z128_row, op("Shape", [t], "t_shape")], "zp")
            q = op("QuantizeLinear", [x, t, zp], "q", axis=-1, block_size=width)
        elif plan.mode == "shift" and plan.scales is None:
            # x >= -c quantized with zero point z = floor(255 c / (max + c)) (at least 1) and step t = c / z, so
            # that t z = c exactly: the kernel's sum over q (zero point 0) is (x + c) / t, and c's share,
            # c ws colsum(Wq), is a constant folded into the bias. No pass over x adds c.
            c = const(p + "shift", plan.shift)
            room = op("Div", [const(p + "c255", 255 * plan.shift),
                              op("Add", [op("ReduceMax", [x, last_axis], "max", keepdims=1), c], "span")], "room")
            zf = op("Clip", [op("Floor", [room], "z0"), one, const(p + "z255", 255.0)], "zf")
            t = op("Div", [c, zf], "t")
            q = op("QuantizeLinear", [x, t, op("Cast", [zf], "zu", to=TensorProto.UINT8)], "q", axis=-1,
                   block_size=width)
        elif plan.mode == "shift":  # prepare added the shift: x + c >= 0 on 0..255, zero point 0
            peak = op("ReduceMax", [x, last_axis], "peak", keepdims=1)
            t = op("Max", [op("Mul", [peak, const(p + "inv255", 1 / 255)], "t0"), tiny], "t")
            q = op("QuantizeLinear", [x, t], "q", axis=-1, block_size=width)
        else:
            lo = op("Min", [op("ReduceMin", [x, last_axis], "min", keepdims=1), zero], "lo")
            hi = op("Max", [op("ReduceMax", [x, last_axis], "max", keepdims=1), zero], "hi")
            t = op("Max", [op("Mul", [op("Sub", [hi, lo], "range"), const(p + "inv255", 1 / 255)], "t0"), tiny], "t")
            zf = op("Round", [op("Div", [op("Neg", [lo], "neg_lo"), t], "z0")], "zf")
            q = op("QuantizeLinear", [x, t, op("Cast", [zf], "zu", to=TensorProto.UINT8)], "q", axis=-1,
                   block_size=width)
            correction_in = op("Concat", [op("Neg", [op("Mul", [t, zf], "tz")], "ntz"),
                                          op("Expand", [ones_row, op("Shape", [t], "t_shape")], "ones")], "u", axis=-1)
        start = 0
        for j, m in enumerate(site.matmuls):
            node = nodes[m]
            n_out = int(inits[node.input[1]].dims[1])
            wq_j, ws_j = wq[:, start:start + n_out], ws[start:start + n_out]
            start += n_out
            # inputs: A, B, a_scale, b_scale, a_zero_point, b_zero_point
            integer_inputs = [q, const(f"{p}{j}_wq", wq_j, np.int8), one, const(f"{p}{j}_ws", ws_j),
                              z128 if plan.mode == "sym" else "", const(f"{p}{j}_wz", np.zeros(n_out), np.int8)]
            r = op("MatMulIntegerToFloat", integer_inputs, f"{j}_r", domain="com.microsoft")
            if plan.mode != "asym":  # the bias Add reads the MatMul's output name, now t * r
                op("Mul", [r, t], f"{j}_scaled", node.output[0])
                if plan.mode == "shift" and plan.scales is None:
                    bias = _bias_of(users, inits, node)
                    _set(inits, bias, _array(inits, bias) - plan.shift * ws_j * wq_j.sum(axis=0))
                continue
            add, bias = _bias_add(users, inits, node), _bias_of(users, inits, node)
            v = np.stack([ws_j * wq_j.sum(axis=0), _array(inits, bias)])  # + [-(t z), 1] [[ws colsum Wq], [b]]
            corr = op("MatMul", [correction_in, const(f"{p}{j}_v", v)], f"{j}_corr")
            op("Add", [op("Mul", [r, t], f"{j}_scaled"), corr], f"{j}_out", add.output[0])
            g.node.remove(add)
            g.initializer.remove(inits[bias])
        position = min(i for i, n in enumerate(g.node) if n.name in site.matmuls)
        for n in reversed(new):
            g.node.insert(position, n)
        for m in site.matmuls:
            g.node.remove(nodes[m])
            g.initializer.remove(inits[nodes[m].input[1]])
    return out
