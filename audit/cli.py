"""``fedtune-audit``: verify nodes' epsilon ledgers and recompute their privacy loss independently.

Each ledger entry names the key that signed it (``ed25519:<sha256 of the public key>``);
give the public keys you obtained from the nodes (``ledger-signing.pub``) with
``--public-key``, or a ``--roster`` that maps each node identity to its key (and,
optionally, its ledger and policy files). Say whose ledger each file must be with
``--node`` (one per ledger, in order) or the roster: a ledger of another node fails.
Give each node's policy file with ``--policy`` (one for all ledgers, or one per
ledger): budget and delta then come from it, not from the ledger. ``--server-record
RUN_DIR`` (repeat it for several runs) cross-checks every ledger against the receipts in
each run record; a receipt counts only when the node it names signed it (its reply's
``node-sig``, checked with that node's public key).

Exit status: 0 when every check passes; 1 when any check fails (each problem names
the ledger and line); 2 for usage errors (missing files, unreadable keys or policies).

Example::

    fedtune-audit hospital-a/ledger.jsonl hospital-b/ledger.jsonl \\
        --public-key keys/hospital-a.pub --public-key keys/hospital-b.pub \\
        --node sha256:3f1c... --node sha256:9ab0... --policy policy.toml \\
        --server-record server/results --server-key keys/server-record.pub --html audit.html
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from rich.console import Console

from fedtune.audit.fleet import AuditReport, audit, to_json
from fedtune.audit.ledger_audit import DEFAULT_MAX_DELTA, DEFAULT_TOLERANCE, LedgerSpec
from fedtune.audit.policy import AuditPolicy, read_policy
from fedtune.audit.roster import RosterNode, node_identity, read_roster
from fedtune.common.errors import ConfigError, FedtuneError
from fedtune.common.ledger.key import key_id, load_public_key
from fedtune.common.ledger.store import LEDGER_FILE


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune-audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ledgers", nargs="*", type=Path, metavar="LEDGER",
                   help=f"ledger file, or a node state directory holding {LEDGER_FILE}")
    p.add_argument("--public-key", "-k", action="append", type=Path, default=[], metavar="PEM",
                   help="a node's Ed25519 public key (SubjectPublicKeyInfo PEM); repeat for each node")
    p.add_argument("--node", action="append", default=[], metavar="ID",
                   help="the node each LEDGER must belong to (sha256:<hex> or simulation:client-<n>), in order")
    p.add_argument("--roster", type=Path, metavar="FILE",
                   help="TOML roster: node identity -> public key (and ledger, policy); see fedtune.audit.roster")
    p.add_argument("--policy", action="append", type=Path, default=[], metavar="FILE",
                   help="the node's policy TOML (max-epsilon, delta, accountant, dataset-id): one for all "
                        "ledgers, or one per LEDGER in order")
    p.add_argument("--server-record", type=Path, action="append", default=[], metavar="RUN_DIR",
                   help="a server run directory (run-record.json): cross-check ledgers against its receipts, each "
                        "verified against the signature of the node it names; repeat for several runs")
    p.add_argument("--server-key", type=Path, action="append", default=[], metavar="PEM",
                   help="the server's record public key (PEM); repeat when the records were signed by "
                        "different keys (each record must verify with one of them)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"relative disagreement allowed between recorded and recomputed epsilon, at most "
                        f"{DEFAULT_TOLERANCE} (budgets are always strict)")
    p.add_argument("--max-delta", type=float, default=DEFAULT_MAX_DELTA,
                   help=f"fail any policy whose delta is above this (default {DEFAULT_MAX_DELTA:g})")
    p.add_argument("--strict-rng", action="store_true",
                   help="fail (not only warn) on rounds whose noise came from a seeded generator")
    p.add_argument("--json", action="store_true", help="print a machine-readable report on stdout")
    p.add_argument("--html", type=Path, metavar="FILE", help="also write an HTML report with a plot")
    return p


def _ledger_path(arg: Path) -> Path:
    path = arg / LEDGER_FILE if arg.is_dir() else arg
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"ledger {path} does not exist")
    return path


def _per_ledger(values: list, count: int, what: str) -> list:
    if len(values) not in (0, 1, count) or (what == "--node" and len(values) not in (0, count)):
        raise ConfigError(f"give {what} once per LEDGER ({count}){'' if what == '--node' else ' or once for all'}, "
                          f"got {len(values)}")
    return values if len(values) == count else values * count if values else [None] * count


def _specs(args: argparse.Namespace, roster: list[RosterNode] | None) -> list[LedgerSpec]:
    paths = [_ledger_path(p) for p in args.ledgers]
    nodes = [node_identity(n) if n else None for n in _per_ledger(args.node, len(paths), "--node")]
    policies: list[AuditPolicy | None] = [read_policy(p) if p else None
                                          for p in _per_ledger(args.policy, len(paths), "--policy")]
    table = {n.node: n.key for n in roster} if roster is not None else None
    specs = [LedgerSpec(p, n, pol, table, args.max_delta) for p, n, pol in zip(paths, nodes, policies, strict=True)]
    for node in roster or []:
        if node.ledger is not None:
            specs.append(LedgerSpec(_ledger_path(node.ledger), node.node,
                                    read_policy(node.policy) if node.policy else None, table, args.max_delta))
    if not specs:
        raise ConfigError("no ledger to audit: give LEDGER files or a roster whose nodes name their ledger")
    return specs


def _keys(args: argparse.Namespace, roster: list[RosterNode] | None) -> dict[str, ed25519.Ed25519PublicKey]:
    keys = {n.key: n.public_key for n in roster or []}
    for path in args.public_key:
        public = load_public_key(path)
        keys[key_id(public)] = public
    if not keys:
        raise ConfigError("no public key given: use --public-key for each node, or --roster")
    return keys


def _run(args: argparse.Namespace) -> AuditReport:
    if not 0 < args.max_delta < 1:
        raise ConfigError(f"--max-delta must be in (0, 1), got {args.max_delta}")
    roster = read_roster(args.roster) if args.roster else None
    keys, specs = _keys(args, roster), _specs(args, roster)
    server_keys = [load_public_key(path) for path in args.server_key]
    if missing := [str(d) for d in args.server_record if not d.exists()]:
        raise ConfigError(f"server record {', '.join(missing)} does not exist")
    report = audit(specs, keys, tolerance=args.tolerance, record_dir=args.server_record, server_key=server_keys,
                   strict_rng=args.strict_rng)
    if args.html:
        from fedtune.audit.report import write_html

        write_html(report, args.html)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    err = Console(stderr=True)
    try:
        report = _run(args)
    except FedtuneError as error:
        err.print("[bold red]fedtune-audit: error[/]")
        err.print(str(error), markup=False, highlight=False, soft_wrap=True)
        return 2
    if args.json:
        print(json.dumps(to_json(report), indent=2))
    else:
        from fedtune.audit.report import render

        Console(width=240, soft_wrap=True).print(render(report))
    if args.html:
        err.print(f"HTML report: {args.html}")
    if args.json and not report.ok:
        for ledger in report.ledgers:
            for problem in ledger.problems.listed():
                err.print(f"{ledger.path}: {problem}", markup=False, highlight=False, soft_wrap=True)
            if ledger.problems.more:
                err.print(f"{ledger.path}: ... and {ledger.problems.more} more", markup=False, highlight=False)
        for problem in report.problems:
            err.print(f"run record: {problem}", markup=False, highlight=False, soft_wrap=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
