"""``moe-export``: parse flags (generated from ``recipe.py``), call :func:`exporter.export.export`, print its summary."""
from __future__ import annotations

import argparse
import sys

from .arch import supported
from .export import export
from .outfile import Interrupted, interruptible
from .recipe import ExportOptions, Recipe


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="moe-export",
        description="MoEfy a Hugging Face model (split each FFN into experts, add routers) and export it to ONNX "
                    "with one SparseExpertFFN node per FFN. The output is written only after it passes onnx.checker "
                    "and matches the PyTorch MoEfied model. Model families: " + ", ".join(supported()) + ".")
    ap.add_argument("model_dir", help="Hugging Face model directory (config.json, weights, tokenizer), a .gguf file "
                                      "(dequantized to float32), or a directory written by --save-moefied")
    ap.add_argument("output", help="an .onnx file (the model alone), or a directory: model.onnx, config.json, the "
                                   "tokenizer files (and generation_config.json for decoders) and moefy.json, which "
                                   "optimum's ORTModel classes load as it is (an existing export directory is "
                                   "replaced)")
    Recipe.add_arguments(ap)
    ExportOptions.add_arguments(ap)
    ap.add_argument("--quiet", action="store_true", help="no progress output, only the summary")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    try:
        with interruptible():
            report = export(args.model_dir, args.output, Recipe.from_namespace(args),
                            **ExportOptions.from_namespace(args).to_dict(), progress=not args.quiet, log=log)
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
