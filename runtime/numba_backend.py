"""Numba backend: the graph cut at each SparseExpertFFN node.

The model's standard parts run as ONNX Runtime sessions and the sparse FFNs between them run as
Numba kernels on the NumPy arrays ONNX Runtime returns, so tensors cross no Python lists (as
onnxruntime-extensions' PyOp would) and no C++ library is needed. Both engines take turns on
all cores; ONNX Runtime's spinning is off so its idle threads do not steal cycles from Numba's.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor

from . import numba_kernels, spec

_ORT_TO_ONNX = {f"tensor({name})": getattr(TensorProto, key) for name, key in (
    ("float", "FLOAT"), ("double", "DOUBLE"), ("float16", "FLOAT16"), ("int64", "INT64"), ("int32", "INT32"),
    ("int8", "INT8"), ("uint8", "UINT8"), ("bool", "BOOL"))}


def is_sparse_ffn(node: onnx.NodeProto) -> bool:
    return node.domain == spec.DOMAIN and node.op_type == spec.OP_TYPE


class _OrtSegment:
    def __init__(self, sess: ort.InferenceSession, inputs: list[str], outputs: list[str]):
        self.sess, self.inputs, self.outputs = sess, inputs, outputs

    def __call__(self, env: dict) -> None:
        env.update(zip(self.outputs, self.sess.run(self.outputs, {n: env[n] for n in self.inputs})))


class _MoESegment:
    def __init__(self, node: onnx.NodeProto, constants: dict[str, np.ndarray]):
        # What ONNX Runtime's schema check refuses for the other backends, and the attributes as they read them.
        where = f"{spec.OP_TYPE} node '{node.name or node.output[0]}'"
        if len(node.input) > len(spec.INPUTS):
            raise spec.SpecError(f"{where} has {len(node.input)} inputs; the operator takes at most {len(spec.INPUTS)} "
                                 f"({', '.join(p.name for p in spec.INPUTS)})")
        if len(node.output) != len(spec.OUTPUTS) or not node.output[0]:
            raise spec.SpecError(f"{where} has outputs {list(node.output)}; the operator has one output "
                                 f"({spec.OUTPUTS[0].name})")
        self.attrs = spec.node_attributes(node)
        self.y = node.output[0]
        # Constant inputs (initializers, X included) are converted once, here; the others come from the graph.
        self.dynamic, self.weights = {}, {}
        for port, tensor in zip(spec.INPUTS, node.input):
            if not tensor:
                continue
            if tensor in constants:
                a = constants[tensor]  # int8 weights stay int8; float16 ones are widened once, here, not per call
                self.weights[port.name] = np.ascontiguousarray(a, np.float32 if a.dtype == np.float16 else a.dtype)
            else:
                self.dynamic[port.name] = tensor

    def __call__(self, env: dict) -> None:
        inputs = {**self.weights, **{k: env[v] for k, v in self.dynamic.items()}}
        env[self.y] = numba_kernels.sparse_expert_ffn(inputs, **self.attrs)


def _to_array(tensor: onnx.TensorProto) -> np.ndarray:
    try:
        return numpy_helper.to_array(tensor)
    except Exception as e:  # NumPy's reshape error names no tensor
        raise ValueError(f"initializer '{tensor.name}' does not hold the data its dims {list(tensor.dims)} and "
                         f"type declare ({type(e).__name__}: {e})") from None


class NumbaGraphSession:
    """Runs a model holding SparseExpertFFN nodes with ONNX Runtime + Numba (no custom-op library)."""

    def __init__(self, model: onnx.ModelProto, make_options: Callable[[], ort.SessionOptions],
                 base_dir: str | None = None):
        """``base_dir``: where the model's external data is, when it was loaded without it (only initializers that
        nodes use are read)."""
        graph = model.graph
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        initializers = {t.name: t for t in graph.initializer if t.name in used}
        for t in initializers.values():
            if base_dir is not None and t.data_location == TensorProto.EXTERNAL:
                load_external_data_for_tensor(t, base_dir)
                t.data_location = TensorProto.DEFAULT
                del t.external_data[:]
        moe_inputs = {i for n in graph.node if is_sparse_ffn(n) for i in n.input}
        constants = {name: _to_array(t) for name, t in initializers.items() if name in moe_inputs}
        chunks: list[list[onnx.NodeProto] | onnx.NodeProto] = [[]]
        for node in graph.node:
            if is_sparse_ffn(node):
                chunks += [node, []]
            else:
                chunks[-1].append(node)

        # A tensor crosses a cut if a later chunk (or the caller) needs it.
        needed_after: list[set[str]] = []
        later = {o.name for o in graph.output}
        for chunk in reversed(chunks):
            needed_after.append(set(later))
            for node in chunk if isinstance(chunk, list) else [chunk]:
                later.update(node.input)
        needed_after.reverse()

        types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
        self.steps: list[Callable[[dict], None]] = []
        for chunk, after in zip(chunks, needed_after):
            if not isinstance(chunk, list):
                self.steps.append(_MoESegment(chunk, constants))
                types[chunk.output[0]] = TensorProto.FLOAT
                continue
            if not chunk:
                continue
            produced = {o for n in chunk for o in n.output if o}
            consumed = [i for n in chunk for i in n.input if i]
            inputs = list(dict.fromkeys(i for i in consumed if i not in produced and i not in initializers))
            outputs = [o for o in dict.fromkeys(o for n in chunk for o in n.output) if o and o in after]
            sub = helper.make_graph(
                chunk, f"segment{len(self.steps)}",
                [helper.make_tensor_value_info(n, types[n], None) for n in inputs],
                [helper.make_empty_tensor_value_info(n) for n in outputs],
                [initializers[i] for i in dict.fromkeys(consumed) if i in initializers])
            sub_model = helper.make_model(sub, opset_imports=[o for o in model.opset_import if o.domain != spec.DOMAIN],
                                          ir_version=model.ir_version)
            sess = ort.InferenceSession(sub_model.SerializeToString(), make_options(),
                                        providers=["CPUExecutionProvider"])
            types.update({o.name: _ORT_TO_ONNX[o.type] for o in sess.get_outputs()})
            self.steps.append(_OrtSegment(sess, inputs, outputs))
        self.n_cuts = sum(isinstance(s, _MoESegment) for s in self.steps)

    def run(self, output_names: Sequence[str], feed: dict) -> list[np.ndarray]:
        env = dict(feed)
        for step in self.steps:
            step(env)
        return [env[n] for n in output_names]
