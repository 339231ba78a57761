"""The secure sum's grid: exact through Flower's own SecAgg+ quantisation, unbiased, overflow counted."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.common.settings import AggregationSettings, PrivacySettings, TrainPlan
from fedtune.common.wire.secure_sum import (
    MODULUS,
    clamp,
    flatten,
    randomised_round,
    step,
    summed_names,
    target_range,
    unflatten,
    value_range,
)
from fedtune.sim.secure_bench import flower_sum  # Flower's own quantisation, modular sum and dequantisation


@pytest.mark.parametrize("nodes", [1, 2, 3, 5, 100, 1000, 4000])
def test_target_range_never_lets_the_modular_sum_wrap(nodes):
    t = target_range(nodes)
    assert t & (t - 1) == 0 and t <= 2**30 and nodes * t < MODULUS
    assert 2 * t * nodes >= MODULUS or t == 2**30  # the largest power of two that fits


def test_values_on_the_grid_pass_flowers_quantisation_exactly():
    rng = np.random.default_rng(0)
    c = value_range(AggregationSettings(), TrainPlan(), PrivacySettings())
    t = target_range(5)
    g = step(c, t)
    updates = [rng.normal(0, 0.05, 5000) for _ in range(5)]
    encoded = []
    for u in updates:
        z, clamped = clamp(randomised_round(u / g, rng), t)
        assert clamped == 0
        encoded.append(z.astype(np.float64) * g)
    np.random.seed(1)  # the mod's own rounding must not matter: values already lie on its grid
    mean = flower_sum(encoded, c, t)
    # Exactly the sum of the nodes' integers (only the final division by 5 rounds, by 1 ulp)
    np.testing.assert_array_equal(np.round(mean * 5 / g), np.round(np.sum(encoded, axis=0) / g))
    np.testing.assert_allclose(mean, np.mean(encoded, axis=0), rtol=1e-15, atol=0)
    exact = np.mean(updates, axis=0)
    assert np.max(np.abs(mean - exact)) <= g  # the node's rounding: below one grid step per coordinate
    assert np.linalg.norm(mean - exact) / np.linalg.norm(exact) < 1e-5


def test_rounding_is_unbiased():
    rng = np.random.default_rng(3)
    x = np.full(200_000, 0.3)
    assert abs(randomised_round(x, rng).mean() - 0.3) < 0.005


def test_values_beyond_the_range_are_clamped_and_counted():
    z, clamped = clamp(np.array([0, 5, -9, 100]), 16)
    assert clamped == 2 and z.tolist() == [0, 5, -8, 8]


def test_the_default_range_covers_the_main_jobs_recipe_and_follows_its_settings():
    c = value_range(AggregationSettings(), TrainPlan(), PrivacySettings())
    assert c == 16.0  # 8 x lr 2.0 x clip 1.0 x 1 epoch
    assert value_range(AggregationSettings(), TrainPlan(learning_rate=4.0, local_epochs=2), PrivacySettings()) == 64
    assert value_range(AggregationSettings(secagg_range=3.0), TrainPlan(), PrivacySettings()) == 4.0
    dp = AggregationSettings(secure_aggregation=True, client_dp=True, client_clip_norm=0.5,
                             client_noise_multiplier=1.0)
    assert value_range(dp, TrainPlan(), PrivacySettings()) >= 0.5 * (1 + 10 / np.sqrt(2))


def test_flatten_and_unflatten_are_inverse_in_sorted_name_order():
    ref = {"b": np.zeros((2, 3), np.float32), "a": np.zeros(4, np.float32)}
    upd = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.arange(4, dtype=np.float32) + 10}
    names = summed_names(ref)
    assert names == ["a", "b"]
    flat = flatten(upd, names)
    assert flat[:4].tolist() == [10, 11, 12, 13]
    back = unflatten(flat, ref, names)
    np.testing.assert_array_equal(back["b"], upd["b"])
    with pytest.raises(ValueError, match="holds 9 values"):
        unflatten(np.zeros(9), ref, names)
