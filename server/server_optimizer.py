"""The server's optimiser on the aggregate (FedOpt, Reddi et al. 2021): FedAvg, FedAvgM, FedAdam.

Each round the mean of the nodes' adapters, minus the global adapter the round started from, is the round's
pseudo-gradient (with its sign flipped); a torch optimiser over the global adapter takes one step on it. Plain
FedAvg at server learning rate 1 is the mean itself. Everything here is post-processing of what the nodes sent
(each node's update is DP before it leaves the node), so no setting here changes any node's epsilon.

The optimiser's state (momentum, Adam's moments) lives in the ServerApp's process: a resumed run starts it again
from zero at the round it resumes.
"""

from __future__ import annotations

from typing import get_args

import numpy as np
import torch

from fedtune.common.settings import FederationSettings, ServerOptimizerName
from fedtune.common.wire.arrays import Arrays

SERVER_OPTIMIZERS: tuple[str, ...] = get_args(ServerOptimizerName)
ADAM_BETAS = (0.9, 0.99)  # Reddi et al.'s defaults
ADAM_EPS = 1e-3  # their tau: adaptivity; larger is closer to FedAvgM


class ServerOptimizer:
    """One optimiser step on the global adapter per round: ``step(global, mean) -> new global``."""

    def __init__(self, kind: str = "fedavg", learning_rate: float = 1.0, momentum: float = 0.9) -> None:
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"server-optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, got {kind!r}")
        self.kind, self.learning_rate, self.momentum = kind, learning_rate, momentum
        self._params: dict[str, torch.nn.Parameter] = {}
        self._optim: torch.optim.Optimizer | None = None

    @classmethod
    def from_settings(cls, federation: FederationSettings) -> ServerOptimizer:
        return cls(federation.server_optimizer, federation.server_learning_rate, federation.server_momentum)

    @property
    def identity(self) -> bool:
        """True when the step returns the mean unchanged (FedAvg at learning rate 1)."""
        return self.kind == "fedavg" and self.learning_rate == 1.0

    def _optimizer(self, current: Arrays) -> torch.optim.Optimizer:
        if self._optim is None or set(self._params) != set(current):
            self._params = {k: torch.nn.Parameter(torch.zeros(v.shape, dtype=torch.float64))
                            for k, v in current.items()}
            params = list(self._params.values())
            if self.kind == "fedadam":
                self._optim = torch.optim.Adam(params, lr=self.learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS)
            else:
                self._optim = torch.optim.SGD(params, lr=self.learning_rate,
                                              momentum=self.momentum if self.kind == "fedavgm" else 0.0)
        return self._optim

    def step(self, current: Arrays, mean: Arrays) -> Arrays:
        """The new global adapter from the round's starting one (``current``) and the nodes' mean (``mean``)."""
        if self.identity:
            return mean
        optim = self._optimizer({name: current[name] for name in mean})
        with torch.no_grad():
            for name, param in self._params.items():
                start = torch.from_numpy(np.asarray(current[name], dtype=np.float64))
                param.copy_(start)
                param.grad = start - torch.from_numpy(np.asarray(mean[name], dtype=np.float64))
        optim.step()
        return {name: param.detach().numpy().astype(mean[name].dtype, copy=True)
                for name, param in self._params.items()}
