"""``fedtune-client``: the node daemon a hospital or bank runs next to its data.

It checks everything first (address, CA and the server's certificate, node key,
data file and schema, policy, ledger, state directory, app allow-list) and
reports every problem at once; then it runs Flower's SuperNode with TLS, node
authentication and the node config, plus the app gate
(:mod:`fedtune.client.gate`) that refuses app bundles not on the allow-list.

It supervises the SuperNode by health, not only by exit: a SuperNode that gave
up reconnecting (Flower then stays alive, idle) or keeps failing to connect
without a sound for ``--stall-timeout`` is restarted, with exponential backoff
and jitter, indefinitely unless ``--max-restarts`` says otherwise; one log line
per attempt. Exit status: 0 stopped normally, 1 gave up (--max-restarts),
2 bad input (or the server refused this node's key until --max-restarts), 130/143 on SIGINT/SIGTERM.

    fedtune-client --superlink fl.example.org:443 --root-certificates ca.pem --node-key node.key \\
        --data /srv/data/notes.csv --labels negative,positive --policy /etc/fedtune/policy.toml \\
        --state-dir /var/lib/fedtune --app-allowlist /etc/fedtune/allowed-apps.txt
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from fedtune.client.node_check import NodeOptions, check
from fedtune.client.supervisor import EXIT_CONNECTION, Supervisor, explain_305, reachable
from fedtune.common import exit_codes, logs
from fedtune.common.errors import FedtuneError, format_problems, problems_of
from fedtune.common.tasks import DEFAULT_TASK, TASKS

log = logging.getLogger("fedtune.client")
DEFAULT_METRICS = "127.0.0.1:9465"
__all__ = ["EXIT_CONNECTION", "explain_305", "main", "reachable"]


class _Parser(argparse.ArgumentParser):
    """argparse that exits with BAD_INPUT and a bounded, literal message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(exit_codes.BAD_INPUT, f"{format_problems(message, prog=self.prog)} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedtune-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--superlink", required=True, help="host:port of the federation server (fleet API)")
    p.add_argument("--root-certificates", type=Path, help="CA certificate (PEM) that signed the server's")
    p.add_argument("--node-key", type=Path, help="this node's OpenSSH EC private key (registered by the operator)")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext transport, for local tests only; refused together with --node-key")
    p.add_argument("--data", type=Path, required=True, help="the node's examples: CSV, JSONL or Parquet")
    p.add_argument("--text-column", default="text", help="column with the text (default: text)")
    p.add_argument("--label-column", default="label", help="column with the label (default: label)")
    p.add_argument("--task", default=DEFAULT_TASK, choices=TASKS,
                   help=f"the task this node trains (default {DEFAULT_TASK}); requests for another are refused")
    p.add_argument("--labels", default="",
                   help="comma-separated label set of the data (classify: its classes, ner: its BIO tags); required "
                        "for classify and ner. Requests naming other labels are refused before any row is read")
    p.add_argument("--policy", type=Path, help="the node's privacy policy (TOML)")
    p.add_argument("--state-dir", type=Path, required=True, help="privacy state and ledger (back this up)")
    p.add_argument("--app-allowlist", type=Path, help="file of sha256 digests of app bundles this node may run")
    p.add_argument("--allow-any-app", action="store_true", help="run any app the server sends (no pinning)")
    p.add_argument("--no-prewarm", action="store_true",
                   help="start each ClientApp process when its task arrives, not ahead of it (saves the memory of "
                        "an idle process that has imported torch; rounds then wait for those imports)")
    p.add_argument("--log-file", type=Path, help="default: STATE_DIR/fedtune-client.log (Flower's own output goes "
                                                 "to supernode.log next to it)")
    p.add_argument("--log-format", choices=logs.LOG_FORMATS, default="text",
                   help="text (default) or json: one JSON object per line, for journald/ELK")
    p.add_argument("--runtime-port", type=int, default=9094,
                   help="node-local Runtime API port; give each node on one host its own (default 9094)")
    p.add_argument("--max-restarts", type=int, default=0, help="give up after N failed restarts (0: never)")
    p.add_argument("--connect-retries", type=int, default=8,
                   help="SuperNode's retries of a failed request before the daemon restarts it (default 8)")
    p.add_argument("--stall-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="restart a SuperNode that fails to connect and stays silent this long (default 120)")
    p.add_argument("--metrics-address", default=DEFAULT_METRICS, metavar="HOST:PORT",
                   help=f"serve this node's Prometheus /metrics here, on its own network (default {DEFAULT_METRICS}; "
                        "'off' to disable)")
    p.add_argument("--witness", type=Path, metavar="FILE",
                   help="the ledger's witness (its newest line and hash), kept outside STATE_DIR so that restoring "
                        "an old copy of the ledger is detected (default: STATE_DIR.witness.json beside STATE_DIR)")
    p.add_argument("--check", action="store_true", help="only run the checks, then exit")
    p.add_argument("--repair-ledger", action="store_true",
                   help="repair a torn last ledger line (an interrupted append): keep its bytes as evidence, charge "
                        "that round as spent, re-sign; then exit (see docs/ledger.md, 'Recovery')")
    p.add_argument("--adopt-witness", action="store_true",
                   help="start the witness at the ledger's current head (first start of a node whose ledger "
                        "predates its witness); then exit")
    return p


def _ledger_command(opts: NodeOptions, repair: bool) -> int:
    """--repair-ledger / --adopt-witness: one operator action on the ledger, then exit."""
    from fedtune.client.ledger_repair import repair_torn_ledger
    from fedtune.common.ledger.key import load_private_key
    from fedtune.common.ledger.store import Ledger

    try:
        key = load_private_key(opts.ledger_key_path())
        if repair:
            done = repair_torn_ledger(opts.ledger_path, key, witness=opts.witness_path)
            print(f"fedtune-client: repaired {opts.ledger_path}: line {done.entry.sealed.seq} charges the torn round "
                  f"({done.recovered}); the torn bytes are kept in {done.evidence}")
        else:
            head = Ledger(opts.ledger_path, key, witness=opts.witness_path).adopt_witness()
            print(f"fedtune-client: witness {opts.witness_path} starts at line {head.seq if head else 0}")
    except FedtuneError as err:
        print(format_problems(problems_of(err), prog="fedtune-client"), file=sys.stderr)
        return exit_codes.FAILED
    return exit_codes.OK


def options(args: argparse.Namespace) -> NodeOptions:
    return NodeOptions(
        superlink=args.superlink, data=args.data, state_dir=args.state_dir,
        root_certificates=args.root_certificates, node_key=args.node_key, insecure=args.insecure,
        policy=args.policy, allowlist=args.app_allowlist, allow_any_app=args.allow_any_app, prewarm=not args.no_prewarm,
        text_column=args.text_column, label_column=args.label_column, task=args.task,
        labels=tuple(x.strip() for x in args.labels.split(",") if x.strip()),
        log_file=args.log_file, runtime_port=args.runtime_port, max_restarts=args.max_restarts,
        connect_retries=args.connect_retries, stall_timeout_s=args.stall_timeout, witness=args.witness,
    )


def backoff(attempt: int, start_s: float = 2.0, cap_s: float = 60.0, rng: random.Random | None = None) -> float:
    """Delay before restart ``attempt`` (1, 2, ...): doubling from ``start_s`` to ``cap_s``, +-25% jitter."""
    base = min(cap_s, start_s * 2 ** max(0, attempt - 1))
    return base * (rng or random).uniform(0.75, 1.25)


def _check(opts: NodeOptions, only: bool) -> int | None:
    """Run the checks; an exit code to return now, or None to go on and start the node."""
    try:
        note = check(opts)
    except FedtuneError as err:
        print(format_problems(problems_of(err), prog="fedtune-client",
                              action="must be fixed before this node can start"), file=sys.stderr)
        return exit_codes.BAD_INPUT
    if only:
        print("fedtune-client: all checks passed" + (f" (note: {note})" if note else ""))
        return exit_codes.OK
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    opts = options(args)
    if args.repair_ledger or args.adopt_witness:
        return _ledger_command(opts, args.repair_ledger)
    if args.metrics_address != "off":
        from fedtune.common.monitoring import metrics_address_problems

        if found := metrics_address_problems(args.metrics_address, "--metrics-address"):
            print(format_problems(found, prog="fedtune-client"), file=sys.stderr)
            return exit_codes.BAD_INPUT
    if (code := _check(opts, args.check)) is not None:
        return code
    logs.setup("fedtune-client", args.log_format, opts.log_path)
    if opts.insecure:
        log.warning("--insecure: the connection to %s is NOT encrypted; use this only for local tests",
                    opts.superlink)
    if opts.allowlist is None:
        log.warning("--allow-any-app: this node will run any app bundle the server sends")
    sup = Supervisor(opts, backoff)
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        sup.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if args.metrics_address != "off":
            from fedtune.client.monitoring import serve_metrics

            serve_metrics(args.metrics_address, opts)
        code = sup.run()
    except FedtuneError as err:
        log.error("%s", format_problems(problems_of(err)).replace("\n", "; "))
        code = exit_codes.BAD_INPUT
    finally:
        sup.stop_children()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        return exit_codes.TERMINATED if received[0] == signal.SIGTERM else exit_codes.INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
