"""``moe-export``: parse flags, call :func:`exporter.export.export`, print its summary."""
from __future__ import annotations

import argparse
import sys

from . import calib_cache
from .distill import HOLDOUT_MAX, MAX_STEPS
from .export import TARGETS, export
from .moefy import CORRECTIONS, ROUTERS, SPLITS
from .outfile import Interrupted, interruptible
from .quantize import WEIGHT_TYPES
from .text import CALIB_LINES, DISTILL_TEXTS
from runtime.session import BACKENDS


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help at spaces only: never inside a path (the cache's) or a flag name at its hyphens."""

    def _split_lines(self, text, width):
        import textwrap
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)


def build_parser() -> argparse.ArgumentParser:
    n, size = calib_cache.usage()
    cache_now = f"{n} {'entry' if n == 1 else 'entries'}, {size / 1e6:,.0f} MB"
    ap = argparse.ArgumentParser(
        prog="moe-export", formatter_class=_HelpFormatter,
        description="MoEfy a Hugging Face model directory (split each FFN into experts, add routers) and "
                    "export it to ONNX with one SparseExpertFFN node per FFN. The file is written only "
                    "after it passes onnx.checker and matches the PyTorch MoEfied model.")
    ap.add_argument("model_dir", help="Hugging Face model directory (config.json, weights, tokenizer), "
                                      "or a directory written by --save-moefied")
    ap.add_argument("output", help="ONNX file to write")
    ap.add_argument("--experts", type=int, default=32, help="experts per FFN; must divide the FFN width (default 32)")
    ap.add_argument("--top-k", type=int, default=None,
                    help="experts computed per token, 1..experts, shared experts included (default 8; re-exporting "
                         "a --save-moefied directory: its own)")
    ap.add_argument("--budget", type=float, metavar="F",
                    help="instead of --top-k: choose each layer's top-k from calibration text so that on average "
                         "the share F of FFN parameters is active per token (greedy on the share of each layer's "
                         "expert-output deviation an oracle choice would capture), e.g. 0.25")
    ap.add_argument("--dynamic-k", type=float, metavar="F",
                    help="dynamic k per token: each token computes between k/F and k*F experts (rounded, within "
                         "1..experts), those whose router score passes a per-layer threshold chosen on calibration "
                         "text so that tokens compute k experts on average (same mean cost as --top-k k); "
                         "exported as the operator's min_k / score_threshold, e.g. 2")
    ap.add_argument("--shared-experts", type=int, default=0, metavar="N",
                    help="N always-on experts per layer, built from the neurons with the largest mean contribution "
                         "|h - mean| * ||W2 row|| on calibration text and forced on by the router (zero row, bias "
                         "1e6); they count in --top-k, which must exceed N (default 0)")
    ap.add_argument("--target", choices=TARGETS, default="custom",
                    help="custom: one ai.moefy SparseExpertFFN node per FFN (needs the moefy runtime); "
                         "standard: standard ONNX ops only (TopK, ScatterElements, MatMul), runs on any ONNX "
                         "Runtime but computes every expert; ort-moe: ONNX Runtime's own com.microsoft::MoE "
                         "(float32 experts) / QMoE (int8, ReLU experts) nodes, runs on a stock ONNX Runtime (CPU "
                         "build with those contrib ops; checked on 1.32; no custom-op library) computing only the "
                         "selected experts; BERT's erf GELU becomes its tanh form there (validated against it, the "
                         "distance reported) (default custom)")
    ap.add_argument("--split", choices=SPLITS, default="param",
                    help="param: balanced k-means over normalised first-layer rows (MoEfication); coact: balanced "
                         "k-means on how neurons' output deviations move together on calibration text; metis: the "
                         "same co-activation as a neighbour graph cut into equal parts by METIS (pymetis); "
                         "random: a seeded random split, a baseline (default param)")
    ap.add_argument("--router", choices=ROUTERS, default="centroid",
                    help="centroid: similarity to each expert's mean normalised first-layer row (MoEfication); "
                         "avgk: each expert's mean first-layer row and bias (its mean pre-activation); norm: avgk "
                         "with each neuron weighted by its second-layer row's norm (output-aware); ls: fitted by "
                         "least squares to each expert's output deviation on calibration text; bce: trained "
                         "(logistic loss, from the ls fit) to pick each calibration token's top-k experts by "
                         "output deviation, keeping the best weights on held-out calibration texts; mlp: bce plus "
                         "a small MLP (64 hidden ReLU units, exported as standard ONNX ops feeding the operator's "
                         "router_scores input) (default centroid; best measured: bce)")
    ap.add_argument("--correction", choices=CORRECTIONS, default="none",
                    help="none: a skipped expert contributes nothing; mean: it contributes its mean output over the "
                         "calibration tokens where the router skips it, since skipped GELU/SiLU neurons are not "
                         "zero; use it with a calibrated router (ls, bce): with centroid it hurts (default none)")
    ap.add_argument("--distill", type=float, metavar="MINUTES",
                    help="after MoEfication, fine-tune the MoEfied model towards the dense one on the calibration text "
                         "for at most MINUTES: first each FFN alone on the dense model's FFN inputs, then the whole "
                         "model (hidden states of every layer and the embedding cosine), with the model's own top-k "
                         f"routing in the loop; a tenth of the texts (at most {HOLDOUT_MAX}) is held out and the best "
                         "weights are kept. The exported experts then no longer add up to the dense FFN (default: off)")
    ap.add_argument("--distill-steps", type=int, default=MAX_STEPS, metavar="N",
                    help=f"cap on the end-to-end steps (32 texts each) of every distillation (--distill, "
                         f"--relufy); a run that stops on this cap rather than on time is reproducible "
                         f"(default {MAX_STEPS})")
    ap.add_argument("--distill-texts", type=int, default=DISTILL_TEXTS, metavar="N",
                    help=f"texts the distillations (--distill, --relufy) train on: the first N of the default corpus "
                         f"or of --calib; the MoE's calibration uses the first {CALIB_LINES} of them; memory grows "
                         f"with N (about 0.6 GB per 1,000 texts for MiniLM) (default {DISTILL_TEXTS})")
    ap.add_argument("--relufy", type=float, nargs="?", const=0.0, metavar="SHIFT",
                    help="before MoEfication, replace the GELU activation by ReLU(z - SHIFT) (SHIFT >= 0, default 0; "
                         "folded into the first-layer bias) and recover the dense model by distillation from the "
                         "original for --relufy-minutes; the operator then computes 'relu', whose skipped experts "
                         "contribute exactly zero below the threshold (default: off)")
    ap.add_argument("--relufy-minutes", type=float, default=2.0, metavar="M",
                    help="time budget of --relufy's recovery distillation (default 2)")
    ap.add_argument("--no-calib-cache", dest="calib_cache", action="store_false",
                    help="do not read or write the cached calibration activations (each layer's FFN input on the "
                         "calibration text, keyed by the model's weights and the tokenized text; about 280 MB per "
                         "entry for MiniLM) in $MOEFY_CACHE_DIR, else $XDG_CACHE_HOME/moefy/calibration, else "
                         f"~/.cache/moefy/calibration: here {calib_cache.cache_dir()}, now {cache_now}")
    ap.add_argument("--calib-cache-max-gb", dest="calib_cache_max_gb", type=float, metavar="GB",
                    help="cap on the calibration cache's total size: the least recently used entries are removed "
                         f"beyond it, 0 keeps none (default ${calib_cache.MAX_GB_ENV} if set, else "
                         f"{calib_cache.DEFAULT_MAX_GB:g})")
    ap.add_argument("--weights", choices=WEIGHT_TYPES, default="float32",
                    help="element type of the exported expert weights: int8 stores each weight row as int8 with a "
                         "float scale (a quarter of the bytes; few-token latency is bound by reading them); needs "
                         "--target custom, or ort-moe with ReLU experts (default float32)")
    ap.add_argument("--calib", metavar="FILE", help="UTF-8 calibration text, one sample per line (default: "
                                                    "1,000 Debian fortunes once `make data` fetched them, else "
                                                    "sentences from Python's standard-library docstrings); "
                                                    "at most the first 1,000 lines calibrate the MoE (with "
                                                    "--distill/--relufy up to --distill-texts train it; said when cut); "
                                                    "validation always uses built-in held-out sentences")
    ap.add_argument("--with-tokenizer", action="store_true",
                    help="write a model from strings to sentence embeddings instead: input 'text' (1-D string "
                         "tensor), output 'sentence_embedding' [N, hidden], onnxruntime-extensions' tokenizer in "
                         "front (BERT WordPiece), mean (or the directory's sentence-transformers) pooling and L2 "
                         "normalisation behind; a host registers onnxruntime-extensions' library (and moefy's for "
                         "--target custom) and passes strings (examples/cpp)")
    ap.add_argument("--save-moefied", metavar="DIR", dest="save_moefied_dir",
                    help="also save the MoEfied model (HF weights with experts contiguous + moefy_config.json + "
                         "routers) to DIR, so it can be re-exported without redoing the split")
    ap.add_argument("--backend", choices=BACKENDS, default="auto",
                    help="runtime backend used to validate a custom-target export (default auto)")
    ap.add_argument("--rtol", type=float, default=1e-4,
                    help="largest accepted max|ONNX - PyTorch| / max|PyTorch| (default 1e-4)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the expert clustering (default 0)")
    ap.add_argument("--quiet", action="store_true", help="no progress output, only the summary")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    try:
        with interruptible():
            report = export(args.model_dir, args.output, experts=args.experts, top_k=args.top_k, target=args.target,
                            split=args.split, router=args.router, correction=args.correction,
                            shared_experts=args.shared_experts, budget=args.budget, dynamic_k=args.dynamic_k,
                            calib=args.calib, save_moefied_dir=args.save_moefied_dir, seed=args.seed,
                            backend=args.backend, rtol=args.rtol, weights=args.weights, distill=args.distill,
                            distill_steps=args.distill_steps, distill_texts=args.distill_texts,
                            relufy=args.relufy, relufy_minutes=args.relufy_minutes, calib_cache=args.calib_cache,
                            calib_cache_max_gb=args.calib_cache_max_gb,
                            with_tokenizer=args.with_tokenizer,
                            progress=not args.quiet, log=log)
    except Interrupted as e:
        print(f"moe-export: interrupted ({e}); nothing was written", file=sys.stderr)
        return 128 + e.signum
    except (ValueError, OSError, RuntimeError) as e:  # OSError: an output path or disk that fails (outfile.py)
        print(f"moe-export: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
