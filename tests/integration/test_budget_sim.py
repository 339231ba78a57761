"""Node-owned budgets end to end: fedtune-sim with per-client policies, ledgers on disk, fedtune-audit.

Client 0 has a small budget and keeps the federation's noise (noise-plan as-requested): it trains in
round 1, then refuses. Client 1's policy demands more noise than the server's plan allows: it refuses
at once. Client 2 has room to spare. The run completes with the clients that still train, and a
second run with the same state directory continues every budget from the ledgers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.audit.cli import main as audit_main
from fedtune.common.ledger.entry import ACCOUNTING_KINDS
from fedtune.sim.cli import main as sim_main

pytestmark = pytest.mark.slow  # two federations of 3 nodes with per-node policies; make test-all

POLICIES = {
    "client-0.toml": 'max-epsilon = 6.0\nnoise-plan = "as-requested"\ndataset-id = "ward-0"\n',
    "client-1.toml": 'max-epsilon = 50.0\nmin-noise-multiplier = 1.5\ndataset-id = "ward-1"\n',
    "default.toml": 'max-epsilon = 100.0\ndataset-id = "ward-2"\n',
}


def _sim(model: Path, csv: Path, out: Path, policies: Path, state: Path, rounds: int) -> int:
    return sim_main([
        "--clients", "3", "--rounds", str(rounds), "--model", str(model), "--dataset", str(csv),
        "--set", "partition-by=group", "--set", "max-seq-len=16", "--set", "batch-size=32",
        "--set", "learning-rate=0.05", "--set", "min-clients=1", "--epsilon", "8",
        "--policy-dir", str(policies), "--state-dir", str(state), "--out", str(out),
    ])


def _ledger(state: Path, pid: int) -> list[dict]:
    """The accounting entries of a client's ledger (its signed header and policy entries left out)."""
    lines = (state / f"client-{pid}" / "ledger.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] in ACCOUNTING_KINDS]


def _rounds(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _by_client(out: Path, state: Path) -> dict[int, dict[int, dict]]:
    """Per round, per client: rows are matched to clients by the ledger key each reply names."""
    from fedtune.common.ledger.key import key_id, load_public_key

    keys = {key_id(load_public_key(state / f"client-{i}" / "ledger-signing.pub")): i for i in range(3)}
    return {r["round"]: {keys[c["ledger-key"]]: c for c in r["clients"]} for r in _rounds(out)[1:]}


@pytest.fixture(scope="module")
def first_run(tiny_model_dir: Path, sentiment_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("budget")
    policies = root / "policies"
    policies.mkdir()
    for name, text in POLICIES.items():
        (policies / name).write_text(text)
    out, state = root / "run-1", root / "state"
    code = _sim(tiny_model_dir, sentiment_csv, out, policies, state, rounds=3)
    return {"code": code, "out": out, "state": state, "policies": policies, "root": root}


def test_small_budget_client_trains_then_refuses_and_the_run_completes(first_run: dict) -> None:
    assert first_run["code"] == 0
    out, state = first_run["out"], first_run["state"]
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    rows = _by_client(out, state)
    assert rows[1][0]["status"] == "trained" and rows[2][0]["status"] == "refused"
    assert rows[2][0]["code"] == "BUDGET_EXHAUSTED" and "reason" not in rows[2][0]  # the detail stays on the node
    assert 0 not in rows[3]  # excluded after refusing
    assert all(rows[r][2]["status"] == "trained" for r in (1, 2, 3))  # the others carry on
    ledger = _ledger(state, 0)
    assert [e["decision"] for e in ledger] == ["charged", "refused"]
    assert ledger[1]["reason"].startswith("budget: epsilon would reach")
    assert all(e["epsilon"] <= e["budget"] == 6.0 for e in ledger)
    assert ledger[1]["projected"] > 6.0
    assert rows[1][0]["epsilon"] == pytest.approx(ledger[0]["epsilon"])  # per-client epsilon in metrics.jsonl


def test_plan_needing_less_noise_than_the_policy_is_refused_and_recorded(first_run: dict) -> None:
    rows = _by_client(first_run["out"], first_run["state"])
    assert rows[1][1]["status"] == "refused" and rows[1][1]["code"] == "POLICY_MIN_NOISE"
    assert 1 not in rows[2] and 1 not in rows[3]
    ledger = _ledger(first_run["state"], 1)
    assert [e["decision"] for e in ledger] == ["refused"]
    assert "needs noise multiplier" in ledger[0]["reason"] and "minimum is 1.5" in ledger[0]["reason"]
    assert ledger[0]["epsilon"] == 0.0


def test_second_run_continues_budgets_from_the_ledgers(first_run: dict, tiny_model_dir: Path,
                                                      sentiment_csv: Path, capsys: pytest.CaptureFixture) -> None:
    state = first_run["state"]
    spent = _ledger(state, 2)[-1]["epsilon"]
    out = first_run["root"] / "run-2"
    assert _sim(tiny_model_dir, sentiment_csv, out, first_run["policies"], state, rounds=1) == 0
    run2 = [e for e in _ledger(state, 2) if e["run"] != _ledger(state, 2)[0]["run"]]
    assert run2 and run2[0]["decision"] == "charged"
    assert run2[0]["epsilon"] - run2[0]["epsilon_round"] == pytest.approx(spent)  # not from zero
    assert spent < run2[0]["epsilon"] <= 100.0
    assert _ledger(state, 0)[-1]["decision"] == "refused"  # still out of budget in the new run
    ledgers = [str(state / f"client-{i}") for i in range(3)]
    keys = [arg for i in range(3) for arg in ("-k", str(state / f"client-{i}" / "ledger-signing.pub"))]
    policies = [arg for name in ("client-0", "client-1", "default") for arg in
                ("--policy", str(first_run["policies"] / f"{name}.toml"))]
    assert audit_main([*ledgers, *keys, *policies, "--html", str(out / "audit.html")]) == 0, capsys.readouterr().out
