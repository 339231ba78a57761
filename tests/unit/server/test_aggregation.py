from __future__ import annotations

import numpy as np
import pytest

from fedtune.server.aggregation import fedavg


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
