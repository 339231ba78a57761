"""fedtune-server startup checks and the app hash nodes pin."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.common import tls
from fedtune.server import daemon
from fedtune.server.federation import Federation


@pytest.fixture()
def certs(tmp_path: Path) -> Path:
    tls.create_ca(tmp_path / "ca")
    tls.create_server_cert(tmp_path / "server", tmp_path / "ca", ["fl.example.org", "127.0.0.1"])
    for name in ("a", "b"):
        tls.create_node_keys(tmp_path / "nodes" / name)
    return tmp_path


def _tls_args(c: Path) -> list[str]:
    return ["--ssl-ca-certfile", str(c / "ca/ca.pem"), "--ssl-certfile", str(c / "server/server.pem"),
            "--ssl-keyfile", str(c / "server/server.key")]


def test_every_startup_problem_is_listed_once(certs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "other"
    tls.create_server_cert(other, certs / "ca", ["localhost"])
    bad_key = tmp_path / "bad.pub"
    bad_key.write_text("ssh-ed25519 AAAA not-a-key\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    code = daemon.main(["--ssl-ca-certfile", str(tmp_path / "missing-ca.pem"), "--ssl-certfile",
                        str(certs / "server/server.pem"), "--ssl-keyfile", str(other / "server.key"),
                        "--node-keys", str(bad_key), "--node-keys", str(empty), "--set", "num-rounds=0",
                        "--set", "colour=blue", "--set", f"dataset={tmp_path / 'none.csv'}",
                        "--work-dir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2
    for expected in ("missing-ca.pem does not exist", "does not belong to certificate", "bad.pub is not an OpenSSH",
                     "holds no *.pub files", "unknown setting 'colour'"):
        assert expected in err, err
    assert "problems must be fixed before the server can start" in err
    assert not (tmp_path / "w").exists()  # nothing was started or written


def test_tls_is_required_unless_insecure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert daemon.main(["--work-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--ssl-ca-certfile, --ssl-certfile and --ssl-keyfile are required" in err
    assert "--node-keys is required" in err


def test_server_certificate_must_name_a_loopback_address(certs: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    public_only = tmp_path / "public"
    tls.create_server_cert(public_only, certs / "ca", ["fl.example.org"])
    args = ["--ssl-ca-certfile", str(certs / "ca/ca.pem"), "--ssl-certfile", str(public_only / "server.pem"),
            "--ssl-keyfile", str(public_only / "server.key"), "--node-keys", str(certs / "nodes")]
    assert daemon.main(args) == 2
    assert "must also name 127.0.0.1 or localhost" in capsys.readouterr().err


def test_a_valid_setup_passes_preflight_and_finds_node_keys_in_a_directory(certs: Path, tmp_path: Path) -> None:
    from fedtune.common.flower.processes import free_port

    args = daemon._parser().parse_args([*_tls_args(certs), "--node-keys", str(certs / "nodes"),
                                        "--work-dir", str(tmp_path / "w"), "--metrics-address", "off",
                                        "--port", str(free_port())])
    opts = daemon.preflight(args)
    assert [p.parent.name for p in opts.node_keys] == ["a", "b"]
    assert opts.host == "127.0.0.1" and opts.control_host == "127.0.0.1"
    assert Path(str(opts.run_config["results-dir"])).is_absolute()
    assert opts.checkpoint_dir == (tmp_path / "w" / "checkpoints").resolve()


def test_app_hash_is_the_sha256_of_the_bundle_flwr_builds(tmp_path: Path) -> None:
    first = Federation.app_hash(tmp_path / "one")
    assert first == Federation.app_hash(tmp_path / "two")  # the same for every server of this fedtune version
    flwr = Path(sys.executable).parent / "flwr"
    subprocess.run([str(flwr), "build", "--app", str(tmp_path / "one" / "app")], cwd=tmp_path, check=True,
                   capture_output=True)
    (fab,) = tmp_path.glob("*.fab")
    assert hashlib.sha256(fab.read_bytes()).hexdigest() == first


def test_a_run_where_no_node_trained_is_not_a_success(tmp_path: Path) -> None:
    from fedtune.server.federation import ServerOptions

    results = tmp_path / "results"
    results.mkdir()
    fed = Federation(ServerOptions(work_dir=tmp_path, host="127.0.0.1", port=1, control_host="127.0.0.1",
                                   insecure=True, ca=None, cert=None, key=None, node_keys=(),
                                   run_config={"results-dir": str(results)}))
    assert fed.trained_updates() == 0
    (results / "metrics.jsonl").write_text('{"round": 0, "clients": []}\n'
                                           '{"round": 1, "clients": [{"status": "error"}, {"status": "refused"}]}\n')
    assert fed.trained_updates() == 0
    with open(results / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 2, "clients": [{"status": "trained"}, {"status": "trained"}]}\n')
    assert fed.trained_updates() == 2


def test_a_secure_round_whose_sum_was_not_aggregated_counts_no_update(tmp_path: Path) -> None:
    from fedtune.server.federation import ServerOptions

    results = tmp_path / "results"
    results.mkdir()
    fed = Federation(ServerOptions(work_dir=tmp_path, host="127.0.0.1", port=1, control_host="127.0.0.1",
                                   insecure=True, ca=None, cert=None, key=None, node_keys=(),
                                   run_config={"results-dir": str(results)}))
    trained = '[{"status": "trained"}, {"status": "trained"}, {"status": "error", "code": "SECAGG_DROPPED"}]'
    (results / "metrics.jsonl").write_text(
        '{"round": 0, "clients": []}\n'
        f'{{"round": 1, "clients": {trained}, "secure-aggregation": {{"aggregated": false, "why": "x"}}}}\n')
    assert fed.trained_updates() == 0  # the nodes trained, but SecAgg+ did not complete: nothing was learned
    with open(results / "metrics.jsonl", "a") as fh:
        fh.write(f'{{"round": 2, "clients": {trained}, "secure-aggregation": {{"aggregated": true}}}}\n')
    assert fed.trained_updates() == 2


# -- exit codes, watchdog, metrics ----------------------------------------------------------------------------

from fedtune.common import exit_codes  # noqa: E402
from fedtune.server.federation import Outcome, ServerOptions, Watchdog  # noqa: E402


@pytest.mark.parametrize(("outcome", "summary", "trained", "code"), [
    (Outcome("finished:completed"), {"status": "completed"}, 4, exit_codes.OK),
    (Outcome("finished:completed"), {"status": "completed"}, 0, exit_codes.FAILED),
    (Outcome("finished:failed"), None, 0, exit_codes.FAILED),
    (Outcome("finished:completed"), {"status": "stopped-early", "stop-code": "budget"}, 2, exit_codes.STOPPED_BUDGET),
    (Outcome("finished:completed"), {"status": "stopped-early", "stop-code": "nodes"}, 2, exit_codes.STOPPED_NODES),
    (Outcome("finished:completed"), {"status": "stopped-early", "stop-code": "deadline"}, 2,
     exit_codes.STOPPED_NODES),
    (Outcome("finished:completed"), {"status": "stopped-early", "stop-code": "diverged"}, 2, exit_codes.DIVERGED),
    # summaries from before stop codes: inferred from the reason
    (Outcome("finished:completed"), {"status": "stopped-early", "stop-reason": "2 nodes refused (budget)"}, 2,
     exit_codes.STOPPED_BUDGET),
    (Outcome("finished:completed"), {"status": "stopped-early", "stop-reason": "only 1 node connected"}, 2,
     exit_codes.STOPPED_NODES),
    (Outcome("finished:stopped", "nodes", "watchdog"), None, 2, exit_codes.STOPPED_NODES),
])
def test_the_exit_code_says_how_the_run_ended(outcome: Outcome, summary: dict | None, trained: int,
                                              code: int) -> None:
    assert daemon.exit_code(outcome, summary, trained) == code


def _opts(tmp_path: Path, **kw: float) -> ServerOptions:
    return ServerOptions(work_dir=tmp_path, host="127.0.0.1", port=1, control_host="127.0.0.1", insecure=True,
                         ca=None, cert=None, key=None, node_keys=(),
                         run_config={"results-dir": str(tmp_path / "results"), "min-clients": 2}, **kw)


def test_watchdog_waits_for_nodes_then_for_rounds(tmp_path: Path) -> None:
    dog = Watchdog(_opts(tmp_path, node_wait_timeout_s=40, round_timeout_s=100), now=0)
    dog.observe(0, lines=1, online=1)
    assert dog.expired(39) is None
    assert dog.expired(41)[0] == "nodes"
    dog.observe(41, lines=1, online=2)  # the second node came: that is progress
    assert dog.expired(140) is None
    dog.observe(140, lines=2, online=2)  # a round finished
    assert dog.expired(239) is None
    code, reason = dog.expired(241)
    assert code == "deadline" and "--round-timeout 100" in reason


def test_a_stopped_run_gets_a_summary_that_says_why(tmp_path: Path) -> None:
    fed = Federation(_opts(tmp_path))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "metrics.jsonl").write_text('{"round": 0, "accuracy": 0.5}\n'
                                                        '{"round": 1, "accuracy": 0.6}\n')
    fed.write_stop_summary("nodes", "fewer than 2 nodes online")
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["status"] == "stopped-early" and summary["stop-code"] == "nodes" and summary["rounds"] == 1
    assert summary["resumable"] is True


def test_server_metrics_are_read_from_the_results(tmp_path: Path) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from fedtune.server.monitoring import ServerCollector

    fed = Federation(_opts(tmp_path))
    (tmp_path / "results").mkdir()
    rows = [{"round": 0, "clients": []},
            {"round": 1, "elapsed-s": 10.0, "clients": [{"status": "trained", "bytes": 1000},
                                                          {"status": "error", "code": "INVALID_FAB"}]},
            {"round": 2, "elapsed-s": 25.0, "clients": [{"status": "refused"}]}]
    (tmp_path / "results" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"round": 3')
    fed.online = 2
    registry = CollectorRegistry()
    registry.register(ServerCollector(fed))
    text = generate_latest(registry).decode()
    for line in ('fedtune_server_rounds_total{result="completed"} 1.0',
                 'fedtune_server_rounds_total{result="failed"} 1.0', "fedtune_server_nodes_connected 2.0",
                 'fedtune_server_replies_total{code="INVALID_FAB",outcome="refused"} 1.0',
                 'fedtune_server_replies_total{code="trained",outcome="accepted"} 1.0',
                 "fedtune_server_received_bytes_total 1000.0", "fedtune_server_round_duration_seconds 15.0"):
        assert line in text, text


def test_work_dir_results_are_never_overwritten(certs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "w" / "results"
    results.mkdir(parents=True)
    (results / "metrics.jsonl").write_text('{"round": 0}\n')
    from fedtune.common.flower.processes import free_port

    args = [*_tls_args(certs), "--node-keys", str(certs / "nodes"), "--work-dir", str(tmp_path / "w"),
            "--metrics-address", "off", "--port", str(free_port())]
    assert daemon.main(args) == exit_codes.BAD_INPUT
    assert "holds another run's results" in capsys.readouterr().err
    assert (results / "metrics.jsonl").read_text() == '{"round": 0}\n'


def test_a_superlink_that_cannot_start_reports_the_cause_from_its_logs(tmp_path: Path) -> None:
    import socket

    from fedtune.common.errors import RunError
    from fedtune.common.flower.processes import flower_bin, flower_env, start_group, wait_healthy

    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        proc = start_group([flower_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                            "--log-file", str(tmp_path / "superlink.log")], env=flower_env(tmp_path / "home"),
                           log_file=tmp_path / "superlink.out")
        with pytest.raises(RunError) as info:
            wait_healthy(f"http://127.0.0.1:{port}/health", proc, tmp_path / "superlink.log", timeout_s=120,
                         other_logs=(tmp_path / "superlink.out",))
    finally:
        busy.close()
    assert "address already in use" in str(info.value).lower(), str(info.value)
