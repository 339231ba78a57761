"""A real Prometheus scrapes a real fedtune-server and fedtune-client during a short TLS run.

Uses the shipped scrape config and alert rules (deploy/prometheus/) with the
targets and interval adapted, and reads the values back through Prometheus'
HTTP query API. Needs Debian's ``prometheus`` package
(``deploy/install-test-tools.sh``); skipped without it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fedtune.common.flower.processes import free_port
from fedtune.common.ledger.entry import ACCOUNTING_KINDS
from tests.faults_helpers import kill_owned, kill_session, start, wait_until
from tests.tiny import make_sentiment_frame

PROMETHEUS = shutil.which("prometheus")
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (deploy/install-test-tools.sh)")]


def _prometheus_config(root: Path, server: str, node: str) -> Path:
    text = (REPO / "deploy/prometheus/prometheus.yml").read_text()
    text = text.replace("127.0.0.1:9464", server).replace("127.0.0.1:9465", node)
    text = text.replace("scrape_interval: 30s", "scrape_interval: 1s").replace("evaluation_interval: 30s",
                                                                                "evaluation_interval: 1s")
    shutil.copy(REPO / "deploy/prometheus/alerts.yml", root / "alerts.yml")
    (root / "prometheus.yml").write_text(text)
    return root / "prometheus.yml"


def _query(api: str, expr: str) -> list[dict]:
    reply = httpx.get(f"{api}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert reply["status"] == "success", reply
    return list(reply["data"]["result"])


def _value(api: str, expr: str) -> float | None:
    result = _query(api, expr)
    return float(result[0]["value"][1]) if result else None


def test_prometheus_reads_server_and_node_metrics(tmp_path: Path, tiny_model_dir: Path, sentiment_csv: Path) -> None:
    subprocess.run([str(BIN / "fedtune-certs"), "dev", "--out", str(tmp_path / "certs"), "--node", "a"], check=True,
                   capture_output=True)
    certs, node = tmp_path / "certs", tmp_path / "node"
    node.mkdir()
    make_sentiment_frame(200, seed=5).to_csv(node / "data.csv", index=False)
    (node / "policy.toml").write_text("max-epsilon = 8.0\ndelta = 1e-5\ndataset-id = \"notes\"\n")
    (tmp_path / "run.toml").write_text(
        f'model-path = "{tiny_model_dir}"\ndataset = "{sentiment_csv}"\npartition-by = "group"\nmax-seq-len = 16\n'
        "batch-size = 32\nlearning-rate = 0.05\nnum-rounds = 2\nmin-clients = 1\n")  # the job's lr 2.0 is for MiniLM
    port, server_metrics, node_metrics, prom_port = free_port(), free_port(), free_port(), free_port()
    api = f"http://127.0.0.1:{prom_port}"
    procs = []
    try:
        config = _prometheus_config(tmp_path, f"127.0.0.1:{server_metrics}", f"127.0.0.1:{node_metrics}")
        procs.append(start([str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                            f"--web.listen-address=127.0.0.1:{prom_port}"], tmp_path / "prometheus.out"))
        server = start([str(BIN / "fedtune-server"), "--ssl-ca-certfile", str(certs / "ca/ca.pem"), "--ssl-certfile",
                        str(certs / "server/server.pem"), "--ssl-keyfile", str(certs / "server/server.key"),
                        "--node-keys", str(certs / "nodes"), "--run-config", str(tmp_path / "run.toml"),
                        "--work-dir", str(tmp_path / "srv"), "--port", str(port),
                        "--metrics-address", f"127.0.0.1:{server_metrics}", "--log-format", "json"],
                       tmp_path / "server.out")
        procs.append(server)
        wait_until("run submitted", (tmp_path / "srv/current-run.json").exists, 180, server)
        procs.append(start([str(BIN / "fedtune-client"), "--superlink", f"127.0.0.1:{port}", "--root-certificates",
                            str(certs / "ca/ca.pem"), "--node-key", str(certs / "nodes/a/node.key"), "--data",
                            str(node / "data.csv"), "--labels", "neg,pos", "--policy", str(node / "policy.toml"),
                            "--state-dir",
                            str(node / "state"), "--allow-any-app", "--runtime-port", str(free_port()),
                            "--metrics-address", f"127.0.0.1:{node_metrics}"], tmp_path / "node.out"))
        assert server.wait(timeout=600) == 0, (tmp_path / "server.out").read_text()[-3000:]
        wait_until("the node's charge scraped", lambda: (_value(api, "fedtune_node_rounds_trained_total") or 0) >= 2,
                   60)
        completed = _value(api, 'max_over_time(fedtune_server_rounds_total{result="completed"}[10m])')
        assert completed == 2
        assert _value(api, 'max_over_time(up{job="fedtune-server"}[10m])') == 1
        assert (_value(api, "max_over_time(fedtune_server_round_duration_seconds[10m])") or 0) > 0
        accepted = _query(api, 'max_over_time(fedtune_server_replies_total{outcome="accepted"}[10m])')
        assert sum(float(r["value"][1]) for r in accepted) == 2
        spent = _value(api, "fedtune_node_epsilon_spent")
        lines = (node / "state/ledger.jsonl").read_text().splitlines()
        ledger = [e for e in map(json.loads, lines) if e["kind"] in ACCOUNTING_KINDS]  # no header/policy entries
        assert spent == pytest.approx(max(e["epsilon"] for e in ledger if e["decision"] == "charged"))
        assert _value(api, "fedtune_node_epsilon_budget_left") == pytest.approx(8.0 - spent)
        assert _value(api, "fedtune_node_ledger_entries") == len(ledger)
        assert (_value(api, "fedtune_node_certificate_expiry_days") or 0) > 3000
        assert abs((_value(api, "fedtune_node_last_good_round_timestamp_seconds") or 0) - time.time()) < 900
        rules = httpx.get(f"{api}/api/v1/rules", timeout=10).json()["data"]["groups"]
        assert {r["name"] for g in rules for r in g["rules"]} >= {"FedtuneBudgetAlmostSpent", "FedtuneNoRoundTrained",
                                                                  "FedtuneCertificateExpiring"}
        text = (tmp_path / "server.out").read_text()
        logged = [json.loads(line) for line in text.splitlines() if line.startswith("{")]  # --log-format json
        assert {e["component"] for e in logged} == {"fedtune-server"}, text[-3000:]  # no JSON line: an empty set
    finally:
        for proc in reversed(procs):
            kill_session(proc)
        kill_owned(f"fedtune-server:{(tmp_path / 'srv').resolve()}")
        kill_owned(f"fedtune-client:{(node / 'state').resolve()}")
