"""Prompt embeddings into clusters: KMeans on standardized embeddings (each dimension to mean 0, variance 1), the
number of clusters chosen by the silhouette score when asked for 'auto', clusters under the minimum size merged
into 'other' (-1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prism.errors import PrismError

OTHER = -1
AUTO_MAX_CLUSTERS = 20
SILHOUETTE_SAMPLE = 2000  # silhouette costs n^2 distances: scored on a fixed sample of the prompts


@dataclass
class Clustering:
    points: np.ndarray  # the normalized embeddings KMeans saw
    labels: np.ndarray  # one cluster per prompt, OTHER for the merged small ones
    centroids: dict[int, np.ndarray]
    k: int  # clusters KMeans made (before the small ones were merged)
    silhouette: dict[int, float]  # k -> silhouette score, for every k tried


def normalized(embeddings: np.ndarray) -> np.ndarray:
    """Each dimension standardized: a few dimensions of an LLM's hidden states carry huge, nearly constant
    activations that would otherwise decide every distance. On MT-Bench + JBB prompts (9 intents) with the
    embedded model's middle block, KMeans reached ARI 0.54, against 0.20 on the raw states and 0.28 centered
    and L2-normalized."""
    return (embeddings - embeddings.mean(0, keepdims=True)) / (embeddings.std(0, keepdims=True) + 1e-6)


def cluster(embeddings: np.ndarray, clusters: int | str, *, min_cluster_size: int, seed: int) -> Clustering:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    points = normalized(np.asarray(embeddings, dtype=np.float32))
    n = len(points)
    if clusters == "auto":
        top = min(AUTO_MAX_CLUSTERS, n // max(1, min_cluster_size), n - 1)
        if top < 2:
            raise PrismError(f"{n} prompts are too few to cluster with --min-cluster-size {min_cluster_size}: "
                             "log more requests, or lower --min-cluster-size")
        candidates = list(range(2, top + 1))
    else:
        if not isinstance(clusters, int) or not 1 <= clusters <= n:
            raise PrismError(f"--clusters must be 'auto' or a number from 1 to the {n} prompts, got {clusters!r}")
        candidates = [clusters]
    scores, fits = {}, {}
    for k in candidates:
        fits[k] = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points)
        if len(candidates) > 1:
            scores[k] = float(silhouette_score(points, fits[k].labels_, sample_size=min(n, SILHOUETTE_SAMPLE),
                                               random_state=seed))
    k = max(scores, key=lambda c: scores[c]) if scores else candidates[0]
    labels = fits[k].labels_.copy()
    sizes = np.bincount(labels, minlength=k)
    for small in np.flatnonzero(sizes < min_cluster_size):
        labels[labels == small] = OTHER
    centroids = {int(c): fits[k].cluster_centers_[c] for c in np.unique(labels) if c != OTHER}
    return Clustering(points, labels, centroids, k, scores)


def central(clustering: Clustering, cluster_id: int, count: int) -> list[int]:
    """The indices of the `count` prompts of a cluster nearest its centroid."""
    points = clustering.points
    members = np.flatnonzero(clustering.labels == cluster_id)
    if cluster_id == OTHER:
        return members[:count].tolist()
    distances = np.linalg.norm(points[members] - clustering.centroids[cluster_id], axis=1)
    return members[np.argsort(distances)[:count]].tolist()


def adjusted_rand(truth: list[str], labels: np.ndarray) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(truth, labels))
