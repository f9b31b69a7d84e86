"""Generation speed of SmolLM2-135M-Instruct on the CPU: moefy's onnxruntime-genai layout against the dense
runtimes a user would pick instead, side by side in one run (issue 16).

Rows (batch 1, greedy; each backend at 1 and 2 threads):
  optimum fp32        ORTModelForCausalLM.generate on optimum's own fp32 export
  genai fp32 / int4   onnxruntime-genai on its model builder's dense model (int4: MatMulNBits, block 32)
  llama.cpp F32 / Q8_0 / Q4_1   llama-cpp-python on the shipped Q4_1 GGUF and on Q8_0 / F32 requantized
                      from it with llama_model_quantize
  moefy P% E/D        moefy's fast layout (exporter/genai_layout.py) run by onnxruntime-genai: P% of the FFN
                      active (top 8 or 16 of 32 experts), E = expert weights fp32/int8, D = dense parts fp32/int4
Each row: prefill ms (a 16- and a 128-token prompt, to the first token) and decode tokens/s after each prompt
(the 32 tokens after the first), medians of --iters generations timed inside the generation loop (optimum:
a logits processor stamps each token). Backends run in rotating blocks, all loaded in one process.

The MoE here is for speed, not quality: each FFN split into 32 contiguous experts of 48 neurons, routed by a
least-squares fit of the experts' output norms on calibration text (a stand-in for moe-export's MoEfication:
the time depends on the share active, not on which neurons an expert holds).

Ceilings of a moefy row: "bytes" = the weights a decode step must read (dense parts, LM head, routers and the
active share of the experts, from the written model) at the DRAM read bandwidth measured at start;
"Amdahl" = the dense genai model's measured decode rate at the same dense precision x 1/((1 - phi) + phi x f),
phi the FFN's share of the dense step's bytes and f the FFN bytes a moefy step reads relative to the dense
FFN's (share x expert bytes / dense FFN bytes: int8 experts against an fp32 FFN read a quarter). --profile adds ONNX Runtime's per-node times (one
thread): the operator's time per decode step per layer against the dense model's MLP nodes.

    make bench-generate-setup                      # llama-cpp-python (built from source, ~15 min), GGUF, builder env
    python benchmarks/bench_generate.py --out out  # models built once into the cache, then ~10 min
Writes bench_generate.json, .md and .png into --out.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import glob
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_ops import machine
from timing import SETTLE_SECONDS, stream_bandwidth

EXPERTS = 32
SHARES = (0.25, 0.5)
PROMPT_LENGTHS = (16, 128)
NEW_TOKENS = 32
LAYOUT_VERSION = 1  # bump when the cached models must be rebuilt
LLAMA_TYPES = {"F32": 0, "Q8_0": 7}  # llama_ftype values (llama.h) of the requantized GGUFs


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moefy" / f"bench-generate-v{LAYOUT_VERSION}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- models
def build_once(path: Path, make) -> Path:
    """``make(tmp)`` writes into a temporary sibling, renamed to ``path`` when complete."""
    if not path.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        os.rmdir(tmp)
        make(tmp)
        os.replace(tmp, path)
    return path


def dense_hf(cache: Path) -> Path:
    """SmolLM2 dequantized from the shipped GGUF to a float32 Hugging Face directory (moefy's transformers)."""
    from exporter.models import smollm2_gguf

    def make(tmp):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        gguf = smollm2_gguf()
        log(f"dequantizing {gguf}")
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).save_pretrained(tmp)
    return build_once(cache / "hf", make)


def optimum_model(cache: Path, hf: Path) -> Path:
    def make(tmp):
        from optimum.onnxruntime import ORTModelForCausalLM
        log("exporting with optimum (fp32)")
        ORTModelForCausalLM.from_pretrained(hf, export=True).save_pretrained(tmp)
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(hf).save_pretrained(tmp)
    return build_once(cache / "optimum-fp32", make)


def llama_ggufs(cache: Path) -> dict[str, Path]:
    """The shipped Q4_1 and its Q8_0 / F32 requantizations."""
    import llama_cpp
    from exporter.models import smollm2_gguf
    src = smollm2_gguf()
    paths = {"Q4_1": src}
    for name, ftype in LLAMA_TYPES.items():
        dst = cache / f"SmolLM2-135M-Instruct.{name}.gguf"
        if not dst.exists():
            log(f"requantizing to {name}")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize = ftype, True
            tmp = dst.with_suffix(".tmp")
            if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
                raise RuntimeError(f"llama_model_quantize to {name} failed")
            os.replace(tmp, dst)
        paths[name] = dst
    return paths


def moe_layers(hf: Path, share: float, int8: bool, calib_tokens: int = 2048) -> list[dict]:
    """SparseExpertFFN inputs per layer: EXPERTS contiguous experts, a least-squares router on calibration text
    (targets: each expert's output norm per token), top_k = share x EXPERTS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporter.quantize import quantize_experts
    from exporter.text import default_calibration_texts
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    ids = tok(" ".join(default_calibration_texts()), return_tensors="pt").input_ids[:, :calib_tokens]
    xs = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: xs.__setitem__(i, a[0][0].detach()))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    layers = []
    for i, layer in enumerate(model.model.layers):
        mlp, x = layer.mlp, xs[i]
        up, gate, down = mlp.up_proj.weight, mlp.gate_proj.weight, mlp.down_proj.weight.T  # [F, d] each
        w1, wg, w2 = (w.detach().reshape(EXPERTS, -1, w.shape[-1]) for w in (up, gate, down))
        with torch.no_grad():
            h = (torch.nn.functional.silu(x @ wg.flatten(0, 1).T) * (x @ w1.flatten(0, 1).T)).unflatten(-1, (EXPERTS, -1))
            norms = torch.einsum("tem,emd->ted", h, w2).norm(dim=-1)  # [T, E]
            a = torch.cat([x, torch.ones(len(x), 1)], 1)
            sol = torch.linalg.lstsq(a.double(), norms.double()).solution.float()  # [d + 1, E]
        arrays = {"W1": w1.numpy().copy(), "Wg": wg.numpy().copy(), "W2": w2.numpy().copy(),
                  "router_w": sol[:-1].T.contiguous().numpy(), "router_b": sol[-1].numpy().copy()}
        if int8:
            arrays = quantize_experts(arrays)
        layers.append({**arrays, "top_k": round(share * EXPERTS), "activation": "silu"})
    return layers


def genai_models(cache: Path, hf: Path, shares, expert_types, dense_types) -> dict[str, dict]:
    """onnxruntime-genai's dense models and moefy's layouts; name -> {path, kind, dense, experts, share}."""
    import runtime
    from exporter.genai_layout import export_genai
    models = {}
    for dense in dense_types:
        path = build_once(cache / f"genai-{dense}",
                          lambda tmp, dense=dense: export_genai(hf, None, tmp, precision=dense))
        models[f"genai {dense}"] = {"path": path, "kind": "genai", "dense": dense, "experts": None, "share": 1.0}
    for share in shares:
        for experts in expert_types:
            layers = None
            for dense in dense_types:
                path = cache / f"moefy-{share:.0%}-{experts}-{dense}".replace("%", "pct")
                if not path.exists():
                    layers = layers or moe_layers(hf, share, experts == "int8")
                    export_genai(hf, layers, path, precision=dense)
                else:  # the cached layout runs the installed kernels, not those it was exported with
                    lib = runtime.library_path()
                    Path(path / Path(lib).name).write_bytes(Path(lib).read_bytes())
                models[f"moefy {share:.0%} {experts}/{dense}"] = {
                    "path": path, "kind": "genai", "dense": dense, "experts": experts, "share": share}
    return models


# ----------------------------------------------------------------------------- runners
# runner(ids, n) -> (n greedy tokens, prefill seconds: prompt to the first token, decode seconds: the n - 1 after)
class Genai:
    def __init__(self, path: Path, threads: int, profile: str | None = None):
        import onnxruntime_genai as og
        self.og = og
        config = og.Config(str(path))
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        if profile:
            options["enable_profiling"] = profile
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def __call__(self, ids: list[int], n: int):
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(ids, np.int32))  # the prefill
        gen.generate_next_token()  # picks from the prefill's logits
        t1 = time.perf_counter()
        for _ in range(n - 1):  # each runs one decode step, then picks
            gen.generate_next_token()
        t2 = time.perf_counter()
        return [int(t) for t in gen.get_sequence(0)[len(ids):]], t1 - t0, t2 - t1


class Optimum:
    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        self.model = ORTModelForCausalLM.from_pretrained(path, session_options=so)

    def __call__(self, ids, n):
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList
        stamps = []

        class Stamp(LogitsProcessor):  # called once per new token, right after its forward pass
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([Stamp()]))
        t2 = time.perf_counter()
        return out[0, len(ids):].tolist(), stamps[0] - t0, t2 - stamps[0]


class LlamaCpp:
    def __init__(self, path: Path, threads: int):
        import llama_cpp
        self.llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)

    def __call__(self, ids, n):
        llm, out = self.llm, []
        t0 = time.perf_counter()
        llm.reset()
        llm.eval(ids)
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        t1 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval(out[-1:])
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        return out, t1 - t0, time.perf_counter() - t1


def time_generations(runners: dict, ids: list[int], iters: int, rounds: int = 3) -> dict[str, np.ndarray]:
    """Per backend [runs, 2]: prefill and decode seconds of generations of 1 + NEW_TOKENS tokens, after one
    warm-up; backends in blocks rotating over ``rounds`` (benchmarks/timing.py explains why blocks, and the
    pause that lets a spinning thread pool go idle before the next backend)."""
    for r in runners.values():
        r(ids, 1 + NEW_TOKENS)
    times = {k: [] for k in runners}
    names = list(runners)
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            time.sleep(SETTLE_SECONDS)
            for _ in range(max(1, -(-iters // rounds))):
                times[name].append(runners[name](ids, 1 + NEW_TOKENS)[1:])
    return {k: np.asarray(v) for k, v in times.items()}


# ----------------------------------------------------------------------------- ceilings
def step_bytes(model_dir: Path) -> dict[str, float]:
    """Bytes of the weights one decode step reads, by part: dense (attention, norms, LM head), ffn (the dense
    MLP), experts (all of them: a step reads the active share), router. Embedding and rotary tables: one row."""
    import onnx
    sizes = {"dense": 0.0, "ffn": 0.0, "experts": 0.0, "router": 0.0}
    for t in onnx.load(model_dir / "model.onnx", load_external_data=False).graph.initializer:
        n = int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if "embed_tokens" in t.name or t.name in ("cos_cache", "sin_cache"):
            continue
        part = ("router" if ".moe.router" in t.name else "experts" if ".moe." in t.name
                else "ffn" if ".mlp." in t.name else "dense")
        sizes[part] += n
    return sizes


def add_ceilings(rows: list[dict], models: dict, bandwidth: dict[int, float]) -> None:
    for r in rows:
        m = models[r["backend"]]
        if m.get("experts") is None:
            continue
        b = step_bytes(m["path"])
        read = b["dense"] + b["router"] + m["share"] * b["experts"]
        dense = next(x for x in rows if x["backend"] == f"genai {m['dense']}" and x["threads"] == r["threads"]
                     and x["prompt"] == r["prompt"])
        db = step_bytes(models[f"genai {m['dense']}"]["path"])
        phi = db["ffn"] / (db["ffn"] + db["dense"])
        f = m["share"] * b["experts"] / db["ffn"]  # the FFN bytes read per step, relative to the dense model's
        r.update(step_mb=read / 1e6, ceiling_bytes=bandwidth[r["threads"]] / read, ffn_share=phi, ffn_bytes_ratio=f,
                 ceiling_amdahl=dense["decode_tok_s"] / ((1 - phi) + phi * f),
                 vs_dense=r["decode_tok_s"] / dense["decode_tok_s"])


# ----------------------------------------------------------------------------- profile (D)
def profile_ops(models: dict, prompt: list[int]) -> list[dict]:
    """ONNX Runtime's node times at one thread over one generation: per decode step and layer, the MLP's
    (moefy: the SparseExpertFFN node; dense: every /mlp/ node) and the whole step's."""
    rows = []
    for name, m in models.items():
        if m["kind"] != "genai":
            continue
        prefix = str(Path(tempfile.gettempdir()) / f"moefy_genai_profile_{os.getpid()}")
        runner = Genai(m["path"], 1, profile=prefix)
        runner(prompt, 1 + NEW_TOKENS)
        del runner
        gc.collect()
        files = sorted(glob.glob(prefix + "*.json"), key=os.path.getmtime)
        events = json.loads(Path(files[-1]).read_text())
        for f in files:
            os.unlink(f)
        by_node: dict[str, list[float]] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                by_node.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"])
        # Medians over each node's calls: the decode steps outnumber the one prefill 32 to 1, and a median
        # ignores the calls a busy core preempted. A decode step runs every node once.
        median = {k: float(np.median(v)) for k, v in by_node.items()}
        mlp = sum(v for k, v in median.items() if "/mlp/" in k)
        layers = len({hit.group(1) for k in median if (hit := re.search(r"/layers\.(\d+)/mlp/", k))})
        step = sum(median.values())
        rows.append({"backend": name, "mlp_us_per_layer": mlp / max(layers, 1), "layers": layers,
                     "step_us": step, "mlp_share": mlp / step})
        log(f"  profile {name}: MLP {rows[-1]['mlp_us_per_layer']:.1f} us per layer and step")
    return rows


# ----------------------------------------------------------------------------- report
def markdown(rows: list[dict], prof: list[dict], header: str) -> str:
    names = list(dict.fromkeys(r["backend"] for r in rows))
    threads = sorted({r["threads"] for r in rows})
    cols = [(t, p) for t in threads for p in PROMPT_LENGTHS]
    get = {(r["backend"], r["threads"], r["prompt"]): r for r in rows}
    lines = [header, "",
             "| backend | " + " | ".join(f"{t}T prefill {p} ms" for t, p in cols) + " | "
             + " | ".join(f"{t}T decode tok/s (after {p})" for t, p in cols) + " | "
             + " | ".join(f"{t}T vs genai dense / ceilings bytes, Amdahl (after 16)" for t in threads) + " |",
             "|---|" + "---:|" * (2 * len(cols) + len(threads))]
    for n in names:
        cells = [f"{get[(n, t, p)]['prefill_ms']:.1f}" for t, p in cols]
        cells += [f"{get[(n, t, p)]['decode_tok_s']:.1f}" for t, p in cols]
        for t in threads:
            r = get[(n, t, PROMPT_LENGTHS[0])]
            cells.append("—" if "ceiling_bytes" not in r else
                         f"{r['vs_dense']:.2f}x / {r['ceiling_bytes']:.0f}, {r['ceiling_amdahl']:.0f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if prof:
        lines += ["", "ONNX Runtime profile, one thread, decode: medians per node over a 16+33-token generation, summed "
                  "(the MLP's nodes per layer; all nodes per step):", "",
                  "| model | MLP µs per layer per step | all nodes µs per step | MLP share |", "|---|---:|---:|---:|"]
        lines += [f"| {p['backend']} | {p['mlp_us_per_layer']:.1f} | {p['step_us']:.0f} | {p['mlp_share']:.0%} |"
                  for p in prof]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    threads = sorted({r["threads"] for r in rows})
    names = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(1, len(threads), figsize=(7 * len(threads), 0.35 * len(names) + 1.5), squeeze=False)
    for ax, t in zip(axes[0], threads):
        sub = {r["backend"]: r for r in rows if r["threads"] == t and r["prompt"] == PROMPT_LENGTHS[0]}
        y = np.arange(len(names))
        colors = ["tab:green" if n.startswith("moefy") else "tab:gray" for n in names]
        ax.barh(y, [sub[n]["decode_tok_s"] for n in names], color=colors)
        for i, n in enumerate(names):
            if "ceiling_bytes" in sub[n]:
                ax.plot([sub[n]["ceiling_bytes"]], [i], "k|", ms=12)
                ax.plot([sub[n]["ceiling_amdahl"]], [i], "rx")
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel="decode tokens/s (after a 16-token prompt)", title=f"SmolLM2-135M, batch 1, {t} thread(s)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].plot([], [], "k|", ms=12, label="bytes ceiling")
    axes[0][0].plot([], [], "rx", label="Amdahl ceiling")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out")
    ap.add_argument("--cache", type=Path, default=default_cache(), help="built models (reused across runs)")
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, min(2, os.cpu_count() or 1)}))
    ap.add_argument("--shares", type=float, nargs="+", default=list(SHARES))
    ap.add_argument("--experts", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    ap.add_argument("--dense", nargs="+", default=["fp32", "int4"], choices=["fp32", "int4", "int8"])
    ap.add_argument("--skip", nargs="*", default=[], choices=["optimum", "llama.cpp"], help="leave these out")
    ap.add_argument("--iters", type=int, default=6, help="timed generations per backend and case (medians)")
    ap.add_argument("--profile", action="store_true", help="also ONNX Runtime's per-node times (one thread)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)

    hf = dense_hf(args.cache)
    models = genai_models(args.cache, hf, args.shares, args.experts, args.dense)
    if "optimum" not in args.skip:
        models = {"optimum fp32": {"path": optimum_model(args.cache, hf), "kind": "optimum"}, **models}
    if "llama.cpp" not in args.skip:
        for name, path in llama_ggufs(args.cache).items():
            models[f"llama.cpp {name}"] = {"path": path, "kind": "llama.cpp"}
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(hf)
    from exporter.text import default_calibration_texts
    text_ids = tok(" ".join(default_calibration_texts()[::-1]), add_special_tokens=False).input_ids
    prompts = {n: text_ids[:n] for n in PROMPT_LENGTHS}

    bandwidth = {t: stream_bandwidth(t) for t in args.threads}
    log("DRAM read bandwidth: " + ", ".join(f"{b / 1e9:.1f} GB/s ({t} thr)" for t, b in bandwidth.items()))
    runner_class = {"genai": Genai, "optimum": Optimum, "llama.cpp": LlamaCpp}
    rows, first_tokens = [], {}
    for threads in args.threads:
        log(f"loading {len(models)} models, {threads} thread(s)")
        runners = {name: runner_class[m["kind"]](m["path"], threads) for name, m in models.items()}
        for n_prompt, ids in prompts.items():
            if threads == args.threads[0] and n_prompt == PROMPT_LENGTHS[0]:
                first_tokens = {name: r(ids, 8)[0] for name, r in runners.items()}
            log(f"  prompt {n_prompt} tokens, {threads} thread(s), {NEW_TOKENS} new tokens")
            t = time_generations(runners, ids, args.iters)
            for name in runners:
                pre, dec = np.median(t[name], axis=0)
                rows.append({"backend": name, "threads": threads, "prompt": n_prompt, "prefill_ms": pre * 1e3,
                             "prefill_p90_ms": float(np.percentile(t[name][:, 0], 90)) * 1e3,
                             "decode_tok_s": (NEW_TOKENS) / dec,
                             "decode_p10_tok_s": NEW_TOKENS / float(np.percentile(t[name][:, 1], 90))})
                log(f"    {name:28s} prefill {pre * 1e3:7.1f} ms  decode {rows[-1]['decode_tok_s']:6.1f} tok/s")
        del runners
        gc.collect()
    add_ceilings(rows, models, bandwidth)
    prof = profile_ops(models, prompts[PROMPT_LENGTHS[0]]) if args.profile else []

    ref = first_tokens.get("genai fp32")
    agree = {k: sum(a == b for a, b in zip(v, ref)) for k, v in first_tokens.items()} if ref else {}
    bw = ", ".join(f"{b / 1e9:.1f} GB/s with {t} thread{'s' * (t > 1)}" for t, b in bandwidth.items())
    header = (f"SmolLM2-135M-Instruct generation, batch 1, greedy; {machine()}; DRAM read {bw}. "
              f"Prefill: median ms to the first token; decode: median tokens/s over the {NEW_TOKENS} tokens after it. "
              f"moefy rows: vs the genai dense model at the same dense precision, and their ceilings in tok/s "
              f"(bytes: weights read per decode step at the DRAM bandwidth; Amdahl: genai dense / ((1-phi) + "
              f"phi x f), phi = FFN share of its step bytes, f = FFN bytes read relative to its). Command: python benchmarks/bench_generate.py "
              + " ".join(argv if argv is not None else sys.argv[1:]))
    md = markdown(rows, prof, header)
    print(md)
    (out / "bench_generate.md").write_text(md + "\n")
    (out / "bench_generate.json").write_text(json.dumps(
        {"machine": machine(), "dram_bytes_per_s": bandwidth, "new_tokens": NEW_TOKENS, "rows": rows,
         "profile": prof, "first_8_tokens": first_tokens, "agreement_with_genai_fp32": agree,
         "models": {k: {**v, "path": str(v["path"])} for k, v in models.items()}}, indent=2))
    plot(rows, out / "bench_generate.png")
    log(f"saved {out / 'bench_generate.md'}, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
