"""Text generation with a decoder exported in optimum's layout (``model.onnx`` with ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/.value`` in and ``logits``, ``present.{i}.*``
out; one model for the first and the later steps, the first with empty past tensors).

* :class:`DecoderSession`: that graph on the moefy runtime, one call per step, greedy decoding;
* :class:`Generator`: with the tokenizer of the export directory, streaming text and timing;
* :class:`GenaiDecoder`: the onnxruntime-genai layout of the same directory (``genai_config.json``, written by
  ``moe-export --genai``), the fast path: fused attention, its own KV cache and loop in C++;
* ``moe-generate OUT_DIR "prompt"``: the command line (the genai layout when the directory has one).

The same directory also loads in optimum: ``ORTModelForCausalLM.from_pretrained(OUT_DIR,
session_options=runtime.session_options())``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .session import BACKENDS, InferenceSession, InvalidInputError

MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
LAYOUTS = ("auto", "onnx", "genai")
PAST = "past_key_values.{}.{}"
PRESENT = "present.{}.{}"


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


class DecoderSession:
    """A text-generation ONNX model with a KV cache, run by :class:`runtime.InferenceSession`.

    Args:
        path: ``model.onnx`` or the export directory holding it.
        backend, threads: as for :class:`runtime.InferenceSession` (also ``sess_options``, ``spinning``).
    """

    def __init__(self, path: str | os.PathLike, backend: str = "auto", **session_kwargs):
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"decoder model {path} does not exist; pass a directory written by moe-export "
                                    "for a text-generation model, or its model.onnx")
        self.session = InferenceSession(path, backend=backend, **session_kwargs)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        if "input_ids" not in inputs or not self.layers or "logits" not in self.session.get_output_names():
            raise ValueError(f"{path} is not a text-generation model with a KV cache: its inputs are "
                             f"{sorted(inputs)}; export a decoder (e.g. LLaMA, GPT-2) with moe-export")
        # [batch, kv heads, past length, head dim]: the heads and head dim are fixed in the graph
        _, self.kv_heads, _, self.head_dim = _dims(inputs[PAST.format(0, "key")])
        self.uses_position_ids = "position_ids" in inputs
        self.model_type = (self.session.moe_config or {}).get("model_type")
        self.backend = self.session.backend

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return {PAST.format(i, kv): empty for i in range(self.layers) for kv in ("key", "value")}

    def position_ids(self, attention_mask: np.ndarray, new: int) -> np.ndarray:
        """Positions of the last ``new`` tokens from the mask, as optimum computes them (OPT: padding -1)."""
        pos = attention_mask.cumsum(-1) - 1
        pos[attention_mask == 0] = -1 if self.model_type == "opt" else 1
        return pos[:, -new:].astype(np.int64)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray]
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One call: logits [batch, new, vocab] of the new tokens ``input_ids`` [batch, new], and the cache
        grown by them. ``attention_mask`` [batch, past + new] covers the cached and the new tokens."""
        input_ids = np.asarray(input_ids, np.int64)
        attention_mask = np.asarray(attention_mask, np.int64)
        past_len = past[PAST.format(0, "key")].shape[2] if past else 0
        if input_ids.ndim != 2 or attention_mask.shape != (input_ids.shape[0], past_len + input_ids.shape[1]):
            raise InvalidInputError(f"attention_mask must be [batch, past + new tokens] = "
                                    f"[{input_ids.shape[0] if input_ids.ndim else '?'}, {past_len} + "
                                    f"{input_ids.shape[-1] if input_ids.ndim else '?'}], got {list(attention_mask.shape)} "
                                    f"(input_ids {list(input_ids.shape)})")
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, **past}
        if self.uses_position_ids:
            feed["position_ids"] = self.position_ids(attention_mask, input_ids.shape[1])
        outs = self.session.run(None, feed)
        names = self.session.get_output_names()
        present = dict(zip(names, outs))
        logits = present.pop("logits")
        return logits, {PAST.format(i, kv): present[PRESENT.format(i, kv)]
                        for i in range(self.layers) for kv in ("key", "value")}

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits [batch, tokens, vocab] of whole sequences (one call, empty cache)."""
        input_ids = np.asarray(input_ids, np.int64)
        mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.step(input_ids, mask, self.empty_past(len(input_ids)))[0]

    def greedy(self, input_ids: Sequence[int], max_new_tokens: int, *, eos_token_id=None,
               stats: "GenerationStats | None" = None) -> Iterator[int]:
        """Greedy decoding of one prompt: yields each new token as it is chosen (the prompt in one call,
        then one call per token). Stops after ``max_new_tokens`` or at an ``eos_token_id`` (int or list)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        ids = np.asarray(input_ids, np.int64).reshape(1, -1)
        if ids.shape[1] == 0:
            raise ValueError("the prompt has no tokens")
        stop = set() if eos_token_id is None else set(np.atleast_1d(eos_token_id).tolist())
        mask, past, t0 = np.ones_like(ids), self.empty_past(1), time.perf_counter()
        for n in range(max_new_tokens):
            logits, past = self.step(ids, mask, past)
            token = int(logits[0, -1].argmax())
            if stats is not None:
                stats.record(n, ids.shape[1], time.perf_counter() - t0)
            yield token
            if token in stop:
                return
            ids, mask, t0 = np.array([[token]], np.int64), np.ones((1, mask.shape[1] + 1), np.int64), time.perf_counter()


class GenaiDecoder:
    """The onnxruntime-genai layout of an export directory (its ``genai_config.json``), with the same ``greedy``
    as :class:`DecoderSession`. moefy's library is the copy the directory holds (onnxruntime-genai loads custom
    op libraries only from inside the model directory)."""

    backend = "onnxruntime-genai"

    def __init__(self, model_dir: str | os.PathLike, threads: int | None = None):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise RuntimeError("the onnxruntime-genai layout needs the onnxruntime-genai package "
                               "(pip install 'moefy[genai]'), or --layout onnx") from None
        model_dir = Path(model_dir)
        if not (model_dir / GENAI_CONFIG).is_file():
            raise FileNotFoundError(f"{model_dir} has no {GENAI_CONFIG}; export with moe-export --genai (it needs "
                                    "`make genai-venv`), or use --layout onnx")
        self.og = og
        config = og.Config(str(model_dir))
        options = {"inter_op_num_threads": 1, **({"intra_op_num_threads": threads} if threads else {})}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def greedy(self, input_ids: Sequence[int], max_new_tokens: int, *, eos_token_id=None,
               stats: "GenerationStats | None" = None) -> Iterator[int]:
        """Greedy new tokens as they come (onnxruntime-genai stops at the model's end-of-sequence tokens itself)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if len(input_ids) == 0:
            raise ValueError("the prompt has no tokens")
        if max_new_tokens == 0:
            return
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(input_ids) + max_new_tokens, do_sample=False)
        gen = self.og.Generator(self.model, params)
        stop = set() if eos_token_id is None else set(np.atleast_1d(eos_token_id).tolist())
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(input_ids, np.int32))  # the prompt's step
        for n in range(max_new_tokens):
            gen.generate_next_token()  # picks from the last logits (then, next time round, runs one step)
            token = int(gen.get_next_tokens()[0])
            if stats is not None:
                stats.record(n, len(input_ids) if n == 0 else 1, time.perf_counter() - t0)
            yield token
            if token in stop or gen.is_done():
                return
            t0 = time.perf_counter()


@dataclasses.dataclass
class GenerationStats:
    """Prefill (the prompt's call) and decode (one call per further token) times of one generation."""
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    def record(self, step: int, tokens: int, seconds: float) -> None:
        if step == 0:
            self.prompt_tokens, self.prefill_seconds = tokens, seconds
        else:
            self.decode_tokens += 1
            self.decode_seconds += seconds

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else float("nan")

    def summary(self) -> str:
        decode = f"decode {self.decode_tokens} tokens at {self.decode_tokens_per_second:.1f} tokens/s" \
            if self.decode_tokens else "no decode step (the prompt's call gave the only token, or the end)"
        return f"prefill {self.prompt_tokens} tokens in {1e3 * self.prefill_seconds:.1f} ms; {decode}"


class Generator:
    """Streaming text generation from a ``moe-export`` directory (model.onnx, config.json, tokenizer files).

    Example::

        gen = Generator("out/smollm-moe")
        for piece in gen.stream("What is the capital of France?", chat=True):
            print(piece, end="", flush=True)
        print(gen.stats.summary())
    """

    def __init__(self, model_dir: str | os.PathLike, backend: str = "auto", *, threads: int | None = None,
                 layout: str = "auto", **session_kwargs):
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"{model_dir} is not a directory; pass the directory moe-export wrote")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if layout == "auto":  # the fast layout when the directory has it, this environment can run it, and no
            # moefy backend or session option was asked for (those apply to model.onnx)
            fast = (model_dir / GENAI_CONFIG).is_file() and _have_genai() and backend == "auto" and not session_kwargs
            layout = "genai" if fast else "onnx"
        if layout == "genai" and (backend != "auto" or session_kwargs):
            raise ValueError("the onnxruntime-genai layout runs moefy's C++ kernels in onnxruntime-genai's own "
                             "session: --backend and session options apply to --layout onnx only")
        self.layout = layout
        self.decoder = (GenaiDecoder(model_dir, threads) if layout == "genai"
                        else DecoderSession(model_dir, backend, threads=threads, **session_kwargs))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError, ... for missing or broken files
            raise FileNotFoundError(f"{model_dir} has no usable tokenizer ({type(e).__name__}: {e}); export "
                                    "directories written by moe-export hold one") from None
        self.eos_token_id = self._eos_ids(model_dir)
        self.max_positions = self._max_positions(model_dir)
        self.stats = GenerationStats()

    def _eos_ids(self, model_dir: Path) -> list[int]:
        ids = []
        for name in ("generation_config.json", "config.json"):
            path = model_dir / name
            if path.is_file():
                eos = json.loads(path.read_text()).get("eos_token_id")
                if eos is not None:
                    ids += list(np.atleast_1d(eos).tolist())
        if self.tokenizer.eos_token_id is not None and not ids:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(ids))

    @staticmethod
    def _max_positions(model_dir: Path) -> int | None:
        path = model_dir / "config.json"
        if not path.is_file():
            return None
        cfg = json.loads(path.read_text())
        return cfg.get("max_position_embeddings") or cfg.get("n_positions")

    def encode(self, prompt: str, *, chat: bool = False) -> list[int]:
        if chat:
            if not self.tokenizer.chat_template:
                raise ValueError("--chat: this model's tokenizer has no chat template")
            return list(self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                           add_generation_prompt=True))
        return list(self.tokenizer(prompt)["input_ids"])

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 64) -> Iterator[int]:
        """Greedy new token ids, one at a time (stops at the model's end-of-sequence tokens)."""
        if self.max_positions and len(prompt_ids) + max_new_tokens > self.max_positions:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; with max_new_tokens={max_new_tokens} that is "
                             f"more than the model's context of {self.max_positions} positions")
        self.stats = GenerationStats()
        return self.decoder.greedy(prompt_ids, max_new_tokens, eos_token_id=self.eos_token_id, stats=self.stats)

    def stream(self, prompt: str, max_new_tokens: int = 64, *, chat: bool = False) -> Iterator[str]:
        """The generated text, piece by piece as tokens come (end-of-sequence tokens are not shown)."""
        tokens, shown, text = [], "", ""
        for token in self.generate_ids(self.encode(prompt, chat=chat), max_new_tokens):
            if token in self.eos_token_id:
                break
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                continue
            yield text[len(shown):]
            shown = text
        if len(text) > len(shown):  # what an incomplete sequence at the end left
            yield text[len(shown):]

    def __call__(self, prompt: str, max_new_tokens: int = 64, *, chat: bool = False) -> str:
        return "".join(self.stream(prompt, max_new_tokens, chat=chat))


def _have_genai() -> bool:
    import importlib.util
    return importlib.util.find_spec("onnxruntime_genai") is not None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="moe-generate",
        description="Generate text greedily with a decoder exported by moe-export (an export directory), printing "
                    "tokens as they come, then the prefill time and the decode speed.")
    ap.add_argument("model_dir", help="export directory written by moe-export (model.onnx, config.json, tokenizer)")
    ap.add_argument("prompt", help="the prompt text")
    ap.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate at most (default 64)")
    ap.add_argument("--chat", action="store_true",
                    help="wrap the prompt in the tokenizer's chat template as a user message (instruct models)")
    ap.add_argument("--threads", type=int, default=None, metavar="T",
                    help="ONNX Runtime intra-op threads (default: all cores)")
    ap.add_argument("--backend", choices=BACKENDS, default="auto", help="moefy runtime backend (default auto)")
    ap.add_argument("--layout", choices=LAYOUTS, default="auto",
                    help="onnx: model.onnx (optimum's layout) on the moefy runtime; genai: the onnxruntime-genai "
                         "layout (genai_config.json, from moe-export --genai), faster; auto: genai when the "
                         "directory has it, onnxruntime-genai is installed and --backend is auto (default auto)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        gen = Generator(args.model_dir, args.backend, threads=args.threads, layout=args.layout)
        for piece in gen.stream(args.prompt, args.max_new_tokens, chat=args.chat):
            print(piece, end="", flush=True)
        print()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"moe-generate: error: {e}", file=sys.stderr)
        return 2
    where = "onnxruntime-genai layout" if gen.layout == "genai" else f"{gen.decoder.backend} backend"
    print(f"[{gen.stats.summary()}; {where}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
