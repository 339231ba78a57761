from __future__ import annotations

import re

import numpy as np
import pytest

from fedtune.server.aggregation import fedavg, node_weights


def test_fedavg_is_example_weighted():
    a = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    b = {"w": np.array([3.0, 6.0], dtype=np.float32)}
    out = fedavg([(a, 1.0), (b, 3.0)])
    assert out["w"].dtype == np.float32
    np.testing.assert_allclose(out["w"], [2.5, 5.0])


@pytest.mark.parametrize("weights", [[0.0, 1.0], [-1.0, 2.0], [float("nan"), 1.0]])
def test_fedavg_rejects_bad_weights(weights):
    a = {"w": np.ones(2)}
    with pytest.raises(ValueError, match="weights"):
        fedavg([(a, weights[0]), (a, weights[1])])


def test_fedavg_needs_updates():
    with pytest.raises(ValueError):
        fedavg([])


HONEST = [100.0, 120.0, 80.0, 110.0]


@pytest.mark.parametrize(("claims", "weighting", "cap", "expected"), [
    # honest nodes of similar size: the weights are their num-examples (the main job unchanged)
    (HONEST, "examples", 0, HONEST),
    # one node claims 10^9 among honest ones: weighed as 4 x the median claim (110 -> 440)
    ([*HONEST[:3], 1e9], "examples", 0, [*HONEST[:3], 440.0]),
    # an operator's cap wins over the median's
    ([*HONEST[:3], 1e9], "examples", 150, [100.0, 120.0, 80.0, 150.0]),
    ([*HONEST[:3], 1e9], "equal", 0, [1.0, 1.0, 1.0, 1.0]),
    ([7.0], "examples", 0, [7.0]),
])
def test_node_weights_are_bounded(claims, weighting, cap, expected):
    np.testing.assert_allclose(node_weights(claims, weighting=weighting, cap=cap), expected)


def test_a_node_claiming_a_billion_examples_cannot_take_the_aggregate():
    """Its weight is the cap, so its share is at most 4 / (4 + k) with k honest nodes of similar size."""
    honest = [({"w": np.array([v], dtype=np.float32)}, n) for v, n in zip((1.0, 2.0, 3.0), HONEST[:3], strict=True)]
    liar = ({"w": np.array([3.0], dtype=np.float32)}, 1e9)  # an update of its own, and an inflated claim
    claims = [n for _, n in honest] + [liar[1]]
    weights = node_weights(claims)
    assert weights[-1] == 4 * np.median(claims)
    bounded = fedavg([(u, float(w)) for (u, _), w in zip([*honest, liar], weights, strict=True)])["w"][0]
    unbounded = fedavg([*honest, liar])["w"][0]
    assert unbounded == pytest.approx(3.0, abs=1e-5)  # the claim alone decides today's FedAvg
    assert 1.0 <= bounded <= 3.0 and bounded == pytest.approx((100 + 240 + 240 + 3 * 440) / 740, rel=1e-6)
    # A far-off update moves the aggregate by at most the liar's share of the way (weights bound no norm).
    far = fedavg([(u, float(w)) for (u, _), w in zip([*honest, ({"w": np.array([1000.0])}, 1e9)], weights,
                                                         strict=True)])["w"][0]
    honest_mean = (100 * 1 + 120 * 2 + 80 * 3) / 300
    assert far - honest_mean == pytest.approx(440 / 740 * (1000 - honest_mean), rel=1e-6)


def test_equal_weighting_is_the_plain_mean():
    updates = [{"w": np.array([v, 2 * v])} for v in (1.0, 2.0, 6.0)]
    weights = node_weights([5.0, 1e9, 20.0], weighting="equal")
    out = fedavg([(u, float(w)) for u, w in zip(updates, weights, strict=True)])
    np.testing.assert_allclose(out["w"], [3.0, 6.0])


@pytest.mark.parametrize(("claims", "kwargs", "message"), [
    ([1.0], {"weighting": "median"}, "weighting must be one of examples, equal, got 'median'"),
    ([1.0], {"cap": -1}, "max-node-examples must be >= 0, got -1"),
    ([0.0, 1.0], {}, "num-examples must be positive and finite"),
    ([float("inf")], {}, "num-examples must be positive and finite"),
    ([], {}, "num-examples must be positive and finite"),
])
def test_node_weights_name_the_bad_value(claims, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        node_weights(claims, **kwargs)
