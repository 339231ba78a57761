"""The simulated nodes' environment, carried to the workers of an existing Ray cluster.

Workers of a cluster started with ``ray start`` inherit that command's environment, not the one
``fedtune-sim`` gives the simulation's driver, and Flower's Ray backend puts only ``PYTHONPATH`` in the
job's runtime environment. ``fedtune-sim --ray-address`` names :func:`forward_node_env` as Ray's runtime
environment hook (``RAY_RUNTIME_ENV_HOOK``), which adds the variables a simulated node reads. Every Ray
node must see the results directory at the same path (a shared filesystem): the nodes' data, ledgers
and state live there.
"""

from __future__ import annotations

from typing import Any

from fedtune.common import runtime

HOOK = f"{__name__}.forward_node_env"


def forward_node_env(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """``runtime_env`` with the node variables of this process added to its ``env_vars`` (theirs win)."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**runtime.forwarded(runtime.NODE_VARIABLES), **(env.get("env_vars") or {})}
    return env
