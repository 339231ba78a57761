"""Prometheus ``/metrics`` for the daemons (prometheus-client), bound to localhost unless told otherwise.

Each daemon registers one collector that reads its own files at scrape time
(the server's metrics.jsonl, the node's ledger), so the numbers are those on
disk, survive restarts, and nothing is counted twice. A node's metrics stay on
the node's network: they are served locally and never sent to the server.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.registry import Collector

from fedtune.common.errors import RunError, quote


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); ValueError naming the problem."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {quote(address)}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be a number between 1 and 65535, got {quote(port)}")
    return host.strip("[]"), int(port)


def metrics_address_problems(address: str, flag: str) -> list[str]:
    """The address parses and can be bound now."""
    try:
        host, port = split_address(address)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except ValueError as err:
        return [f"{flag}: {err}"]
    except (socket.gaierror, UnicodeError) as err:
        return [f"{flag}: host {quote(address)} cannot be resolved: {getattr(err, 'strerror', None) or err}"]
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as err:
            why = "is already in use" if err.errno == errno.EADDRINUSE else f"cannot be bound: {err.strerror}"
            return [f"{flag} {address} {why} (pass another address, or 'off')"]
    return []


def serve(address: str, collector: Collector) -> Any:
    """Serve ``collector`` on ``http://address/metrics`` from a daemon thread; returns the HTTP server."""
    host, port = split_address(address)
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise RunError(f"cannot serve metrics on {address}: {err.strerror or err}") from err
    return server


def counts(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
