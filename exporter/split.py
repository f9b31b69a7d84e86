"""Expert construction: split an FFN's neurons into equal-size experts (parameter clustering,
co-activation on calibration tokens by k-means or by METIS graph partitioning, or at random), and pick
the neurons of always-on shared experts.
Each assignment step is an exact balanced assignment (Hungarian algorithm on the distance matrix
with every centroid repeated expert-size times), not a greedy fill.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans


def balanced_kmeans(vectors: np.ndarray, n_clusters: int, *, seed: int = 0, max_iter: int = 30
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Labels [N] with exactly N / n_clusters members per cluster, and the centroids [n_clusters, d]."""
    n = len(vectors)
    if n % n_clusters:
        raise ValueError(f"{n} neurons cannot be split into {n_clusters} equal experts; "
                         f"choose a divisor of {n}")
    size = n // n_clusters
    x = np.asarray(vectors, np.float64)
    centroids = KMeans(n_clusters, n_init=1, random_state=seed).fit(x).cluster_centers_
    labels = np.full(n, -1)
    for _ in range(max_iter):
        dist = (x**2).sum(1)[:, None] - 2 * x @ centroids.T + (centroids**2).sum(1)  # [N, E]
        rows, cols = linear_sum_assignment(np.repeat(dist, size, axis=1))
        new = np.empty(n, int)
        new[rows] = cols // size
        if np.array_equal(new, labels):
            break
        labels = new
        centroids = np.stack([x[labels == e].mean(0) for e in range(n_clusters)])
    return labels, centroids


def parameter_clustering(w1: np.ndarray, n_experts: int, *, seed: int = 0) -> np.ndarray:
    """MoEfication's split of W1 [I, d]: balanced k-means over the L2-normalised rows. Returns the
    permutation [I] that makes each expert's neurons contiguous."""
    rows = w1 / np.maximum(np.linalg.norm(w1, axis=1, keepdims=True), 1e-12)
    labels, _ = balanced_kmeans(rows, n_experts, seed=seed)
    return np.argsort(labels, kind="stable")


def coactivation_features(h: np.ndarray, w2_norms: np.ndarray, *, max_tokens: int = 6000) -> np.ndarray:
    """[I, N] per neuron: how far it deviates from its mean on calibration tokens, weighted by its output
    norm (|h - mean| * ||W2 row||, over up to ``max_tokens`` tokens), L2-normalised and centred."""
    h = np.asarray(h[:max_tokens], np.float64)
    feat = (np.abs(h - h.mean(0)) * w2_norms).T  # [I, N]
    feat /= np.maximum(np.linalg.norm(feat, axis=1, keepdims=True), 1e-9)
    return feat - feat.mean(0)


def coactivation_split(h: np.ndarray, w2_norms: np.ndarray, n_experts: int, *, seed: int = 0,
                       max_tokens: int = 6000, dims: int = 128) -> np.ndarray:
    """Co-activation split: neurons whose contributions move together on real tokens share an expert.

    Each neuron is described by :func:`coactivation_features`, reduced to ``dims`` principal components;
    balanced k-means then cuts equal experts. Returns the permutation [I] that makes each expert's
    neurons contiguous. (Measured on all-MiniLM-L6-v2 to beat parameter clustering, and binary or signed
    co-activation features: see docs/QUALITY.md.)
    """
    feat = coactivation_features(h, w2_norms, max_tokens=max_tokens)
    u, sv, _ = np.linalg.svd(feat, full_matrices=False)
    labels, _ = balanced_kmeans(u[:, :dims] * sv[:dims], n_experts, seed=seed)
    return np.argsort(labels, kind="stable")


def random_split(width: int, n_experts: int, *, seed: int = 0) -> np.ndarray:
    """Baseline: a seeded random permutation (experts = consecutive blocks of it)."""
    if width % n_experts:
        raise ValueError(f"{width} neurons cannot be split into {n_experts} equal experts")
    return np.random.default_rng(seed).permutation(width)


def coactivation_graph(h: np.ndarray, w2_norms: np.ndarray, *, neighbours: int = 16, max_tokens: int = 6000
                       ) -> np.ndarray:
    """Symmetric [I, I] co-activation affinities: the cosine similarity of the neurons'
    :func:`coactivation_features`, kept for each neuron's ``neighbours`` most similar neurons (positive
    only), the rest zero."""
    feat = coactivation_features(h, w2_norms, max_tokens=max_tokens)
    feat /= np.maximum(np.linalg.norm(feat, axis=1, keepdims=True), 1e-12)
    sim = feat @ feat.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argsort(-sim, axis=1)[:, :neighbours]
    adj = np.zeros_like(sim)
    rows = np.repeat(np.arange(len(sim)), nn.shape[1])
    adj[rows, nn.ravel()] = np.maximum(sim[rows, nn.ravel()], 0)
    return np.maximum(adj, adj.T)


def rebalance(labels: np.ndarray, affinity: np.ndarray, n_parts: int) -> np.ndarray:
    """Make parts exactly equal: each oversized part keeps the members most tied to it (sum of affinities
    to its other members); the surplus fills the free places of the undersized parts by an exact
    assignment that maximises the surplus neurons' affinity to the part they join."""
    labels = np.asarray(labels).copy()
    size = len(labels) // n_parts
    surplus = []
    for p in range(n_parts):
        members = np.nonzero(labels == p)[0]
        if len(members) > size:
            tie = affinity[np.ix_(members, members)].sum(1)
            surplus += list(members[np.argsort(-tie, kind="stable")[size:]])
    if not surplus:
        return labels
    surplus = np.array(surplus)
    labels[surplus] = -1
    free = np.concatenate([np.full(size - (labels == p).sum(), p) for p in range(n_parts)])
    gain = np.stack([affinity[np.ix_(surplus, np.nonzero(labels == p)[0])].sum(1) for p in range(n_parts)], 1)
    rows, cols = linear_sum_assignment(-gain[:, free])
    labels[surplus[rows]] = free[cols]
    return labels


def metis_split(h: np.ndarray, w2_norms: np.ndarray, n_experts: int, *, seed: int = 0, neighbours: int = 16
                ) -> np.ndarray:
    """Graph split: METIS (pymetis) cuts the neurons' co-activation graph (:func:`coactivation_graph`)
    into ``n_experts`` parts of nearly equal size with the least affinity across parts; :func:`rebalance`
    then makes them exactly equal. Returns the permutation [I] that makes each expert contiguous."""
    import pymetis

    width = h.shape[1]
    if width % n_experts:
        raise ValueError(f"{width} neurons cannot be split into {n_experts} equal experts")
    if n_experts == 1:
        return np.arange(width)
    adj = coactivation_graph(h, w2_norms, neighbours=neighbours)
    weights = np.rint(adj * 1000).astype(np.int64)  # METIS takes integer edge weights
    xadj, adjncy, eweights = [0], [], []
    for i in range(width):
        nbr = np.nonzero(weights[i])[0]
        adjncy += nbr.tolist()
        eweights += weights[i, nbr].tolist()
        xadj.append(len(adjncy))
    _, parts = pymetis.part_graph(n_experts, pymetis.CSRAdjacency(xadj, adjncy), eweights=eweights,
                                  options=pymetis.Options(ufactor=1, seed=seed))
    labels = rebalance(np.asarray(parts), adj, n_experts)
    return np.argsort(labels, kind="stable")


def shared_neurons(h: np.ndarray, w2_norms: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` neurons with the largest mean contribution |h - mean| * ||W2 row|| on calibration
    tokens (largest first): the always-on shared experts."""
    contrib = (np.abs(h - h.mean(0)) * w2_norms).mean(0)
    return np.argsort(-contrib, kind="stable")[:count]
