"""Aggregation of adapter updates: pure functions on ``dict[str, np.ndarray]`` and plain numbers.

FedAvg (McMahan et al. 2017) averages each tensor weighted by the client's number
of training examples. For LoRA this averages the factors A and B separately,
which is the standard practice; the product of averages differs from the average
of products (FFA-LoRA, Sun et al. 2024, fixes A to make it exact).

The number of examples is the node's own claim, which the server cannot check: :func:`node_weights` bounds
each node's weight, so that a node claiming 10^9 examples weighs no more than the cap (see its docstring).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Arrays = dict[str, np.ndarray]
WEIGHTINGS = ("examples", "equal")
MEDIAN_FACTOR = 4.0  # the default cap: this many times the median num-examples of the round's trained nodes


def node_weights(num_examples: Sequence[float], *, weighting: str = "examples", cap: int = 0) -> np.ndarray:
    """Each trained node's FedAvg weight, bounded so that no node's claim buys it the aggregate.

    ``examples``: w_i = min(n_i, c), with c = ``cap`` when > 0, else 4 x median(n) over the round's trained
    nodes. With k honest nodes of similar size n and one node claiming any N, that node's share of the
    aggregate is at most 4n / (4n + k n) = 4 / (4 + k) (the median stays among the honest claims), instead of
    N / (N + k n) -> 1. A median is robust only with 3 or more nodes: with 2, one node's claim sets it (then
    give ``cap``, or use ``equal``). ``equal``: w_i = 1, the plain mean of the updates. Weights never bound an
    update's norm: a node can still send a large update, and its share times that update moves the aggregate.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if cap < 0:
        raise ValueError(f"max-node-examples must be >= 0, got {cap}")
    claims = np.asarray(num_examples, dtype=np.float64)
    if claims.size == 0 or not np.all(np.isfinite(claims)) or np.any(claims <= 0):
        raise ValueError(f"num-examples must be positive and finite, got {claims.tolist()}")
    if weighting == "equal":
        return np.ones_like(claims)
    bound = float(cap) if cap > 0 else MEDIAN_FACTOR * float(np.median(claims))
    return np.minimum(claims, bound)


def fedavg(updates: Sequence[tuple[Arrays, float]]) -> Arrays:
    """Weighted mean of each tensor; weights must be positive and finite."""
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
