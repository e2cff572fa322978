"""Feature Mapping (FM): downstream images vote for their nearest source cluster centre.

``fm`` clusters the source features with k-means (the paper's method); ``fm-classmean`` uses the
per-class mean features as the centres (summed on actors, ``select.class_stats``), i.e. votes for the nearest class mean (what the paper's
released code does, there with an indexing bug that sends every vote to class 0 - done right here).
"""

from __future__ import annotations

import numpy as np

from dp4tl_ray.errors import UserError
from dp4tl_ray.featurestore import FeatureStore
from dp4tl_ray.select.voting import votes_from_topk


def class_sums(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class feature sums (float64) and row counts: the mergeable part of class means (``cluster_sums``
    sorts and sums ``CHUNK_ROWS`` rows at a time, so temporaries stay bounded)."""
    from dp4tl_ray.kmeans.lloyd import cluster_sums

    return cluster_sums(features, labels, num_classes), np.bincount(labels, minlength=num_classes)


def feature_mapping_votes(downstream: FeatureStore, centres: np.ndarray, k: int = 1) -> np.ndarray:
    """Votes per centre: each downstream image gives 1 (or 1/k to each of its k nearest) centre(s)."""
    return votes_from_topk(nearest_centres(downstream.arrays()[2], centres, k), centres.shape[0], k)


def feature_mapping_image_units(downstream: FeatureStore, centres: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Each downstream image's label and its ``k`` nearest centres ``[n, k]`` (for diagnostics)."""
    _, labels, feats, _ = downstream.arrays()
    return labels, nearest_centres(feats, centres, k)


def nearest_centres(features: np.ndarray, centres: np.ndarray, k: int = 1) -> np.ndarray:
    """Indices ``int64[n, k]`` of each row's ``k`` nearest centres (squared L2, exact FAISS search)."""
    import faiss

    if features.shape[0] == 0:
        raise UserError("downstream set has no images: nothing to vote with")
    if features.shape[1] != centres.shape[1]:
        raise UserError(f"downstream features are {features.shape[1]}-d but centres are {centres.shape[1]}-d; "
                        "extract both with the same surrogate")
    index = faiss.IndexFlatL2(centres.shape[1])
    index.add(np.ascontiguousarray(centres, np.float32))
    _, idx = index.search(np.ascontiguousarray(features, np.float32), min(k, centres.shape[0]))
    return idx
