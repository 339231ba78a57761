"""Everything fedtune-server checks before it starts or changes anything, every problem at once."""

from __future__ import annotations

import argparse
import errno
import json
import socket
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedtune.common import tls
from fedtune.common.errors import ConfigError, FedtuneError, quote
from fedtune.common.models.registry_models import with_model_defaults
from fedtune.common.settings import RunSettings
from fedtune.server.federation import ServerOptions, local_control_host
from fedtune.server.results import SUMMARY_FILE


def run_config(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Run settings from --run-config and --set, with paths made absolute, validated."""
    config: dict[str, Any] = {}
    if args.run_config is not None:
        try:
            loaded = tomllib.loads(args.run_config.read_text())
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"run config {args.run_config} cannot be read: {getattr(err, 'strerror', None) or err}"
                              ) from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"run config {args.run_config} is not valid TOML: {err}") from err
        config |= loaded
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {quote(pair)}")
        config[key.strip()] = value.strip()
    config.setdefault("results-dir", str(work_dir / "results"))
    config = with_model_defaults(config)
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
    return [k.resolve() for k in keys], problems


def address_problems(host: str, port: int) -> list[str]:
    """The SuperLink can bind ``host:port`` now (checked by binding it for a moment)."""
    if not 1 <= port <= 65535:
        return [f"--port must be between 1 and 65535, got {port}"]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        return [f"--host {quote(host)} cannot be resolved: {getattr(err, 'strerror', None) or err}"]
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return [f"port {port} on {host} is already in use (another SuperLink or fedtune-server?); "
                        f"stop it or pass another --port"]
            return [f"cannot listen on {host}:{port}: {err.strerror or err}"]
    return []


def _tls_problems(args: argparse.Namespace) -> list[str]:
    tls_files = (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile)
    if args.insecure:
        given = [f"--{n}" for n, v in zip(("ssl-ca-certfile", "ssl-certfile", "ssl-keyfile"), tls_files, strict=True)
                 if v is not None]
        out = [f"--insecure cannot be combined with {', '.join(given)}: choose TLS or plaintext"] if given else []
        if args.node_keys:
            out.append("--insecure cannot be combined with --node-keys: node authentication requires TLS")
        return out
    if None in tls_files:
        problems = ["--ssl-ca-certfile, --ssl-certfile and --ssl-keyfile are required (TLS is on unless --insecure "
                    "is given)"]
    else:
        problems = tls.check_server_tls(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile)
        if not problems:
            _, why = local_control_host(args.ssl_certfile)
            problems += [why] if why else []
    if not args.node_keys:
        problems.append("--node-keys is required: only registered nodes can join (node authentication is on)")
    return problems


def _dir_problems(path: Path, what: str) -> list[str]:
    """``path`` is a directory or can be made one (nothing is created here)."""
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                return [f"{what} {path}: {parent} exists and is not a directory"]
            return []
    return []


def results_problems(results: Path, resuming: bool, fresh: bool) -> list[str]:
    """Never overwrite a result: a finished run, or another run's files, need --fresh (moved aside)."""
    if fresh or not results.is_dir() or not any(results.iterdir()):
        return []
    try:
        summary = json.loads((results / SUMMARY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        summary = None
    if isinstance(summary, dict) and summary.get("status") == "completed":
        return [f"results-dir {results} holds a completed run; pass --fresh to move it aside and start a new run, "
                f"or set another results-dir"]
    if not resuming:
        return [f"results-dir {results} holds another run's results and there is no checkpoint to resume; pass "
                f"--fresh to move them aside, or set another results-dir"]
    return []


def _timing_problems(args: argparse.Namespace) -> list[str]:
    out = []
    for flag, value in (("--node-wait-timeout", args.node_wait_timeout), ("--round-timeout", args.round_timeout)):
        if not value > 0:
            out.append(f"{flag} must be > 0 seconds, got {value}")
    return out


def preflight(args: argparse.Namespace) -> ServerOptions:
    """Check everything before any process starts or any file changes; raise ConfigError listing every problem."""
    work = args.work_dir.resolve()
    problems = _tls_problems(args) + _timing_problems(args) + _dir_problems(work, "--work-dir")
    keys, key_problems = node_keys(args.node_keys)
    problems += key_problems
    config: dict[str, Any] = {}
    if not _dir_problems(work, "--work-dir"):
        try:
            config = run_config(args, work)
        except FedtuneError as err:
            problems += err.problems
    checkpoints = (args.checkpoint_dir or work / "checkpoints").resolve()
    problems += _dir_problems(checkpoints, "--checkpoint-dir")
    if config:
        problems += _config_problems(config, checkpoints, args.fresh)
        results = Path(str(config["results-dir"]))
        problems += [f"results-dir {results} must not contain {what} {path} (--fresh moves results aside)"
                     for what, path in (("--work-dir", work), ("--checkpoint-dir", checkpoints))
                     if path == results or results in path.parents]
    problems += address_problems(args.host, args.port)
    if args.metrics_address != "off":
        from fedtune.common.monitoring import metrics_address_problems

        problems += metrics_address_problems(args.metrics_address, "--metrics-address")
    if problems:
        raise ConfigError(problems)
    control_host = "127.0.0.1" if args.insecure else local_control_host(args.ssl_certfile)[0]
    absolute = [None if p is None else p.resolve() for p in (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile)]
    return ServerOptions(
        work_dir=work, host=args.host, port=args.port, control_host=control_host, insecure=args.insecure,
        ca=absolute[0], cert=absolute[1], key=absolute[2], node_keys=tuple(keys), run_config=config,
        checkpoint_dir=checkpoints, node_wait_timeout_s=args.node_wait_timeout, round_timeout_s=args.round_timeout,
    )


def _config_problems(config: dict[str, Any], checkpoints: Path, fresh: bool) -> list[str]:
    problems = []
    if Path(str(config["dataset"])).suffix and not Path(str(config["dataset"])).is_file():
        problems.append(f"dataset {config['dataset']} (server-side evaluation data) does not exist")
    if config.get("model-path") and not Path(str(config["model-path"])).is_dir():
        problems.append(f"model-path {config['model-path']} is not a directory")
    results = Path(str(config["results-dir"]))
    problems += _dir_problems(results, "results-dir")
    resuming = False
    if not fresh and checkpoints.is_dir():
        from fedtune.server.checkpoint import CheckpointStore, run_key  # torch/PEFT: only when there is one

        try:
            resuming = CheckpointStore(checkpoints).resumable(run_key(config), int(config["num-rounds"])) is not None
        except FedtuneError as err:
            problems += [f"{p} (or pass --fresh to move the checkpoints aside)" for p in err.problems]
    if not problems:
        problems += results_problems(results, resuming, fresh)
    return problems
