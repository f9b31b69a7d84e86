"""onnxruntime-genai's model builder with moefy's operator in place of each MLP.

Runs inside the builder's own environment (``make genai-venv``: onnxruntime-genai, transformers>=5, onnx_ir),
never in moefy's (which pins transformers<4.58 for optimum): ``exporter/genai_layout.py`` starts it as a
subprocess. It imports nothing from moefy but ``runtime/spec.py`` (standard library only), by path.

The builder keeps everything it fuses (GroupQueryAttention with rotary embedding, SkipSimplifiedLayerNorm,
int4/int8 MatMulNBits for the dense parts); only ``Model.make_mlp`` is replaced, for the duration of the
build, by one ``SparseExpertFFN`` node whose inputs come from ``--layers`` (a directory written by
genai_layout: ``layers.json`` and one ``.npy`` per array). Without ``--layers`` it is the plain builder, which
the benchmarks use for the dense baselines.

Exit status 2 with a one-line message on stderr (prefixed ``moefy:``) means bad input; anything else is a bug.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

PRECISIONS = ("fp32", "int4", "int8")  # of the dense parts (attention, LM head); CPU only
_SPEC_PATH = Path(__file__).resolve().parents[1] / "runtime" / "spec.py"


class InputError(Exception):
    """Bad input: reported as one line, exit status 2."""


def load_spec():
    s = importlib.util.spec_from_file_location("moefy_spec", _SPEC_PATH)
    mod = importlib.util.module_from_spec(s)
    sys.modules[s.name] = mod  # dataclasses look their module up there
    s.loader.exec_module(mod)
    return mod


spec = load_spec()


def dequantize_gguf(gguf: Path, out_dir: Path) -> Path:
    """A Hugging Face directory (float32 safetensors, config, tokenizer) from a GGUF file of any quantization;
    the builder's own GGUF reader takes only float16/float32 files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    except Exception as e:  # transformers raises ValueError, KeyError, RuntimeError... for unreadable files
        raise InputError(f"cannot read {gguf} as a GGUF model: {type(e).__name__}: {e}") from None
    # transformers marks a GGUF-loaded model as "quantized" and refuses to save it; its weights are plain float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_layers(directory: Path) -> list[tuple[dict, dict, list | None]]:
    """(inputs, attributes, low-rank stand-in (A, B, c) or None) per layer, the operator's arrays memory-mapped."""
    meta = json.loads((directory / "layers.json").read_text())
    layers = []
    for entry in meta["layers"]:
        inputs = {name: np.load(directory / file, mmap_mode="r") for name, file in entry["inputs"].items()}
        attrs = {k: (float(v) if k == "score_threshold" else v) for k, v in entry["attrs"].items()}
        lowrank = [np.load(directory / f) for f in entry["lowrank"]] if "lowrank" in entry else None  # genai_layout.LOWRANK
        layers.append((inputs, attrs, lowrank))
    return layers


@contextlib.contextmanager
def sparse_mlp(model_class, layers: list[tuple[dict, dict, list | None]], metadata: dict[str, str]):
    """Patch ``model_class.make_mlp`` (every architecture's MLP hook) to emit one SparseExpertFFN node per layer
    (and the low-rank stand-in's MatMuls beside it, if the layer has one), and ``save_model`` to declare the
    operator's domain and store ``metadata`` in metadata_props; restored afterwards so that the builder module
    stays usable for dense models in the same process."""
    make_mlp, save_model = model_class.make_mlp, model_class.save_model

    def moe_make_mlp(self, layer_id, mlp, root_input):
        if layer_id >= len(layers):
            raise InputError(f"the model has more than the {len(layers)} layers given")
        inputs, attrs, lowrank = layers[layer_id]
        d = next(iter(inputs.values())).shape[-1]
        if d != self.hidden_size:
            raise InputError(f"layer {layer_id}: the operator's inputs have width d={d}, the model's hidden size "
                             f"is {self.hidden_size}")
        basename = f"/model/layers.{layer_id}/mlp/{spec.OP_TYPE}"
        names = []
        for port in spec.INPUTS:
            if port.name == "X":
                names.append(root_input)
            elif port.name in inputs:
                init = f"model.layers.{layer_id}.mlp.moe.{port.name}"
                self.make_initializer(np.ascontiguousarray(inputs[port.name]), init)
                names.append(init)
            else:
                names.append("")  # absent optional input
        while names[-1] == "":
            names.pop()
        output = f"{basename}/output_0"
        self.make_node(spec.OP_TYPE, names, [output], name=basename, domain=spec.DOMAIN, **attrs)
        self.make_value(output, self.io_dtype, shape=self.make_hidden_state_shape())
        if lowrank is not None:  # the stand-in for the skipped experts, beside the node: output + (X A^T) B + c
            a, b, c = lowrank
            base, init = f"/model/layers.{layer_id}/mlp/lowrank", f"model.layers.{layer_id}.mlp.lowrank"
            for name, t in (("a_t", a.T), ("b", b), ("c", c)):
                self.make_initializer(np.ascontiguousarray(t, dtype=np.float32), f"{init}.{name}")

            def node(op, name, node_inputs, width=None):
                out = f"{base}/{name}/output_0"
                self.make_node(op, node_inputs, [out], name=f"{base}/{name}")
                self.make_value(out, self.io_dtype, shape=self.make_hidden_state_shape(last_dim=width))
                return out
            low = node("MatMul", "MatMul", [root_input, f"{init}.a_t"], len(a))
            low = node("Add", "Add", [node("MatMul", "MatMul_1", [low, f"{init}.b"]), f"{init}.c"])
            output = node("Add", "Add_1", [output, low])
        self.mlp_attrs["output_0"] = output
        self.layernorm_attrs["skip_input"] = output

    def moe_save_model(self, out_dir):
        if self.layer_id != len(layers):
            raise InputError(f"{len(layers)} layers of operator inputs given, the model has {self.layer_id}")
        self.graph.opset_imports[spec.DOMAIN] = spec.VERSION
        self.model.metadata_props.update(metadata)
        return save_model(self, out_dir)

    model_class.make_mlp, model_class.save_model = moe_make_mlp, moe_save_model
    try:
        yield
    finally:
        model_class.make_mlp, model_class.save_model = make_mlp, save_model


def build(source: Path, out_dir: Path, precision: str, cache_dir: Path, layers_dir: Path | None,
          library: str | None, extra_options: list[str]) -> None:
    from transformers import AutoConfig

    if source.suffix == ".gguf":
        print(f"dequantizing {source} to float32", flush=True)
        source = dequantize_gguf(source, cache_dir / "hf")
    config = AutoConfig.from_pretrained(source)
    from onnxruntime_genai.models import builder  # noqa: E402 (after transformers: its import is slow)

    layers, metadata = [], {}
    if layers_dir is not None:
        layers = load_layers(layers_dir)
        metadata = json.loads((layers_dir / "layers.json").read_text())["metadata"]
        if len(layers) != config.num_hidden_layers:
            raise InputError(f"{len(layers)} layers of operator inputs given, {source} has "
                             f"{config.num_hidden_layers} (num_hidden_layers)")
    options = builder.parse_extra_options(None, str(source), str(out_dir), precision, "cpu", str(cache_dir),
                                          extra_options)
    patch = sparse_mlp(builder.Model, layers, metadata) if layers_dir is not None else contextlib.nullcontext()
    with patch:
        builder.create_model(None, str(source), str(out_dir), precision, "cpu", str(cache_dir), **options)
    if library is not None:
        path = out_dir / "genai_config.json"
        cfg = json.loads(path.read_text())
        cfg["model"]["decoder"]["session_options"]["custom_ops_library"] = library
        path.write_text(json.dumps(cfg, indent=4) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, type=Path, help="Hugging Face directory or .gguf file")
    ap.add_argument("--out", required=True, type=Path, help="output directory (created)")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32", help="weights of the dense parts")
    ap.add_argument("--cache", required=True, type=Path, help="scratch directory")
    ap.add_argument("--layers", type=Path, help="operator inputs per layer (from genai_layout); absent: dense model")
    ap.add_argument("--library", help="custom_ops_library to write into genai_config.json (a file name: the "
                                      "library is copied into the model directory)")
    ap.add_argument("--dequantize-only", action="store_true",
                    help="only write the .gguf --source as a float32 Hugging Face directory to --out")
    ap.add_argument("--extra-option", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to the builder's --extra_options")
    args = ap.parse_args(argv)
    try:
        if args.dequantize_only:
            dequantize_gguf(args.source, args.out)
            return 0
        build(args.source, args.out, args.precision, args.cache, args.layers, args.library, args.extra_option)
    except InputError as e:
        print(f"moefy: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
