"""Routers: linear scores router_w · x + router_b, so every router exports as the op's own inputs."""
from __future__ import annotations

import numpy as np


def centroid_router(w1: np.ndarray, n_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """MoEfication's similarity router: the mean of each expert's L2-normalised first-layer rows
    (w1 already permuted so experts are contiguous)."""
    rows = w1 / np.maximum(np.linalg.norm(w1, axis=1, keepdims=True), 1e-12)
    return rows.reshape(n_experts, -1, w1.shape[1]).mean(1).astype(np.float32), np.zeros(n_experts, np.float32)


def expert_deviation(h: np.ndarray, w2: np.ndarray, n_experts: int) -> np.ndarray:
    """[N, E]: how far each expert's output on each token is from its mean output, ||(h_e - mean h_e) W2_e||
    (h [N, I] and w2 [I, d] permuted so experts are contiguous). What a router should rank by."""
    n, width = h.shape
    hc = (h - h.mean(0)).reshape(n, n_experts, width // n_experts)
    out = np.einsum("nem,emd->ned", hc, w2.reshape(n_experts, width // n_experts, -1))
    return np.linalg.norm(out, axis=-1)


def least_squares_router(x: np.ndarray, h: np.ndarray, w2: np.ndarray, n_experts: int, *, ridge: float = 1e-3
                         ) -> tuple[np.ndarray, np.ndarray]:
    """A linear router fitted (ridge regression on centred inputs) to predict each expert's deviation
    norm from the FFN input on calibration tokens (x [N, d], h [N, I] its activations).

    Plain least squares is ill-conditioned on transformer hidden states (a few near-constant outlier
    dimensions): it returns weights and biases in the tens of thousands whose float32 scores cancel
    to noise, so two runtimes route differently. Centring and a ridge of ``ridge`` x the mean input
    variance keep the scores on the scale of the targets.
    """
    target = expert_deviation(h, w2, n_experts)
    x = np.asarray(x, np.float64)
    mx, mt = x.mean(0), target.mean(0)
    xc = x - mx
    gram = xc.T @ xc
    gram[np.diag_indices_from(gram)] += ridge * np.trace(gram) / len(gram)
    w = np.linalg.solve(gram, xc.T @ (target - mt))  # [d, E]
    return w.T.astype(np.float32), (mt - mx @ w).astype(np.float32)
