"""MoEfication of a loaded Hugging Face model: split each FFN into experts, build routers,
save and reload the result, and build the MoE modules that replace the dense FFNs."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from .progress import tqdm

from .arch import FFNAdapter
from .arch.base import get_module
from .config import ROUTERS_FILE, MoEConfig
from .moe_ffn import MoEFFN
from .outfile import staged_directory
from .routers import (avgk_router, bce_router, centroid_router, expert_deviation, least_squares_router, norm_router,
                      representative_router)
from .split import coactivation_split, metis_split, parameter_clustering, random_split, shared_neurons


def check_split(experts: int, top_k: int, width: int | None = None, shared: int = 0) -> None:
    """1 <= top_k <= experts, experts divides the FFN width (when known), 0 <= shared < top_k."""
    if experts < 1 or not 1 <= top_k <= experts:
        raise ValueError(f"--top-k must be between 1 and --experts ({experts}), got {top_k}")
    if width is not None and width % experts:
        raise ValueError(f"--experts must divide the FFN width {width}, got {experts}")
    if not 0 <= shared < top_k:
        raise ValueError(f"--shared-experts must be between 0 and top-k - 1 ({top_k - 1}): at least one "
                         f"expert per token must be routed; got {shared}")


def check_budget(budget: float, experts: int, shared: int = 0) -> None:
    """The smallest share is one routed expert per layer beside the shared ones; the largest, all experts."""
    low = (shared + 1) / experts
    if not low <= budget <= 1:
        raise ValueError(f"--budget must be between {low:g} ((shared experts + 1) / experts) and 1, got {budget}")


SPLITS = ("param", "coact", "metis", "random")
ROUTERS = ("centroid", "ls", "bce", "avgk", "norm", "mlp", "cmoe")
ROUTER_LABELS = ("deviation", "output")
CORRECTIONS = ("none", "mean")
CALIBRATED_SPLITS = ("coact", "metis")
CALIBRATED_ROUTERS = ("ls", "bce", "mlp", "cmoe")
MLP_HIDDEN = 64  # hidden width of the "mlp" router
# router_b of a shared (always-on) expert, whose router_w row is zero: its score is exactly 1e6 in float32
# in every runtime, and moefy() checks that routed scores stay far below it on calibration text.
FORCED_SCORE = 1e6


def needs_calibration(config: MoEConfig) -> bool:
    return (config.split in CALIBRATED_SPLITS or config.router in CALIBRATED_ROUTERS or config.correction == "mean"
            or config.lowrank > 0 or config.shared_experts > 0 or config.budget is not None or config.dynamic_k is not None
            or config.sequential)


def moefy(model, adapter: FFNAdapter, config: MoEConfig, calib=None, *, batch=None, progress: bool = True,
          log=None) -> dict[str, np.ndarray]:
    """Split each FFN into experts (permuting its neurons in place into contiguous blocks; the dense
    model's function is unchanged) and build the routers. Returns {layer.i.router_w [E, d],
    layer.i.router_b [E], layer.i.unselected_bias [E, d] (correction "mean")}.

    ``calib`` (a :class:`~exporter.calib_cache.Calibration`: the dense model's FFN inputs on calibration
    text) is needed for the calibrated splits and routers, shared experts, ``budget`` and the mean
    correction. With
    ``config.budget`` set, ``config.layer_top_k`` (and ``top_k``, their rounded mean) are chosen here.
    ``config.sequential`` also needs ``batch``, the tokenized calibration text ``calib`` was captured on.
    """
    E, S = config.experts, config.shared_experts
    check_split(E, config.top_k, config.intermediate_size, 0 if config.budget is not None else S)
    if config.budget is not None:
        check_budget(config.budget, E, S)
    if needs_calibration(config) and calib is None:
        raise ValueError(f"the {config.split} split / {config.router} router / {config.correction} correction "
                         "need calibration activations")
    xs, groups = (calib.xs, calib.groups) if needs_calibration(config) else (None, None)
    activations = lambda ffn, x: None if x is None else ffn.hidden(x, config.activation).astype(np.float32)  # noqa: E731
    layers = adapter.layers(model)
    devs = []
    for i, layer in enumerate(tqdm(layers, desc="splitting FFNs into experts", disable=not progress)):
        ffn = adapter.read(layer)
        h = activations(ffn, None if xs is None else xs[i])
        perm = split_ffn(ffn, h, config)
        adapter.permute(layer, perm)
        if config.budget is not None:
            devs.append(expert_deviation(h[:, perm], ffn.w2[perm], E))
    if config.budget is not None:
        config.layer_top_k = choose_layer_top_k(devs, config.budget, S)
        config.top_k = int(round(float(np.mean(config.layer_top_k))))
        if log:
            log(f"  --budget {config.budget:g}: top-k per layer {config.layer_top_k}")
    routers, thresholds = {}, []
    if config.sequential:  # the layers below layer i are MoEfied in `student` before layer i is fitted
        if batch is None:
            raise ValueError("sequential calibration needs the calibration text's batch")
        student = copy.deepcopy(model)
        student_layers = adapter.layers(student)
        dense_io = LayerReplay(model, adapter, batch)
        student_io = dense_io.fork(student)
    for i, layer in enumerate(tqdm(layers, desc="building routers", disable=not progress)):
        ffn = adapter.read(layer)
        x = None if xs is None else xs[i]
        target = None  # what the layer's MoE (and its stand-in) should output on x: the dense FFN's output
        if config.sequential:  # on the inputs layer i now gets; the target puts its output where the dense one is
            target = ffn.forward(x, config.activation) + dense_io(i)[1]
            x, r = student_io(i)
            target -= r
        h = activations(ffn, x)
        rw, rb, info = build_router(ffn, x, h, config, config.layer_k(i), groups=groups, progress=progress)
        if info and log:
            log(f"  layer {i}: router recall of the oracle top-k on held-out calibration text "
                f"{info['recall_start']:.3f} (least squares) -> {info['recall']:.3f}")
        routers[f"layer.{i}.router_w"], routers[f"layer.{i}.router_b"] = rw, rb
        if info and "mlp" in info:
            for name, t in zip(MLP_KEYS, info["mlp"]):
                routers[f"layer.{i}.{name}"] = t
        if config.dynamic_k is not None or config.correction == "mean":
            scores = layer_scores(routers, i, x)
        if config.dynamic_k is not None:
            thresholds.append(dynamic_threshold(scores, config.layer_k(i), *config.k_bounds(i)))
            config.layer_threshold = thresholds
        if config.correction == "mean":
            routers[f"layer.{i}.unselected_bias"] = mean_correction(ffn, layer_selection(config, i, scores), h, config)
        if config.lowrank:
            moe = _layer_moe(ffn, config, routers, i)
            with torch.no_grad():
                left = (ffn.forward(x, config.activation) if target is None else target) \
                    - moe(torch.as_tensor(x, dtype=torch.float32)).numpy()
            for name, t in zip(LOWRANK_KEYS, lowrank_fit(x, left, config.lowrank)):
                routers[f"layer.{i}.{name}"] = t
        if config.sequential:
            adapter.install(student_layers[i], build_moes(student, adapter, config, routers, only=i)[0])
    if config.dynamic_k is not None and log:
        ranges = (f"{lo}..{hi}" for lo, hi in map(config.k_bounds, range(len(layers))))
        log(f"  --dynamic-k {config.dynamic_k:g}: experts per token per layer {', '.join(ranges)} "
            f"(mean {config.top_k if config.layer_top_k is None else config.layer_top_k} on calibration text)")
    return routers


def dynamic_threshold(scores: np.ndarray, k: int, min_k: int, max_k: int) -> float:
    """The router score threshold at which tokens keep k experts on average (calibration tokens ``scores``
    [N, E]): each keeps its first min_k experts, then those of its top max_k scoring at least the threshold.
    So the threshold is the r-th largest of the candidate scores, r = N * (k - min_k)."""
    ranked = -np.sort(-scores, axis=1)[:, min_k:max_k].ravel()  # each token's candidates beyond min_k
    r = int(round(len(scores) * (k - min_k)))
    if r <= 0:
        return float("inf")
    if r >= ranked.size:
        return float("-inf")
    return float(np.partition(ranked, ranked.size - r)[ranked.size - r])


def layer_selection(config: MoEConfig, i: int, scores: np.ndarray) -> np.ndarray:
    """[N, E] bool: the experts layer i's operator computes for tokens with router ``scores``."""
    from runtime.reference import selected_mask
    return selected_mask(scores, **config.op_selection(i))


def split_ffn(ffn, h: np.ndarray | None, config: MoEConfig) -> np.ndarray:
    """The neuron permutation of one FFN: the shared experts' neurons first (largest contribution first),
    then the other neurons split into experts by ``config.split``."""
    E, S = config.experts, config.shared_experts
    width = ffn.width()
    m = width // E
    w2_norms = np.linalg.norm(ffn.w2, axis=1)
    shared = shared_neurons(h, w2_norms, S * m) if S else np.zeros(0, int)
    rest = np.setdiff1d(np.arange(width), shared)
    n = E - S
    if config.split == "coact":
        p = coactivation_split(h[:, rest], w2_norms[rest], n, seed=config.seed)
    elif config.split == "metis":
        p = metis_split(h[:, rest], w2_norms[rest], n, seed=config.seed)
    elif config.split == "random":
        p = random_split(len(rest), n, seed=config.seed)
    else:
        p = parameter_clustering(ffn.keys[0][rest], n, seed=config.seed)
    return np.concatenate([shared, rest[p]])


def build_router(ffn, x, h, config: MoEConfig, top_k: int, *, groups=None, progress: bool = False):
    """(router_w [E, d], router_b [E], info) for one permuted FFN. Shared experts get a zero row and
    router_b = FORCED_SCORE; the others are routed by ``config.router`` for the remaining top_k - shared.
    The weight-only routers read the rows that decide whether a neuron fires (the gate's, if gated)."""
    E, S = config.experts, config.shared_experts
    m, d = config.expert_size, ffn.w1.shape[1]
    n, k = E - S, top_k - S
    keys, key_bias = ffn.keys
    w1, w2 = keys[S * m:], ffn.w2[S * m:]
    b1 = np.zeros(len(w1), np.float32) if key_bias is None else key_bias[S * m:]
    hr = None if h is None else h[:, S * m:]
    info = None
    centred = config.router_labels == "deviation"
    if config.router == "ls":
        rw, rb = least_squares_router(x, hr, w2, n, centred=centred)
    elif config.router in ("bce", "mlp"):
        rw, rb, info = bce_router(x, hr, w2, n, k, groups=groups, seed=config.seed, progress=progress,
                                  hidden=MLP_HIDDEN if config.router == "mlp" else 0, centred=centred)
    elif config.router == "cmoe":
        rw, rb = representative_router(w1, b1, hr, w2, n)
    elif config.router == "avgk":
        rw, rb = avgk_router(w1, b1, n)
    elif config.router == "norm":
        rw, rb = norm_router(w1, b1, w2, n)
    else:
        rw, rb = centroid_router(w1, n)
    if S:
        rw = np.concatenate([np.zeros((S, d), np.float32), rw])
        rb = np.concatenate([np.full(S, FORCED_SCORE, np.float32), rb])
        if info and "mlp" in info:
            a, a_b, b = info["mlp"]
            info["mlp"] = (a, a_b, np.concatenate([np.zeros((S, len(a_b)), np.float32), b]))
        if x is not None:
            routed = np.abs(_scores(x, rw, rb, info and info.get("mlp"))[:, S:]).max()
            if not routed < FORCED_SCORE / 1e3:
                raise ValueError(f"router scores reach {routed:.3g} on calibration text: too close to the "
                                 f"shared experts' forced score {FORCED_SCORE:g}")
    return rw.astype(np.float32), rb.astype(np.float32), info


MLP_KEYS = ("router_mlp_a", "router_mlp_a_b", "router_mlp_b")


def _scores(x, rw, rb, mlp=None) -> np.ndarray:
    s = x.astype(np.float64) @ rw.T + rb
    if mlp is not None:
        a, a_b, b = mlp
        s = s + np.maximum(x.astype(np.float64) @ a.T + a_b, 0) @ b.T
    return s


def layer_mlp(routers, i: int):
    """Layer i's router MLP (A, a, B), or None for a linear router."""
    return tuple(routers[f"layer.{i}.{n}"] for n in MLP_KEYS) if f"layer.{i}.{MLP_KEYS[0]}" in routers else None


def layer_scores(routers, i: int, x: np.ndarray) -> np.ndarray:
    """Layer i's router scores [N, E] on FFN inputs x (float64)."""
    return _scores(x, routers[f"layer.{i}.router_w"], routers[f"layer.{i}.router_b"], layer_mlp(routers, i))


def choose_layer_top_k(devs: list[np.ndarray], budget: float, shared: int = 0) -> list[int]:
    """Per-layer top_k whose mean over layers is ``budget`` x experts (rounded), chosen greedily on
    marginal recall: every layer starts at shared + 1 experts, and each further expert goes to the layer
    where it adds the largest share of that layer's deviation energy (sum over experts of each token's
    squared expert deviation, :func:`expert_deviation`) captured by an oracle choosing per token.
    ``devs``: [N, E] per layer, experts permuted (shared ones first)."""
    L, E = len(devs), devs[0].shape[1]
    total = int(round(budget * E * L))
    curves = []
    for dev in devs:
        energy = dev.astype(np.float64) ** 2
        routed = -np.sort(-energy[:, shared:], axis=1)  # per token, largest first
        captured = np.concatenate([[0.0], np.cumsum(routed.mean(0))]) + energy[:, :shared].sum(1).mean()
        curves.append(captured / max(energy.sum(1).mean(), 1e-30))  # captured[j]: share with j routed experts
    ks = [shared + 1] * L
    total = min(max(total, sum(ks)), E * L)
    while sum(ks) < total:
        gains = [curves[l][ks[l] - shared + 1] - curves[l][ks[l] - shared] if ks[l] < E else -np.inf for l in range(L)]
        ks[int(np.argmax(gains))] += 1
    return ks


FFN_INPUT_CHUNK = 64  # texts per forward pass when capturing FFN inputs: bounds memory on long calibration text


@torch.no_grad()
def ffn_inputs(model, adapter: FFNAdapter, batch, *, chunk: int = FFN_INPUT_CHUNK) -> list[np.ndarray]:
    """Each layer's FFN input on the batch's real (unpadded) tokens: [N, d] per layer, text after text.
    Runs ``chunk`` texts at a time, each cut after its last real token, through the base model (no task head:
    a language model's logits would cost more than the rest)."""
    mask = batch["attention_mask"].numpy().astype(bool)
    captured = []
    hooks = [adapter.ffn_module(layer).register_forward_hook(lambda mod, args, out: captured.append(args[0]))
             for layer in adapter.layers(model)]
    per_layer = [[] for _ in hooks]
    try:
        for start in range(0, len(mask), chunk):
            rows = mask[start:start + chunk]
            width = int(np.nonzero(rows.any(0))[0].max(initial=0)) + 1  # the chunk's last real token
            model.base_model(**{k: v[start:start + chunk, :width] for k, v in batch.items()})
            for xs, x in zip(per_layer, captured):  # (OPT flattens the batch before its FFN)
                xs.append(x.reshape(len(rows), width, -1).numpy()[rows[:, :width]])
            captured.clear()
    finally:
        for h in hooks:
            h.remove()
    out = []
    while per_layer:  # layer by layer, freeing the chunks as we go: peak memory one layer above the result
        out.append(np.concatenate(per_layer.pop(0)))
    return out


class LayerReplay:
    """Each layer's (FFN input, residual stream: see :meth:`FFNAdapter.post_norm`) on a batch, as a forward pass
    gives them, but one layer at a time: the hidden states entering layer i are kept, and asking for layer i + 1
    runs layer i on them as it is *then*. Sequential calibration MoEfies layer i between the two, so the layers
    above see the MoEfied ones below, in one pass through the depth (a forward pass per layer is quadratic in it).

    A forward pass at the start records each layer's call (the attention mask, position embeddings, ... that the
    model gives it, the same on every pass over the batch) and the hidden states entering the first layer."""

    HIDDEN_KEYS = ("hidden_states",)  # the hidden states' name when a layer gets keywords only (every family here)

    def __init__(self, model, adapter: FFNAdapter, batch, *, chunk: int = FFN_INPUT_CHUNK):
        import inspect
        from transformers.cache_utils import Cache
        self.adapter, self.layers = adapter, adapter.layers(model)
        self.post_norm = adapter.post_norm(model.config)
        mask = batch["attention_mask"].numpy().astype(bool)
        # with a key/value cache in every layer's call, a replayed layer would append to it
        no_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.base_model.forward).parameters else {}
        self.chunks = []  # per chunk: [real tokens [b, w], hidden states entering layer self.at [b, w, d], calls]
        calls = []
        hooks = [layer.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(self._split(args, kwargs)),
                                                 with_kwargs=True) for layer in self.layers]
        try:
            with torch.no_grad():
                for start in range(0, len(mask), chunk):
                    rows = mask[start:start + chunk]
                    width = int(np.nonzero(rows.any(0))[0].max(initial=0)) + 1
                    model.base_model(**{k: v[start:start + chunk, :width] for k, v in batch.items()}, **no_cache)
                    if len(calls) != len(self.layers) or any(
                            isinstance(v, Cache) for _, args, kwargs, _ in calls for v in (*args, *kwargs.values())):
                        raise RuntimeError(f"{type(model).__name__} does not call each layer once without a cache "
                                           "in a forward pass: its layers cannot be replayed one at a time")
                    self.chunks.append([rows[:, :width], calls[0][0], [c[1:] for c in calls]])  # (hidden, call)
                    calls.clear()
        finally:
            for h in hooks:
                h.remove()
        self.at = 0

    def fork(self, model) -> "LayerReplay":
        """The same replay on ``model``, a copy of this one's model whose layers have not changed yet: it starts
        from the same recorded calls and first hidden states, without a forward pass of its own."""
        if self.at:
            raise ValueError(f"fork before asking for a layer (this replay is at layer {self.at})")
        twin = copy.copy(self)
        twin.layers = self.adapter.layers(model)
        twin.chunks = [list(c) for c in self.chunks]  # the layers replace the hidden states, never modify them
        return twin

    @classmethod
    def _split(cls, args, kwargs):
        """(hidden states, the other arguments, the other keywords, the hidden states' keyword or None)."""
        if args:
            return args[0], args[1:], kwargs, None
        key = next((k for k in cls.HIDDEN_KEYS if k in kwargs), None)
        if key is None:
            raise RuntimeError(f"cannot tell the hidden states among a layer's arguments {sorted(kwargs)}")
        return kwargs[key], (), {k: v for k, v in kwargs.items() if k != key}, key

    def _run(self, i: int, hidden, call):
        args, kwargs, key = call
        out = self.layers[i](**{key: hidden}, **kwargs) if key else self.layers[i](hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def __call__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(FFN input, residual stream) of layer i on the batch's real tokens, [N, d] each, text after text;
        the layers from the last one asked for up to i - 1 are run as they are now. Layers are asked for in order."""
        if not self.at <= i < len(self.layers):
            raise ValueError(f"layers are replayed in order: asked for layer {i} after layer {self.at}")
        for j in range(self.at, i):
            for c in self.chunks:
                c[1] = self._run(j, c[1], c[2][j])
        self.at = i
        seen = {}
        layer = self.layers[i]
        hooks = [self.adapter.ffn_module(layer).register_forward_hook(lambda m, a, out: seen.__setitem__("x", a[0])),
                 get_module(layer, self.adapter.down).register_forward_hook(lambda m, a, out: seen.__setitem__("y", out))]
        xs, rs = [], []
        try:
            for rows, hidden, calls in self.chunks:
                out = self._run(i, hidden, calls[i])
                x, y, out = (t.reshape(*rows.shape, -1) for t in (seen["x"], seen["y"], out))  # (OPT flattens)
                xs.append(x.numpy()[rows])
                rs.append((x if self.post_norm else out - y).numpy()[rows])
        finally:
            for h in hooks:
                h.remove()
        return np.concatenate(xs), np.concatenate(rs)


def text_ids(batch) -> np.ndarray:
    """[N]: the text each of :func:`ffn_inputs`' tokens comes from."""
    return np.nonzero(batch["attention_mask"].numpy().astype(bool))[0]


def mean_correction(ffn, selected: np.ndarray, h: np.ndarray, config: MoEConfig, *,
                    conditional: bool = True) -> np.ndarray:
    """unselected_bias [E, d]: each expert's mean output over the calibration tokens whose router did *not*
    select it (``selected`` [N, E] bool; its mean over all tokens where none did; ``conditional=False``:
    over all tokens). A skipped GELU/SiLU expert is not zero. Shared (always selected) experts get zeros."""
    E, m = config.experts, config.expert_size
    n = len(h)
    unselected = ~selected
    weights = np.where(unselected.any(0) & conditional, unselected, True).astype(np.float64)  # [N, E]
    mean_h = np.einsum("ne,nem->em", weights, h.reshape(n, E, m)) / weights.sum(0)[:, None]
    u = np.einsum("em,emd->ed", mean_h, ffn.w2.reshape(E, m, -1)).astype(np.float32)
    u[: config.shared_experts] = 0
    return u


LOWRANK_KEYS = ("lowrank_a", "lowrank_b", "lowrank_c")


def lowrank_fit(x: np.ndarray, target: np.ndarray, rank: int, *, ridge: float = 1e-3
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A [R, d], B [R, d_out], c [d_out]) such that (x A^T) B + c predicts ``target`` [N, d_out] from x [N, d]
    with least squared error at rank R (reduced-rank ridge regression, closed form): the ridge solution W on
    centred data (ridge scaled as in :func:`~exporter.routers.least_squares_router`), projected onto the top R
    right singular vectors of its fitted values."""
    x, t = np.asarray(x, np.float64), np.asarray(target, np.float64)
    mx, mt = x.mean(0), t.mean(0)
    xc = x - mx
    gram = xc.T @ xc
    gram[np.diag_indices_from(gram)] += ridge * np.trace(gram) / len(gram)
    w = np.linalg.solve(gram, xc.T @ (t - mt))  # [d, d_out]
    v = np.linalg.svd(xc @ w, full_matrices=False)[2][:rank].T  # [d_out, R]
    a, b = (w @ v).T, v.T
    return a.astype(np.float32), b.astype(np.float32), (mt - mx @ a.T @ b).astype(np.float32)


def _layer_moe(ffn, config: MoEConfig, routers, i: int) -> MoEFFN:
    return MoEFFN.from_dense(ffn, config.experts, routers[f"layer.{i}.router_w"], routers[f"layer.{i}.router_b"],
                             routers.get(f"layer.{i}.unselected_bias"), activation=config.activation,
                             shared=config.shared_experts, router_mlp=layer_mlp(routers, i), **config.op_selection(i))


def layer_lowrank(routers, i: int):
    """Layer i's low-rank stand-in (A, B, c), or None."""
    return tuple(routers[f"layer.{i}.{n}"] for n in LOWRANK_KEYS) if f"layer.{i}.{LOWRANK_KEYS[0]}" in routers else None


def save_moefied(directory: str | Path, model, tokenizer, config: MoEConfig, routers) -> None:
    """A Hugging Face directory (permuted weights: still the dense model) plus the MoE config and routers."""
    with staged_directory(directory, "--save-moefied") as tmp:  # whole or not at all
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file({k: np.ascontiguousarray(v) for k, v in routers.items()}, tmp / ROUTERS_FILE)
        config.save(tmp)


def build_moes(model, adapter: FFNAdapter, config: MoEConfig, routers, *, target: str = "custom",
               only: int | None = None) -> list[MoEFFN]:
    """One MoEFFN per layer (or only for layer ``only``) from its (already permuted) dense FFN and its router."""
    return [MoEFFN.from_dense(adapter.read(layer), config.experts, routers[f"layer.{i}.router_w"],
                              routers[f"layer.{i}.router_b"], routers.get(f"layer.{i}.unselected_bias"),
                              activation=config.activation, target=target, shared=config.shared_experts,
                              router_mlp=layer_mlp(routers, i), lowrank=layer_lowrank(routers, i),
                              **config.op_selection(i))
            for i, layer in enumerate(adapter.layers(model)) if only in (None, i)]


def install_moe(model, adapter: FFNAdapter, config: MoEConfig, routers, *, target: str = "custom") -> list[MoEFFN]:
    """Replace every dense FFN by its MoEFFN for good (``arch.patched`` swaps them for a block only)."""
    moes = build_moes(model, adapter, config, routers, target=target)
    for layer, moe in zip(adapter.layers(model), moes):
        adapter.install(layer, moe)
    return moes


def operator_inputs(moes: list[MoEFFN]) -> list[dict]:
    """Per layer, what its SparseExpertFFN node holds: the constant inputs by spec name (W1, B1, W2, B2, Wg, Bg,
    router_w, router_b, unselected_bias, W1_scale, W2_scale, Wg_scale: NumPy arrays, None if absent; with the
    MLP router, router_w / router_b are None and ``router_mlp`` = (A, a, B) computes router_scores from X; with
    --lowrank, ``lowrank`` = (A, B, c) is added to the operator's output as (X A^T) B + c) and the attributes (top_k, activation, min_k, score_threshold). What other layouts of the same MoE (e.g.
    onnxruntime-genai's) need, from :func:`exporter.convert`'s ``moes``."""
    out = []
    for moe in moes:
        inputs, attrs = moe.operator_inputs()
        out.append({**inputs, **attrs})
    return out


@torch.no_grad()
def last_hidden_state(model, batch) -> np.ndarray:
    return model(**batch).last_hidden_state.numpy()
