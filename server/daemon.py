"""``fedtune-server``: run a federation's SuperLink with TLS and node authentication, and one run on it.

It checks the certificates, node keys and run settings first (every problem at
once), starts ``flower-superlink`` with TLS and ``--enable-supernode-auth``,
registers the allowed node public keys, submits the fedtune app, follows the
run and exits with its real outcome (0 only for ``finished:completed``).

The SuperLink binds to 127.0.0.1 by default: Flower serves the control API (run
submission, node registration; no user authentication in the open-source
build) on the same port as the fleet API, so nodes must reach it through the
reverse proxy in ``deploy/nginx`` that forwards only ``/v1/fleet/``.

After every round the ServerApp checkpoints into ``--checkpoint-dir``; starting
fedtune-server again with the same settings resumes from the last checkpoint
(``--fresh`` moves old checkpoints aside and starts a new run).

    fedtune-server --ssl-ca-certfile ca.pem --ssl-certfile server.pem --ssl-keyfile server.key \\
        --node-keys /etc/fedtune/nodes/ --run-config run.toml --work-dir /var/lib/fedtune-server
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from fedtune.common import tls
from fedtune.common.errors import ConfigError, FedtuneError, RunError
from fedtune.common.settings import RunSettings
from fedtune.server.federation import Federation, ServerOptions, local_control_host

log = logging.getLogger("fedtune.server")
EXIT_FAILED_RUN, EXIT_BAD_SETUP, EXIT_SIGNAL = 1, 2, 143


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune-server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ssl-ca-certfile", type=Path, help="CA certificate (PEM) that signed the server certificate")
    p.add_argument("--ssl-certfile", type=Path, help="server certificate (PEM) with the nodes' hostname in its SANs")
    p.add_argument("--ssl-keyfile", type=Path, help="server private key (PEM)")
    p.add_argument("--insecure", action="store_true", help="plaintext and no node authentication (local tests only)")
    p.add_argument("--node-keys", type=Path, action="append", default=[],
                   help="an allowed node's public key (OpenSSH), or a directory of *.pub files (repeatable)")
    p.add_argument("--run-config", type=Path, help="TOML file of run settings (kebab-case keys, as fedtune-sim)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a run setting (repeatable)")
    p.add_argument("--work-dir", type=Path, default=Path("fedtune-server"),
                   help="SuperLink home, logs, app bundle, results (default ./fedtune-server)")
    p.add_argument("--checkpoint-dir", type=Path, help="per-round checkpoints (default WORK_DIR/checkpoints)")
    p.add_argument("--fresh", action="store_true",
                   help="start a new run: move old checkpoints aside (CHECKPOINT_DIR.old-TIME) instead of resuming")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the SuperLink binds (default 127.0.0.1: nodes come in through the proxy)")
    p.add_argument("--port", type=int, default=9092, help="SuperLink port (default 9092)")
    p.add_argument("--print-app-hash", action="store_true",
                   help="print the sha256 of the app bundle nodes must allow-list, then exit")
    return p


def run_config(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Run settings from --run-config and --set, with paths made absolute, validated."""
    config: dict[str, Any] = {}
    if args.run_config is not None:
        try:
            config |= tomllib.loads(args.run_config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"run config {args.run_config}: {err}") from err
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        config[key.strip()] = value.strip()
    config.setdefault("results-dir", str(work_dir / "results"))
    settings = RunSettings.from_config(config)
    for key, value in (("model-path", settings.model.model_path), ("dataset", settings.data.dataset),
                       ("results-dir", settings.results_dir)):
        if value and (key != "dataset" or Path(value).suffix):
            config[key] = str(Path(value).resolve())
    return RunSettings.from_config(config).to_config()


def node_keys(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """Public key files named directly or found as *.pub in directories, and their problems."""
    keys, problems = [], []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.pub")) + sorted(path.glob("*/node.pub"))
            if not found:
                problems.append(f"node key directory {path} holds no *.pub files")
            keys += found
        else:
            keys.append(path)
    for key in keys:
        problems += tls.check_node_public_key(key)
    return keys, problems


def preflight(args: argparse.Namespace) -> ServerOptions:
    """Check everything before any process starts; raise ConfigError listing every problem."""
    problems: list[str] = []
    work = args.work_dir.resolve()
    tls_files = (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile)
    control_host = "127.0.0.1"
    if args.insecure:
        log.warning("--insecure: no TLS and no node authentication; use this only for local tests")
    elif None in tls_files:
        problems.append("--ssl-ca-certfile, --ssl-certfile and --ssl-keyfile are required (TLS is on unless "
                        "--insecure is given)")
    else:
        problems += tls.check_server_tls(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile)
        if not problems:
            control_host, why = local_control_host(args.ssl_certfile)
            problems += [why] if why else []
    keys, key_problems = node_keys(args.node_keys)
    problems += key_problems
    if not args.insecure and not args.node_keys:
        problems.append("--node-keys is required: only registered nodes can join (node authentication is on)")
    config: dict[str, Any] = {}
    try:
        config = run_config(args, work)
    except FedtuneError as err:
        problems += err.problems
    if config and Path(str(config["dataset"])).suffix and not Path(str(config["dataset"])).is_file():
        problems.append(f"dataset {config['dataset']} (server-side evaluation data) does not exist")
    if config.get("model-path") and not Path(str(config["model-path"])).is_dir():
        problems.append(f"model-path {config['model-path']} is not a directory")
    if problems:
        raise ConfigError(problems)
    return ServerOptions(
        work_dir=work, host=args.host, port=args.port, control_host=control_host, insecure=args.insecure,
        ca=args.ssl_ca_certfile, cert=args.ssl_certfile, key=args.ssl_keyfile, node_keys=tuple(keys),
        run_config=config, checkpoint_dir=(args.checkpoint_dir or work / "checkpoints").resolve(),
    )


@dataclass
class _Stop:
    federation: Federation | None = None
    signalled: bool = False

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: stopping the SuperLink (checkpoints are kept; start again to resume)", signum)
        self.signalled = True
        if self.federation is not None:
            self.federation.stop()
        raise SystemExit(EXIT_SIGNAL)


def _report(problems: list[str]) -> None:
    n = len(problems)
    print(f"fedtune-server: {n} problem{'s' if n > 1 else ''} must be fixed before the server can start:\n"
          + "\n".join(f"- {p}" for p in problems), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fedtune-server %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    if args.print_app_hash:
        print(Federation.app_hash(args.work_dir.resolve()))
        return 0
    try:
        opts = preflight(args)
    except FedtuneError as err:
        _report(err.problems)
        return EXIT_BAD_SETUP
    if args.fresh and opts.checkpoint_dir.exists():
        aside = opts.checkpoint_dir.with_name(f"{opts.checkpoint_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        opts.checkpoint_dir.rename(aside)
        log.info("--fresh: moved the previous checkpoints to %s", aside)
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    fed = Federation(opts)
    stop.federation = fed
    try:
        status = fed.run()
    except FedtuneError as err:
        log.error("%s", err)
        return EXIT_FAILED_RUN if isinstance(err, RunError) else EXIT_BAD_SETUP
    finally:
        fed.stop()
    if status != "finished:completed":
        log.error("the run ended as %s; see %s", status, opts.work_dir / "logs")
        return EXIT_FAILED_RUN
    if fed.trained_updates() == 0:
        log.error("the run completed but no node trained in any round; each node's reason (refused app, "
                  "budget, error) is in %s", Path(str(opts.run_config["results-dir"])) / "metrics.jsonl")
        return EXIT_FAILED_RUN
    log.info("the run completed; results in %s", opts.run_config["results-dir"])
    return 0

