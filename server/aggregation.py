"""Aggregation of adapter updates: pure functions on ``dict[str, np.ndarray]``.

FedAvg (McMahan et al. 2017) averages each tensor weighted by the client's number
of training examples. For LoRA this averages the factors A and B separately,
which is the standard practice; the product of averages differs from the average
of products (FFA-LoRA, Sun et al. 2024, fixes A to make it exact).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Arrays = dict[str, np.ndarray]


def fedavg(updates: Sequence[tuple[Arrays, float]]) -> Arrays:
    """Example-weighted mean of each tensor; weights must be positive and finite."""
    if not updates:
        raise ValueError("fedavg needs at least one update")
    weights = np.array([w for _, w in updates], dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(f"fedavg weights must be positive and finite, got {weights.tolist()}")
    weights /= weights.sum()
    names = updates[0][0].keys()
    return {
        name: np.sum([w * u[name].astype(np.float64) for (u, _), w in zip(updates, weights, strict=True)],
                     axis=0).astype(updates[0][0][name].dtype)
        for name in names
    }
