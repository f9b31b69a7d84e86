"""The sparse FFN operator alone against the dense FFN, side by side in one process.

Backends (same experts, same router, one process, timed in rotating blocks: benchmarks/timing.py):
  dense ORT     MatMul + Add + Gelu + MatMul + Add in ONNX Runtime (fused to BiasGelu by ORT)
  moefy cpp X   SparseExpertFFN through the C++ custom-op library, instruction-set path X (--isa: avx512, avx2,
                sse2, neon; each forced in turn, so every path this CPU runs can be compared in one run)
  moefy numba   the Numba kernels inside ONNX Runtime (runtime.InferenceSession(backend="numba"))
  moefy numba-split  the Numba kernels called from Python on Numba's own threads (backend="numba-split")
  ... float16   the same with float16 expert weights (moe-export --weights float16)
  ... int8      the same with int8 expert weights and row scales (moe-export --weights int8)
  moefy std     the standard-ONNX export (TopK + masked dense; portable, computes every expert)
  ORT MoE       ONNX Runtime's own com.microsoft::MoE (int8: QMoE) computing the same function: the op's model
                through moe-convert --target ort-moe (exporter/ort_moe.py; the erf GELU as its tanh form; int8
                plain GELU has no QMoE form and no row)
  torch eager   a per-expert index_select loop in PyTorch

Methodology after optimum-benchmark: >= 10 warm-up runs, >= 10 timed runs and >= --min-seconds per case,
p50/p90, thread count per row, machine described in the output. Every call takes the next of --inputs
different inputs, so the experts chosen change from call to call as with real traffic; --cold also evicts
the caches before every timed call (a layer of a real model finds its weights in DRAM, not in the last-level
cache). --background-load N times every case twice, quiet and with N CPU-bound processes running (a desktop
app shares the CPU with other programs), each ratio against dense under the same load. Writes bench_ops.json,
bench_ops.md and bench_ops.png into --out.

    python benchmarks/bench_ops.py --out out            # full sweep (a few minutes)
    python benchmarks/bench_ops.py --shapes minilm --tokens 1 128 --threads 2 --shares 0.25
    python benchmarks/bench_ops.py --shapes 4096x11008 --shares 0.25 --isa avx512 avx2 --background-load 1
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import runtime
from runtime.session import default_options
from runtime import spec
from runtime.single_op import single_op_model
from timing import (BandwidthProbe, CacheEvictor, background_load, last_level_cache_bytes, machine, p50_p90,
                    stream_bandwidth, time_blocks)

from exporter.quantize import quantize_experts

SHAPES = {"minilm": (384, 1536), "bert-base": (768, 3072), "smollm2": (576, 1536), "4096x11008": (4096, 11008)}
BACKENDS = ["cpp", "numba", "numba-split", "std", "ort-moe", "torch"]
EXPERTS = 32  # default --experts
TORCH_GELU = torch.nn.functional.gelu


def ffn_flops(tokens: int, d: int, width: int) -> float:
    """Multiply-adds x 2 of a dense FFN over ``tokens`` tokens (the op does share x this)."""
    return 4.0 * tokens * d * width


def touched_share(w: dict, xs: list[np.ndarray], k: int) -> float:
    """Mean share of the experts that at least one token of a call selects: the share of the expert weights
    a call must read, however well the kernel reuses them across tokens."""
    shares = []
    for x in xs:
        sel = np.argsort(-(x @ w["router_w"].T + w["router_b"]), axis=1, kind="stable")[:, :k]
        shares.append(np.unique(sel).size / w["router_w"].shape[0])
    return float(np.mean(shares))


def add_ceilings(rows: list[dict], share: float, expert_bytes: int, from_dram: bool) -> None:
    """Each row's ceiling: the compute bound 1/share, or, when lower, the memory bound: a call that touches
    the share u of the experts (``expert_bytes`` in float32, half with float16, a quarter with int8) reads at least
    that many bytes, at no more than the DRAM bandwidth measured beside it (the row's ``dram_bytes_per_s``). Without
    ``from_dram`` the weights come from the cache (no DRAM bound)."""
    for r in rows:
        if r["backend"] == "dense ORT":
            r["ceiling"] = None
            continue
        dense = next(d["p50_us"] for d in rows if d["backend"] == "dense ORT" and d["tokens"] == r["tokens"]
                     and d.get("background_load", 0) == r.get("background_load", 0))
        if not from_dram:
            r["ceiling"] = 1 / share
            continue
        bandwidth = r["dram_bytes_per_s"]
        scale = next((f for w, f in (("int8", 0.25), ("float16", 0.5)) if w in r["backend"]), 1.0)  # of float32's
        floor_us = 1e6 * r["touched_share"] * expert_bytes * scale / bandwidth
        r["ceiling"] = min(1 / share, dense / floor_us)


def make_weights(d: int, width: int, experts: int = EXPERTS, seed: int = 0, gated: bool = False) -> dict:
    """Seeded random FFN in operator layout, scaled so activations stay O(1); gated adds the gate rows Wg
    (SwiGLU: silu(Wg x) * (W1 x))."""
    rng = np.random.default_rng(seed)
    E, m = experts, width // experts
    f = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    w = {"W1": f(E, m, d) / np.sqrt(d), "B1": f(E, m) * 0.1, "W2": f(E, m, d) / np.sqrt(width),
         "B2": f(d) * 0.1, "router_w": f(E, d) / np.sqrt(d), "router_b": np.zeros(E)}
    if gated:
        w["Wg"] = f(E, m, d) / np.sqrt(d)
    return {k: v.astype(np.float32) for k, v in w.items()}


def activation(w: dict) -> str:
    return "silu" if "Wg" in w else "gelu"


def _model(nodes, inits, inputs=("X",), domains=()):
    g = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)] +
                             [helper.make_opsetid(dom, 1) for dom in domains]).SerializeToString()


def dense_model(w: dict) -> bytes:
    """The dense FFN as an exporter writes it: MatMul + Add + Gelu + MatMul + Add (ORT fuses the bias and Gelu);
    gated (SwiGLU): two first-layer MatMuls, Sigmoid, two Muls."""
    E, m, d = w["W1"].shape
    init = lambda a, n: numpy_helper.from_array(np.ascontiguousarray(a, np.float32), n)  # noqa: E731
    inits = [init(w["W1"].reshape(E * m, d).T, "W1t"), init(w["B1"].reshape(-1), "b1"),
             init(w["W2"].reshape(E * m, d), "W2"), init(w["B2"], "b2")]
    first = [helper.make_node("MatMul", ["X", "W1t"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"])]
    if "Wg" in w:
        inits.append(init(w["Wg"].reshape(E * m, d).T, "Wgt"))
        act = [helper.make_node("MatMul", ["X", "Wgt"], ["g0"]), helper.make_node("Sigmoid", ["g0"], ["g1"]),
               helper.make_node("Mul", ["g0", "g1"], ["g2"]), helper.make_node("Mul", ["g2", "h1"], ["h2"])]
    else:
        act = [helper.make_node("Gelu", ["h1"], ["h2"], domain="com.microsoft")]
    return _model(first + act + [helper.make_node("MatMul", ["h2", "W2"], ["y0"]),
                                 helper.make_node("Add", ["y0", "b2"], ["Y"])], inits, domains=["com.microsoft"])


def ort_moe_model(model: bytes) -> bytes | None:
    """The op's one-node model on ONNX Runtime's com.microsoft::MoE / QMoE, as moe-convert --target ort-moe writes
    it; None when the stock ops cannot express it."""
    import onnx

    from exporter.ort_moe import ConversionError, convert_model
    try:
        return convert_model(onnx.load_from_string(model))[0].SerializeToString()
    except ConversionError:
        return None


def standard_model(w: dict, k: int) -> bytes:
    """The exporter's standard target for one FFN: the same MoEFFN module traced to standard ops."""
    import io
    import warnings

    from exporter.moe_ffn import MoEFFN
    mod = MoEFFN(w["W1"], w["B1"], w["W2"], w["B2"], w["router_w"], w["router_b"], top_k=k, activation="gelu",
                 target="standard")  # plain form only (the gated rows skip this backend)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(mod, (torch.zeros(2, w["W1"].shape[2]),), buf, dynamo=False, input_names=["X"],
                          output_names=["Y"], dynamic_axes={"X": {0: "T"}, "Y": {0: "T"}}, opset_version=17)
    return buf.getvalue()


def torch_sparse(w: dict, k: int):
    """What one would write in PyTorch: route, then per expert gather its tokens, two matmuls, scatter-add."""
    t = {n: torch.from_numpy(a) for n, a in w.items()}

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        sel = (x @ t["router_w"].T + t["router_b"]).topk(k, dim=-1).indices
        y = t["B2"].expand(x.shape[0], -1).clone()
        for e in sel.unique().tolist():
            rows = (sel == e).any(-1).nonzero().squeeze(-1)
            h = TORCH_GELU(x[rows] @ t["W1"][e].T + t["B1"][e])
            y.index_add_(0, rows, h @ t["W2"][e])
        return y
    return run


def run_case(w: dict, k: int, tokens_list, threads: int, args) -> list[dict]:
    so = lambda: default_options(threads)  # noqa: E731  (spinning on: timing.py lets pools settle between blocks)
    sessions = {"dense ORT": ort.InferenceSession(dense_model(w), so(), providers=["CPUExecutionProvider"])}
    x_shape = np.zeros((1, w["W1"].shape[2]), np.float32)  # X is a graph input; only its width matters
    act = activation(w)
    models = {"": single_op_model({"X": x_shape, **w}, top_k=k, activation=act).SerializeToString()}
    if "float16" in args.weights:
        half = {n: a.astype(np.float16) if n in spec.SCALES else a for n, a in w.items()}
        models[" float16"] = single_op_model({"X": x_shape, **half}, top_k=k, activation=act).SerializeToString()
    if "int8" in args.weights:
        models[" int8"] = single_op_model({"X": x_shape, **quantize_experts(w)}, top_k=k,
                                          activation=act).SerializeToString()
    wanted = set(args.backends)
    for suffix, model in models.items():
        if runtime.cpp_available() and "cpp" in wanted:
            for isa in args.isa:  # every path in one process: the session option moefy.isa forces each in turn
                sessions[f"moefy cpp {isa}{suffix}"] = runtime.InferenceSession(model, backend="cpp", threads=threads,
                                                                                sess_options=so(), isa=isa)
        for b in ["numba", "numba-split"] if runtime.cpp_available() else ["numba-split"]:
            if b in wanted:
                opts = so() if b != "numba-split" else None  # numba-split makes its own (spinning off)
                sessions[f"moefy {b}{suffix}"] = runtime.InferenceSession(model, backend=b, threads=threads,
                                                                           sess_options=opts)
    for spec_ in args.library:  # another build of the library (an older release, a -march build), same process
        name, _, path = spec_.partition("=")
        o = so()
        o.register_custom_ops_library(path)
        sessions[f"{name} (other build)"] = ort.InferenceSession(models[""], o, providers=["CPUExecutionProvider"])
    if "std" in wanted and "Wg" not in w:
        sessions["moefy std"] = ort.InferenceSession(standard_model(w, k), so(), providers=["CPUExecutionProvider"])
    for suffix, model in models.items() if "ort-moe" in wanted else ():
        if (converted := ort_moe_model(model)) is not None:
            sessions[f"ORT MoE{suffix}"] = ort.InferenceSession(converted, so(), providers=["CPUExecutionProvider"])
    eager = torch_sparse(w, k) if "torch" in wanted and "Wg" not in w else None
    rng = np.random.default_rng(1)
    before = CacheEvictor() if args.cold else None
    probe = args.probe
    loads = [0] + ([args.background_load] if args.background_load else [])
    rows = []
    for T in tokens_list:
        xs = [rng.standard_normal((T, w["W1"].shape[2]), dtype=np.float32) for _ in range(args.inputs)]
        touched = touched_share(w, xs, k)
        xts = [torch.from_numpy(x) for x in xs]

        def rotating(run):  # each call takes the next input
            calls = iter(range(1 << 62))
            return lambda: run(next(calls) % len(xs))
        fns = {name: rotating(lambda i, s=s: s.run(None, {"X": xs[i]})) for name, s in sessions.items()}
        if eager is not None:
            fns["torch eager"] = rotating(lambda i: eager(xts[i]))
        fns["DRAM probe"] = probe  # the bandwidth of this very case, in the same rotation
        for load in loads:
            with background_load(load):
                t = time_blocks(fns, warmup=args.warmup, iters=args.iters, min_seconds=args.min_seconds,
                                before=before)
            bandwidth = probe.bytes_per_s(t.pop("DRAM probe"))
            dense = p50_p90(t["dense ORT"])[0]
            for name, us in t.items():
                p50, p90 = p50_p90(us)
                rows.append({"backend": name, "tokens": T, "threads": threads, "background_load": load,
                             "cache": "cold" if args.cold else "warm", "p50_us": p50, "p90_us": p90,
                             "touched_share": touched, "runs": int(us.size), "speedup_vs_dense": dense / p50,
                             "dram_bytes_per_s": bandwidth})
    expert_bytes = w["W1"].nbytes + w["W2"].nbytes + (w["Wg"].nbytes if "Wg" in w else 0)
    from_dram = args.cold or expert_bytes > last_level_cache_bytes()  # else warm calls find them in the cache
    add_ceilings(rows, k / w["W1"].shape[0], expert_bytes, from_dram)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = list(dict.fromkeys((r["shape"], r["form"], r["experts"]) for r in rows))
    share = 0.25 if any(r["share"] == 0.25 for r in rows) else rows[0]["share"]
    threads = max(r["threads"] for r in rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (shape, form, E) in zip(axes[0], panels):
        sub = [r for r in rows if (r["shape"], r["form"], r["experts"]) == (shape, form, E) and r["share"] == share
               and r["threads"] == threads]
        for (b, load) in dict.fromkeys((r["backend"], r["background_load"]) for r in sub):
            pts = sorted((r["tokens"], r["speedup_vs_dense"]) for r in sub
                         if (r["backend"], r["background_load"]) == (b, load))
            ax.plot(*zip(*pts), marker="o", ls="-" if load == 0 else "--",
                    label=b + (f", {load} busy process{'es' * (load > 1)}" if load else ""))
        ax.axhline(1 / share, ls=":", c="gray", label=f"ceiling 1/f = {1 / share:.0f}x")
        ax.set(xscale="log", yscale="log", title=f"{shape} {form}, {E} experts, {share:.1%} active, {threads} threads",
               xlabel="tokens", ylabel="speed-up vs dense ORT FFN")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--shares", type=float, nargs="+", default=[0.125, 0.25, 0.5],
                    help="shares of FFN parameters active (top_k = share x experts)")
    ap.add_argument("--experts", type=int, nargs="+", default=[EXPERTS],
                    help="experts per FFN (each of FFN / experts neurons)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128])
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--min-seconds", type=float, default=0.5)
    ap.add_argument("--weights", nargs="+", default=["float32", "int8"], choices=["float32", "float16", "int8"],
                    help="expert weight types to time for the moefy backends (float32 always runs)")
    ap.add_argument("--inputs", type=int, default=8, help="different inputs, taken in turn call by call")
    ap.add_argument("--cold", action="store_true",
                    help="evict the caches (write 2x the last-level cache) before every timed call")
    ap.add_argument("--forms", nargs="+", default=["plain"], choices=["plain", "gated"],
                    help="plain: GELU FFN (BERT); gated: SwiGLU (LLaMA: silu(Wg x) * (W1 x))")
    default_isa = runtime.isa_paths()["default"] if runtime.cpp_available() else None
    ap.add_argument("--isa", nargs="+", default=[default_isa] if default_isa else [],
                    help="instruction-set paths of the C++ kernels to time, each forced in turn (default: the one "
                         f"this CPU gets, {default_isa}); e.g. --isa avx512 avx2 sse2")
    ap.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS,
                    help="which to time besides dense ORT (default all)")
    ap.add_argument("--library", nargs="+", default=[], metavar="NAME=PATH",
                    help="also time the float32 op through other builds of libmoefy_ops.so (e.g. an older release), "
                         "each under NAME, side by side")
    ap.add_argument("--background-load", type=int, default=0, metavar="N",
                    help="also time every case with N CPU-bound background processes running (default 0: quiet only)")
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    for shape, E in itertools.product(args.shapes, args.experts):
        if E < 1 or SHAPES[shape][1] % E:
            ap.error(f"--experts {E}: must be >= 1 and divide {shape}'s FFN width {SHAPES[shape][1]}")
    runnable = [p["name"] for p in runtime.isa_paths()["paths"] if p["runs"]] if runtime.cpp_available() else []
    for isa in args.isa:
        if isa not in runnable:
            ap.error(f"--isa {isa}: this CPU runs {', '.join(runnable) or 'no C++ path (library not built)'}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import numba

    args.bandwidth = {t: stream_bandwidth(t) for t in args.threads}  # bytes/s, at the start (for reference)
    bw = ", ".join(f"{args.bandwidth[t] / 1e9:.1f} GB/s with {t} thread{'s' * (t > 1)}" for t in args.threads)
    print(f"DRAM read bandwidth at the start: {bw}", file=sys.stderr)
    args.probe = BandwidthProbe()
    rows = []
    for shape, form, E in itertools.product(args.shapes, args.forms, args.experts):
        d, width = SHAPES[shape]
        w = make_weights(d, width, E, gated=form == "gated")
        for share in args.shares:
            k = max(1, round(share * E))
            for threads in args.threads:
                torch.set_num_threads(threads)
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                print(f"{shape} {form} d={d} FFN={width}, {E} experts top-{k}, {threads} threads",
                      file=sys.stderr, flush=True)
                for r in run_case(w, k, args.tokens, threads, args):
                    rows.append({"shape": shape, "form": form, "d": d, "ffn": width, "experts": E, "top_k": k,
                                 "share": k / E, **r})
    header = ("| shape | form | experts | active | threads | load | tokens | experts touched | DRAM GB/s | backend | p50 µs | "
              "p90 µs | vs dense | ceiling | of ceiling |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    lines = [f"| {r['shape']} | {r['form']} | {r['experts']} x {r['ffn'] // r['experts']} | {r['share']:.1%} | {r['threads']} | {r['background_load']} | "
             f"{r['tokens']} | {r['touched_share']:.0%} | {r['dram_bytes_per_s'] / 1e9:.1f} | "
             f"{r['backend']} | {r['p50_us']:.0f} | {r['p90_us']:.0f} | {r['speedup_vs_dense']:.2f}x | "
             + ("— | — |" if r["ceiling"] is None else f"{r['ceiling']:.2f}x | {r['speedup_vs_dense'] / r['ceiling']:.0%} |")
             for r in rows]
    cache = ("caches evicted before every call" if args.cold else
             f"warm caches: weights that fit the {last_level_cache_bytes() >> 20} MiB last-level cache stay there")
    md = (f"Op alone vs the dense FFN; {machine()}; {args.inputs} inputs in turn; {cache}. Ceiling: 1/active share, "
          f"or lower when memory-bound: the expert bytes a call touches (half for float16, a quarter for int8) read at "
          f"the DRAM "
          f"bandwidth measured beside the kernels in the same timing rotation (DRAM GB/s: a parallel sum over 16x the "
          f"last-level cache; {bw} at the start), for experts that do not fit the last-level cache or with --cold. "
          f"Load: CPU-bound background processes during the timing.\n\n"
          + "\n".join([header] + lines))
    print(md)
    (out / "bench_ops.md").write_text(md + "\n")
    (out / "bench_ops.json").write_text(json.dumps({"machine": machine(), "dram_bytes_per_s": args.bandwidth, "rows": rows}, indent=2))
    plot(rows, out / "bench_ops.png")
    print(f"saved {out / 'bench_ops.md'}, {out / 'bench_ops.json'}, {out / 'bench_ops.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
