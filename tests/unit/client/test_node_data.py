"""The per-process cache of a node's rows and tokens: reused while the data file is unchanged, rebuilt when it
changes (even in place, with the same size), bounded by the bytes it holds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedtune.client import node_data
from fedtune.client.node_config import NodeConfig
from fedtune.client.node_data import ROWS, RowsCache, load_rows, tensors
from tests.tiny import make_sentiment_frame


@pytest.fixture(autouse=True)
def _empty_cache() -> None:
    ROWS.clear()


def _node(tmp_path: Path, name: str = "a", n: int = 30, seed: int = 1) -> NodeConfig:
    path = tmp_path / f"{name}.csv"
    make_sentiment_frame(n, seed=seed).to_csv(path, index=False)
    return NodeConfig(data_path=path, state_dir=tmp_path / f"state-{name}", policy=tmp_path / "policy.toml",
                      labels=("neg", "pos"))


def test_rows_and_tokens_are_read_once_while_the_file_is_unchanged(tmp_path: Path, tiny_model_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config = _node(tmp_path)
    reads: list[str] = []
    real = node_data._rows
    monkeypatch.setattr(node_data, "_rows", lambda *a: reads.append(a[0]) or real(*a))
    first = load_rows(config, ("neg", "pos"), local_eval=False)
    ids = tensors(first, "train", str(tiny_model_dir), 16)[0]
    again = load_rows(config, ("neg", "pos"), local_eval=False)
    assert again is first and tensors(again, "train", str(tiny_model_dir), 16)[0] is ids and len(reads) == 1


def test_a_changed_data_file_is_read_and_tokenised_again(tmp_path: Path, tiny_model_dir: Path) -> None:
    """An edit of the same size with the modification time put back still changes the file's ctime: new rows, a
    new fingerprint (the ledger records it) and new tokens."""
    config = _node(tmp_path)
    first = load_rows(config, ("neg", "pos"), local_eval=False)
    ids = tensors(first, "train", str(tiny_model_dir), 16)[0]
    raw, info = config.data_path.read_bytes(), config.data_path.stat()
    edited = raw.replace(b"neg", b"pos", 1) if b",neg" in raw else raw.replace(b"pos", b"neg", 1)
    assert len(edited) == len(raw) and edited != raw
    config.data_path.write_bytes(edited)
    os.utime(config.data_path, ns=(info.st_atime_ns, info.st_mtime_ns))
    second = load_rows(config, ("neg", "pos"), local_eval=False)
    assert second is not first and second.fingerprint != first.fingerprint
    assert tensors(second, "train", str(tiny_model_dir), 16)[0] is not ids


def test_the_cache_drops_the_least_recently_used_nodes_beyond_its_bytes(tmp_path: Path, tiny_model_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = RowsCache(max_bytes=1 << 40)
    monkeypatch.setattr(node_data, "ROWS", cache)
    configs = [_node(tmp_path, name, seed=i) for i, name in enumerate("ab")]
    rows = [load_rows(c, ("neg", "pos"), local_eval=False) for c in configs]
    one = rows[0].nbytes()
    assert cache.total == one + rows[1].nbytes()
    cache.max_bytes = cache.total + 10  # the two nodes fit, without tokens
    load_rows(configs[0], ("neg", "pos"), local_eval=False)  # a is now the most recently used
    assert load_rows(configs[0], ("neg", "pos"), local_eval=False) is rows[0]
    tensors(rows[0], "train", str(tiny_model_dir), 16)  # a grows: b, the least recently used, goes
    assert len(cache._items) == 1 and cache.total == rows[0].nbytes() > one
    assert load_rows(configs[1], ("neg", "pos"), local_eval=False) is not rows[1]
    assert len(cache._items) == 1  # b back in, a (with its tokens) out
