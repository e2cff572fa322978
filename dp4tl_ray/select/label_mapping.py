"""Label Mapping (LM): each downstream image votes for the source class its surrogate predicts."""

from __future__ import annotations

import numpy as np

from dp4tl_ray.featurestore import FeatureStore
from dp4tl_ray.select.voting import votes_from_topk


def label_mapping_votes(downstream: FeatureStore, num_classes: int, k: int = 1) -> np.ndarray:
    """Votes per source class from the downstream store's stored top-k source-class predictions."""
    return votes_from_topk(downstream.arrays()[3], num_classes, k)


def label_mapping_image_units(downstream: FeatureStore) -> tuple[np.ndarray, np.ndarray]:
    """Each downstream image's label and its stored top-k source classes ``[n, topk]`` (for diagnostics)."""
    _, labels, _, topk = downstream.arrays()
    return labels, topk
