"""``fedtune-audit``: verify nodes' epsilon ledgers and recompute their privacy loss independently.

Each ledger entry names the key that signed it (``ed25519:<sha256 of the public key>``);
give the public keys you obtained from the nodes (``ledger-signing.pub``) with
``--public-key``, in any order: each ledger is checked against the key its entries
name, and a ledger signed by a key you did not give fails. Exit status: 0 when every
ledger verifies and every epsilon agrees within the tolerance and the budget; 1 when
any check fails (each problem names the ledger and line); 2 for usage errors.

Example::

    fedtune-audit hospital-a/ledger.jsonl hospital-b/ledger.jsonl \\
        --public-key keys/hospital-a.pub --public-key keys/hospital-b.pub --html audit.html
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from fedtune.common.audit import DEFAULT_TOLERANCE, audit, to_json
from fedtune.common.errors import ConfigError, FedtuneError
from fedtune.common.ledger import LEDGER_FILE
from fedtune.common.ledger_key import key_id, load_public_key


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune-audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ledgers", nargs="+", type=Path, metavar="LEDGER",
                   help=f"ledger file, or a node state directory holding {LEDGER_FILE}")
    p.add_argument("--public-key", "-k", action="append", type=Path, default=[], metavar="PEM", required=True,
                   help="a node's Ed25519 public key (SubjectPublicKeyInfo PEM); repeat for each node")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"relative disagreement allowed between recorded and recomputed epsilon "
                        f"(default {DEFAULT_TOLERANCE})")
    p.add_argument("--json", action="store_true", help="print a machine-readable report on stdout")
    p.add_argument("--html", type=Path, metavar="FILE", help="also write an HTML report with a plot")
    return p


def _ledger_paths(args: list[Path]) -> list[Path]:
    paths: list[Path] = []
    problems: list[Path] = []
    for arg in args:
        path = arg / LEDGER_FILE if arg.is_dir() else arg
        (paths if path.is_file() else problems).append(path)
    if problems:
        raise ConfigError([f"ledger {p} does not exist" for p in problems])
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    err = Console(stderr=True)
    try:
        keys = {}
        for path in args.public_key:
            public = load_public_key(path)
            keys[key_id(public)] = public
        report = audit(_ledger_paths(args.ledgers), keys, args.tolerance)
        if args.html:
            from fedtune.common.audit_report import write_html

            write_html(report, args.html)
    except FedtuneError as error:
        err.print("[bold red]fedtune-audit: error[/]")
        err.print(str(error), markup=False, highlight=False, soft_wrap=True)
        return 2
    if args.json:
        print(json.dumps(to_json(report), indent=2))
    else:
        from fedtune.common.audit_report import render

        Console(width=200).print(render(report))
    if args.html:
        err.print(f"HTML report: {args.html}")
    if args.json and not report.ok:
        for ledger in report.ledgers:
            for problem in ledger.problems:
                err.print(f"{ledger.path}: {problem}", markup=False, highlight=False, soft_wrap=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
