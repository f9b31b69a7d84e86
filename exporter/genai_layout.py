"""The fast layout for onnxruntime-genai: its model builder's graph with moefy's operator as the MLP.

``export_genai`` writes a directory that ``onnxruntime_genai.Model(out_dir)`` loads as it is: ``model.onnx``
(+ ``.data``) from onnxruntime-genai's model builder (fused GroupQueryAttention and rotary embedding,
SkipSimplifiedLayerNorm, fp32 or int4/int8 ``MatMulNBits`` dense parts) in which every decoder layer's MLP is
one ``ai.moefy::SparseExpertFFN`` node, the tokenizer files, and ``genai_config.json`` naming moefy's op
library under ``model.decoder.session_options.custom_ops_library``.

The library is copied into the directory and named relative to it: onnxruntime-genai (0.18) loads a custom
op library only from inside the model directory (after resolving symlinks), so neither the installed
library's absolute path nor a symlink to it loads. The copy is that of the moefy which exported the model;
re-export (or copy ``runtime.library_path()`` over it) to pick up newer kernels.

The builder needs transformers>=5 and onnx_ir, which moefy's own environment cannot have (optimum-onnx pins
transformers<4.58), so it runs in a separate environment (``make genai-venv``) as a subprocess
(``exporter/genai_builder.py``); the operator inputs reach it as ``.npy`` files.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from runtime import spec

PRECISIONS = ("fp32", "int4", "int8")  # of the dense parts; the experts' type is that of the W1/W2/Wg given
GENAI_VENV = ".venv-genai"  # created by `make genai-venv`
PYTHON_ENV_VAR = "MOEFY_GENAI_PYTHON"  # the builder environment's python, if not ./.venv-genai
BUILDER_SCRIPT = Path(__file__).with_name("genai_builder.py")
METADATA_KEY = "moefy.genai"
INPUT_NAMES = tuple(p.name for p in spec.INPUTS if p.name not in ("X", "router_scores"))
ATTRIBUTE_NAMES = tuple(a.name for a in spec.ATTRIBUTES)
LOWRANK = "lowrank"  # the low-rank stand-in for the skipped experts: standard MatMuls beside the node


class GenaiLayoutError(ValueError):
    """Inputs the fast layout cannot be built from (the message says what was wrong and what is accepted)."""


def builder_python(python: str | os.PathLike | None = None) -> Path:
    """The Python of the model builder's environment: ``python``, else ``$MOEFY_GENAI_PYTHON``, else
    ``.venv-genai/bin/python`` in the working directory or one above it, or beside this package's source."""
    if python is None:
        python = os.environ.get(PYTHON_ENV_VAR)
    if python is not None:
        if not Path(python).is_file():
            raise FileNotFoundError(f"onnxruntime-genai's model builder environment: {python} does not exist")
        return Path(python)
    for base in (Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parents[1]):
        candidate = base / GENAI_VENV / "bin" / "python"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"onnxruntime-genai's model builder needs its own Python environment (transformers>=5, onnx_ir, which "
        f"moefy's cannot have): run `make genai-venv` in the moefy checkout, or set ${PYTHON_ENV_VAR} to the "
        "python of an environment with requirements-genai.txt installed")


def normalize_layer(entry, index: int) -> tuple[dict[str, np.ndarray], dict, tuple | None]:
    """One layer's (operator inputs, attributes, low-rank stand-in or None) from a mapping of spec input and
    attribute names (and ``lowrank``, see below), or from an object with ``.inputs`` and ``.attrs`` (e.g.
    ``exporter.evaluate.SparseFFNLayer``); checked by the spec. ``lowrank`` = (A [R, d], B [R, d], c [d]), as
    :func:`exporter.moefy.operator_inputs` gives it, is added to the operator's output as (X A^T) B + c."""
    if hasattr(entry, "inputs") and hasattr(entry, "attrs"):
        items = {**entry.inputs, **entry.attrs}
    elif isinstance(entry, Mapping):
        items = dict(entry)
    else:
        raise GenaiLayoutError(f"layer {index}: expected a mapping of {spec.OP_TYPE} input and attribute names, "
                               f"got {type(entry).__name__}")
    unknown = sorted(set(items) - set(INPUT_NAMES) - set(ATTRIBUTE_NAMES) - {LOWRANK})
    if unknown:
        raise GenaiLayoutError(f"layer {index}: unknown keys {unknown}; accepted: inputs {', '.join(INPUT_NAMES)} "
                               f"(X comes from the graph, router_scores cannot), attributes "
                               f"{', '.join(ATTRIBUTE_NAMES)} and {LOWRANK} (A, B, c)")
    inputs = {k: np.asarray(v) for k, v in items.items() if k in INPUT_NAMES and v is not None}
    attrs = {k: v for k, v in items.items() if k in ATTRIBUTE_NAMES and v is not None}
    if "W1" not in inputs or np.ndim(inputs["W1"]) != 3:
        raise GenaiLayoutError(f"layer {index}: W1 [E, m, d] is required")
    # Float inputs go in as float32, the operator's float type, except expert weights of a type it takes (float16).
    for name, a in inputs.items():
        if a.dtype != np.float32 and np.issubdtype(a.dtype, np.floating) and not (
                name in spec.SCALES and str(a.dtype) in spec.WEIGHT_TYPES):
            inputs[name] = a.astype(np.float32)
    try:
        attrs, _ = spec.check_arrays({**inputs, "X": np.zeros((1, inputs["W1"].shape[-1]), np.float32)}, attrs)
    except spec.SpecError as e:
        raise GenaiLayoutError(f"layer {index}: {e}") from None
    # Plain Python scalars: they become ONNX attributes (and JSON).
    attrs = {a.name: {"int": int, "float": float, "string": str}[a.type](attrs[a.name]) for a in spec.ATTRIBUTES}
    return inputs, attrs, _lowrank(items.get(LOWRANK), inputs["W1"].shape[-1], index)


def _lowrank(lowrank, d: int, index: int) -> tuple[np.ndarray, ...] | None:
    if lowrank is None:
        return None
    try:
        a, b, c = (np.asarray(t, dtype=np.float32) for t in lowrank)
    except (TypeError, ValueError):  # not three arrays
        a = b = c = None
    if a is None or a.ndim != 2 or a.shape[1] != d or b.shape != a.shape or c.shape != (d,):
        got = "?" if a is None else ", ".join(str(list(t.shape)) for t in (a, b, c))
        raise GenaiLayoutError(f"layer {index}: {LOWRANK} must be (A [R, {d}], B [R, {d}], c [{d}]), got ({got})")
    return a, b, c


def _write_layers(layers: Sequence, directory: Path, metadata: Mapping[str, str]) -> dict:
    directory.mkdir()
    entries, widths = [], set()
    for i, entry in enumerate(layers):
        inputs, attrs, lowrank = normalize_layer(entry, i)
        widths.add(inputs["W1"].shape[-1])
        files = {}
        for name, a in inputs.items():
            files[name] = f"{i}.{name}.npy"
            np.save(directory / files[name], np.ascontiguousarray(a))
        entries.append({"inputs": files, "attrs": attrs})
        if lowrank is not None:  # (A, B, c): genai_builder adds (X A^T) B + c to the node's output
            entries[-1][LOWRANK] = [f"{i}.{LOWRANK}{j}.npy" for j in range(3)]
            for f, a in zip(entries[-1][LOWRANK], lowrank):
                np.save(directory / f, a)
    if len(widths) > 1:
        raise GenaiLayoutError(f"the layers' operator inputs have different widths d: {sorted(widths)}")
    first = entries[0]
    summary = {"layers": len(entries), "op": f"{spec.DOMAIN}::{spec.OP_TYPE}", "op_version": spec.VERSION,
               "top_k": [e["attrs"]["top_k"] for e in entries],
               "weights": str(np.load(directory / first["inputs"]["W1"], mmap_mode="r").dtype)}
    meta = {METADATA_KEY: json.dumps(summary), **{str(k): str(v) for k, v in metadata.items()}}
    (directory / "layers.json").write_text(json.dumps({"layers": entries, "metadata": meta}))
    return summary


def _run(cmd: list[str], log_path: Path, progress: bool, log: Callable[[str], object]) -> None:
    """Run the builder; its lines go to ``log`` (if ``progress``) and to ``log_path``. A ``moefy:`` line on
    exit status 2 is bad input; any other failure quotes the end of the output."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # moefy's environment must not leak into the builder's
    tail: deque[str] = deque(maxlen=30)
    with open(log_path, "w") as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                    text=True, env=env) as proc:
        for line in proc.stdout:
            f.write(line)
            tail.append(line.rstrip())
            if progress and line.strip():
                log(f"  [genai builder] {line.rstrip()}")
    errors = [t[len("moefy: "):] for t in tail if t.startswith("moefy: ")]
    if proc.returncode == 2 and errors:
        raise GenaiLayoutError(errors[-1])
    if proc.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai's model builder failed (exit status {proc.returncode}):\n"
                           + "\n".join(tail))


def _check_source(source: Path, layers: Sequence | None) -> None:
    """Fail before the (slow) build where the source can tell; a GGUF's layer count and width are checked
    by the builder process once it has read the file."""
    if source.suffix == ".gguf":
        if not source.is_file():
            raise GenaiLayoutError(f"{source} does not exist")
        return
    if not (source / "config.json").is_file():
        raise GenaiLayoutError(f"{source} is neither a .gguf file nor a Hugging Face directory with config.json")
    if layers is None:
        return
    config = json.loads((source / "config.json").read_text())
    n = config.get("num_hidden_layers")
    if n is not None and len(layers) != n:
        raise GenaiLayoutError(f"{len(layers)} layers of operator inputs given, {source} has {n} (num_hidden_layers)")


def export_genai(source: str | os.PathLike, layers: Sequence | None, out_dir: str | os.PathLike, *,
                 precision: str = "fp32", library: str | None = None, metadata: Mapping[str, str] | None = None,
                 python: str | os.PathLike | None = None, overwrite: bool = False,
                 check: Callable[[Path], object] | None = None, progress: bool = True,
                 log: Callable[[str], object] = print) -> Path:
    """Write onnxruntime-genai's layout of ``source`` with moefy's operator as every decoder layer's MLP.

    Args:
        source: the dense model, a Hugging Face directory or a ``.gguf`` file (any quantization: it is
            dequantized to float32 first). Its attention, norms, embeddings and LM head are kept.
        layers: one entry per decoder layer, each a mapping of ``SparseExpertFFN`` input names (``W1``, ``W2``,
            ``Wg``, ``B1``, ``Bg``, ``B2``, ``router_w``, ``router_b``, ``unselected_bias``, ``*_scale``; NumPy
            arrays, float32 or int8 experts with row scales) and attribute names (``top_k``, ``activation``,
            ``min_k``, ``score_threshold``), and optionally ``lowrank`` (a low-rank stand-in beside the node,
            see :func:`normalize_layer`), or an object with ``.inputs`` and ``.attrs`` holding the same.
            ``None``: the builder's dense model, unchanged (benchmark baselines).
        out_dir: the directory to write; it appears only when complete.
        precision: of the dense parts: ``fp32``, or ``int4`` / ``int8`` (the builder's ``MatMulNBits``).
        library: the op library copied into ``out_dir`` for genai_config.json; default
            ``runtime.library_path()`` (the installed moefy's).
        metadata: extra ONNX ``metadata_props`` (e.g. the MoE config).
        python: the builder environment's python (default: see ``builder_python``).
        overwrite: replace an existing ``out_dir``.
        check: called with the finished model's directory (a temporary one) before it becomes ``out_dir``,
            e.g. to compare ``greedy(dir, ...)`` with the PyTorch MoEfied model; whatever it raises aborts the
            export with nothing written.

    Returns:
        ``out_dir``.

    Raises:
        GenaiLayoutError: bad input (source, layer count or width, operator inputs); nothing is written.
        FileNotFoundError: no builder environment, or the op library was not built.
    """
    source, out_dir = Path(source), Path(out_dir)
    if precision not in PRECISIONS:
        raise GenaiLayoutError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if layers is not None and (isinstance(layers, Mapping) or not isinstance(layers, Sequence) or not layers):
        raise GenaiLayoutError("layers must be a non-empty list with one entry per decoder layer, or None")
    _check_source(source, layers)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    if not out_dir.parent.is_dir():
        raise FileNotFoundError(f"the parent directory of {out_dir} does not exist")
    exe = builder_python(python)
    if layers is not None and library is None:
        from runtime import library_path
        library = library_path()

    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        cmd = [str(exe), str(BUILDER_SCRIPT), "--source", str(source.resolve()), "--out", str(work / "model"),
               "--precision", precision, "--cache", str(work / "cache")]
        if layers is not None:
            summary = _write_layers(layers, work / "layers", dict(metadata or {}))
            cmd += ["--layers", str(work / "layers"), "--library", Path(library).name]
            log(f"building the onnxruntime-genai layout of {source} ({precision} dense parts, {summary['layers']} "
                f"{spec.OP_TYPE} layers, {summary['weights']} experts)")
        else:
            log(f"building onnxruntime-genai's dense {precision} model of {source}")
        _run(cmd, work / "builder.log", progress, log)
        if layers is not None:
            shutil.copy2(library, work / "model" / Path(library).name)
        if check is not None:
            check(work / "model")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(work / "model", out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


GENAI_SUBDIR = "genai"  # in a moe-export directory: the genai layout's model files (optimum's model.onnx is above)


MODEL_TYPES = ("llama", "mistral", "qwen2")  # moefy's families that onnxruntime-genai's builder (0.18) builds


def genai_precision(choice: str, *, decoder_directory: bool, model_type: str) -> str | None:
    """The dense parts' precision of the genai layout ``moe-export --genai CHOICE`` builds, or None for none;
    an explicit choice that cannot be honoured is an error now, before the export's work."""
    if choice == "off":
        return None
    if not decoder_directory:  # a decoder exported to a directory: the layout goes beside optimum's
        if choice == "auto":
            return None
        raise GenaiLayoutError("--genai builds onnxruntime-genai's layout of a decoder exported to a directory; "
                               "pass an output directory and a text-generation model, or --genai off")
    if model_type not in MODEL_TYPES:
        if choice == "auto":
            return None
        raise GenaiLayoutError(f"--genai: onnxruntime-genai's model builder does not build {model_type} models; "
                               f"it builds {', '.join(MODEL_TYPES)} (pass --genai off)")
    try:
        builder_python()
    except FileNotFoundError:
        if choice == "auto":
            return None
        raise
    return "fp32" if choice == "auto" else choice


def add_to_export(source: str | os.PathLike, layers: Sequence, directory: str | os.PathLike, precision: str, *,
                  reference: Callable[[list[int], int], tuple[list[int], int | None]], prompts: Sequence[list[int]],
                  new_tokens: int, metadata: Mapping[str, str] | None = None, progress: bool = True,
                  log: Callable[[str], object] = print) -> dict:
    """Build the genai layout of an export into ``directory/genai`` and point ``directory/genai_config.json`` at
    it, so ``og.Model(directory)`` loads it beside optimum's ``model.onnx`` (the tokenizer files are shared).

    ``reference(prompt, n)`` gives the PyTorch MoEfied model's greedy tokens and its first near-tied step (or
    None): with fp32 dense parts the genai model must produce the same tokens on every prompt up to such a tie;
    with int4/int8 dense parts (other numbers) they are only counted. Returns what was checked."""
    directory = Path(directory)
    checked = {"precision": precision, "prompts": len(prompts), "identical": 0}

    def check(model_dir: Path) -> None:
        for prompt in prompts:
            got, _ = greedy(model_dir, prompt, new_tokens)
            want, first_tie = reference(prompt, new_tokens)
            want = want[:len(got)]  # genai stops at the end-of-text token; PyTorch's loop does not
            if got == want:
                checked["identical"] += 1
                continue
            at = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            if precision == "fp32" and (first_tie is None or first_tie > at):
                raise GenaiLayoutError(f"the onnxruntime-genai layout's greedy tokens differ from the PyTorch MoEfied "
                                       f"model at new token {at} ({got[:at + 1]} vs {want[:at + 1]}), with no near tie "
                                       "before; nothing was written")

    export_genai(source, layers, directory / GENAI_SUBDIR, precision=precision, metadata=metadata, check=check,
                 progress=progress, log=log)
    sub = directory / GENAI_SUBDIR
    config = json.loads((sub / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    decoder["filename"] = f"{GENAI_SUBDIR}/{decoder['filename']}"
    options = decoder.setdefault("session_options", {})
    if options.get("custom_ops_library"):
        options["custom_ops_library"] = f"{GENAI_SUBDIR}/{options['custom_ops_library']}"
    (directory / "genai_config.json").write_text(json.dumps(config, indent=4) + "\n")
    (sub / "genai_config.json").unlink()
    return checked


def greedy(model_dir: str | os.PathLike, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding through ``onnxruntime_genai``: the new tokens and the logits each was picked from
    ([new_tokens, vocab]; the first row is the prompt's last position). For validation and tests."""
    import onnxruntime_genai as og
    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(prompt, np.int32))
    tokens, logits = [], []
    while not gen.is_done():
        logits.append(np.asarray(gen.get_logits(), np.float32).reshape(-1))
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens, np.stack(logits)


def dequantize_gguf(gguf: str | os.PathLike, out_dir: str | os.PathLike, *, python: str | os.PathLike | None = None,
                    progress: bool = True, log: Callable[[str], object] = print) -> Path:
    """A float32 Hugging Face directory from a GGUF file (transformers' dequantization, in the builder's
    environment), to build several layouts from one conversion."""
    gguf, out_dir = Path(gguf), Path(out_dir)
    if not gguf.is_file():
        raise GenaiLayoutError(f"{gguf} does not exist")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists")
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _run([str(builder_python(python)), str(BUILDER_SCRIPT), "--dequantize-only", "--source", str(gguf.resolve()),
              "--out", str(work / "hf"), "--cache", str(work)], work / "builder.log", progress, log)
        os.replace(work / "hf", out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def main(argv=None) -> int:
    """``python -m exporter.genai_layout SOURCE OUT --precision P``: the builder's dense model (baselines)."""
    import argparse
    ap = argparse.ArgumentParser(description="onnxruntime-genai's dense model of SOURCE, built as moefy builds its "
                                             "fast layout (for comparisons)")
    ap.add_argument("source")
    ap.add_argument("out")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32")
    args = ap.parse_args(argv)
    try:
        export_genai(args.source, None, args.out, precision=args.precision)
    except (GenaiLayoutError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
