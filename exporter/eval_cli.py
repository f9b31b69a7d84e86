"""``moe-eval``: how faithful a MoEfied ONNX model is to its dense source (see docs/QUALITY.md)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from runtime import BACKENDS

from .evaluate import TASKS, Evaluator, markdown_table, plot_curve, quality_curve, read_moe_onnx
from .outfile import Interrupted, check_output, check_output_dir, interruptible, write_text
from .recipe import ExportOptions, Recipe
from .text import load_texts

# Where each family's curve is informative: decoders lose far more at low shares (docs/QUALITY.md).
DEFAULT_SHARES = {"encoder": "0.125,0.25,0.5", "decoder": "0.25,0.5,0.75"}
# moe-export flags the curve sets itself, or that make no sense for it: the recipe's number of experts per token,
# and every export option (--backend is moe-eval's own).
CURVE_OWNS = tuple([Recipe.flags()["top_k"], Recipe.flags()["budget"]]
                   + [f for name, f in ExportOptions.flags().items() if name != "backend"])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="moe-eval", allow_abbrev=False,
        description="Measure MoEfied ONNX models (run by the moefy runtime) against their dense Hugging Face "
                    "source: held-out embedding cosine and nearest-neighbour agreement, per-layer router recall "
                    "and FFN error on the exported operators, and labelled tasks as ratios to dense.",
        epilog="With --curve, the other flags are moe-export's recipe flags (e.g. --experts 32 --router ls "
               "--correction mean); the labelled tasks need `make data`.")
    ap.add_argument("dense_dir", help="the dense Hugging Face model directory (or .gguf file) the ONNX models were "
                                      "exported from")
    ap.add_argument("models", nargs="*", metavar="MOE.onnx",
                    help="MoEfied ONNX files (or export directories) written by moe-export")
    ap.add_argument("--curve", metavar="OUT_DIR",
                    help="export dense_dir at each --shares with the given moe-export flags into OUT_DIR, evaluate "
                         "each, and write OUT_DIR/curve.json and OUT_DIR/curve.png")
    ap.add_argument("--shares", default=None,
                    help="active shares (top-k / experts) for --curve, comma-separated (default "
                         f"{DEFAULT_SHARES['encoder']} for encoders, {DEFAULT_SHARES['decoder']} for decoders)")
    ap.add_argument("--tasks", default=",".join(TASKS),
                    help=f"labelled tasks, comma-separated from {', '.join(TASKS)}, or 'none' (default all)")
    ap.add_argument("--backend", choices=BACKENDS, default="auto", help="moefy runtime backend (default auto)")
    ap.add_argument("--plot", metavar="FILE",
                    help="with MOE.onnx files at different active shares (e.g. exported with their own --distill "
                         "budgets): also plot their quality against the share into FILE (PNG), as --curve does")
    ap.add_argument("--json", metavar="FILE", help="also write the full reports as JSON to FILE")
    ap.add_argument("--quiet", action="store_true", help="no progress output, only the results")
    return ap


def _shares(shares: str) -> list[float]:
    values = []
    for s in shares.split(","):
        try:
            value = float(s)
        except ValueError:
            value = None
        if value is None or not 0 < value <= 1:
            raise ValueError(f"--shares takes comma-separated numbers in (0, 1], got {s!r}")
        values.append(value)
    return values


def _top_ks(shares: str, experts: int) -> list[int]:
    ks = []
    for share in _shares(shares):
        k = round(share * experts)
        if abs(k - share * experts) > 1e-9:
            raise ValueError(f"--shares: {share:g} of {experts} experts is not a whole number of experts in "
                             f"[1, {experts}]")
        ks.append(k)
    return ks


def _recipe(args, rest: list[str]) -> Recipe:
    """The recipe of the curve from moe-export's own recipe flags, so they mean exactly what they mean there."""
    owned = [f for f in rest if f.split("=")[0] in CURVE_OWNS]
    if owned:
        accepted = [f for name, f in Recipe.flags().items() if f not in CURVE_OWNS]
        raise ValueError(f"--curve sets {', '.join(owned)} itself; accepted recipe flags: {', '.join(accepted)}")
    parser = argparse.ArgumentParser(prog="moe-eval --curve", allow_abbrev=False)
    Recipe.add_arguments(parser, exclude=("top_k", "budget"))
    recipe = Recipe.from_namespace(parser.parse_args(rest))
    if recipe.calib:
        load_texts(recipe.calib)  # a bad file fails now, not after the dense side is computed
    # the curve chooses top-k itself
    dataclasses.replace(recipe, top_k=None if recipe.experts is None else max(recipe.experts, 1)).check()
    return recipe


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    if rest and not args.curve:
        ap.error(f"unrecognized arguments: {' '.join(rest)} (moe-export flags go with --curve)")
    if not args.curve and not args.models:
        ap.error("give MoE ONNX files to evaluate, or --curve OUT_DIR")
    if args.curve and args.models:
        ap.error("give either MoE ONNX files or --curve, not both")
    if args.plot and not args.models:
        ap.error("--plot goes with MoE ONNX files (--curve writes OUT_DIR/curve.png itself)")
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    tasks = [] if args.tasks == "none" else [t for t in args.tasks.split(",") if t]
    try:
        with interruptible():
            return _run(args, rest, tasks, log)
    except Interrupted as e:
        print(f"moe-eval: interrupted ({e})", file=sys.stderr)
        return 128 + e.signum


def _run(args, rest, tasks, log) -> int:
    try:
        if set(tasks) - set(TASKS):
            raise ValueError(f"--tasks: unknown task(s) {sorted(set(tasks) - set(TASKS))}; "
                             f"choose from {', '.join(TASKS)}, or 'none'")
        recipe = _recipe(args, rest) if args.curve else None
        if args.curve and args.shares is not None:  # bad shares fail before the slow dense side (without
            # --experts, the count comes with the model: only their form now)
            _shares(args.shares) if recipe.experts is None else _top_ks(args.shares, recipe.experts)
        if not Path(args.dense_dir).exists():
            raise FileNotFoundError(f"dense model {args.dense_dir} does not exist")
        for flag, out in (("--json", args.json), ("--plot", args.plot)):
            if out:
                check_output(out, flag)  # a directory, a read-only place ...: said now, not after the work
        if args.curve:
            check_output_dir(args.curve, "--curve")
        shares = {}
        for path in args.models:  # before the slow dense side: bad files fail at once
            config = read_moe_onnx(path)[0]
            shares.setdefault(config.active_share, []).append(Path(path).name)
        if args.plot and (len(shares) < 2 or len(shares) < len(args.models)):
            raise ValueError("--plot needs models at two or more different active shares, one model per share; got "
                             + "; ".join(f"{100 * s:.1f}%: {', '.join(n)}" for s, n in sorted(shares.items())))
        evaluator = Evaluator(args.dense_dir, tasks=tasks, progress=not args.quiet, log=log)
        if args.curve:
            first = evaluator.adapter.read(evaluator.adapter.layers(evaluator.model)[0])
            recipe = dataclasses.replace(recipe, experts=recipe.experts_for(first.gated, first.width()))
            top_ks = _top_ks(args.shares or DEFAULT_SHARES["decoder" if evaluator.decoder else "encoder"],
                             recipe.experts)
            reports = quality_curve(evaluator, args.dense_dir, args.curve, top_ks, recipe, backend=args.backend,
                                    log=log)
            flags = " ".join(rest) or "default recipe"
            name = "/".join(Path(args.dense_dir).resolve().parts[-2:])  # HF directories are often just "model"
            plot_curve(reports, Path(args.curve) / "curve.png", f"{name}: {flags}")
            payload = {"dense": str(args.dense_dir), "recipe": recipe.to_dict(), "reports": [r.to_dict() for r in reports]}
            write_text(Path(args.curve) / "curve.json", json.dumps(payload, indent=2) + "\n", "--curve")
            log(f"wrote {Path(args.curve) / 'curve.json'} and {Path(args.curve) / 'curve.png'}")
        else:
            reports = []
            for path in args.models:
                reports.append(evaluator(path, backend=args.backend))
                print(reports[-1].summary(), flush=True)
            payload = {"dense": str(args.dense_dir), "reports": [r.to_dict() for r in reports]}
            if args.plot:
                plot_curve(sorted(reports, key=lambda r: r.active_share), args.plot,
                           ", ".join(Path(p).name for p in args.models))
                log(f"wrote {args.plot}")
        if args.json:
            write_text(args.json, json.dumps(payload, indent=2) + "\n", "--json")
    except (ValueError, OSError, RuntimeError) as e:  # OSError: an output path or disk that fails (outfile.py)
        print(f"moe-eval: error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
