"""Decoders (text generation with a KV cache), in optimum's layout: ``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key/.value`` in; ``logits``, ``present.{i}.key/.value`` out; one graph
for the first step (empty past) and the later ones. Validation compares logits with the PyTorch MoEfied
model, then greedy tokens; fidelity to the dense model is measured on next-token predictions."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..moe_ffn import routing_margins
from ..text import SAMPLE_PROMPTS
from .base import (TIE_MARGIN, Task, Validation, ValidationError, clear_prefix, length_batches, register,
                   relative_difference)

GREEDY_TOKENS = 32  # new tokens compared per prompt


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@dataclasses.dataclass
class NextTokenFidelity:
    """Next-token predictions of a MoE model against the dense one, accumulated over batches: perplexity of
    each on the text, top-1 agreement and KL(dense || MoE) per predicted position."""
    tokens: int = 0
    nll_dense: float = 0.0
    nll_moe: float = 0.0
    agree: int = 0
    kl: float = 0.0

    def add(self, dense_logits: np.ndarray, moe_logits: np.ndarray, input_ids: np.ndarray, mask: np.ndarray) -> None:
        """Logits [batch, tokens, vocab] of both models on ``input_ids`` (right-padded, ``mask``)."""
        keep = (mask[:, :-1] & mask[:, 1:]).astype(bool)  # position t predicts token t + 1, both real
        if not keep.any():
            return
        target = input_ids[:, 1:][keep]
        ld, lm = log_softmax(dense_logits[:, :-1][keep]), log_softmax(moe_logits[:, :-1][keep])
        rows = np.arange(len(target))
        self.tokens += len(target)
        self.nll_dense -= float(ld[rows, target].sum())
        self.nll_moe -= float(lm[rows, target].sum())
        self.agree += int((ld.argmax(-1) == lm.argmax(-1)).sum())
        self.kl += float((np.exp(ld) * (ld - lm)).sum())

    @property
    def perplexity_dense(self) -> float:
        return float(np.exp(self.nll_dense / self.tokens))

    @property
    def perplexity_moe(self) -> float:
        return float(np.exp(self.nll_moe / self.tokens))

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "perplexity_dense": self.perplexity_dense, "perplexity_moe": self.perplexity_moe,
                "perplexity_ratio": self.perplexity_moe / self.perplexity_dense,
                "next_token_agreement": self.agree / self.tokens, "mean_kl": self.kl / self.tokens}

    def summary(self) -> str:
        d = self.to_dict()
        return (f"next-token agreement with the dense model {d['next_token_agreement']:.3f}, perplexity ratio "
                f"{d['perplexity_ratio']:.3f} ({d['perplexity_moe']:.2f} vs {d['perplexity_dense']:.2f}), mean KL "
                f"{d['mean_kl']:.4f} ({d['tokens']} tokens)")


@torch.no_grad()
def torch_greedy(model, moes, prompt: list[int], new_tokens: int, tie: float) -> tuple[list[int], int | None]:
    """Greedy tokens of the PyTorch model with its KV cache, and the first step whose choice was nearly tied
    (top-2 logit gap below ``tie`` x max |logit|, or a routing margin below TIE_MARGIN), or None."""
    tokens, first_tie, past, cur = [], None, None, torch.tensor([prompt])
    with routing_margins(moes) as margins:
        for step in range(new_tokens):
            out = model(input_ids=cur, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
            top = logits.topk(2).values
            routing = min(float(calls[-1].min()) for calls in margins) if moes else np.inf
            if first_tie is None and (float(top[0] - top[1]) < tie * float(logits.abs().max()) or routing < TIE_MARGIN):
                first_tie = step
            tokens.append(int(logits.argmax()))
            cur = torch.tensor([[tokens[-1]]])
    return tokens, first_tie


@register
class TextGeneration(Task):
    name = "text-generation"
    optimum_task = "text-generation-with-past"
    auto_class = "AutoModelForCausalLM"
    onnx_config_kwargs = {"use_past": True, "use_past_in_inputs": True}  # one graph for every step

    def prepare_tokenizer(self, tokenizer):
        if tokenizer.pad_token is None:  # batches are right-padded and masked: any token will do
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"

    def model_inputs(self, model):
        return ("input_ids", "attention_mask")

    def default_calibration(self, tokenizer, texts):
        """An instruct model (its tokenizer has a chat template) is used in its chat format, whose tokens plain
        text never shows the routers: every second text becomes a one-turn chat, the text before it as the user's
        message and itself as the reply."""
        if not getattr(tokenizer, "chat_template", None):
            return texts, ""
        bos = tokenizer.bos_token
        adds_bos = bos is not None and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
        out = list(texts)
        for i in range(1, len(texts), 2):
            chat = tokenizer.apply_chat_template([{"role": "user", "content": texts[i - 1]},
                                                  {"role": "assistant", "content": texts[i]}], tokenize=False)
            out[i] = chat[len(bos):] if adds_bos and chat.startswith(bos) else chat  # the tokenizer adds it
        return out, "every second one as a chat turn in the model's chat template"

    heldout_batch = 4  # texts: their logits over the whole vocabulary are large

    def heldout_reference(self, model, tokenizer, texts, max_length, *, progress=False):
        return model  # the dense logits are computed batch by batch beside the MoE's: all at once they take GBs

    @torch.no_grad()
    def heldout_fidelity(self, reference, onnx_path, tokenizer, texts, max_length, *, backend, progress=False):
        from runtime.generate import DecoderSession
        session = DecoderSession(onnx_path, backend="auto" if backend == "onnxruntime" else backend)
        fidelity = NextTokenFidelity()
        for _, feed in length_batches(tokenizer, texts, self.model_inputs(reference), max_length, self.heldout_batch,
                                      desc="next-token predictions", progress=progress):
            dense = reference(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
            fidelity.add(dense, session.logits(feed["input_ids"], feed["attention_mask"]), feed["input_ids"],
                         feed["attention_mask"].astype(bool))
        return ({**fidelity.to_dict(), "heldout_texts": len(texts), "backend": session.backend},
                f"held-out texts ({len(texts)}, as moe-eval): {fidelity.summary()}")

    @torch.no_grad()
    def outputs(self, model, batch):
        return model(**batch).logits.numpy()

    def validate(self, model, moes, onnx_path, batch, dense, *, tokenizer, backend, rtol, log):
        from runtime.generate import DecoderSession
        ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy().astype(bool)
        with routing_margins(moes) as margins:
            want = self.outputs(model, batch)
        keep = clear_prefix(margins, mask)
        # The standard target has no custom node: any backend's session runs it on plain ONNX Runtime kernels.
        session = DecoderSession(onnx_path, backend="auto" if backend == "onnxruntime" else backend)
        got = session.logits(ids, mask.astype(np.int64))
        if keep.any():
            max_abs, max_rel = relative_difference(got, want, keep)
            if not max_rel <= rtol:
                raise ValidationError(f"ONNX logits differ from the PyTorch MoEfied model: max rel diff {max_rel:.2e} "
                                      f"> {rtol:.0e} (max abs {max_abs:.2e}); nothing was written")
        # After a near tie the two may legitimately differ; where they still agree, those tokens are validated too.
        # Without them a tie at a position every text shares (a chat template's first token, an attention sink)
        # would leave nothing to compare.
        agrees = mask & (np.abs(got - want).max(-1) <= rtol * float(np.abs(want[mask]).max()))
        compared = keep | agrees
        if not compared.any():
            raise ValidationError("every validation text meets a near-tied routing decision at its first token and the "
                                  "ONNX logits differ from the PyTorch MoEfied model after it; nothing was written")
        max_abs, max_rel = relative_difference(got, want, compared)
        clear = compared.any(1)

        log(f"validating greedy generation ({GREEDY_TOKENS} new tokens on {len(SAMPLE_PROMPTS)} prompts)")
        same, tied = 0, 0
        context = getattr(model.config, "max_position_embeddings", None) or 2**31
        for prompt in SAMPLE_PROMPTS:
            prompt_ids = tokenizer(prompt)["input_ids"]
            new = min(GREEDY_TOKENS, context - len(prompt_ids))  # (tiny test models have short contexts)
            want_tokens, first_tie = torch_greedy(model, moes, prompt_ids, new, rtol)
            got_tokens = list(session.greedy(prompt_ids, new))
            if got_tokens == want_tokens:
                same += 1
                continue
            diverged = next(i for i, (a, b) in enumerate(zip(got_tokens, want_tokens)) if a != b)
            if first_tie is not None and first_tie <= diverged:
                tied += 1  # float32 rounding may legitimately pick the other token or expert there
                continue
            raise ValidationError(
                f"greedy tokens of the ONNX model differ from the PyTorch MoEfied model on the prompt {prompt!r} at "
                f"new token {diverged} ({got_tokens[:diverged + 1]} vs {want_tokens[:diverged + 1]}), with no "
                "near tie before; nothing was written")

        metrics = {"greedy_identical": same, "greedy_tied": tied, "greedy_prompts": len(SAMPLE_PROMPTS),
                   "greedy_tokens": GREEDY_TOKENS}
        lines = [f"greedy tokens identical to PyTorch on {same} of {len(SAMPLE_PROMPTS)} prompts ({GREEDY_TOKENS} new "
                 f"tokens each{f'; {tied} diverged after a near tie' if tied else ''})"]
        return Validation(session.backend, max_abs, max_rel, int(clear.sum()), int((~clear).sum()), metrics, lines)

    def save_extras(self, model, directory):
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(directory)
