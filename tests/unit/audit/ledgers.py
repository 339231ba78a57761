"""Real signed ledgers for tests, written through the ledger API the node uses (no client code).

A node charges rounds the way client/round.py does: project the dataset's epsilon with
Opacus (the policy's accountant), charge when it fits the budget, refuse otherwise, and
append a signed entry. With the default event, rounds 1-3 are charged (epsilon 5.05,
6.55, 7.73 under PRV at delta 1e-5) and round 4 is refused (it would reach 8.76 > 8).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.common.ledger.chain import canonical, sign
from fedtune.common.ledger.entry import AccountantRecord, LedgerHeader, RoundEntry
from fedtune.common.ledger.key import load_or_create_key, public_path
from fedtune.common.ledger.receipts import Receipt, sign_receipt
from fedtune.common.ledger.schema import Entry
from fedtune.common.ledger.store import Ledger
from fedtune.common.privacy.accountant import DpEvent, opacus_epsilon

NODE_A = "sha256:" + "a1" * 32
NODE_B = "sha256:" + "b2" * 32
DATASET = "ward-7-notes"
EVENT = DpEvent(0.25, 0.9, 4, 1.0)  # one round: q 0.25, sigma 0.9, 4 steps


@dataclass(frozen=True)
class Node:
    """A node's state directory: its ledger key, ledger and (outside the state directory) witness."""

    root: Path
    header: LedgerHeader
    key: ed25519.Ed25519PrivateKey

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def ledger_path(self) -> Path:
        return self.state / "ledger.jsonl"

    @property
    def public_key(self) -> Path:
        return public_path(self.state / "ledger-signing.key")

    @property
    def witness(self) -> Path:
        return self.root / "witness" / "ledger.witness.json"

    def ledger(self, header: LedgerHeader | None = None) -> Ledger:
        return Ledger(self.ledger_path, self.key, header=header or self.header, witness=self.witness)

    def policy_file(self, **overrides: Any) -> Path:
        values = {"max-epsilon": self.header.budget, "delta": self.header.delta,
                  "accountant": self.header.accountant, "dataset-id": self.header.dataset} | overrides
        path = self.root / "policy.toml"
        path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                        + 'noise-plan = "spread"\nrequire-dp = true\n')  # keys the auditor ignores
        return path


def make_node(root: Path, node: str = NODE_A, *, budget: float = 8.0, delta: float = 1e-5,
              accountant: str = "prv", dataset: str = DATASET) -> Node:
    key = load_or_create_key(root / "state" / "ledger-signing.key")
    return Node(root, LedgerHeader(node, dataset, budget, delta, accountant), key)


def charge(node: Node, server_round: int, event: DpEvent | None = EVENT, *, run: str = "9",
           rng: str = "secrets", header: LedgerHeader | None = None, fingerprint: str = "f" * 64,
           bound: bool = True) -> Entry:
    """Decide and append one round like a node: charged if the projection fits the budget, else refused.

    ``bound=False``: a ledger without a header (the policy only shapes the entry's fields). Returns the
    entry's JSON form, as the line holds it.
    """
    policy = header or node.header
    ledger = node.ledger(policy) if bound else Ledger(node.ledger_path, node.key, witness=node.witness)
    with ledger.session() as s:
        history = [e.event for e in s.entries if e.dataset == policy.dataset and e.decision == "charged"]
        before = opacus_epsilon([e for e in history if e], policy.delta, policy.accountant)
        after = opacus_epsilon([*[e for e in history if e], event], policy.delta, policy.accountant) if event \
            else float("inf")
        charged = after <= policy.budget
        return s.append(RoundEntry(
            run=run, run_key="rk", round=server_round, dataset=policy.dataset, fingerprint=fingerprint,
            decision="charged" if charged else "refused",
            reason="" if charged else f"budget: epsilon would reach {after:.4f} > budget {policy.budget:.4f}",
            event=event, delta=policy.delta, accountant=AccountantRecord.of(policy.accountant),
            epsilon=after if charged else before, epsilon_round=after - before if charged else 0.0,
            projected=after, budget=policy.budget,
            request={"epsilon": 8.0, "delta": 1e-5, "num_rounds": 4, "local_steps": 4},
            rng=rng, released=("train-loss",),
        )).to_json()


def four_rounds(node: Node) -> list[Entry]:
    """Header, rounds 1-3 charged, round 4 refused: five signed lines."""
    return [charge(node, r) for r in (1, 2, 3, 4)]


NODE_STATUS = {"charged": "trained", "refused": "refused"}


def receipt(node: Node, entry: dict, flower_id: str = "17", *, run: str = "9", status: str | None = None,
            server_round: int | None = None) -> Receipt:
    """The server's receipt of the node's reply citing ``entry``, signed by the node as client/round.py does."""
    status = status or NODE_STATUS[entry["decision"]]
    server_round = entry["round"] if server_round is None else server_round
    node_status = "trained" if status == "rejected" else status
    sig = sign_receipt(node.key, run=run, round=server_round, seq=entry["seq"], head=entry["hash"],
                       status=node_status)
    return Receipt(server_round, flower_id, entry["key"], entry["seq"], entry["hash"], status, run=run, node_sig=sig)


def lines(path: Path) -> list[dict]:
    return [json.loads(raw) for raw in path.read_text().splitlines()]


def write(path: Path, entries: Sequence[dict]) -> None:
    path.write_bytes(b"".join(canonical(e) + b"\n" for e in entries))


def rechain(entries: list[dict], key: ed25519.Ed25519PrivateKey, start: int,
            edit: Callable[[dict], dict] = lambda e: e) -> list[dict]:
    """Edit entry ``start`` (0-based) and re-sign it and every later one with ``key``: a consistent forgery."""
    out = list(entries)
    for i in range(start, len(out)):
        changed = edit(out[i]) if i == start else out[i]
        out[i] = sign(changed | {"prev": out[i - 1]["hash"] if i else "0" * 64}, key)
    return out


def flip_signature_bits(sig: str) -> str:
    """The same signature bytes, written with other unused low bits in the last base64 character."""
    raw = base64.b64decode(sig)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(sig[-3])  # 64 bytes -> 86 characters + "==": the last 4 bits of char 86 are unused
    flipped = sig[:-3] + alphabet[last ^ 0b0011] + sig[-2:]
    assert base64.b64decode(flipped) == raw and flipped != sig
    return flipped

