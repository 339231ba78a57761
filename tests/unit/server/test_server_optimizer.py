"""The server's optimiser on the aggregate (FedOpt): FedAvg is the mean; FedAvgM and FedAdam follow their
update rules on the pseudo-gradient (global - mean), with state kept across rounds."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.common.errors import ConfigError
from fedtune.common.settings import RunSettings
from fedtune.server.server_optimizer import ServerOptimizer


def _arrays(value: float) -> dict[str, np.ndarray]:
    return {"lora_B": np.full((2, 3), value, dtype=np.float32), "head.bias": np.array([value, -value], np.float32)}


def test_fedavg_at_rate_one_is_the_mean_itself():
    mean = _arrays(2.0)
    assert ServerOptimizer().step(_arrays(1.0), mean) is mean


def test_a_server_learning_rate_scales_the_rounds_step():
    out = ServerOptimizer("fedavg", 2.0).step(_arrays(1.0), _arrays(1.5))
    assert np.allclose(out["lora_B"], 2.0) and np.allclose(out["head.bias"], [2.0, -2.0])
    assert out["lora_B"].dtype == np.float32


def test_fedavgm_accumulates_momentum_across_rounds():
    opt = ServerOptimizer("fedavgm", 1.0, 0.5)
    first = opt.step(_arrays(0.0), _arrays(1.0))  # buffer = step 1: x = 1
    second = opt.step(first, _arrays(2.0))  # buffer = 0.5 * 1 + 1 = 1.5: x = 2.5
    assert np.allclose(first["lora_B"], 1.0) and np.allclose(second["lora_B"], 2.5)


def test_fedadam_takes_normalised_steps():
    opt = ServerOptimizer("fedadam", 0.1)
    out = opt.step(_arrays(0.0), _arrays(5.0))  # Adam's first step: lr * sign (eps small against 5)
    assert np.allclose(out["lora_B"], 0.1, rtol=1e-3)
    assert np.allclose(out["head.bias"], [0.1, -0.1], rtol=1e-3)


def test_server_settings_are_checked():
    with pytest.raises(ConfigError) as err:
        RunSettings.from_config({"server-optimizer": "fedprox", "server-learning-rate": 0, "server-momentum": 1})
    text = str(err.value)
    assert "server-optimizer" in text
    with pytest.raises(ConfigError) as err:
        RunSettings.from_config({"server-learning-rate": 0, "server-momentum": 1})
    assert "server-learning-rate" in str(err.value) and "server-momentum" in str(err.value)
