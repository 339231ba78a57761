"""``fedtune-server``: run a federation's SuperLink with TLS and node authentication, and one run on it.

It checks the certificates, node keys, run settings, addresses and directories
first (every problem at once, exit 2, nothing started or changed), starts
``flower-superlink`` with TLS, ``--enable-supernode-auth`` and an operator token
on its control API, registers the allowed node public keys, submits the fedtune
app, follows the run and exits with its real outcome:

  0 completed | 1 failed | 2 bad input | 3 stopped early: budgets/policies refused |
  4 stopped early: too few nodes / a deadline passed | 5 diverged | 130 SIGINT | 143 SIGTERM

The SuperLink binds to 127.0.0.1 by default: Flower serves the control API on
the same port as the fleet API, so nodes must reach it through the reverse proxy
in ``deploy/nginx`` that forwards only ``/v1/fleet/``.

After every round the ServerApp checkpoints into ``--checkpoint-dir``; starting
fedtune-server again with the same settings resumes from the last checkpoint
(``--fresh`` moves old checkpoints and results aside and starts a new run).

    fedtune-server --ssl-ca-certfile ca.pem --ssl-certfile server.pem --ssl-keyfile server.key \\
        --node-keys /etc/fedtune/nodes/ --run-config run.toml --work-dir /var/lib/fedtune-server
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from fedtune.common import exit_codes, logs
from fedtune.common.errors import FedtuneError, RunError, format_problems, problems_of
from fedtune.server.federation import Federation, Outcome
from fedtune.server.preflight import preflight
from fedtune.server.results import METRICS_FILE, SUMMARY_FILE

log = logging.getLogger("fedtune.server")
STOP_CODES = {"budget": exit_codes.STOPPED_BUDGET, "nodes": exit_codes.STOPPED_NODES,
              "deadline": exit_codes.STOPPED_NODES, "diverged": exit_codes.DIVERGED}
DEFAULT_METRICS = "127.0.0.1:9464"


class _Parser(argparse.ArgumentParser):
    """argparse that exits with BAD_INPUT and a bounded, literal message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(exit_codes.BAD_INPUT, f"{format_problems(message, prog=self.prog)} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedtune-server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ssl-ca-certfile", type=Path, help="CA certificate (PEM) that signed the server certificate")
    p.add_argument("--ssl-certfile", type=Path, help="server certificate (PEM) with the nodes' hostname in its SANs")
    p.add_argument("--ssl-keyfile", type=Path, help="server private key (PEM, mode 0600)")
    p.add_argument("--insecure", action="store_true", help="plaintext and no node authentication (local tests only)")
    p.add_argument("--node-keys", type=Path, action="append", default=[],
                   help="an allowed node's public key (OpenSSH), or a directory of *.pub files (repeatable)")
    p.add_argument("--run-config", type=Path, help="TOML file of run settings (kebab-case keys, as fedtune-sim)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a run setting (repeatable)")
    p.add_argument("--work-dir", type=Path, default=Path("fedtune-server"),
                   help="SuperLink home, logs, app bundle, results (default ./fedtune-server)")
    p.add_argument("--checkpoint-dir", type=Path, help="per-round checkpoints (default WORK_DIR/checkpoints)")
    p.add_argument("--fresh", action="store_true",
                   help="start a new run: move old checkpoints and results aside (NAME.old-TIME) instead of resuming")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the SuperLink binds (default 127.0.0.1: nodes come in through the proxy)")
    p.add_argument("--port", type=int, default=9092, help="SuperLink port (default 9092)")
    p.add_argument("--node-wait-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="stop the run (exit 4, resumable) when fewer nodes than it needs are online this long "
                        "(default 600)")
    p.add_argument("--round-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="stop the run (exit 4, resumable) when no round finishes this long (default 600)")
    p.add_argument("--metrics-address", default=DEFAULT_METRICS, metavar="HOST:PORT",
                   help=f"serve Prometheus /metrics here (default {DEFAULT_METRICS}; 'off' to disable)")
    p.add_argument("--log-format", choices=logs.LOG_FORMATS, default="text",
                   help="text (default) or json: one JSON object per line, for journald/ELK")
    p.add_argument("--print-app-hash", action="store_true",
                   help="print the sha256 of the app bundle nodes must allow-list, then exit")
    return p


def exit_code(outcome: Outcome, summary: dict[str, Any] | None, trained: int) -> int:
    """The process's exit status for a run that ended (see the module docstring)."""
    if outcome.stop_code is not None:
        return STOP_CODES.get(outcome.stop_code, exit_codes.STOPPED_NODES)
    if outcome.status != "finished:completed":
        return exit_codes.FAILED
    status = (summary or {}).get("status")
    if status == "stopped-early":
        code = (summary or {}).get("stop-code")
        if code is None:  # summaries written before stop codes existed: infer from the reason
            reason = str((summary or {}).get("stop-reason", "")).lower()
            code = "budget" if any(w in reason for w in ("refus", "budget", "policy", "exhaust")) else "nodes"
        return STOP_CODES.get(str(code), exit_codes.FAILED)
    if status != "completed" or trained == 0:
        return exit_codes.FAILED
    return exit_codes.OK


def _read_summary(results: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads((results / SUMMARY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return loaded if isinstance(loaded, dict) else None


@dataclass
class _Signals:
    """SIGINT/SIGTERM: remember which, and unwind main() (its finally stops every child)."""

    received: int | None = None

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            raise KeyboardInterrupt


def _move_aside(path: Path, what: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        aside = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
        log.info("--fresh: moved the previous %s to %s", what, aside)


def _follow(fed: Federation, signals: _Signals) -> int:
    results = fed.opts.results_dir
    try:
        outcome = fed.run()
    except KeyboardInterrupt:
        fed.save_run_log()
        code = exit_codes.INTERRUPTED if signals.received != signal.SIGTERM else exit_codes.TERMINATED
        log.warning("stopped by signal %s; every Flower process ended, checkpoints kept: start again to resume",
                    signals.received or signal.SIGINT)
        return code
    summary = _read_summary(results)
    code = exit_code(outcome, summary, fed.trained_updates())
    if code == exit_codes.OK:
        log.info("the run completed; results in %s", results)
    elif outcome.stop_code is not None or (summary or {}).get("status") == "stopped-early":
        reason = outcome.stop_reason or (summary or {}).get("stop-reason", "")
        log.error("the run stopped early (exit %s): %s; results in %s", code, reason, results)
    elif outcome.status != "finished:completed":
        log.error("the run ended as %s; see %s", outcome.status, fed.logs)
    else:
        log.error("the run completed but no node's update was aggregated in any round; each node's reason "
                  "(refused app, budget, error) and, under secure aggregation, why a round's sum was not "
                  "aggregated are in %s", results / METRICS_FILE)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup("fedtune-server", args.log_format)
    if args.print_app_hash:
        print(Federation.app_hash(args.work_dir.resolve()))
        return exit_codes.OK
    try:
        opts = preflight(args)
    except FedtuneError as err:
        print(format_problems(problems_of(err), prog="fedtune-server", action="must be fixed before the server can "
                              "start"), file=sys.stderr)
        return exit_codes.BAD_INPUT
    if args.fresh:
        _move_aside(opts.checkpoint_dir, "checkpoints")
        _move_aside(opts.results_dir, "results")
    if opts.insecure:
        log.warning("--insecure: no TLS and no node authentication; use this only for local tests")
    signals = _Signals()
    previous = {sig: signal.signal(sig, signals) for sig in (signal.SIGTERM, signal.SIGINT)}
    fed = Federation(opts)
    try:
        if args.metrics_address != "off":
            from fedtune.server.monitoring import serve_metrics

            serve_metrics(args.metrics_address, fed)
        return _follow(fed, signals)
    except FedtuneError as err:
        log.error("%s", format_problems(problems_of(err)).replace("\n", "; "))
        return exit_codes.FAILED if isinstance(err, RunError) else exit_codes.BAD_INPUT
    finally:
        for sig in previous:  # nothing interrupts the clean-up
            signal.signal(sig, signal.SIG_IGN)
        fed.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
