"""Flower 1.42's in-memory link state, with its undelivered messages found by destination node.

In a simulation, Flower's delivery thread asks the link state every 0.1 s, for every node in turn, for that
node's next message (``vce_api.add_messages_to_queue``), and each ask scans and re-checks every stored message:
nodes x messages checks per sweep, under the state's lock and the GIL. With 1,000 simulated nodes this was 91%
of the simulation process's GIL time (py-spy), which starved the threads that collect the nodes' replies and run
the ServerApp: a round of 1,000 tiny clients took 335 s although the ClientApp's own work was ~35 ms a client.

:func:`index_by_destination` makes an ask look at the asking node's messages only. Every message it returns has
passed the same checks as before (expiry, federation: Flower's ``_check_stored_messages``), in the same order,
and is marked delivered the same way; messages of other nodes are checked when those nodes ask. The ServerApp
applies it on import (in a simulation it runs in the process that holds the state); in a deployment the state
lives in the SuperLink's own process and this changes nothing. It replaces Flower code, so it is applied to
the Flower version it was written against only (see ``PATCHED``). :func:`pace` spaces the ServerApp's own polls
for replies by the number of nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

log = logging.getLogger("fedtune.server")
PATCHED = "1.42."  # the flwr release whose InMemoryLinkState.get_message_ins this replaces
_flower: dict[str, Any] = {}  # Flower's own get_message_ins, once replaced (tests compare the two)


class ByDestination(dict):  # type: ignore[type-arg]  # message id -> Message, as Flower's store
    """Flower's ``message_ins_store`` with an index: destination node -> its message ids, in insertion order.

    Flower changes the store only by ``store[id] = message`` and ``del store[id]`` (1.42's in_memory_linkstate).
    """

    def __init__(self, items: dict[str, Any]) -> None:
        super().__init__()
        self.by_dst: dict[Hashable, dict[str, None]] = {}
        for key, message in items.items():
            self[key] = message

    def __setitem__(self, key: str, message: Any) -> None:
        if key in self:
            del self[key]
        super().__setitem__(key, message)
        self.by_dst.setdefault(message.metadata.dst_node_id, {})[key] = None

    def __delitem__(self, key: str) -> None:
        dst = self[key].metadata.dst_node_id
        super().__delitem__(key)
        mine = self.by_dst.get(dst, {})
        mine.pop(key, None)
        if not mine:
            self.by_dst.pop(dst, None)


def get_message_ins(self: Any, node_id: int, limit: int | None, *, run_id: int | None = None) -> list[Any]:
    """Flower 1.42's ``InMemoryLinkState.get_message_ins``, looking only at ``node_id``'s messages."""
    from flwr.supercore.date import now

    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    found: list[Any] = []
    with self.lock:
        store = self.message_ins_store
        if not isinstance(store, ByDestination):
            store = self.message_ins_store = ByDestination(store)
        for msg_id in list(store.by_dst.get(node_id, ())):
            self._check_stored_messages({msg_id})
            if ((msg := store.get(msg_id)) and msg.metadata.dst_node_id == node_id
                    and (run_id is None or msg.metadata.run_id == run_id) and msg.metadata.delivered_at == ""):
                found.append(msg)
            if limit and len(found) == limit:
                break
    if found:  # (every node is asked every 0.1 s; most asks find nothing)
        delivered_at = now().isoformat()
        for msg in found:
            msg.metadata.delivered_at = delivered_at
    return found


def pace(grid: Any) -> float | None:
    """The simulation's ServerApp asks for all its outstanding replies every ``pull_interval`` (0.1 s), and each ask
    re-checks every outstanding message: at 10,000 nodes that was 69% of the process's GIL time. Ask every
    0.1 s per 1,000 nodes instead (1 s at 10,000), at most 2 s; a round then ends at most that much later. Only
    Flower's in-memory grid (a simulation) is changed; the interval set, or None."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    if not isinstance(grid, InMemoryGrid):
        return None
    grid.pull_interval = min(2.0, max(0.1, len(list(grid.get_node_ids())) / 10_000))
    return grid.pull_interval


def index_by_destination() -> bool:
    """Replace ``InMemoryLinkState.get_message_ins`` (for flwr ``PATCHED`` only); whether it was replaced."""
    import flwr
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    if not flwr.__version__.startswith(PATCHED):
        log.info("flwr %s: the simulation's link state is left as Flower wrote it (patched for %sx)",
                 flwr.__version__, PATCHED)
        return False
    if InMemoryLinkState.get_message_ins is not get_message_ins:
        _flower["get_message_ins"] = InMemoryLinkState.get_message_ins
        InMemoryLinkState.get_message_ins = get_message_ins  # type: ignore[method-assign]
    return True


def flower_get_message_ins() -> Any:
    """Flower's own ``InMemoryLinkState.get_message_ins`` (replaced or not)."""
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    return _flower.get("get_message_ins", InMemoryLinkState.get_message_ins)
