"""The roster: which nodes the auditor expects, with each node's ledger key (and ledger, policy).

A TOML file with one ``[[node]]`` table per node::

    [[node]]
    id = "sha256:3f1c..."              # the node identity its ledger header must name
    public-key = "keys/hospital-a.pub"  # its ledger-signing public key (PEM)
    ledger = "hospital-a/ledger.jsonl"  # optional: audit this file as that node's ledger
    policy = "hospital-a/policy.toml"   # optional: hold it to this policy

Relative paths are relative to the roster file. A ledger audited against the
roster must name a node of the roster in its header and be signed by that node's
key: node A's ledger replaced by node B's fails even when both keys are known.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.common.errors import ConfigError
from fedtune.common.ledger.key import key_id, load_public_key
from fedtune.common.ledger.schema import NODE_ID

MAX_ROSTER_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class RosterNode:
    node: str  # node identity, as ledger headers name it
    public_key: ed25519.Ed25519PublicKey
    ledger: Path | None  # the ledger file to audit for this node, if the roster names one
    policy: Path | None  # the node's policy file, if the roster names one

    @property
    def key(self) -> str:
        return key_id(self.public_key)


def _path(base: Path, value: object, what: str, problems: list[str]) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        problems.append(f"{what} must be a path, got {value!r}")
        return None
    return base / Path(value).expanduser()


def _node(table: object, number: int, base: Path, path: Path, problems: list[str]) -> RosterNode | None:
    where = f"{path}: node {number}"
    if not isinstance(table, dict):
        problems.append(f"{where}: must be a table")
        return None
    unknown = sorted(set(table) - {"id", "public-key", "ledger", "policy"})
    problems += [f"{where}: unknown key '{k}'" for k in unknown]
    node = table.get("id")
    if not isinstance(node, str) or not NODE_ID.fullmatch(node):
        problems.append(f"{where}: id must be 'sha256:<64 hex>' or 'simulation:client-<n>', got {node!r}")
    key_path = _path(base, table.get("public-key"), f"{where}: public-key", problems)
    if key_path is None:
        problems.append(f"{where}: public-key is required")
        return None
    try:
        public = load_public_key(key_path)
    except ConfigError as err:
        problems += [f"{where}: {p}" for p in err.problems]
        return None
    ledger = _path(base, table.get("ledger"), f"{where}: ledger", problems)
    policy = _path(base, table.get("policy"), f"{where}: policy", problems)
    return RosterNode(str(node), public, ledger, policy)


def read_roster(path: Path) -> list[RosterNode]:
    """Every node of the roster; ConfigError listing every problem at once."""
    try:
        if path.stat().st_size > MAX_ROSTER_BYTES:
            raise ConfigError(f"roster {path} is larger than {MAX_ROSTER_BYTES} bytes")
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"roster {path} cannot be read: {err.strerror or err}") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"roster {path} is not valid TOML: {err}") from err
    tables = raw.get("node")
    problems = [f"{path}: unknown key '{k}' (a roster has [[node]] tables)" for k in raw if k != "node"]
    if not isinstance(tables, list) or not tables:
        raise ConfigError(problems + [f"{path}: no [[node]] tables"])
    nodes = [n for i, t in enumerate(tables, 1) if (n := _node(t, i, path.parent, path, problems)) is not None]
    seen: dict[str, int] = {}
    for n in nodes:
        seen[n.node] = seen.get(n.node, 0) + 1
    problems += [f"{path}: node {node} is listed {count} times" for node, count in seen.items() if count > 1]
    if problems:
        raise ConfigError(problems)
    return nodes


def node_identity(text: str) -> str:
    """Validate a ``--node`` argument."""
    if not NODE_ID.fullmatch(text):
        raise ConfigError(f"--node must be 'sha256:<64 hex>' or 'simulation:client-<n>', got {text!r}")
    return text
