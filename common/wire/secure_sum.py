"""How an adapter update travels inside Flower's SecAgg+ sum: the integer grid both sides agree on.

SecAgg+ sums integer vectors modulo ``2^32``. Flower's ``secaggplus_mod`` maps each float ``x`` of a node's
update to ``round((clip(x, -c, c) + c) * T / (2c))`` (stochastic rounding with numpy's global generator) and the
workflow maps the sum back. fedtune does the rounding itself, with the node's own secret randomness, and hands
the mod values that already lie on the grid ``x = z * g`` (``g = 2c / T``, ``z`` an integer, ``|z| <= T/2``):
``c`` and ``T`` are powers of two, so the mod's arithmetic is exact and its rounding is the identity. The sum the
server recovers is then exactly ``g * sum_i z_i``: the quantisation is the node's unbiased randomised rounding
(error below ``g`` per coordinate), and client-level noise added to ``z`` in the integer domain (Skellam, see
:mod:`fedtune.common.privacy.distributed`) sums exactly.

- ``c`` (the range): ``secagg-range``, or from the run (see :func:`value_range`);
- ``T`` (the target range): the largest power of two with ``n * T <= 2^32`` for the round's ``n`` nodes (so the
  modular sum never wraps) and ``T <= 2^30`` (the mod rounds through int32).

Every node's update is the difference between its trained adapter and the round's global adapter, over the
tensors it trains (:func:`~fedtune.common.wire.arrays.sent_arrays`), flattened in sorted-name order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedtune.common.settings import AggregationSettings, PrivacySettings, TrainPlan
from fedtune.common.wire.arrays import Arrays

MODULUS = 2**32  # SecAgg+'s modulus (Flower's default and maximum)
MAX_TARGET = 2**30
MIN_AUTO_RANGE = 16.0
CLIENT_DP_TAIL = 10.0  # the range holds a node's clipped update plus this many standard deviations of its noise


def _power_of_two_at_least(value: float) -> float:
    return float(2.0 ** math.ceil(math.log2(value)))


def target_range(nodes: int) -> int:
    """T for a round of ``nodes`` nodes: a power of two with nodes * T <= 2^32 and T <= 2^30."""
    if nodes < 1:
        raise ValueError(f"a secure sum needs at least one node, got {nodes}")
    return min(MAX_TARGET, 2 ** (32 - math.ceil(math.log2(nodes + 1))))


def value_range(aggregation: AggregationSettings, plan: TrainPlan, privacy: PrivacySettings) -> float:
    """c: the largest |coordinate| of one node's update that the sum carries (a power of two).

    With client-dp, a node's update has L2 norm <= client-clip-norm C, so every coordinate does too; its noise
    share has standard deviation sigma_c C / sqrt(t) <= sigma_c C / sqrt(2) for any threshold t >= 2, and
    c >= C (1 + 10 sigma_c / sqrt(2)) leaves a tail probability below 1e-22 per coordinate. Without it,
    ``secagg-range``, or 8 x the largest learning rate x the clip norm (1 without DP) x the local epochs, and at
    least 16: a round moves a LoRA or head coordinate far less (measured in docs/secure-aggregation.md). The range
    costs little: the grid step is 2c / T with T >= 2^22 up to 1,000 nodes, so even c = 16 rounds each
    coordinate to within 8e-6 (6e-8 for 5 nodes). A coordinate beyond c is clamped and counted
    (``secagg-clamped``), never silently.
    """
    if aggregation.client_dp:
        bound = aggregation.client_clip_norm * (1.0 + CLIENT_DP_TAIL * aggregation.client_noise_multiplier
                                                / math.sqrt(2.0))
    elif aggregation.secagg_range > 0:
        bound = aggregation.secagg_range
    else:
        private = privacy.dp_mode != "off"
        lr = plan.learning_rate if private else plan.nonprivate_learning_rate
        scale = plan.lora_lr_scale if private else plan.nonprivate_lora_lr_scale
        bound = max(MIN_AUTO_RANGE, 8.0 * lr * max(1.0, scale) * (privacy.clip_norm if private else 1.0)
                    * max(1.0, plan.local_epochs))
    return _power_of_two_at_least(max(bound, 2.0**-20))


def step(value_range_c: float, target: int) -> float:
    """g = 2c / T: the value of one integer unit of the sum."""
    return 2.0 * value_range_c / target


def summed_names(reference: Arrays) -> list[str]:
    """The order in which a node's tensors travel in the sum (both sides sort the names)."""
    return sorted(reference)


def flatten(update: Arrays, names: Sequence[str]) -> np.ndarray:
    """One float64 vector of the named tensors (shape (d,))."""
    return np.concatenate([np.asarray(update[n], dtype=np.float64).ravel() for n in names])


def unflatten(vector: np.ndarray, reference: Arrays, names: Sequence[str]) -> Arrays:
    """The vector back as named tensors with the reference's shapes (float64)."""
    if (total := sum(reference[n].size for n in names)) != vector.size:
        raise ValueError(f"the sum holds {vector.size} values; the adapter has {total}")
    out, at = {}, 0
    for name in names:
        size = reference[name].size
        out[name] = vector[at:at + size].reshape(reference[name].shape)
        at += size
    return out


def randomised_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unbiased rounding to integers: floor(x) + Bernoulli(frac(x)); |result - x| < 1 per coordinate."""
    low = np.floor(x)
    return (low + (rng.random(x.shape) < (x - low))).astype(np.int64)


def clamp(z: np.ndarray, target: int) -> tuple[np.ndarray, int]:
    """z limited to [-T/2, T/2] (what the sum can carry) and the number of coordinates that were beyond."""
    half = target // 2
    beyond = int(np.count_nonzero(np.abs(z) > half))
    return np.clip(z, -half, half), beyond
