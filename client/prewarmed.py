"""A ``flwr-clientapp`` process started before its task: ``python -m fedtune.client.prewarmed``.

Flower runs every message a node receives in a new ``flwr-clientapp`` process, which first imports torch,
transformers, PEFT, Opacus and the ClientApp: about 6-7 CPU-seconds on a small node, paid by every node for
every message (training and evaluation), on the round's critical path. The app gate (:mod:`fedtune.client.gate`)
keeps one of these processes ready: it imports all of that while the node waits for work, then blocks on its
standard input. When a task the gate allows arrives, the gate writes the task's token to it and starts the next
one. The process then runs exactly what ``flwr-clientapp --token`` runs (Flower's ``run_clientapp``) for that one
task and exits, so every message still gets a fresh process of its own; only the imports moved off the round.

End of input without a token (the gate stopped or replaced it) ends the process without running anything.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def warm() -> None:
    """Import what a round imports (the ClientApp and the modules its handlers import lazily)."""
    import opacus  # noqa: F401  # the package before its submodules (see client.trainer)
    from flwr.supernode.runtime import run_clientapp  # noqa: F401

    import fedtune.client.app  # noqa: F401
    import fedtune.client.trainer  # noqa: F401
    import fedtune.common.tasks.classify.evaluation  # noqa: F401
    import fedtune.common.tasks.classify.model  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedtune.client.prewarmed", description=__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the gate) is gone")
    args = p.parse_args(argv)
    warm()
    token = sys.stdin.readline().strip()
    if not token:
        return 0
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    sys.argv = ["flwr-clientapp"]  # Flower's exit handling names the component after argv[0]
    run_clientapp(runtime_api_address=args.runtime_api_address, token=token, insecure=True, certificates=None,
                  parent_pid=args.parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
