"""The simulation's link state, indexed by destination: the same messages, checks and delivery marks as Flower's
own scan, looking only at the asking node's messages."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from fedtune.server import link_state


class FakeState:
    """What get_message_ins uses of Flower's InMemoryLinkState; a ttl of 0 marks a message Flower would drop."""

    def __init__(self, messages: dict[str, SimpleNamespace]) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = dict(messages)
        self.checked: list[str] = []

    def _check_stored_messages(self, ids: set[str]) -> None:
        for msg_id in ids:
            self.checked.append(msg_id)
            if msg_id in self.message_ins_store and self.message_ins_store[msg_id].metadata.ttl == 0:
                del self.message_ins_store[msg_id]


def _messages() -> dict[str, SimpleNamespace]:
    specs = [("a", 1, 1, 5), ("b", 2, 1, 5), ("c", 1, 2, 5), ("d", 1, 1, 0), ("e", 3, 1, 5), ("f", 1, 1, 5)]
    return {i: SimpleNamespace(metadata=SimpleNamespace(dst_node_id=dst, run_id=run, ttl=ttl, delivered_at=""))
            for i, dst, run, ttl in specs}


@pytest.mark.parametrize(("node", "limit", "run_id"), [(1, 1, None), (1, None, None), (1, None, 1), (2, 1, None),
                                                      (9, 1, None)])
def test_a_node_gets_what_flowers_scan_gives_it(node: int, limit: int | None, run_id: int | None) -> None:
    link_state.index_by_destination()
    ours, flowers = FakeState(_messages()), FakeState(_messages())
    got = link_state.get_message_ins(ours, node, limit, run_id=run_id)
    want = link_state.flower_get_message_ins()(flowers, node, limit, run_id=run_id)
    assert [m.metadata.dst_node_id for m in got] == [m.metadata.dst_node_id for m in want]
    assert [id_ for id_, m in ours.message_ins_store.items() if m in got] == \
        [id_ for id_, m in flowers.message_ins_store.items() if m in want]
    assert all(m.metadata.delivered_at for m in got)
    assert set(ours.checked) <= {i for i, m in _messages().items() if m.metadata.dst_node_id == node}
    again = link_state.get_message_ins(ours, node, limit, run_id=run_id)  # delivered once only
    assert not set(map(id, again)) & set(map(id, got))


def test_the_index_follows_new_and_deleted_messages() -> None:
    state = FakeState({})
    assert link_state.get_message_ins(state, 1, 1) == []
    state.message_ins_store["x"] = SimpleNamespace(metadata=SimpleNamespace(dst_node_id=1, run_id=1, ttl=5,
                                                                           delivered_at=""))
    state.message_ins_store["y"] = SimpleNamespace(metadata=SimpleNamespace(dst_node_id=1, run_id=1, ttl=5,
                                                                           delivered_at=""))
    del state.message_ins_store["x"]
    got = link_state.get_message_ins(state, 1, None)
    assert got == [state.message_ins_store["y"]] and state.message_ins_store.by_dst == {1: {"y": None}}


def test_it_replaces_flowers_scan_only_for_the_release_it_was_written_for(monkeypatch) -> None:
    import flwr
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    assert link_state.index_by_destination() is flwr.__version__.startswith(link_state.PATCHED)
    assert InMemoryLinkState.get_message_ins is link_state.get_message_ins
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    assert link_state.index_by_destination() is False


@pytest.mark.parametrize(("nodes", "interval"), [(5, 0.1), (1000, 0.1), (10_000, 1.0), (50_000, 2.0)])
def test_a_simulations_polls_for_replies_are_spaced_by_its_nodes(nodes: int, interval: float) -> None:
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    grid = object.__new__(InMemoryGrid)
    grid.pull_interval = 0.1
    grid.get_node_ids = lambda: range(nodes)  # type: ignore[method-assign]
    assert link_state.pace(grid) == interval == grid.pull_interval
    assert link_state.pace(SimpleNamespace(pull_interval=0.1)) is None  # a deployment's grid is left alone
