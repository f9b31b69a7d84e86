"""Recovery fine-tune by distillation: train a MoEfied model (or a ReLU-fied dense one, ``relufy.py``) to
match its dense teacher on calibration text, with the student's own top-k routing in the loop.

Two phases share one time budget; a step cap on the second makes a run reproducible:

1. **Layer-wise.** Each FFN alone, fed the teacher's FFN inputs (the cached calibration activations),
   learns to reproduce the teacher FFN's output: expert weights and biases, the ``unselected_bias``
   terms, and the router through a straight-through surrogate of the top-k (``masked_dense``). The
   selection is the one the router makes; gradients reach only the selected experts. Cheap (no
   attention), it gives the second phase a good start (MiniLM at 25% active: held-out cosine 0.88 -> 0.92) and
   converges within a few epochs, so it gets a small share of an encoder's budget (LAYERWISE_SHARE).
2. **End to end.** The whole student on calibration texts: each layer's hidden states against the
   teacher's (relative squared error) plus the mean-pooled embedding cosine, with routing recomputed
   from the student's own, drifting, inputs at every step. The encoder weights train (attention and
   experts included); the token embeddings stay frozen. The routers get no gradient from that loss:
   trained through the straight-through top-k they wrecked the model (measured on MiniLM from the
   layer-wise checkpoint, held-out loss 0.176 -> 0.234 in 40 steps even at lr 3e-5, against
   0.176 -> 0.166 without; a router step flips discrete selections everywhere downstream). Instead
   each router is refit on its own loss (``router_refit_loss``: its FFN's current oracle set on the
   student's own inputs), so it follows the drifting inputs. MiniLM at 25% active: 0.92 -> 0.945
   (docs/QUALITY.md).

A tenth of the calibration texts (at most HOLDOUT_MAX) is held out; each phase keeps the weights that do
best on it (layer-wise: the FFN's error; end to end: the loss).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .progress import tqdm

from .moe_ffn import MoEFFN, expert_hidden, selection_mask
from .routers import gram_sq_norms

HOLDOUT = 0.1  # share of calibration texts held out to pick the best weights
HOLDOUT_MAX = 256  # texts: enough to rank checkpoints; more would make every evaluation slower
LAYERWISE_EPOCHS = 5  # measured on MiniLM: 5 -> 0.897 held-out cosine, 20 -> 0.902
LAYERWISE_BATCH = 1024  # tokens
LAYERWISE_LR = 1e-3
LAYERWISE_SHARE = {False: 0.15, True: 0.5}  # embedding models, language models: at most this share of the
# budget goes to the layer-wise phase. MiniLM, 25% active, --recipe best's 30 min (docs/QUALITY.md, eleventh pass):
# 0.5 -> cosine 0.9518, 0.3 -> 0.9527, 0.15 -> 0.9539: its FFN errors stop falling after about 3 epochs and the
# end-to-end steps the time buys are worth more; on Zen 4 in bfloat16 at 192 x 8 (nineteenth pass), 0.05 -> 0.9588
# against 0.9593-0.9600 at 0.15 (five runs, seventeenth to twentieth passes), and 0.25 ends at 0.15's FFN errors.
# SmolLM2: measured at 0.5 only (in bfloat16 its 5 epochs end in 15 of the 30 minutes that share gives it in
# --recipe best)
E2E_BATCH = 32  # texts, of similar length (less padding)
E2E_LM_TOKENS = 2048  # language models: tokens per batch at most (padded). The backward pass keeps every layer's
# activations and the logits over the vocabulary: SmolLM2's longest batches of 32 texts (8,192 tokens) took 22 GB,
# with this cap 11.9 GB after one step and 17.9 GB after 20 with the chat-turn calibration, 13.4 GB once the
# layer-wise activations were released (docs/QUALITY.md, fourth to sixth pass)
E2E_LR = 3e-4  # both families (docs/QUALITY.md). MiniLM, 25% active, --recipe best's 30 min: 1e-4 -> cosine 0.940,
# 2e-4 -> 0.9415, 3e-4 -> 0.942 (higher rates lag for the first few hundred steps and overtake as the rate decays; at
# 70 min: 3e-5 -> 0.941, 1e-4 -> 0.946); on Zen 4 in bfloat16, 5e-4 -> 0.9590 against 0.9593-0.9600. SmolLM2, 25%,
# its 60 min in bfloat16 on Zen 4 (about 160 steps): 1e-4 -> perplexity ratio x1.625, 3e-4 -> x1.534 (agreement 0.521,
# KL 0.865), 1e-3 -> x1.532 (0.493, 0.991: worse)
E2E_WARMUP = 10  # steps
E2E_LR_END = 0.1  # the rate's multiplier at the end of its linear decay. MiniLM, --recipe best on Zen 4: 0 ->
# cosine 0.9599, within a tenth's five runs (0.9593-0.9600; docs/QUALITY.md, twenty-first pass)
E2E_EVAL_EVERY = 25  # steps between held-out evaluations, at least; a run the budget ends spaces them further so
E2E_EVAL_SHARE = 0.05  # that they take at most this share of its training time: SmolLM2's 256 chat texts took 120 s
# an evaluation against 21 s a step (19% of the end-to-end phase at every 25 steps); MiniLM's about 1.5 s against 1 s
COSINE_WEIGHT = 1.0  # embedding (1 - cosine) against the mean relative squared error of the hidden states
KL_WEIGHT = 1.0  # language models: next-token KL to the teacher (nats per token), against the same
KL_CHUNK = 256  # tokens whose log-softmax over the vocabulary exists at once (next_token_kl)
TARGETS_MAX_GB = 4.0  # teacher targets kept for the end-to-end phase; past this they are recomputed at each use
FIGURES = {False: "cosine", True: "kl"}  # what DistillResult.figure holds: embedding cosine, next-token KL
ACTIVATIONS_MAX_GB = 4.0  # teacher FFN inputs the layer-wise phase fits on (distill_texts's first texts that fit)
ROUTER_TEMPERATURE = 0.5  # of the straight-through surrogate, in units of each token's score spread
MAX_STEPS = 1000  # default cap on end-to-end steps
# bfloat16 matrix products in hardware: AMX (Intel Sapphire Rapids and later) or AVX-512 BF16 (AMD Zen 4 and later,
# Intel Cooper Lake); private torch APIs, absent means no
_BF16_HW = any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
TRAIN_BF16 = _BF16_HW  # both phases' training forward and backward in bfloat16 autocast (weights, optimizer,
# held-out targets and evaluations stay float32; attention too, _Float32Attention), on CPUs with bfloat16 in hardware
# only: MiniLM's student step, 32 texts of 48 tokens, one thread: 0.93 s -> 0.53 s with AMX, twice the steps in
# --recipe best's 30 min; a layer-wise batch 97 -> 65 ms (docs/QUALITY.md, twelfth and thirteenth passes); Zen 4
# (AVX-512 BF16): MiniLM's dense forward and backward 1.21 s -> 0.61 s (seventeenth pass), SmolLM2's (2,048
# tokens) 26 s -> 14 s, its teacher's next-token log-probabilities within a KL of 0.001 nats of float32's
# (nineteenth pass). AVX2-only CPUs emulate bfloat16 (slower than float32)
E2E_ROUTER_TOKENS = 384  # tokens a layer's refit sees per step, a random sample: MiniLM's 32 texts are ~1,500
# tokens, whose expert deviations took 19% of a 256 x 6 step; sampled, the step is 24% shorter (bfloat16, one
# thread) and the routers recall the oracle as well (docs/QUALITY.md, fifteenth pass). SmolLM2: not measured
E2E_ROUTER_LR = {False: 3e-3, True: 3e-4}  # embedding models, language models: the routers' refit end to end
# (router_refit_loss); 0 freezes them. Refit rather than frozen: MiniLM's WordNet 95.6% of dense against 94.2% (32 x 48,
# float32). MiniLM, --recipe best on Zen 4: 3e-4 -> cosine 0.9593-0.9600 (five runs), 3e-3 -> 0.9603-0.9606 (three
# seeds; 1e-3, 1e-2 alike): the routers lagged the experts. SmolLM2: 1e-3 no gain over 3e-4 (docs/QUALITY.md,
# twenty-first and twenty-second passes)


def check_distill(minutes: float | None, max_steps: int, texts: int = 2) -> None:
    if minutes is not None and not minutes > 0:
        raise ValueError(f"--distill takes a positive number of minutes, got {minutes:g}")
    if max_steps < 0:
        raise ValueError(f"--distill-steps must be >= 0, got {max_steps}")
    if texts < 2:  # one to fit, one held out
        raise ValueError(f"--distill-texts must be >= 2, got {texts}")


@dataclasses.dataclass
class DistillResult:
    """What a distillation did, measured on the held-out calibration texts."""
    layer_error: list[list[float]]  # per layer: FFN relative error on teacher inputs [before, after]
    loss: list[float]  # the end-to-end loss [before, after layer-wise, after end to end]
    figure: list[float]  # the task's figure [before, after layer-wise, after end to end]: embedding cosine to the
    # teacher (encoders) or next-token KL to it (language models; FIGURES names it)
    steps: int  # end-to-end steps run
    seconds: float
    heldout_texts: int
    lm: bool = False  # a language model: figure is the next-token KL
    bf16: bool = False  # both phases' training steps ran in bfloat16 autocast (TRAIN_BF16)

    @property
    def figure_name(self) -> str:
        return FIGURES[self.lm]

    def summary(self) -> str:
        errs = ", ".join(f"{a:.3f}->{b:.3f}" for a, b in self.layer_error)
        arithmetic = " in bfloat16" if self.bf16 else ""
        return (f"held-out FFN rel. error per layer {errs}; held-out loss {self.loss[0]:.4f} -> {self.loss[1]:.4f} "
                f"(layer-wise{arithmetic}) -> {self.loss[2]:.4f} ({self.steps} end-to-end steps{arithmetic}), "
                f"{'next-token KL' if self.lm else 'embedding cosine'} {self.figure[0]:.4f} -> {self.figure[1]:.4f} "
                f"-> {self.figure[2]:.4f}; {self.seconds:.0f} s")


def layerwise_texts(batch, config) -> int:
    """How many of ``batch``'s first texts the layer-wise phase fits on: as many as have their FFN inputs (every
    layer, float32) within ACTIVATIONS_MAX_GB (MiniLM: all 10,000 default texts, 2.8 GB; SmolLM2: about 2,000)."""
    per_token = 4 * config.hidden_size * config.num_hidden_layers
    used = batch["attention_mask"].sum(1).cumsum(0) * per_token
    return max(1, int((used <= ACTIVATIONS_MAX_GB * 1e9).sum()))


def _heldout_texts(n_texts: int, seed: int) -> np.ndarray:
    """Bool [n_texts]: the held-out texts (none if there is only one text)."""
    held = np.zeros(n_texts, bool)
    if n_texts > 1:
        n_held = min(HOLDOUT_MAX, max(1, int(round(HOLDOUT * n_texts))))
        held[np.random.default_rng(seed).choice(n_texts, n_held, replace=False)] = True
    return held


def _expert_tensors(moe: MoEFFN) -> list[torch.Tensor]:
    """What both phases train in one MoE FFN: the experts and unselected_bias (buffers, not parameters)."""
    return moe.expert_tensors()


def _router_tensors(moe: MoEFFN) -> list[torch.Tensor]:
    """The router: buffers, and the MLP's parameters (which layer.parameters() also yields)."""
    return [moe.router_w, moe.router_b] + ([] if moe.router_mlp is None else list(moe.router_mlp))


def _moe_tensors(moe: MoEFFN) -> list[torch.Tensor]:
    """What the layer-wise phase trains: the experts and the router."""
    return _expert_tensors(moe) + _router_tensors(moe)


def router_refit_loss(moe: MoEFFN, x: torch.Tensor, h: torch.Tensor | None = None, tokens: int | None = None,
                      real: torch.Tensor | None = None) -> torch.Tensor:
    """Logistic loss of the router's scores on the FFN's own inputs ``x`` against its current oracle set:
    the top_k experts whose output deviates most from what the op adds when they are skipped (their
    unselected_bias, else their mean output). Gradients reach the router only (inputs and targets detached):
    it follows the drifting inputs and experts without the straight-through path through the task loss.
    ``h``: the experts' activations on ``x`` (:func:`expert_hidden`), when the forward pass computed them;
    ``tokens``: fitted on a random sample of at most that many of them; ``real``: x's real tokens (a bool mask of
    its leading shape, e.g. the batch's attention mask), the only ones sampled (padding is not routed in use)."""
    with torch.no_grad():
        x = x.detach().reshape(-1, moe.w1.shape[2])
        h = None if h is None else h.reshape(-1, h.shape[-1])
        rows = None if real is None else real.reshape(-1).nonzero()[:, 0]  # None: every row
        n = len(x) if rows is None else len(rows)
        if tokens is not None and n > tokens:  # a random sample: an unbiased estimate of the mean loss
            pick = torch.randperm(n)[:tokens]
            rows = pick if rows is None else rows[pick]
        if rows is not None:  # the sample's rows only (h has 1,536 columns at MiniLM's 192 x 8)
            x, h = x[rows], None if h is None else h[rows]
        x = x.float()  # a bfloat16 forward's (TRAIN_BF16)
        h = expert_hidden(x, moe.w1, moe.b1, moe.activation, moe.wg, moe.bg) if h is None else h.float()
        target = selection_mask(expert_deviations(moe, h), moe.top_k)
    return F.binary_cross_entropy_with_logits(moe.scores(x), target)


def expert_deviations(moe: MoEFFN, h: torch.Tensor) -> torch.Tensor:
    """[n, E]: ||h_e W2_e - s_e|| per token and expert, s_e what the op adds when e is skipped (unselected_bias,
    else the mean output over ``h``), expanded as ||h_e W2_e||^2 (:func:`~exporter.routers.gram_sq_norms`)
    - 2 h_e W2_e s_e + ||s_e||^2: the per-expert outputs would cost as much as the FFN's second layer again
    (MiniLM: a 45% longer step)."""
    E, m, d = moe.w1.shape
    h = h.unflatten(-1, (E, m))
    w2 = moe.w2
    s = moe.unselected_bias if moe.unselected_bias is not None else torch.einsum("em,emd->ed", h.mean(0), w2)
    sq = gram_sq_norms(h, w2 @ w2.transpose(1, 2))
    sq = sq - 2 * torch.einsum("nem,em->ne", h, torch.einsum("emd,ed->em", w2, s)) + (s * s).sum(-1)
    return sq.clamp_min(0).sqrt()


def _relative_error(moe, x, y, per_token: bool = False) -> float:
    with torch.no_grad():
        return float(_relative_sq_error(moe(x), y, per_token).sqrt())


def _relative_sq_error(y, target, per_token: bool):
    """Squared error relative to the target's: over all tokens at once, or (``per_token``) per token, then averaged.
    A language model's first token (the same BOS in every text: an attention sink) carries activations hundreds
    to a thousand times larger than the others' in some layers (SmolLM2: FFN output norm 25,000 against 34); over
    all tokens at once its error alone would be the loss."""
    y = y.float()  # a bfloat16 forward's (TRAIN_BF16)
    if per_token:
        return (((y - target) ** 2).sum(-1) / (target ** 2).sum(-1).clamp_min(1e-30)).mean()
    return ((y - target) ** 2).sum() / (target ** 2).sum().clamp_min(1e-30)


def layerwise(moes, teacher, adapter, calib, held_tokens, *, deadline, epochs=LAYERWISE_EPOCHS, seed=0,
              progress=True, per_token: bool = False, release: bool = False, bf16=False) -> list[list[float]]:
    """Phase 1 (module docstring); returns each layer's held-out FFN relative error [before, after]
    (``per_token``: :func:`_relative_sq_error`'s, trained on that too). ``release``: drop each layer's
    activations from ``calib`` once that layer is fitted. ``bf16``: training forwards in bfloat16 autocast."""
    errors = []
    fit_tokens = ~held_tokens if (~held_tokens).any() else held_tokens
    layers = adapter.layers(teacher)
    t0 = time.monotonic()
    for i, moe in enumerate(tqdm(moes, desc="distilling layer by layer", disable=not progress)):
        x = torch.as_tensor(calib.xs[i])
        if release:
            calib.xs[i] = None
        with torch.no_grad():
            y = adapter.read(layers[i]).forward(x, adapter.activation(teacher.config))
        x_fit, y_fit = x[torch.as_tensor(fit_tokens)], y[torch.as_tensor(fit_tokens)]
        x_held, y_held = x[torch.as_tensor(held_tokens)], y[torch.as_tensor(held_tokens)]
        params = _moe_tensors(moe)
        best = start = _relative_error(moe, x_held, y_held, per_token)
        best_values = [p.detach().clone() for p in params]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=LAYERWISE_LR, fused=True)
        gen = torch.Generator().manual_seed(seed + i)
        layer_deadline = t0 + (deadline - t0) * (i + 1) / len(moes)  # an even share of the time per layer
        moe.router_temperature = ROUTER_TEMPERATURE
        for _ in range(epochs):
            order = torch.randperm(len(x_fit), generator=gen)
            for j in range(0, len(order), LAYERWISE_BATCH):
                b = order[j:j + LAYERWISE_BATCH]
                with _training_arithmetic(bf16):
                    out = moe(x_fit[b])
                loss = _relative_sq_error(out, y_fit[b], per_token)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if time.monotonic() > layer_deadline:
                    break
            moe.router_temperature = None
            err = _relative_error(moe, x_held, y_held, per_token)
            moe.router_temperature = ROUTER_TEMPERATURE
            if err < best:
                best, best_values = err, [p.detach().clone() for p in params]
            if time.monotonic() > layer_deadline:
                break
        moe.router_temperature = None
        with torch.no_grad():
            for p, v in zip(params, best_values):
                p.requires_grad_(False)
                p.copy_(v)
        errors.append([start, best])
    return errors


def _rows(batch, texts: np.ndarray) -> dict:
    """The given texts of a padded batch, cut after their last real token."""
    sub = {k: v[torch.as_tensor(texts)] for k, v in batch.items()}
    width = int(sub["attention_mask"].any(0).nonzero().max()) + 1
    return {k: v[:, :width] for k, v in sub.items()}


def _length_batches(batch, texts: np.ndarray, size: int, max_tokens: int | None = None) -> list[dict]:
    """Batches of at most ``size`` texts of similar length, and at most ``max_tokens`` tokens padded."""
    lengths = batch["attention_mask"][torch.as_tensor(texts)].sum(1).numpy()
    order = np.argsort(lengths, kind="stable")
    groups, start = [], 0
    for end in range(1, len(order) + 1):  # lengths ascend: a batch's padded size is its count x its last length
        if end == len(order) or end + 1 - start > size or \
                (max_tokens is not None and (end + 1 - start) * lengths[order[end]] > max_tokens):
            groups.append(texts[order[start:end]])
            start = end
    return [_rows(batch, g) for g in groups]


def _pool(h, mask):
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


def _is_lm(model) -> bool:
    """A language model (logits over a vocabulary) rather than an encoder (embeddings)."""
    return model.get_output_embeddings() is not None


@torch.no_grad()
def _teacher_target(teacher, b, bf16: bool = False) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Each layer's output on the real tokens, the mean-pooled embeddings, and (language models) the next-token
    log-probabilities on the real tokens; float32, computed in bfloat16 autocast if ``bf16``."""
    with _training_arithmetic(bf16):
        out = _forward(teacher, b)
    hs = [h.float() for h in out.hidden_states[1:]]
    mask = b["attention_mask"].bool()
    return [h[mask] for h in hs], _pool(hs[-1], b["attention_mask"]), \
        F.log_softmax(out.logits[mask].float(), -1) if _is_lm(teacher) else None


class _Targets:
    """The teacher's targets per batch: computed once and kept when they fit in TARGETS_MAX_GB, else computed
    again at each use (a language model's log-probabilities: tokens x vocabulary). ``bf16``: the teacher's forward
    in the training steps' arithmetic (TRAIN_BF16; MiniLM on AMD Zen 4: twice as fast, each layer within a relative
    squared error of 5e-5 of the float32 forward's)."""

    def __init__(self, teacher, batches: list[dict], bf16: bool = False, progress: bool = False):
        self.teacher, self.batches, self.bf16 = teacher, batches, bf16
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        c = teacher.config
        vocab = teacher.get_output_embeddings().weight.shape[0] if _is_lm(teacher) else 0
        size = 4 * tokens * (c.hidden_size * c.num_hidden_layers + vocab)
        self.kept = None
        if size <= TARGETS_MAX_GB * 1e9:
            self.kept = [_teacher_target(teacher, b, bf16)
                         for b in tqdm(batches, desc="the teacher's targets", disable=not progress)]

    def __getitem__(self, j):
        return self.kept[j] if self.kept is not None else _teacher_target(self.teacher, self.batches[j], self.bf16)


def _loss(out, mask, target):
    """Mean over layers of the hidden states' relative squared error on real tokens, plus the task's term; and
    the task's per-text figure. Encoders: COSINE_WEIGHT x (1 - cosine of the mean-pooled embeddings), figure the
    cosine; language models: KL_WEIGHT x the next-token KL to the teacher per real token, figure that KL."""
    layer_targets, emb, logprobs = target
    m = mask.bool()
    hidden = sum(_relative_sq_error(h[m], t, per_token=logprobs is not None)
                 for h, t in zip(out.hidden_states[1:], layer_targets)) / len(layer_targets)
    if logprobs is None:
        cos = F.cosine_similarity(_pool(out.hidden_states[-1].float(), mask), emb)
        return hidden + COSINE_WEIGHT * (1 - cos.mean()), cos
    kl = next_token_kl(out.logits, m, logprobs)
    per_text = torch.zeros(len(mask)).index_add_(0, m.nonzero()[:, 0], kl.detach()) / m.sum(1).clamp_min(1)
    return hidden + KL_WEIGHT * kl.mean(), per_text


def _kl_rows(logits, real, logprobs):
    return F.kl_div(F.log_softmax(logits[real].float(), -1), logprobs, log_target=True, reduction="none").sum(-1)


def next_token_kl(logits, mask, logprobs) -> torch.Tensor:
    """KL(teacher || student) of each real token (``mask``) of ``logits`` [texts, length, vocabulary], against
    the teacher's log-probabilities on the real tokens. Computed KL_CHUNK positions at a time and recomputed in
    the backward pass, so the log-softmax, the elementwise KL and their gradients exist for one chunk at a time,
    not for the batch (SmolLM2: 400 MB a copy at 2,048 tokens; 0.4 GB less peak per 1,024 tokens, measured)."""
    flat, real = logits.flatten(0, 1), mask.flatten()
    ends = real.cumsum(0)  # the teacher's rows are the real positions in order
    out, start = [], 0
    for i in range(0, len(flat), KL_CHUNK):
        end = int(ends[min(i + KL_CHUNK, len(flat)) - 1])
        if end > start:
            out.append(checkpoint(_kl_rows, flat[i:i + KL_CHUNK], real[i:i + KL_CHUNK], logprobs[start:end],
                                  use_reentrant=False))
        start = end
    return torch.cat(out) if out else logits.new_zeros(0)


class _Float32Attention(torch.overrides.TorchFunctionMode):
    """Attention in float32 inside a bfloat16 autocast: PyTorch's CPU flash attention is slow to differentiate in
    bfloat16 (MiniLM's student step, 32 texts of 64 tokens: its backward 312 ms against 46 ms in float32, a third
    of the step), and the matrix products around it keep bfloat16's speed."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            as32 = lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
            with torch.autocast("cpu", enabled=False):
                return func(*map(as32, args), **{k: as32(v) for k, v in kwargs.items()})
        return func(*args, **kwargs)


def _training_arithmetic(bf16: bool) -> contextlib.AbstractContextManager:
    """Where a training forward runs (TRAIN_BF16): bfloat16 autocast with attention in float32, or plain float32."""
    stack = contextlib.ExitStack()
    if bf16:
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        stack.enter_context(_Float32Attention())
    return stack


def _forward(student, b):
    return student(**b, output_hidden_states=True, **({"use_cache": False} if _is_lm(student) else {}))


@torch.no_grad()
def heldout_eval(student, batches, targets) -> tuple[float, float]:
    """(loss, the task's figure: embedding cosine or next-token KL) on the held-out batches, text-weighted."""
    losses, figures = [], []
    for j, b in enumerate(batches):
        target = targets[j]  # first: a recomputed target's forward pass then peaks alone, not beside the student's
        loss, f = _loss(_forward(student, b), b["attention_mask"], target)
        losses.append(float(loss) * len(f))
        figures.append(f)
    figures = torch.cat(figures)
    return sum(losses) / len(figures), float(figures.mean())


def eval_interval(eval_seconds: float, step_seconds: float) -> int:
    """End-to-end steps between held-out evaluations: E2E_EVAL_EVERY, or more when an evaluation is so slow
    against a step that it would take more than E2E_EVAL_SHARE of the time."""
    return max(E2E_EVAL_EVERY, math.ceil(eval_seconds / (E2E_EVAL_SHARE * max(step_seconds, 1e-9))))


def lr_factor(step: int, max_steps: int, time_share: float | None = None) -> float:
    """The end-to-end rate's multiplier at ``step``: a warm-up, then a linear decay to a tenth by the step cap
    or, when the warm-up's pace says the budget ends the run first, by the deadline: ``time_share`` is the share
    of the budget spent (planning steps from that pace overestimated them by a third and MiniLM's rate decayed
    to 0.34 only). A run that the cap ends decays on steps alone: reproducible."""
    done = step / max_steps if time_share is None else time_share
    return min(1.0, (step + 1) / E2E_WARMUP) * (1 - (1 - E2E_LR_END) * min(done, 1.0))


def end_to_end(student, teacher, adapter, moes, fit, held, held_targets, *, deadline, max_steps, seed=0,
               bf16=False, progress=True) -> tuple[tuple[float, float], tuple[float, float], int]:
    """Phase 2 (module docstring) on batches ``fit``; keeps the state with the lowest loss on the held-out
    batches ``held``. Returns the held-out (loss, task figure) before it and of the state kept, and the steps run."""
    t_eval = time.monotonic()
    start = best = heldout_eval(student, held, held_targets)
    t_eval = time.monotonic() - t_eval
    if max_steps == 0 or time.monotonic() >= deadline:
        return start, best, 0
    # the student trains in bfloat16 where TRAIN_BF16 says so: its targets can be, too (the held-out ones that choose
    # the state kept stay float32)
    fit_targets = _Targets(teacher, fit, bf16, progress)
    router = {id(t) for moe in moes for t in _router_tensors(moe)}  # frozen, or refit on its own: docstring
    params = [p for layer in adapter.layers(student) for p in layer.parameters() if id(p) not in router]
    params += [t for moe in moes for t in _expert_tensors(moe) if all(t is not p for p in params)]
    groups = [{"params": params, "lr": E2E_LR, "base_lr": E2E_LR}]
    routed = [moe for moe in moes if moe.top_k < moe.w1.shape[0]]  # not relufy's one always-selected expert
    router_lr = E2E_ROUTER_LR[_is_lm(student)]
    refit = routed if router_lr > 0 else []
    if refit:
        groups.append({"params": [t for moe in refit for t in _router_tensors(moe)], "lr": router_lr,
                       "base_lr": router_lr})
    best_state = copy.deepcopy(student.state_dict())
    for p in student.parameters():
        p.requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    opt = torch.optim.Adam(groups, fused=True)  # MiniLM's 18M trained parameters, one thread: 27 ms a step, 74 unfused
    t0, rng, step, order, by_time = time.monotonic(), np.random.default_rng(seed), 0, [], False
    eval_every, last_eval, t_evals = E2E_EVAL_EVERY, 0, 0.0
    bar = tqdm(total=max_steps, desc="distilling end to end", disable=not progress)
    while step < max_steps and time.monotonic() < deadline:
        if not order:
            order = list(rng.permutation(len(fit)))
        j = order.pop()
        b = fit[j]
        for moe in refit:  # the training forward's FFN inputs and activations, for the routers' own loss
            moe.hidden_log = []
        target = fit_targets[j]  # before the student's forward: heldout_eval says why
        with _training_arithmetic(bf16):
            out = _forward(student, b)
        loss, _ = _loss(out, b["attention_mask"], target)
        for moe in refit:
            loss = loss + sum(router_refit_loss(moe, x, h, E2E_ROUTER_TOKENS, b["attention_mask"])
                              for x, h in moe.hidden_log)
            moe.hidden_log = None
        now = time.monotonic()
        if step == E2E_WARMUP:
            by_time = (deadline - t0) * step / (now - t0) < max_steps
            if by_time:  # a run that the cap ends keeps its schedule: reproducible
                eval_every = eval_interval(t_eval, (now - t0 - t_evals) / step)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, max_steps, (now - t0) / (deadline - t0) if by_time else None)
        if step and step % E2E_WARMUP == 0:  # the bar's end (and its time left) is the budget's, not the cap's
            bar.total = min(max_steps, step + max(1, int((deadline - now) * step / (now - t0))))
            bar.refresh()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        bar.update()
        if step - last_eval >= eval_every or step == max_steps or time.monotonic() >= deadline:
            now = time.monotonic()  # the training time so far: now - t0 - t_evals
            held_now = heldout_eval(student, held, held_targets)
            t_eval, last_eval = time.monotonic() - now, step
            if by_time:
                eval_every = eval_interval(t_eval, (now - t0 - t_evals) / step)
            t_evals += t_eval
            bar.set_postfix(heldout_loss=f"{held_now[0]:.4f}",
                            **{f"heldout_{FIGURES[_is_lm(student)]}": f"{held_now[1]:.4f}"})
            if held_now[0] < best[0]:
                best, best_state = held_now, copy.deepcopy(student.state_dict())
    bar.close()
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(False)
    student.load_state_dict(best_state)
    return start, best, step


def distill(model, teacher, adapter, config, routers: dict, teacher_calib, batch, *, minutes: float,
            max_steps: int = MAX_STEPS, seed: int = 0, progress: bool = True, log=None, release_calib: bool = False):
    """Train ``model`` (its FFNs split as ``config`` and ``routers`` say, weights in its own layout) to match
    ``teacher``, and write the best weights back into ``model``. Returns (routers, DistillResult).

    ``teacher_calib``: the teacher's FFN inputs on ``batch`` (tokenized, padded calibration texts; the
    Calibration's ``groups`` index them). At most ``minutes`` of training, at most ``max_steps``
    end-to-end steps; seeded. ``release_calib``: ``teacher_calib``'s activations are dropped layer by layer as
    the layer-wise phase is done with them, for a caller that needs them no more (up to ACTIVATIONS_MAX_GB that
    the end-to-end phase would otherwise hold beside its own)."""
    from .moefy import LOWRANK_KEYS, MLP_KEYS, install_moe
    check_distill(minutes, max_steps)
    t0 = time.monotonic()
    deadline = t0 + 60 * minutes
    torch.manual_seed(seed)
    student = copy.deepcopy(model).eval()  # eval: no dropout; the teacher's targets are deterministic too
    install_moe(student, adapter, config, routers)
    moes = [m for m in student.modules() if isinstance(m, MoEFFN)]
    n_texts = len(batch["attention_mask"])
    held_texts = _heldout_texts(n_texts, seed)
    fit_ids, held_ids = np.nonzero(~held_texts)[0], np.nonzero(held_texts)[0]
    if not len(held_ids):
        held_ids = fit_ids
    lm = _is_lm(student)
    bf16, cap = TRAIN_BF16, (E2E_LM_TOKENS if lm else None)
    fit, held = (_length_batches(batch, ids, E2E_BATCH, cap) for ids in (fit_ids, held_ids))
    held_targets = _Targets(teacher, held)
    start = heldout_eval(student, held, held_targets)

    errors = layerwise(moes, teacher, adapter, teacher_calib, held_texts[teacher_calib.groups],
                       deadline=t0 + LAYERWISE_SHARE[lm] * (deadline - t0), seed=seed, progress=progress,
                       per_token=lm, release=release_calib, bf16=bf16)
    if log:
        log("  layer-wise: held-out FFN relative error per layer "
            + ", ".join(f"{a:.3f}->{b:.3f}" for a, b in errors))
    mid, end, steps = end_to_end(student, teacher, adapter, moes, fit, held, held_targets, deadline=deadline,
                            max_steps=max_steps, seed=seed, bf16=bf16, progress=progress)
    result = DistillResult(errors, [start[0], mid[0], end[0]], [start[1], mid[1], end[1]], steps,
                           time.monotonic() - t0, len(held_ids), lm, bf16)
    if log:
        log(f"  {result.summary()}")

    # Write back: FFNs into the model's own layout, the rest by name (the MoE's buffers have other names).
    routers = dict(routers)
    for i, (layer, moe) in enumerate(zip(adapter.layers(model), moes)):
        adapter.write(layer, moe.dense())
        routers[f"layer.{i}.router_w"] = moe.router_w.detach().numpy().copy()
        routers[f"layer.{i}.router_b"] = moe.router_b.detach().numpy().copy()
        if moe.unselected_bias is not None:
            routers[f"layer.{i}.unselected_bias"] = moe.unselected_bias.detach().numpy().copy()
        if moe.lowrank is not None:  # trained with the experts (expert_tensors)
            for name, t in zip(LOWRANK_KEYS, moe.lowrank):
                routers[f"layer.{i}.{name}"] = t.detach().numpy().copy()
        if moe.router_mlp is not None:
            for name, t in zip(MLP_KEYS, moe.router_mlp):
                routers[f"layer.{i}.{name}"] = t.detach().numpy().copy()
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in student.state_dict().items()
                           if k in own and v.shape == own[k].shape}, strict=False)
    return routers, result
