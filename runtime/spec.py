"""The ``SparseExpertFFN`` operator, specified once.

Everything that knows about the operator reads it from here: the exporter (node
inputs and attributes), the NumPy reference, the Numba kernels and the C++ custom
op, whose constants header is generated from this file at build time
(``python runtime/spec.py --cpp-header OUT``). ``docs/OPS.md`` states the math.

This module must stay importable with the standard library alone, because the C++
build runs it before NumPy may be installed.

Semantics (version 2), per token ``x`` of width ``d``, ``E`` experts of ``m`` neurons::

    s      = router_scores[t]            if router_scores is given
           = router_w @ x + router_b     otherwise
    S      = indices of the top_k largest s (ties: lower expert index first, NaN last), of which the
             j-th (j = 0, 1, ...) is dropped when j >= min_k and s < score_threshold (dynamic k)
    h_e    = act(W1[e] @ x + B1[e])                             (plain)
           = act(Wg[e] @ x + Bg[e]) * (W1[e] @ x + B1[e])       (gated, e.g. SwiGLU)
    y      = B2 + sum_{e in S} W2[e].T @ h_e + sum_{e not in S} U[e]

with every selected expert weighted 1 (MoEfication); ``U`` (``unselected_bias``)
lets a model replace a skipped expert by a constant, e.g. its mean output. With the default
score_threshold (-inf) every token gets exactly top_k experts: version 1's operator. Version 2 added
min_k and score_threshold; runtimes implement versions SINCE_VERSION..VERSION.

Expert weights may be float16 (their values exactly, widened to float32 to compute: half the bytes),
or int8 with one float scale per row (weight-only quantization, since reading the weights bounds
few-token latency): W1, W2 and Wg then all are int8 and each comes with its ``*_scale`` [E, m],
meaning ``W[e, j, :] = W_scale[e, j] * W_int8[e, j, :]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Mapping, Sequence

DOMAIN = "ai.moefy"
OP_TYPE = "SparseExpertFFN"
VERSION = 2
SINCE_VERSION = 1  # version-1 models (fixed top-k) mean the same under version 2

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
EXPERT_WEIGHTINGS = ("ones",)
WEIGHT_TYPES = ("float32", "float16", "int8")  # of the expert weights W1, W2, Wg (one type for all three)


@dataclasses.dataclass(frozen=True)
class Port:
    name: str
    shape: str
    optional: bool
    doc: str
    types: tuple[str, ...] = ("float32",)  # NumPy dtype names accepted


@dataclasses.dataclass(frozen=True)
class Attribute:
    name: str
    type: str  # "int", "float" or "string"; the node attribute must have the matching ONNX type (ONNX_TYPES)
    default: object  # None: required
    allowed: tuple = ()  # strings: the accepted values
    doc: str = ""
    low: int | None = None  # ints: the smallest value
    high: str | None = None  # ints: the largest value is this size ("E") or this attribute ("top_k")


INPUTS: tuple[Port, ...] = (
    Port("X", "[..., d]", False, "hidden states, any leading shape"),
    Port("W1", "[E, m, d]", False, "first-layer (up) rows, one contiguous block per expert", WEIGHT_TYPES),
    Port("B1", "[E, m]", True, "first-layer bias (zeros if absent)"),
    Port("W2", "[E, m, d]", False, "second-layer (down) rows: W2[e, j] is neuron j's output vector", WEIGHT_TYPES),
    Port("B2", "[d]", True, "output bias (zeros if absent)"),
    Port("router_w", "[E, d]", True, "router weights; give this or router_scores"),
    Port("router_b", "[E]", True, "router bias (zeros if absent; only with router_w)"),
    Port("router_scores", "[..., E]", True, "precomputed router scores, same leading shape as X"),
    Port("Wg", "[E, m, d]", True, "gate rows of the gated form; the activation applies to the gate", WEIGHT_TYPES),
    Port("Bg", "[E, m]", True, "gate bias (only with Wg)"),
    Port("unselected_bias", "[E, d]", True, "added to the output for every expert a token did not select"),
    Port("W1_scale", "[E, m]", True, "row scales of an int8 W1 (required then, absent for float32 W1)"),
    Port("W2_scale", "[E, m]", True, "row scales of an int8 W2"),
    Port("Wg_scale", "[E, m]", True, "row scales of an int8 Wg"),
)
SCALES = {"W1": "W1_scale", "W2": "W2_scale", "Wg": "Wg_scale"}  # int8 weight -> its row scales
OUTPUTS: tuple[Port, ...] = (Port("Y", "[..., d]", False, "FFN output, same shape as X"),)
ATTRIBUTES: tuple[Attribute, ...] = (  # in dependency order: a bound names an attribute listed before it
    Attribute("top_k", "int", None, (), "experts computed per token, 1 <= top_k <= E", low=1, high="E"),
    Attribute("activation", "string", "gelu", ACTIVATIONS, "activation of the first layer (of the gate if gated)"),
    Attribute("expert_weighting", "string", "ones", EXPERT_WEIGHTINGS,
              "how selected experts are weighted; 'ones' sums them (MoEfication)"),
    Attribute("min_k", "int", 1, (), "dynamic k: experts every token keeps, 1 <= min_k <= top_k", low=1,
              high="top_k"),
    Attribute("score_threshold", "float", float("-inf"), (),
              "dynamic k: of a token's top_k experts, those after the first min_k whose score is below this are "
              "dropped (-inf: always top_k)"),
)

INPUT_INDEX = {p.name: i for i, p in enumerate(INPUTS)}
ATTRIBUTE_NAMES = tuple(a.name for a in ATTRIBUTES)
ATTRIBUTE_DEFAULTS = {a.name: a.default for a in ATTRIBUTES if a.default is not None}
# onnx.AttributeProto.AttributeType numbers (this module must not import onnx): the spec's types, then the others
# by name for messages.
ONNX_TYPES = {"float": 1, "int": 2, "string": 3}
ONNX_TYPE_NAMES = {0: "UNDEFINED", 1: "FLOAT", 2: "INT", 3: "STRING", 4: "TENSOR", 5: "GRAPH", 6: "FLOATS", 7: "INTS",
                   8: "STRINGS", 9: "TENSORS", 10: "GRAPHS", 11: "SPARSE_TENSOR", 12: "SPARSE_TENSORS",
                   13: "TYPE_PROTO", 14: "TYPE_PROTOS"}


class SpecError(ValueError):
    """Inputs or attributes that break the operator's contract."""


@dataclasses.dataclass(frozen=True)
class Dims:
    tokens: int  # product of X's leading dimensions
    d: int
    experts: int
    m: int


def _fmt(shape: Sequence[int] | None) -> str:
    return "absent" if shape is None else "[" + ", ".join(str(int(s)) for s in shape) + "]"


def check(shapes: Mapping[str, Sequence[int] | None], attrs: Mapping[str, object],
          dtypes: Mapping[str, str] | None = None) -> Dims:
    """Validate input shapes (name -> shape or None), attributes and, when given, element types
    (name -> NumPy dtype name); return the problem sizes.

    The C++ kernel enforces the same rules with the same wording (cpp_ops/ort/).
    """
    if dtypes is not None:
        check_types(dtypes)
    get = lambda n: None if shapes.get(n) is None else tuple(int(s) for s in shapes[n])  # noqa: E731
    x, w1, w2 = get("X"), get("W1"), get("W2")
    for name, s in (("X", x), ("W1", w1), ("W2", w2)):
        if s is None:
            raise SpecError(f"{OP_TYPE}: input {name} is required")
    if len(x) < 1:
        raise SpecError(f"{OP_TYPE}: X must have rank >= 1, got shape {_fmt(x)}")
    if len(w1) != 3:
        raise SpecError(f"{OP_TYPE}: W1 must be [E, m, d], got {_fmt(w1)}")
    E, m, d = w1
    if x[-1] != d:
        raise SpecError(f"{OP_TYPE}: last dim of X {_fmt(x)} must equal d={d} of W1 {_fmt(w1)}")
    expect = {
        "W2": (E, m, d), "B1": (E, m), "B2": (d,), "router_w": (E, d), "router_b": (E,),
        "Wg": (E, m, d), "Bg": (E, m), "unselected_bias": (E, d),
        "router_scores": tuple(x[:-1]) + (E,),
        "W1_scale": (E, m), "W2_scale": (E, m), "Wg_scale": (E, m),
    }
    for name, want in expect.items():
        got = get(name)
        if got is not None and got != want:
            raise SpecError(f"{OP_TYPE}: {name} must have shape {_fmt(want)} (from X {_fmt(x)}, "
                            f"W1 {_fmt(w1)}), got {_fmt(got)}")
    has_w, has_s = get("router_w") is not None, get("router_scores") is not None
    if has_w == has_s:
        raise SpecError(f"{OP_TYPE}: give exactly one of router_w and router_scores "
                        f"(got {'both' if has_w else 'neither'})")
    if get("router_b") is not None and not has_w:
        raise SpecError(f"{OP_TYPE}: router_b needs router_w")
    if get("Bg") is not None and get("Wg") is None:
        raise SpecError(f"{OP_TYPE}: Bg needs Wg")
    if E < 1 or m < 1:
        raise SpecError(f"{OP_TYPE}: W1 {_fmt(w1)} must have at least one expert and one neuron")
    if d < 1:  # an FFN of width 0 has no meaning; refused rather than answered with an empty Y
        raise SpecError(f"{OP_TYPE}: d (the last dim of X and W1) must be >= 1, got X {_fmt(x)}, W1 {_fmt(w1)}")
    check_attributes(attrs, E)
    return Dims(tokens=math.prod(x[:-1]), d=d, experts=E, m=m)


def check_attributes(attrs: Mapping[str, object], experts: int | None = None) -> None:
    """Attribute values (name -> Python value; absent: the default): names, value types, allowed strings, NaN, and
    with ``experts`` (E) the integer ranges, all of which depend on E or on top_k. A bool is not an integer here.

    The C++ op checks the same with the same words (cpp_ops/ort/attributes.cc): everything but the ranges once per
    session, the ranges per call.
    """
    unknown = [n for n in attrs if n not in ATTRIBUTE_NAMES]
    if unknown:
        raise SpecError(f"{OP_TYPE}: unknown attribute(s) {', '.join(map(repr, unknown))}; the operator's attributes "
                        f"are {', '.join(ATTRIBUTE_NAMES)}")
    values: dict[str, object] = {}
    for a in ATTRIBUTES:
        v = values[a.name] = attrs.get(a.name, a.default)
        if a.type == "int":
            if experts is None:
                continue
            high = experts if a.high == "E" else values[a.high]
            if not isinstance(v, int) or isinstance(v, bool) or not a.low <= v <= high:
                raise SpecError(f"{OP_TYPE}: {a.name} must be an integer in [{a.low}, {a.high}={high}], got {v!r}")
        elif a.type == "float":
            if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
                raise SpecError(f"{OP_TYPE}: {a.name} must be a number (not NaN), got {v!r}")
        elif v not in a.allowed:
            raise SpecError(f"{OP_TYPE}: {a.name} must be one of {', '.join(a.allowed)}; got {v!r}")


def node_attributes(node) -> dict:
    """The attributes of a SparseExpertFFN node (an ``onnx.NodeProto``), defaults filled in, as every backend reads
    them: each must have the spec's ONNX type (an INT ``score_threshold`` is refused, never read as the default),
    unknown and repeated names are refused, and ``check_attributes`` runs on the result (the ranges, which need E,
    are checked with the inputs). The C++ op reads them the same way (cpp_ops/ort/attributes.cc)."""
    by_name = {a.name: a for a in ATTRIBUTES}
    got: dict[str, object] = {}
    for proto in node.attribute:
        a = by_name.get(proto.name)
        if a is None:
            raise SpecError(f"{OP_TYPE}: unknown attribute '{proto.name}'; the operator's attributes are "
                            f"{', '.join(ATTRIBUTE_NAMES)}")
        if proto.name in got:
            raise SpecError(f"{OP_TYPE}: attribute {proto.name} is given twice")
        if proto.type != ONNX_TYPES[a.type]:
            raise SpecError(f"{OP_TYPE}: attribute {a.name} must be of ONNX type {ONNX_TYPE_NAMES[ONNX_TYPES[a.type]]}"
                            f", got {ONNX_TYPE_NAMES.get(proto.type, f'type {proto.type}')}")
        got[a.name] = proto.i if a.type == "int" else proto.f if a.type == "float" else \
            proto.s.decode("utf-8", "replace")
    for a in ATTRIBUTES:
        if a.default is None and a.name not in got:
            raise SpecError(f"{OP_TYPE}: attribute {a.name} is required")
    attrs = {**ATTRIBUTE_DEFAULTS, **got}
    check_attributes(attrs)
    return attrs


def check_version(version: int) -> None:
    """A model's ``DOMAIN`` opset version must be one this runtime implements. ONNX Runtime cannot tell a custom op
    which version a model imports (every version >= the op's first resolves to the same schema and kernel), so
    runtime.InferenceSession checks it for every backend before ONNX Runtime sees the model."""
    if not SINCE_VERSION <= version <= VERSION:
        raise SpecError(f"{OP_TYPE}: the model uses {DOMAIN} version {version}; this moefy implements versions "
                        f"{SINCE_VERSION} to {VERSION}" + (": upgrade moefy" if version > VERSION else ""))


def one_of(names: Sequence[str]) -> str:
    """'a', 'a or b', 'a, b or c': how messages list what is accepted."""
    return " or ".join(filter(None, (", ".join(names[:-1]), names[-1])))


def check_types(dtypes: Mapping[str, str | None]) -> None:
    """Element types of the present inputs (name -> NumPy dtype name, None if absent)."""
    for p in INPUTS:
        t = dtypes.get(p.name)
        if t is not None and t not in p.types:
            raise SpecError(f"{OP_TYPE}: {p.name} must be {one_of(p.types)}, got {t}")
    w = dtypes.get("W1")
    for name, scale in SCALES.items():
        t = dtypes.get(name)
        if t is not None and t != w:
            raise SpecError(f"{OP_TYPE}: W1, W2 and Wg must have one element type, got W1 {w} and {name} {t}")
        if t == "int8" and dtypes.get(scale) is None:
            raise SpecError(f"{OP_TYPE}: int8 {name} needs {scale} (one float scale per row)")
        if t != "int8" and dtypes.get(scale) is not None:
            raise SpecError(f"{OP_TYPE}: {scale} is only for an int8 {name}")


def check_arrays(inputs: Mapping[str, object], attrs: Mapping[str, object]) -> tuple[dict, Dims]:
    """``check`` for a mapping of input name -> array (anything with ``.shape``) or None; returns the
    attributes with defaults filled in, and the problem sizes."""
    attrs = {**ATTRIBUTE_DEFAULTS, **attrs}
    shapes = {n: None if inputs.get(n) is None else tuple(inputs[n].shape) for n in INPUT_INDEX}
    dtypes = {n: None if inputs.get(n) is None else str(inputs[n].dtype) for n in INPUT_INDEX}
    return attrs, check(shapes, attrs, dtypes)


# The Numba host ABI (runtime/numba_host.py <-> cpp_ops/ort/numba_host.cc): the library also registers the
# op under NUMBA_HOST_DOMAIN, computed by Numba callbacks on ONNX Runtime's threads. Each callback gets an
# int64 array: NUMBA_HOST_FIELDS, then one address (0 if absent) per input of INPUTS.
NUMBA_HOST_DOMAIN = "ai.moefy.numba"
NUMBA_HOST_FIELDS = ("tokens", "d", "experts", "m", "top_k", "min_k", "score_threshold", "activation", "workers",
                     "weight_int8", "scratch", "y")  # score_threshold: the bits of a float64
NUMBA_HOST_ABI_VERSION = 2


def cpp_header() -> str:
    """C++ constants for cpp_ops, generated so that the C++ op cannot drift from this file."""
    q = lambda s: '"' + s + '"'  # noqa: E731
    lines = [
        "// Generated from runtime/spec.py by the build. Do not edit.",
        "#pragma once",
        "#include <cstddef>",
        "namespace moefy::spec {",
        f"inline constexpr const char* kDomain = {q(DOMAIN)};",
        f"inline constexpr const char* kOpType = {q(OP_TYPE)};",
        f"inline constexpr int kVersion = {VERSION};",
        f"inline constexpr int kSinceVersion = {SINCE_VERSION};",
        "enum Attribute : int { " + ", ".join(f"kAttr_{a.name} = {i}" for i, a in enumerate(ATTRIBUTES)) + " };",
        f"inline constexpr std::size_t kNumAttributes = {len(ATTRIBUTES)};",
        "enum class AttributeType : int { kInt, kFloat, kString };",
        "inline constexpr AttributeType kAttributeTypes[] = {"
        + ", ".join(f"AttributeType::k{a.type.capitalize()}" for a in ATTRIBUTES) + "};",
        "inline constexpr const char* kAttributeOnnxTypes[] = {"
        + ", ".join(q(ONNX_TYPE_NAMES[ONNX_TYPES[a.type]]) for a in ATTRIBUTES) + "};",
        "inline constexpr bool kAttributeRequired[] = {" + ", ".join(str(a.default is None).lower() for a in ATTRIBUTES)
        + "};",
        "// ints: the smallest value, and the name of the size or attribute that is the largest",
        "inline constexpr long kAttributeLow[] = {" + ", ".join(str(a.low or 0) for a in ATTRIBUTES) + "};",
        "inline constexpr const char* kAttributeHigh[] = {" + ", ".join(q(a.high or "") for a in ATTRIBUTES) + "};",
        f"inline constexpr long kDefaultMinK = {ATTRIBUTE_DEFAULTS['min_k']};",
        f"inline constexpr std::size_t kNumInputs = {len(INPUTS)};",
        f"inline constexpr std::size_t kNumOutputs = {len(OUTPUTS)};",
        "enum Input : int { " + ", ".join(f"k{p.name} = {i}" for i, p in enumerate(INPUTS)) + " };",
        "inline constexpr const char* kInputNames[] = {" + ", ".join(q(p.name) for p in INPUTS) + "};",
        "inline constexpr bool kInputOptional[] = {" + ", ".join(str(p.optional).lower() for p in INPUTS) + "};",
        "inline constexpr bool kInputIsExpertWeight[] = {" + ", ".join(str(p.types == WEIGHT_TYPES).lower() for p in INPUTS)
        + "};",
        f"inline constexpr const char* kWeightTypes = {q(one_of(WEIGHT_TYPES))};",
        "inline constexpr const char* kOutputNames[] = {" + ", ".join(q(p.name) for p in OUTPUTS) + "};",
        "inline constexpr const char* kAttributeNames[] = {" + ", ".join(q(a.name) for a in ATTRIBUTES) + "};",
        "inline constexpr const char* kActivations[] = {" + ", ".join(q(a) for a in ACTIVATIONS) + "};",
        f"inline constexpr std::size_t kNumActivations = {len(ACTIVATIONS)};",
        f"inline constexpr const char* kDefaultActivation = {q(ATTRIBUTE_DEFAULTS['activation'])};",
        "inline constexpr const char* kExpertWeightings[] = {" + ", ".join(q(a) for a in EXPERT_WEIGHTINGS) + "};",
        f"inline constexpr const char* kNumbaHostDomain = {q(NUMBA_HOST_DOMAIN)};",
        f"inline constexpr long kNumbaHostAbiVersion = {NUMBA_HOST_ABI_VERSION};",
        "enum NumbaHostField : int { " + ", ".join(f"kHost_{n} = {i}" for i, n in enumerate(NUMBA_HOST_FIELDS))
        + f", kNumHostFields = {len(NUMBA_HOST_FIELDS)} }};",
        "}  // namespace moefy::spec",
        "",
    ]
    return "\n".join(lines)


def markdown_table() -> str:
    """The operator's inputs and attributes as Markdown (README / docs/OPS.md)."""
    rows = ["| # | input | shape | type | optional | meaning |", "|---|---|---|---|---|---|"]
    rows += [f"| {i} | `{p.name}` | `{p.shape}` | {one_of(p.types)} | {'yes' if p.optional else 'no'} | {p.doc} |"
             for i, p in enumerate(INPUTS)]
    rows += ["", "| attribute | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    rows += [f"| `{a.name}` | {a.type} | {'required' if a.default is None else repr(a.default)} | "
             f"{', '.join(a.allowed) or '—'} | {a.doc} |" for a in ATTRIBUTES]
    return "\n".join(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpp-header", metavar="OUT", help="write the C++ constants header to OUT")
    ap.add_argument("--markdown", action="store_true", help="print the operator table as Markdown")
    args = ap.parse_args()
    if args.cpp_header:
        with open(args.cpp_header, "w") as f:
            f.write(cpp_header())
    if args.markdown:
        sys.stdout.write(markdown_table() + "\n")
