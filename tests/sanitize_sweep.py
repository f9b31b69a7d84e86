"""The sanitizer job's workload (tests/test_sanitize.py runs it in a process with the library built with
-fsanitize=address,undefined): a seeded random sweep of valid problems on the C++ op and the Numba-hosted op
inside ONNX Runtime, each compared with the NumPy reference, then malformed nodes and inputs, each of which must
be refused with an error. Any sanitizer report goes to the log files the test counts; this script prints one
summary line and exits 1 on a wrong answer or an accepted malformed case.

    python tests/sanitize_sweep.py [CASES] [SEED]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_inputs, near_tie_tokens  # noqa: E402

import runtime  # noqa: E402
from runtime import numba_host, reference, spec  # noqa: E402
from runtime.single_op import single_op_model  # noqa: E402

RTOL = 2e-5


# The C++ kernels' instruction-set paths this CPU runs: valid cases take them in turn.
PATHS = [p["name"] for p in runtime.isa_paths()["paths"] if p["runs"]]


def session(model, backend: str) -> ort.InferenceSession:
    """Plain ONNX Runtime with the library registered, so the C++ binding does every check itself; backend
    "cpp:<path>" forces an instruction-set path."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2  # the binding's parallel paths too
    if backend.startswith("cpp:"):
        so.add_session_config_entry("moefy.isa", backend[4:])
    if backend == "numba":
        so.register_custom_ops_library(numba_host.register())
        numba_host.retarget(model)
    else:
        so.register_custom_ops_library(runtime.library_path())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def quantize(a: dict) -> dict:
    for name, scale in spec.SCALES.items():
        if a.get(name) is not None:
            amax = np.abs(a[name]).max(-1)
            s = np.where(amax > 0, amax / 127, 1).astype(np.float32)
            a[name], a[scale] = np.round(a[name] / s[..., None]).clip(-127, 127).astype(np.int8), s
    return a


def random_case(rng):
    lead = [(0,), (1,), (int(rng.integers(2, 9)),), (int(rng.integers(9, 140)),),
            (int(rng.integers(1, 4)), int(rng.integers(1, 20)))][int(rng.integers(5))]
    d = int(rng.choice([1, 2, 3, 7, 16, 17, 31, 48, 65, 130]))
    E, m = int(rng.integers(1, 17)), int(rng.integers(1, 50))
    a = make_inputs(rng, lead=lead, d=d, E=E, m=m, gated=bool(rng.random() < 0.4),
                    router="scores" if rng.random() < 0.3 else "weights", biases=bool(rng.random() < 0.7),
                    unselected=bool(rng.random() < 0.3))
    if a.get("router_scores") is not None and a["router_scores"].size and rng.random() < 0.2:
        a["router_scores"].reshape(-1)[rng.integers(a["router_scores"].size, size=3)] = np.nan
    kind = rng.random()
    if kind < 0.3:
        a = quantize(a)
    elif kind < 0.45:  # float16 experts (the SSE paths widen them when packing; the Numba host per session)
        a.update({n: a[n].astype(np.float16) for n in ("W1", "W2", "Wg") if a.get(n) is not None})
    k = int(rng.integers(1, E + 1))
    attrs = {"top_k": k, "activation": str(rng.choice(spec.ACTIVATIONS))}
    if rng.random() < 0.3:
        attrs.update(min_k=int(rng.integers(1, k + 1)), score_threshold=float(rng.normal()))
    feeds = ["X", "router_scores"] if rng.random() < 0.75 else [p.name for p in spec.INPUTS]  # weights per call
    return a, attrs, [f for f in feeds if a.get(f) is not None]


def sweep(cases: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    wrong = 0
    for i in range(cases):
        a, attrs, feeds = random_case(rng)
        ref = reference.sparse_expert_ffn(a, **attrs)
        keep = ~near_tie_tokens(a, attrs["top_k"], threshold=attrs.get("score_threshold")).reshape(ref.shape[:-1])
        for backend in (f"cpp:{PATHS[i % len(PATHS)]}", "numba"):
            got = session(single_op_model(a, feeds=feeds, **attrs), backend).run(None, {f: a[f] for f in feeds})[0]
            err = np.abs(got - ref)[keep].max(initial=0.0) if got.shape == ref.shape else np.inf
            if not err <= RTOL * np.abs(ref).max(initial=0.0) + 1e-6:
                wrong += 1
                print(f"case {i} ({backend}): X {a['X'].shape}, W1 {a['W1'].shape} {a['W1'].dtype}, {attrs}: "
                      f"max error {err:.3e}", file=sys.stderr)
    return wrong


def malformed(rng) -> list[tuple[str, object]]:
    """(what, model-or-(model, feed)) pairs every backend must refuse."""
    def op(a=None, feeds=("X",), cast=True, **attrs):
        a = a if a is not None else make_inputs(rng)
        attrs = {"top_k": 2, **attrs}
        feeds = [f for f in feeds if a.get(f) is not None]
        return single_op_model(a, feeds=feeds, cast=cast, **attrs), {f: a[f] for f in feeds}

    def changed(fn, **kw):
        a = make_inputs(rng, **kw)
        fn(a)
        return a

    def attribute(name, value):
        model, feed = op()
        node = model.graph.node[0]
        keep = [x for x in node.attribute if x.name != name]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.append(helper.make_attribute(name, value))
        return model, feed

    def scalar_x():
        model, _ = op()
        model.graph.input[0].CopyFrom(helper.make_tensor_value_info("X", TensorProto.FLOAT, []))
        return model, {"X": np.float32(1.0).reshape(())}

    def empty_weights(shape):
        a = make_inputs(rng)
        a["W1"] = np.zeros(shape, np.float32)
        a["W2"] = np.zeros(shape, np.float32)
        a["X"] = np.zeros((3, shape[2]), np.float32)
        a["router_w"], a["router_b"] = np.zeros((shape[0], shape[2]), np.float32), np.zeros(shape[0], np.float32)
        a.pop("B1"), a.pop("B2")
        return op(a, top_k=1)

    return [
        ("W2 shape", op(changed(lambda a: a.update(W2=a["W2"][:, :-1])))),
        ("B2 shape", op(changed(lambda a: a.update(B2=np.zeros(3, np.float32))))),
        ("router_b shape", op(changed(lambda a: a.update(router_b=np.zeros(2, np.float32))))),
        ("X last dim", op(changed(lambda a: a.update(X=np.zeros((7, 5), np.float32))))),
        ("W1 rank", op(changed(lambda a: a.update(W1=a["W1"][0])))),
        ("no router", op(changed(lambda a: [a.pop("router_w"), a.pop("router_b")]))),
        ("Bg without Wg", op(changed(lambda a: a.update(Bg=np.zeros((6, 5), np.float32))))),
        ("router_scores lead", op(changed(lambda a: a.update(router_scores=np.zeros((6, 6), np.float32)), router="scores"),
                                  feeds=("X", "router_scores"))),
        ("runtime W2 shape", op(changed(lambda a: a.update(W2=a["W2"][:, :-1])), feeds=[p.name for p in spec.INPUTS])),
        ("d = 0", empty_weights((6, 5, 0))),
        ("E = 0", empty_weights((0, 5, 8))),
        ("m = 0", empty_weights((6, 0, 8))),
        ("top_k 0", op(top_k=0)), ("top_k > E", op(top_k=7)), ("min_k 0", op(min_k=0)), ("min_k > top_k", op(min_k=3)),
        ("NaN threshold", op(score_threshold=float("nan"))), ("activation", op(activation="tanh")),
        ("expert_weighting", op(expert_weighting="softmax")),
        ("INT score_threshold", attribute("score_threshold", 0)), ("FLOAT min_k", attribute("min_k", 2.0)),
        ("INT activation", attribute("activation", 1)), ("STRING top_k", attribute("top_k", "2")),
        ("INTS min_k", attribute("min_k", [1, 2])),
        ("TENSOR score_threshold", attribute("score_threshold", numpy_helper.from_array(np.zeros(1, np.float32)))),
        ("int8 W1 without scale", op(changed(lambda a: a.update(W1=a["W1"].astype(np.int8))), cast=False)),
        ("float16 W1, float32 W2", op(changed(lambda a: a.update(W1=a["W1"].astype(np.float16))), cast=False)),
        ("scale for float W1", op(changed(lambda a: a.update(W1_scale=np.ones((6, 5), np.float32))))),
        ("float64 B1", op(changed(lambda a: a.update(B1=a["B1"].astype(np.float64))), cast=False)),
        ("int8 B1", op(changed(lambda a: a.update(B1=a["B1"].astype(np.int8))), cast=False)),
        ("rank-0 X", scalar_x()),
    ]


def refuse(cases) -> int:
    accepted = 0
    for what, (model, feed) in cases:
        for backend in ("cpp", "numba"):
            try:
                session(model.__deepcopy__({}), backend).run(None, feed)
            except Exception:  # noqa: BLE001 - any error is right; a crash or a sanitizer report is not
                continue
            accepted += 1
            print(f"malformed case accepted ({backend}): {what}", file=sys.stderr)
    return accepted


def main() -> int:
    cases = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    ort.set_default_logger_severity(4)  # the refused cases would each log an error
    wrong = sweep(cases, seed)
    bad = malformed(np.random.default_rng(seed))
    accepted = refuse(bad)
    print(f"sweep: {cases} valid problems x 2 backends, {wrong} wrong; malformed: {len(bad)} x 2 backends, "
          f"{accepted} accepted")
    return 1 if wrong or accepted else 0


if __name__ == "__main__":
    sys.exit(main())
