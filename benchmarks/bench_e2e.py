"""End-to-end CPU latency: dense ONNX Runtime (optimum export) vs the MoEfied model on moefy's backends (what
``backend="auto"`` picks, the C++ kernels on each instruction-set path given by --isa, the Numba kernels inside
ONNX Runtime, and the graph cut at each FFN with Numba between) and, with --ort-moe, each MoEfied model rewritten
onto ONNX Runtime's own MoE / QMoE operators (moe-convert --target ort-moe, a stock session with no custom-op
library), side by side in one process. Batch 1, real
text cut to each sequence length; backends timed in rotating blocks (benchmarks/timing.py); medians after
warm-up. --background-load N also times every length with N CPU-bound processes running.

    python benchmarks/bench_e2e.py --moe out/minilm-moe.onnx [out/minilm-moe-int8.onnx ...] --out out
    python benchmarks/bench_e2e.py --moe out/minilm-moe.onnx --isa avx512 avx2 --background-load 1
    python benchmarks/bench_e2e.py --moe out/minilm-moe.onnx --ort-moe --backends auto
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import runtime
from runtime import numba_kernels
from runtime.session import default_options
from timing import background_load, machine, p50_p90, time_blocks


def dense_export(model_dir: Path, out_dir: Path) -> Path:
    """The dense baseline: optimum's own ONNX export of the same model (cached)."""
    path = out_dir / "model.onnx"
    if not path.is_file():
        from optimum.exporters.onnx import main_export
        print(f"exporting the dense baseline with optimum to {out_dir}", file=sys.stderr)
        main_export(str(model_dir), output=str(out_dir), task="feature-extraction", do_validation=False)
    return path


def text_feed(model_dir: Path, length: int) -> dict:
    """Real text (the exporter's sample sentences, repeated) tokenized to exactly ``length`` tokens."""
    from transformers import AutoTokenizer

    from exporter.text import SAMPLE_TEXTS
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(" ".join(SAMPLE_TEXTS * 8), truncation=True, max_length=length, return_tensors="np")["input_ids"]
    ids = ids.astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


FFN_NODE = re.compile(r"/intermediate/|layer\.\d+/output/dense/")  # optimum's BERT node names


def ffn_share(dense_path: Path, feed: dict, threads: int, runs: int = 20) -> float:
    """phi: the FFN's share of the dense model's node time, from ONNX Runtime's profiler."""
    so = default_options(threads)
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "moefy_dense_profile")
    sess = ort.InferenceSession(str(dense_path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, feed)
    path = sess.end_profiling()
    events = json.loads(Path(path).read_text())
    os.unlink(path)
    nodes = [(e["name"], e["dur"]) for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    total = sum(d for _, d in nodes)
    return sum(d for n, d in nodes if FFN_NODE.search(n)) / total


def amdahl_ceiling(phi: float, f: float) -> float:
    """End-to-end speed-up if the FFN (share phi of time) did only the fraction f of its work, for free."""
    return 1.0 / ((1.0 - phi) + phi * f)


def numba_overhead_us(threads: int) -> dict:
    """What the numba-split backend pays per sparse FFN beyond the math: the kernel call from Python on a
    toy problem (validation, dispatch, allocation) and one extra ONNX Runtime session boundary."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(0)
    toy = {"X": rng.standard_normal((1, 16), np.float32), "W1": rng.standard_normal((2, 16, 16), np.float32),
           "W2": rng.standard_normal((2, 16, 16), np.float32), "router_w": rng.standard_normal((2, 16), np.float32)}
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "boundary",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, 384])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    sess = ort.InferenceSession(helper.make_model(g).SerializeToString(), default_options(threads, spinning=False),
                                providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 128, 384), np.float32)
    t = time_blocks({"kernel_call": lambda: numba_kernels.sparse_expert_ffn(toy, top_k=1),
                     "session_boundary": lambda: sess.run(None, {"x": x})}, warmup=20, iters=500, min_seconds=0.5)
    out = {k: p50_p90(v)[0] for k, v in t.items()}
    out["per_sparse_ffn"] = out["kernel_call"] + out["session_boundary"]
    return out


def numba_vs_cpp(rows: list[dict], isa: str | None) -> list[str]:
    """Each Numba row's p50 over the C++ row (on path ``isa``) of the same weights, length and load."""
    def key(r):
        return r["tokens"], r["background_load"], next((w for w in ("int8", "float16") if f" {w}" in r["backend"]), "")
    cpp = {key(r): r["p50_ms"] for r in rows if r["backend"].startswith(f"moefy cpp {isa}")}
    return [f"{r['tokens']} tokens{', loaded' if r['background_load'] else ''} "
            f"{r['backend']}: {r['p50_ms'] / cpp[key(r)]:.2f}x" for r in rows
            if r["backend"].startswith("moefy numba") and key(r) in cpp]


def ort_moe_session(path: Path, out: Path, threads: int) -> dict:
    """{row name: stock ONNX Runtime session} of ``path`` rewritten onto com.microsoft::MoE / QMoE; empty (and said
    why) when the stock operators cannot express it."""
    from exporter.ort_moe import ConversionError, convert
    converted = out / f"{path.stem}-ort-moe.onnx"
    try:
        report = convert(path, converted, check=False)
    except ConversionError as e:
        print(f"--ort-moe: {path} not converted: {e}", file=sys.stderr)
        return {}
    name = f"ORT {'/'.join(report.ops)} (moe-convert)" + (" int8" if "QMoE" in report.ops else "")
    return {name: ort.InferenceSession(str(converted), default_options(threads),
                                                      providers=["CPUExecutionProvider"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moe", required=True, nargs="+",
                    help="MoEfied ONNX models (moe-export output), e.g. float32 and --weights int8 exports")
    ap.add_argument("--model-dir", help="the dense Hugging Face model (default: the bundled all-MiniLM-L6-v2)")
    ap.add_argument("--dense", help="dense ONNX model, or optimum's export directory holding model.onnx (default: "
                                    "optimum export into OUT/dense)")
    ap.add_argument("--seq", type=int, nargs="+", default=[16, 128], help="sequence lengths (default 16 128)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads (default: all cores)")
    ap.add_argument("--warmup", type=int, default=10, help="warm-up runs per backend (default 10)")
    ap.add_argument("--iters", type=int, default=30, help="minimum timed runs per backend (default 30)")
    ap.add_argument("--min-seconds", type=float, default=2.0, help="minimum timed duration per length (default 2)")
    default_isa = runtime.isa_paths()["default"] if runtime.cpp_available() else None
    ap.add_argument("--isa", nargs="+", default=[default_isa] if default_isa else [],
                    help=f"instruction-set paths of the C++ kernels to time, each forced in turn (default {default_isa})")
    ap.add_argument("--backends", nargs="+", default=["auto", "cpp", "numba", "numba-split"],
                    choices=["auto", "cpp", "numba", "numba-split"], help="moefy backends to time (default all)")
    ap.add_argument("--ort-moe", action="store_true",
                    help="also time each --moe model converted to ONNX Runtime's own MoE / QMoE operators "
                         "(exporter/ort_moe.py, written to OUT/NAME-ort-moe.onnx) in a stock ONNX Runtime session")
    ap.add_argument("--background-load", type=int, default=0, metavar="N",
                    help="also time with N CPU-bound background processes running (default 0: quiet only)")
    ap.add_argument("--out", default="out", help="directory for bench_e2e.json / bench_e2e.md (default out)")
    args = ap.parse_args(argv)
    if min(args.seq) < 2:  # the tokenizer would ignore max_length below its two special tokens
        ap.error(f"--seq {min(args.seq)}: sequences hold at least 2 tokens ([CLS] and [SEP])")

    from exporter.models import bundled_minilm_dir
    model_dir = Path(args.model_dir) if args.model_dir else bundled_minilm_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense_path = Path(args.dense) if args.dense else dense_export(model_dir, out / "dense")
    if dense_path.is_dir():  # optimum's layout, as OUT/dense
        dense_path /= "model.onnx"
    if not dense_path.is_file():
        ap.error(f"--dense: no ONNX model at {dense_path}")

    # Each backend with its best settings (ONNX Runtime spinning on; numba-split turns it off itself);
    # timing.py lets spinning pools settle between blocks so they do not steal each other's cores.
    sessions = {"dense ORT": ort.InferenceSession(str(dense_path), default_options(args.threads),
                                                  providers=["CPUExecutionProvider"])}
    runs = [(b, None) for b in args.backends if b not in ("cpp", "numba") or runtime.cpp_available()]
    if "cpp" in args.backends:  # one session per path, forced through the moefy.isa session option
        runs = [r for r in runs if r[0] != "cpp"] + [("cpp", isa) for isa in args.isa]
    # Every model's sessions first: their configs say whether rows need the expert count in their names.
    loaded = [(path, [(b, isa, runtime.InferenceSession(path, backend=b, threads=args.threads, isa=isa))
                      for b, isa in runs]) for path in args.moe]
    configs = [(made[0][2].moe_config or {}) if made else {} for _, made in loaded]
    counted = len({c.get("experts") for c in configs}) > 1  # different expert counts (same share) side by side
    auto_choice = None
    for (path, made), cfg in zip(loaded, configs):
        weights = cfg.get("weights", "float32")
        tag = ("" if weights == "float32" else f" {weights}") + (f" {cfg.get('experts')} experts" if counted else "")
        for b, isa, sess in made:
            name = f"moefy {b}" + (f" {isa}" if isa else "") + tag
            if b == "auto":
                auto_choice = f"{sess.backend} {sess.isa or ''}".strip()
                name = f"moefy auto (= {auto_choice})" + tag
            sessions[name] = sess
        if args.ort_moe:
            sessions.update(ort_moe_session(Path(path), out, args.threads))
    moe_cfg = configs[0]
    share = lambda c: c.get("top_k", 1) / c.get("experts", 1)  # noqa: E731
    if any(abs(share(c) - share(moe_cfg)) > 1e-9 for c in configs):
        ap.error("--moe models must share the active share top-k / experts (one Amdahl ceiling per table)")

    rows = []
    for length in args.seq:
        feed = text_feed(model_dir, length)
        phi = ffn_share(dense_path, feed, args.threads)
        ceiling = amdahl_ceiling(phi, share(moe_cfg))
        for load in [0] + ([args.background_load] if args.background_load else []):
            print(f"benchmarking {length} tokens, {load} background processes ({', '.join(sessions)})",
                  file=sys.stderr, flush=True)
            with background_load(load):
                times = time_blocks({k: (lambda s=s: s.run(["last_hidden_state"], feed))
                                     for k, s in sessions.items()},
                                    warmup=args.warmup, iters=args.iters, min_seconds=args.min_seconds)
            dense_ms = p50_p90(times["dense ORT"])[0] / 1e3
            for name, us in times.items():
                p50, p90 = (v / 1e3 for v in p50_p90(us))
                rows.append({"backend": name, "tokens": int(feed["input_ids"].shape[1]), "batch": 1,
                             "threads": args.threads, "background_load": load, "runs": len(us), "p50_ms": p50,
                             "p90_ms": p90, "speedup_vs_dense": dense_ms / p50, "ffn_share_phi": phi,
                             "amdahl_ceiling": ceiling, "share_of_ceiling": dense_ms / p50 / ceiling})
    overhead = numba_overhead_us(args.threads) if "numba-split" in args.backends else None

    header = ("| tokens | load | backend | p50 ms | p90 ms | speed-up vs dense | FFN share φ | Amdahl ceiling | "
              "of ceiling |\n|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    table = "\n".join([header] + [
        f"| {r['tokens']} | {r['background_load']} | {r['backend']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
        f"{r['speedup_vs_dense']:.2f}x | "
        f"{r['ffn_share_phi']:.2f} | {r['amdahl_ceiling']:.2f}x | "
        f"{'—' if r['backend'] == 'dense ORT' else format(r['share_of_ceiling'], '.0%')} |" for r in rows])
    vs_cpp = numba_vs_cpp(rows, args.isa[0] if args.isa else None)
    machine_line = f"{machine()}; {args.threads} threads"
    md = (f"MoEfied {model_dir}: {moe_cfg.get('experts')} experts, top-{moe_cfg.get('top_k')} "
          f"({100 * moe_cfg.get('top_k', 0) / max(moe_cfg.get('experts', 1), 1):.1f}% of FFN parameters active); "
          f"batch 1; {machine_line}. Load: CPU-bound background processes while timing.\n\n{table}\n\nNumba latency / C++ latency (same weights): {'; '.join(vs_cpp) or '—'}\n\n"
          + (f"numba-split overhead per sparse FFN: "
             f"{overhead['per_sparse_ffn']:.0f} us (kernel call from Python {overhead['kernel_call']:.0f} us + "
             f"one ONNX Runtime session boundary {overhead['session_boundary']:.0f} us)\n" if overhead else ""))
    print(md)
    (out / "bench_e2e.md").write_text(md)
    (out / "bench_e2e.json").write_text(json.dumps({"machine": machine_line, "moe_config": moe_cfg, "rows": rows,
                                                    "numba_overhead_us": overhead}, indent=2))
    print(f"saved {out / 'bench_e2e.md'} and {out / 'bench_e2e.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
