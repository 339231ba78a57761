"""``fedtune-certs``: create the federation's CA, server certificate and node keys.

    fedtune-certs ca --out ca/                                  # operator, keep ca.key offline
    fedtune-certs server --ca ca/ --out server/ --host fl.example.org --host 10.0.0.5
    fedtune-certs node --out node/ --name hospital-a            # on the node; send node.pub to the operator
    fedtune-certs dev --out certs/ --host localhost --host 127.0.0.1 --node a --node b   # all of it, for tests

Nothing is overwritten unless ``--force`` is given; private keys are mode 0600.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fedtune.common import exit_codes, tls
from fedtune.common.errors import FedtuneError, format_problems, problems_of


class _Parser(argparse.ArgumentParser):
    """argparse that exits with BAD_INPUT and a bounded, literal message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(exit_codes.BAD_INPUT, f"{format_problems(message, prog=self.prog)} (see {self.prog} --help)\n")


def _days(value: str) -> int:
    days = int(value)
    if days < 1:
        raise argparse.ArgumentTypeError(f"--days must be >= 1, got {days}")
    return days


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedtune-certs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ca = sub.add_parser("ca", help="create a self-signed CA (ca.pem, ca.key)")
    ca.add_argument("--out", type=Path, required=True, help="directory for ca.pem and ca.key")
    ca.add_argument("--name", default="fedtune federation CA", help="the CA's common name")
    ca.add_argument("--days", type=_days, default=3650, help="validity in days")
    server = sub.add_parser("server", help="create the SuperLink's TLS certificate (server.pem, server.key)")
    server.add_argument("--ca", type=Path, required=True, help="directory holding ca.pem and ca.key")
    server.add_argument("--out", type=Path, required=True, help="directory for server.pem and server.key")
    server.add_argument("--host", action="append", default=[], required=True,
                        help="hostname or IP address nodes use to reach the server (repeat for each SAN)")
    server.add_argument("--days", type=_days, default=825, help="validity in days")
    node = sub.add_parser("node", help="create a node's auth key pair and its ledger-signing key pair")
    node.add_argument("--out", type=Path, required=True,
                      help="directory for node.key/node.pub (OpenSSH EC) and ledger-signing.key/.pub (Ed25519)")
    node.add_argument("--name", default="", help="a label stored as the public key's comment")
    dev = sub.add_parser("dev", help="CA + server certificate + node keys in one go (tests, compose demos)")
    dev.add_argument("--out", type=Path, required=True, help="writes ca/, server/ and nodes/NAME/ under this")
    dev.add_argument("--host", action="append", default=[], help="server SANs (default: localhost, 127.0.0.1)")
    dev.add_argument("--node", action="append", default=[], help="node name (repeat)")
    for sp in (ca, server, node, dev):
        sp.add_argument("--force", action="store_true", help="replace existing files")
    return p


def _run(args: argparse.Namespace) -> list[tls.Written]:
    if args.command == "ca":
        return tls.create_ca(args.out, common_name=args.name, days=args.days, force=args.force)
    if args.command == "server":
        return tls.create_server_cert(args.out, args.ca, args.host, days=args.days, force=args.force)
    if args.command == "node":
        return tls.create_node_keys(args.out, comment=args.name, force=args.force)
    hosts = args.host or ["localhost", "127.0.0.1"]
    written = tls.create_ca(args.out / "ca", force=args.force)
    written += tls.create_server_cert(args.out / "server", args.out / "ca", hosts, force=args.force)
    for name in args.node:
        written += tls.create_node_keys(args.out / "nodes" / name, comment=name, force=args.force)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        written = _run(args)
    except OSError as err:  # an --out that is a file, a read-only directory, a full disk
        where = f" {err.filename}" if err.filename else ""
        print(format_problems(f"cannot write{where}: {err.strerror or err}", prog="fedtune-certs"), file=sys.stderr)
        return exit_codes.BAD_INPUT
    except FedtuneError as err:
        print(format_problems(problems_of(err), prog="fedtune-certs"), file=sys.stderr)
        return exit_codes.BAD_INPUT
    for w in written:
        note = " (private, 0600)" if w.secret else ""
        if w.path.name == tls.NODE_PUB:
            note = f"  {tls.fingerprint(w.path.read_bytes())} -> give this file to the federation operator"
        print(f"wrote {w.path}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
