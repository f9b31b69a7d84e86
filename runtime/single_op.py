"""Build a one-node ONNX model of ``SparseExpertFFN`` (tests, benchmarks, kernel checks)."""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import spec


def single_op_model(arrays: Mapping[str, np.ndarray | None], *, feeds: Iterable[str] = ("X",),
                    opset: int = 17, cast: bool = True, **attrs) -> onnx.ModelProto:
    """One SparseExpertFFN node; inputs named in ``feeds`` are graph inputs, the rest initializers.

    Absent optional inputs (missing or None) become empty names, as ONNX prescribes. With ``cast``, arrays
    of a type the input does not accept become float32; without, every array keeps its type (tests).
    """
    feeds = set(feeds)
    missing = [p.name for p in spec.INPUTS if not p.optional and arrays.get(p.name) is None]
    if missing:
        raise ValueError(f"{spec.OP_TYPE} needs inputs {missing} (for graph inputs, pass an array of the right width)")
    last = max(i for i, p in enumerate(spec.INPUTS) if arrays.get(p.name) is not None)
    names, graph_inputs, inits = [], [], []
    for p in spec.INPUTS[: last + 1]:
        a = arrays.get(p.name)
        if a is None:
            names.append("")
            continue
        names.append(p.name)
        # Keep an accepted element type (int8 weights); anything else becomes float32.
        a = np.ascontiguousarray(a, a.dtype if str(a.dtype) in p.types or not cast else np.float32)
        if p.name in feeds:
            dims = ["batch"] * (a.ndim - 1) + [a.shape[-1]] if p.name in ("X", "router_scores") else list(a.shape)
            dims = [f"lead{i}" if s == "batch" else s for i, s in enumerate(dims)]
            elem = helper.np_dtype_to_tensor_dtype(a.dtype)
            graph_inputs.append(helper.make_tensor_value_info(p.name, elem, dims))
        else:
            inits.append(numpy_helper.from_array(a, p.name))
    # A float attribute given as a Python int (score_threshold=0) would become an ONNX INT, which the op refuses.
    floats = {a.name for a in spec.ATTRIBUTES if a.type == "float"}
    node = helper.make_node(spec.OP_TYPE, names, ["Y"], domain=spec.DOMAIN,
                            **{k: float(v) if k in floats and type(v) is int else v
                               for k, v in attrs.items() if v is not None})
    graph = helper.make_graph([node], "sparse_expert_ffn", graph_inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid(spec.DOMAIN, spec.VERSION)])
