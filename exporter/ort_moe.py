"""``--target ort-moe``: a moefy model rewritten so that ONNX Runtime's own MoE operators run its sparse FFNs.

Each ``SparseExpertFFN`` node becomes ``com.microsoft::MoE`` (float32 experts) or ``QMoE`` (int8 experts), which
every ONNX Runtime CPU build has: the model then runs with no custom-op library (any ONNX Runtime host,
onnxruntime-genai, a mobile build with the contrib ops). How the operator's math maps onto them, from ONNX
Runtime 1.32's schemas and CPU kernels (tests/test_ort_moe.py checks each point against runtime/reference.py):

- Selection. Both kernels take a token's top k of ``router_probs`` but break ties toward the higher expert index
  (the operator: the lower), and MoE weights each selected expert by its softmax over *all* experts (MoE has no
  ``router_weights`` input). So the router (a MatMul + Add, or the given ``router_scores``) feeds a TopK, whose
  tie rule is the operator's, and ``router_probs`` is 0 at the k experts it chose and -1e30 elsewhere: both
  kernels then select exactly those.
- Weights of 1. QMoE: ``router_weights`` is all ones (gathered at the selected experts; normalize_routing_weights
  0). MoE: the softmax of that mask is 1/k at each selected expert, so fc2 and its bias are scaled by k.
- ``unselected_bias`` U: y = B2 + sum_e U[e] + sum_{e selected} (W2[e]^T h_e - U[e]): -U[e] is expert e's fc2
  bias, and B2 + sum_e U[e] one constant Add after the node.
- SwiGLU: ``swiglu_fusion=1`` (gate and up rows interleaved in fc1), alpha 1, beta 0, no limit, so
  G * sigmoid(alpha G) * (L + beta) = silu(g) * u exactly.
- Activations: relu and silu are exact; ONNX Runtime's "gelu" is the tanh form, so gelu_tanh is exact and the erf
  GELU (BERT's) is approximated (|gelu - gelu_tanh| < 5e-4 per neuron): allowed unless ``exact``, and reported.
- int8 experts: QMoE with 8 bits, one scale per fc row and its default zero point 128 (uint8 = int8 + 128). W1 and
  Wg scale rows, as fc1's scales do; W2's scales are per neuron, i.e. per *column* of fc2, which QMoE cannot
  express, so they are folded into the neuron's first layer where that is exact: the up rows of SwiGLU
  (silu(g) * (s u)), and the rows of ReLU (relu(u) s = relu(s u), s >= 0). Plain GELU / SiLU with int8 experts
  are refused; ``dequantize`` writes them as float32 MoE instead (the same numbers, four times the bytes).

Refused with the reason: dynamic k (``score_threshold``: both kernels compute exactly k experts), gated forms
other than SwiGLU (the CPU kernels have no GEGLU), expert weights or router computed in the graph rather than
stored as initializers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime import spec

MS_DOMAIN = "com.microsoft"
TARGET_KEY = "moefy.target"  # metadata: what a converted model runs on, and what was approximated
EXCLUDED = -1e30  # router_probs of the experts a token did not select (softmax: exactly 0)
GELU_TANH_MAX_DIFF = 4.8e-4  # max over z of |gelu(z) - gelu_tanh(z)|
EXTERNAL_DATA_BYTES = 1_800_000_000  # above this the weights go to OUT.data (protobuf's 2 GiB limit)
# moefy activation -> ONNX Runtime MoE activation_type (ORT's "gelu" is the tanh approximation)
ACTIVATIONS = {"relu": "relu", "silu": "silu", "gelu_tanh": "gelu", "gelu": "gelu"}


class ConversionError(ValueError):
    """A model, or a node of it, that ONNX Runtime's MoE operators cannot express (the message says why)."""


@dataclasses.dataclass
class ConversionReport:
    output: str
    nodes: int
    ops: dict  # MoE / QMoE -> count
    notes: list  # approximations and choices, one line each
    file_bytes: int

    def summary(self) -> str:
        ops = ", ".join(f"{n} {op}" for op, n in sorted(self.ops.items()))
        return "\n".join([f"wrote {self.output} ({self.file_bytes / 2**20:.1f} MiB): {self.nodes} SparseExpertFFN "
                          f"nodes -> {ops}; runs on a stock ONNX Runtime (no custom-op library)"]
                         + [f"  {n}" for n in self.notes])


class _Names:
    """Fresh tensor and node names in a graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.used = {t.name for t in graph.initializer} | {v.name for v in graph.input} | \
            {n for node in graph.node for n in (*node.input, *node.output, node.name)}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """[E, m, ...] x 2 -> [E, 2m, ...]: gate_0, up_0, gate_1, up_1, ... (swiglu_fusion=1)."""
    return np.stack([gate, up], axis=2).reshape(gate.shape[0], 2 * gate.shape[1], *gate.shape[2:])


def _constants(graph: onnx.GraphProto) -> dict:
    """Tensor name -> TensorProto for the graph's constants: initializers, Constant nodes, and Identity nodes of
    either (PyTorch's exporter stores identical weights, e.g. the zero router biases, once and aliases them)."""
    consts = {t.name: t for t in graph.initializer}
    for node in graph.node:  # topologically sorted
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1 \
                and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
        elif node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
    return consts


def _prune(graph: onnx.GraphProto) -> None:
    """Remove the Constant / Identity nodes and the initializers nothing reads any more."""
    while True:
        read = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("Constant", "Identity") and n.domain in ("", "ai.onnx")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _node_arrays(node: onnx.NodeProto, inits: dict, where: str) -> dict:
    """The node's constant inputs as arrays (name -> array or None); X and router_scores stay graph tensors."""
    arrays = {}
    for i, p in enumerate(spec.INPUTS):
        name = node.input[i] if i < len(node.input) else ""
        if not name or p.name in ("X", "router_scores"):
            arrays[p.name] = None
            continue
        if name not in inits:
            raise ConversionError(f"{where}: input {p.name} ('{name}') is computed in the graph, not stored as an "
                                  "initializer; ort-moe repacks the expert weights and router once, so they must "
                                  "be constants (as moe-export writes them)")
        arrays[p.name] = numpy_helper.to_array(inits[name])
    return arrays


def _tensor(names: _Names, new_inits: list, base: str, a: np.ndarray) -> str:
    name = names(base)
    new_inits.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
    return name


def _rewrite(node: onnx.NodeProto, index: int, inits: dict, names: _Names, *, exact: bool,
             dequantize: bool, notes: set) -> tuple[list, list, str]:
    """The nodes and initializers replacing one SparseExpertFFN node, and the operator used."""
    where = f"{spec.OP_TYPE} node '{node.name or index}'"
    try:
        attrs = spec.node_attributes(node)
    except spec.SpecError as e:
        raise ConversionError(f"{where}: {e}") from None
    a = _node_arrays(node, inits, where)
    x_name = node.input[0]
    scores_name = node.input[spec.INPUT_INDEX["router_scores"]] if len(node.input) > 7 else ""
    w1 = a["W1"]
    if w1 is None or w1.ndim != 3:
        raise ConversionError(f"{where}: W1 must be an [E, m, d] initializer")
    E, m, d = w1.shape
    shapes = {n: None if v is None else v.shape for n, v in a.items()}
    shapes["X"] = (1, d)
    shapes["router_scores"] = (1, E) if scores_name else None
    dtypes = {n: None if v is None else str(v.dtype) for n, v in a.items()}
    dtypes["X"] = "float32"
    dtypes["router_scores"] = "float32" if scores_name else None
    try:
        spec.check(shapes, attrs, dtypes)
    except spec.SpecError as e:
        raise ConversionError(f"{where}: {e}") from None

    k, act, gated = attrs["top_k"], attrs["activation"], a["Wg"] is not None
    if attrs["score_threshold"] != -math.inf:
        raise ConversionError(f"{where}: dynamic k (min_k={attrs['min_k']}, score_threshold="
                              f"{attrs['score_threshold']:g}) cannot be expressed: ONNX Runtime's MoE and QMoE "
                              "compute exactly k experts per token; export with a fixed --top-k")
    if gated and act != "silu":
        raise ConversionError(f"{where}: a gated FFN with activation {act} cannot be expressed: ONNX Runtime's CPU "
                              "MoE and QMoE have only SwiGLU (silu) as a gated activation")
    if act == "gelu":
        if exact:
            raise ConversionError(f"{where}: activation gelu (erf) has no exact counterpart: ONNX Runtime's MoE "
                                  "'gelu' is the tanh approximation (up to 4.8e-4 apart per neuron); allow the "
                                  "approximation or export a gelu_tanh / relu model")
        notes.add(f"the erf GELU runs as ONNX Runtime's tanh approximation (<= {GELU_TANH_MAX_DIFF:g} apart per "
                  "neuron)")
    int8 = a["W1"].dtype == np.int8
    if int8 and not gated and act != "relu" and not dequantize:
        raise ConversionError(f"{where}: int8 experts with a plain {act} activation cannot be expressed: QMoE scales "
                              "fc2 per output row, the operator per neuron (per fc2 column), and that scale folds "
                              "into the first layer only for ReLU and SwiGLU; dequantize them to float32 MoE "
                              "(moe-convert --dequantize) or convert a float32 export")
    if int8 and dequantize:
        notes.add("int8 experts dequantized to float32 MoE experts (--dequantize)")
    f32 = lambda v: None if v is None else np.asarray(v, np.float32)  # noqa: E731
    scale = {n: f32(a[s]) for n, s in spec.SCALES.items()}
    if int8 and dequantize:  # float32 MoE with the dequantized weights
        for n in spec.SCALES:
            if a[n] is not None:
                a[n] = a[n].astype(np.float32) * scale[n][..., None]
        int8 = False
    b1, b2, bg, u = f32(a["B1"]), f32(a["B2"]), f32(a["Bg"]), f32(a["unselected_bias"])

    p = f"{node.name or f'{spec.OP_TYPE}_{index}'}/ort_moe"
    new_nodes, new_inits = [], []
    const = lambda base, v: _tensor(names, new_inits, f"{p}/{base}", v)  # noqa: E731

    def op(op_type, inputs, base, domain="", n_out=1, **kw):
        outs = [names(f"{p}/{base}{'' if n_out == 1 else f'_{i}'}") for i in range(n_out)]
        new_nodes.append(helper.make_node(op_type, inputs, outs, name=names(f"{p}/{op_type}"), domain=domain, **kw))
        return outs[0] if n_out == 1 else outs

    # Tokens as rows: the operator takes any leading shape, MoE 2-D [tokens, d].
    x_shape = op("Shape", [x_name], "x_shape")
    x2 = op("Reshape", [x_name, const("rows_d", np.array([-1, d], np.int64))], "x_rows")
    if scores_name:
        s = op("Reshape", [scores_name, const("rows_e", np.array([-1, E], np.int64))], "scores")
    else:
        s = op("MatMul", [x2, const("router_wT", f32(a["router_w"]).T)], "scores")
        if a["router_b"] is not None:
            s = op("Add", [s, const("router_b", f32(a["router_b"]))], "scores_b")
    idx = op("TopK", [s, const("k", np.array([k], np.int64))], "topk", n_out=2, axis=-1, largest=1, sorted=1)[1]
    s_shape = op("Shape", [s], "scores_shape")
    excluded = op("ConstantOfShape", [s_shape], "excluded",
                  value=numpy_helper.from_array(np.array([EXCLUDED], np.float32)))
    zeros = op("ConstantOfShape", [op("Shape", [idx], "topk_shape")], "zeros",
               value=numpy_helper.from_array(np.array([0.0], np.float32)))
    probs = op("ScatterElements", [excluded, idx, zeros], "router_probs", axis=1)

    moe_attrs = dict(k=k, activation_type="swiglu" if gated else ACTIVATIONS[act], normalize_routing_weights=0)
    if gated:
        moe_attrs.update(swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
    # fc1 rows (interleaved gate/up when gated), their biases; fc2 [E, d, m]; -U as fc2's bias.
    w1, w2, wg = a["W1"], a["W2"], a["Wg"]
    zeros_em = np.zeros((E, m), np.float32)
    if int8:
        s1, s2, sg = scale["W1"], scale["W2"], scale["Wg"]
        if (s2 < 0).any():
            raise ConversionError(f"{where}: W2_scale has negative entries; they fold into the first layer only "
                                  "when >= 0")
        up_b = (zeros_em if b1 is None else b1) * s2  # the per-neuron W2 scale moves into the up / ReLU rows
        fc1_s = _interleave(sg, s1 * s2) if gated else s1 * s2
        fc1_b = _interleave(zeros_em if bg is None else bg, up_b) if gated else up_b
        u8 = lambda q: (q.astype(np.int16) + 128).astype(np.uint8)  # noqa: E731  QMoE's zero point is 128
        fc1 = u8(_interleave(wg, w1) if gated else w1)
        fc2 = u8(w2.transpose(0, 2, 1))
        fc2_b = None if u is None else -u
        ones = op("ConstantOfShape", [s_shape], "ones", value=numpy_helper.from_array(np.array([1.0], np.float32)))
        inputs = [x2, probs, const("fc1", fc1), const("fc1_scales", fc1_s.astype(np.float32)),
                  const("fc1_bias", fc1_b.astype(np.float32)), const("fc2", fc2),
                  const("fc2_scales", np.ones((E, d), np.float32)),
                  "" if fc2_b is None else const("fc2_bias", fc2_b), "", "", "", "", "", "", ones]
        y = op("QMoE", inputs, "y_rows", domain=MS_DOMAIN, expert_weight_bits=8, weights_prepacked=0, **moe_attrs)
        used = "QMoE"
    else:
        if w1.dtype == np.float16:  # MoE's inputs share one float type: the same values in float32
            notes.add("float16 experts widened to float32 MoE experts (the same values, twice the bytes)")
        w1, w2 = np.asarray(w1, np.float32), np.asarray(w2, np.float32)
        fc1 = _interleave(np.asarray(wg, np.float32), w1) if gated else w1
        fc1_b = None
        if b1 is not None or bg is not None:
            up_b = zeros_em if b1 is None else b1
            fc1_b = _interleave(zeros_em if bg is None else bg, up_b) if gated else up_b
        # Each selected expert comes weighted 1/k (the softmax of the mask): fc2 and its bias are scaled by k.
        fc2 = w2.transpose(0, 2, 1) * np.float32(k)
        inputs = [x2, probs, const("fc1", fc1), "" if fc1_b is None else const("fc1_bias", fc1_b),
                  const("fc2", fc2), "" if u is None else const("fc2_bias", -u * np.float32(k))]
        y = op("MoE", inputs, "y_rows", domain=MS_DOMAIN, **moe_attrs)
        used = "MoE"
    if b2 is not None or u is not None:
        c = np.zeros(d, np.float64) + (0 if b2 is None else b2) + (0 if u is None else u.astype(np.float64).sum(0))
        y = op("Add", [y, const("bias", c.astype(np.float32))], "y_bias")
    new_nodes.append(helper.make_node("Reshape", [y, x_shape], [node.output[0]], name=names(f"{p}/Reshape_out")))
    return new_nodes, new_inits, used


def _subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def check_config(activation: str | None, *, weights: str = "float32", gated: bool = False,
                 dynamic_k: bool = False) -> None:
    """What :func:`convert_model` would refuse, from a model's MoE recipe (moe-export checks it before the work;
    ``activation`` None: not known yet, only the rest is checked). Raises ConversionError."""
    if dynamic_k:
        raise ConversionError("--target ort-moe: dynamic k cannot be expressed (ONNX Runtime's MoE and QMoE compute "
                              "exactly k experts per token); export with a fixed --top-k")
    if activation is None:
        return
    if gated and activation != "silu":
        raise ConversionError(f"--target ort-moe: a gated FFN with activation {activation} cannot be expressed "
                              "(ONNX Runtime's CPU MoE and QMoE have only SwiGLU as a gated activation)")
    if weights == "int8" and not gated and activation != "relu":
        raise ConversionError(f"--target ort-moe: int8 experts with a plain {activation} activation cannot be "
                              "expressed (QMoE has no per-neuron second-layer scales; they fold into the first layer "
                              "only for ReLU and SwiGLU); use float32 weights, or --relufy")


def convert_model(model: onnx.ModelProto, *, exact: bool = False,
                  dequantize: bool = False) -> tuple[onnx.ModelProto, dict, list[str]]:
    """A copy of ``model`` (external data loaded) with every SparseExpertFFN node on MoE / QMoE.

    Returns the new model, {operator: count} and notes on what was approximated. Raises ConversionError.
    """
    versions = {o.domain: o.version for o in model.opset_import}
    if spec.DOMAIN in versions:
        try:
            spec.check_version(versions[spec.DOMAIN])
        except spec.SpecError as e:
            raise ConversionError(str(e)) from None
    if versions.get("", versions.get("ai.onnx", 0)) < 11:
        raise ConversionError(f"the model imports ONNX opset {versions.get('', 'none')}; the rewrite needs >= 11 "
                              "(TopK with a K input, ScatterElements)")
    for node in model.graph.node:
        if any(n.domain == spec.DOMAIN for g in _subgraphs(node) for n in g.node):
            raise ConversionError(f"node '{node.name}' ({node.op_type}) holds {spec.DOMAIN} nodes in a subgraph; "
                                  "only top-level SparseExpertFFN nodes are converted")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = _constants(graph)
    names = _Names(graph)
    nodes, added, ops, notes = [], [], {}, set()
    for i, node in enumerate(graph.node):
        if node.domain != spec.DOMAIN:
            nodes.append(node)
            continue
        if node.op_type != spec.OP_TYPE:
            raise ConversionError(f"node '{node.name}' is {node.domain}::{node.op_type}; only {spec.OP_TYPE} "
                                  "is converted")
        new_nodes, new_inits, used = _rewrite(node, i, inits, names, exact=exact, dequantize=dequantize,
                                              notes=notes)
        nodes += new_nodes
        added += new_inits
        ops[used] = ops.get(used, 0) + 1
    if not ops:
        raise ConversionError(f"the model has no {spec.OP_TYPE} node: nothing to convert")
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    _prune(graph)  # the replaced nodes' weights go, unless something else still reads them
    opsets = [o for o in out.opset_import if o.domain != spec.DOMAIN]
    if MS_DOMAIN not in versions:
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    del out.opset_import[:]
    out.opset_import.extend(opsets)
    record = {"target": "ort-moe", "ops": ops, "onnxruntime_ops": f"{MS_DOMAIN}::MoE/QMoE version 1",
              "notes": sorted(notes)}
    for prop in [p for p in out.metadata_props if p.key == TARGET_KEY]:
        out.metadata_props.remove(prop)
    out.metadata_props.add(key=TARGET_KEY, value=json.dumps(record))
    return out, ops, sorted(notes)


def convert(input_path: str | os.PathLike, output: str | os.PathLike, *, target: str = "ort-moe",
            exact: bool = False, dequantize: bool = False, check: bool = True, log=None) -> ConversionReport:
    """Convert the moefy ONNX model at ``input_path`` for ``target`` and write it to ``output``.

    The file appears only once complete and, with ``check``, after a stock ONNX Runtime session (no custom-op
    library) has loaded it. Raises ConversionError (the model cannot be expressed), OSError (files).
    """
    from .outfile import atomic_path, check_output, writing
    if target != "ort-moe":
        raise ConversionError(f"target must be ort-moe, got {target!r}")
    if not os.path.isfile(input_path):
        raise ConversionError(f"{input_path} is not a file" if os.path.exists(input_path)
                              else f"{input_path} does not exist")
    output = check_output(output)
    try:
        model = onnx.load(os.fspath(input_path))
    except Exception as e:  # noqa: BLE001 (protobuf's DecodeError and friends)
        raise ConversionError(f"{input_path} is not an ONNX model: {e}") from None
    converted, ops, notes = convert_model(model, exact=exact, dequantize=dequantize)
    del model
    big = sum(len(t.raw_data) for t in converted.graph.initializer) > EXTERNAL_DATA_BYTES
    with atomic_path(output) as tmp:
        with writing(output):
            # Over protobuf's limit the weights go beside the model, to OUT.data
            onnx.save(converted, os.fspath(tmp), save_as_external_data=big, all_tensors_to_one_file=True,
                      location=output.name + ".data")
        if check:
            import onnxruntime as ort
            if log:
                log(f"checking that a stock ONNX Runtime {ort.__version__} session loads it")
            try:
                ort.InferenceSession(os.fspath(tmp), providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 (ONNX Runtime's own exception types)
                raise ConversionError(f"ONNX Runtime {ort.__version__} does not load the converted model: {e}; "
                                      "nothing was written") from None
    return ConversionReport(str(output), sum(ops.values()), ops, notes, output.stat().st_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="moe-convert",
        description="Rewrite a moefy ONNX model (moe-export --target custom) for another runtime. ort-moe: every "
                    "SparseExpertFFN node on ONNX Runtime's com.microsoft::MoE (float32 experts) or QMoE (int8), so "
                    "the model runs on a stock ONNX Runtime with no custom-op library.")
    ap.add_argument("input", help="moefy ONNX model (moe-export output)")
    ap.add_argument("output", help="ONNX file to write")
    ap.add_argument("--target", choices=["ort-moe"], default="ort-moe", help="(default ort-moe)")
    ap.add_argument("--exact", action="store_true",
                    help="refuse what ONNX Runtime's MoE computes only approximately (the erf GELU: its 'gelu' is "
                         "the tanh form, up to 4.8e-4 apart per neuron) instead of approximating it")
    ap.add_argument("--dequantize", action="store_true",
                    help="write int8 experts as float32 MoE experts (the same numbers, four times the bytes): the "
                         "only way for plain GELU / SiLU int8 experts, whose per-neuron second-layer scales QMoE "
                         "cannot express")
    args = ap.parse_args(argv)
    from .outfile import Interrupted, interruptible
    try:
        with interruptible():
            report = convert(args.input, args.output, target=args.target, exact=args.exact,
                             dequantize=args.dequantize, log=lambda *m: print(*m, file=sys.stderr, flush=True))
    except Interrupted as e:
        print(f"moe-convert: interrupted ({e}); nothing was written", file=sys.stderr)
        return 128 + e.signum
    except (ValueError, OSError) as e:
        print(f"moe-convert: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
