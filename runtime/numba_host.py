"""The Numba kernels as ONNX Runtime kernels: C callbacks the C++ library's ``ai.moefy.numba`` op calls.

The graph-cut backend (numba_backend.py) alternates two thread pools: ONNX Runtime must stop spinning
so its idle threads leave the cores to Numba's, which costs every standard op ~20%, and each call
first wakes Numba's sleeping threads. Here the library's host op does what the C++ op does
(checks, output allocation, ONNX Runtime's thread pool) but each phase of the work is a Numba
``cfunc`` running the same functions as numba_kernels._ffn: route and reduce per token range,
plan once, experts per worker. One session, one pool, spinning on.

The C ABI is in runtime/spec.py (NUMBA_HOST_*, generated into the C++ header): every phase gets
``const int64_t* call``; ``scratch`` holds ``scratch_bytes(call)`` bytes laid out by _layout.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic, overload
from onnx import helper

from . import spec
from .library import library_path
from .numba_kernels import (_TOKEN_BLOCK, _experts, _init_output, _max_blocks, _plan, _reduce, _route,
                            _token_range)

# Positions in the call array, as module constants (Numba compiles them in).
_FIELD = {name: i for i, name in enumerate(spec.NUMBA_HOST_FIELDS)}
_T, _D, _E, _M, _K, _MIN_K, _THRESHOLD, _ACT, _WORKERS, _INT8, _SCRATCH, _Y = (_FIELD[n] for n in (
    "tokens", "d", "experts", "m", "top_k", "min_k", "score_threshold", "activation", "workers", "weight_int8",
    "scratch", "y"))
_X, _W1, _B1, _W2, _B2, _RW, _RB, _RS, _WG, _BG, _UB, _W1S, _W2S, _WGS = (len(_FIELD) + spec.INPUT_INDEX[n] for n in (
    "X", "W1", "B1", "W2", "B2", "router_w", "router_b", "router_scores", "Wg", "Bg", "unselected_bias", "W1_scale",
    "W2_scale", "Wg_scale"))
_CALL_LEN = len(_FIELD) + len(spec.INPUTS)
# The scratch arrays, in _layout's order.
_S_SCORES, _S_SEL, _S_TOKENS, _S_START, _S_B_E, _S_B_BEGIN, _S_B_N, _S_ORDER, _S_OWNER, _S_META, _S_PARTIAL, _S_H, \
    _S_G = range(13)
_ALIGN = 64


@intrinsic
def _ptr(typingctx, addr, like):
    """The address ``addr`` as a pointer to ``like``'s element type (for numba.carray)."""
    sig = types.CPointer(like.dtype)(types.int64, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
    return sig, codegen


_F32 = np.zeros(0, np.float32)
_I8 = np.zeros(0, np.int8)
_I32 = np.zeros(0, np.int32)
_I64 = np.zeros(0, np.int64)


@njit(cache=True)
def _dims(c):
    return c[_T], c[_D], c[_E], c[_M], c[_K]


@njit(cache=True)
def _layout(c):
    """Byte offsets in scratch of the _S_* arrays (64-byte aligned), then the total."""
    T, d, E, m, k = _dims(c)
    W = c[_WORKERS]
    mp = (m + 15) // 16 * 16
    nbmax = _max_blocks(T, k, E)
    gated = c[_WG] != 0
    sizes = (T * E * 4, T * k * 4, T * k * 4, (E + 1) * 8, nbmax * 8, nbmax * 8, nbmax * 8, nbmax * 8, nbmax * 8,
             2 * 8, (W - 1) * T * d * 4, W * _TOKEN_BLOCK * mp * 4, W * _TOKEN_BLOCK * mp * 4 if gated else 0)
    offsets = np.zeros(len(sizes) + 1, np.int64)
    for i in range(len(sizes)):
        offsets[i + 1] = offsets[i] + (sizes[i] + _ALIGN - 1) // _ALIGN * _ALIGN
    return offsets


@njit(cache=True)
def _scratch(c, i, shape, like):
    """View i of the scratch layout."""
    return carray(_ptr(c[_SCRATCH] + _layout(c)[i], like), shape)


def _empty_shape(shape):
    """(0, ..., 0) of shape's rank."""


@overload(_empty_shape)
def _empty_shape_impl(shape):
    return {1: lambda shape: (0,), 2: lambda shape: (0, 0), 3: lambda shape: (0, 0, 0)}[shape.count]


@njit(cache=True)
def _in(c, field, shape, like):
    """An input's array, or an empty one of the same rank when it is absent."""
    a = c[field]
    return carray(_ptr(a, like), shape if a != 0 else _empty_shape(shape))


@njit(cache=True)
def _routing(c):
    T, d, E, m, k = _dims(c)
    computed = c[_RS] == 0
    s = _scratch(c, _S_SCORES, (T, E), _F32) if computed else _in(c, _RS, (T, E), _F32)
    return s, computed, _scratch(c, _S_SEL, (T, k), _I32)


@njit(cache=True)
def _blocks(c):
    T, d, E, m, k = _dims(c)
    nbmax = _max_blocks(T, k, E)
    return (_scratch(c, _S_TOKENS, (T * k,), _I32), _scratch(c, _S_START, (E + 1,), _I64),
            _scratch(c, _S_B_E, (nbmax,), _I64), _scratch(c, _S_B_BEGIN, (nbmax,), _I64),
            _scratch(c, _S_B_N, (nbmax,), _I64), _scratch(c, _S_ORDER, (nbmax,), _I64),
            _scratch(c, _S_OWNER, (nbmax,), _I64), _scratch(c, _S_META, (2,), _I64))


@njit(cache=True)
def _y(c):
    T, d, E, m, k = _dims(c)
    return carray(_ptr(c[_Y], _F32), (T, d))


@njit(cache=True, error_model="numpy", fastmath=True)
def _experts_typed(c, w, like):
    """Worker w's share, the expert weights viewed with ``like``'s element type (float32 or int8)."""
    T, d, E, m, k = _dims(c)
    mp = (m + 15) // 16 * 16
    tokens, start, b_e, b_begin, b_n, order, owner, meta = _blocks(c)
    nb, W = meta[0], meta[1]
    if w >= W:
        return
    x = _in(c, _X, (T, d), _F32)
    gated = c[_WG] != 0
    g = _scratch(c, _S_G, (W, _TOKEN_BLOCK, mp), _F32)[w] if gated else np.empty((0, 0), np.float32)
    out = _y(c) if w == 0 else _scratch(c, _S_PARTIAL, (W - 1, T, d), _F32)[w - 1]
    _experts(w, x, _in(c, _W1, (E, m, d), like), _in(c, _B1, (E, m), _F32),
             _in(c, _W2, (E, m, d), like), _in(c, _WG, (E, m, d), like), _in(c, _BG, (E, m), _F32),
             _in(c, _UB, (E, d), _F32), _in(c, _W1S, (E, m), _F32),
             _in(c, _W2S, (E, m), _F32), _in(c, _WGS, (E, m), _F32), c[_ACT],
             tokens, b_e, b_begin, b_n, order, owner, nb, out, _scratch(c, _S_H, (W, _TOKEN_BLOCK, mp), _F32)[w], g)


_CALL = types.CPointer(types.int64)


@cfunc(types.int64(_CALL), cache=True)
def _scratch_bytes_c(call):
    return _layout(carray(call, (_CALL_LEN,)))[-1]


@cfunc(types.void(_CALL, types.int64, types.int64), cache=True, error_model="numpy")
def _route_c(call, part, parts):
    c = carray(call, (_CALL_LEN,))
    T, d, E, m, k = _dims(c)
    t0, t1 = _token_range(T, part, parts)
    s, computed, sel = _routing(c)
    threshold = np.float32(c[_THRESHOLD:_THRESHOLD + 1].view(np.float64)[0])
    _route(_in(c, _X, (T, d), _F32), _in(c, _RW, (E, d), _F32), _in(c, _RB, (E,), _F32), k, c[_MIN_K], threshold,
           s, computed, sel, t0, t1)


@cfunc(types.int64(_CALL), cache=True, error_model="numpy")
def _plan_c(call):
    c = carray(call, (_CALL_LEN,))
    T, d, E, m, k = _dims(c)
    s, computed, sel = _routing(c)
    tokens, start, b_e, b_begin, b_n, order, owner, meta = _blocks(c)
    meta[0], meta[1] = _plan(sel, E, c[_WORKERS], start, tokens, b_e, b_begin, b_n, order, owner)
    _init_output(_y(c), _in(c, _B2, (d,), _F32), _in(c, _UB, (E, d), _F32))
    return meta[1]


@cfunc(types.void(_CALL, types.int64), cache=True, error_model="numpy")
def _experts_c(call, w):
    c = carray(call, (_CALL_LEN,))
    if c[_INT8]:
        _experts_typed(c, w, _I8)
    else:
        _experts_typed(c, w, _F32)


@cfunc(types.void(_CALL, types.int64, types.int64), cache=True, error_model="numpy")
def _reduce_c(call, part, parts):
    c = carray(call, (_CALL_LEN,))
    T, d, E, m, k = _dims(c)
    meta = _blocks(c)[-1]
    W = meta[1]
    if W > 1:
        t0, t1 = _token_range(T, part, parts)
        _reduce(_y(c), _scratch(c, _S_PARTIAL, (W - 1, T, d), _F32), W, t0, t1)


class _Kernels(ctypes.Structure):
    _fields_ = [("abi_version", ctypes.c_int64), ("call_len", ctypes.c_int64)] + [
        (name, ctypes.c_void_p) for name in ("scratch_bytes", "route", "plan", "experts", "reduce")]


@functools.cache
def register() -> str:
    """Compile (or load from Numba's cache) the phase kernels and hand their addresses to the C++ library,
    once per process. Returns the library's path, to register with a session."""
    path = library_path()
    table = _Kernels(spec.NUMBA_HOST_ABI_VERSION, _CALL_LEN, _scratch_bytes_c.address, _route_c.address, _plan_c.address,
                     _experts_c.address, _reduce_c.address)
    lib = ctypes.CDLL(path)  # the same handle ONNX Runtime's dlopen of this path gets
    lib.moefy_set_numba_kernels.argtypes = [ctypes.POINTER(_Kernels)]
    lib.moefy_set_numba_kernels.restype = ctypes.c_char_p
    error = lib.moefy_set_numba_kernels(ctypes.byref(table))
    if error:
        raise RuntimeError(f"moefy C++ library {path} refused the Numba kernels: {error.decode()}")
    register.table = table  # the library keeps this pointer: keep the table alive
    return path


def retarget(model) -> None:
    """Point the model's SparseExpertFFN nodes (in place) at the op computed by these kernels."""
    for node in model.graph.node:
        if node.domain == spec.DOMAIN and node.op_type == spec.OP_TYPE:
            node.domain = spec.NUMBA_HOST_DOMAIN
    if not any(o.domain == spec.NUMBA_HOST_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(spec.NUMBA_HOST_DOMAIN, spec.VERSION))
