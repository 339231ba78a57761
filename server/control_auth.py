"""An operator credential for the SuperLink's control API (run submission, node registration).

Flower 1.42 authenticates control-API callers through a ``ControlAuthnPlugin``;
the open-source build ships only the no-op plugin (anyone who reaches the port
may submit code or register a node key) and enables OIDC only in Flower
Enterprise. fedtune plugs its own implementation into that same hook: a bearer
token, 256 random bits, created fresh for each SuperLink start and readable only
by the server's user. Every ``/v1/control/*`` request without it gets HTTP 401
from Flower's own authentication middleware; the fleet API (nodes) and the
runtime API (ServerApp) are unaffected.

The ``flwr`` CLI sends the token as Flower's OIDC CLI plugin does: from
``$FLWR_HOME/credentials.yaml`` of fedtune-server's private Flower home
(:func:`write_cli_credentials`). An operator who needs ``flwr`` by hand uses
that home as the server's user (``FLWR_HOME=WORK_DIR/flwr-home flwr ls fedtune``).

Run as ``python -m fedtune.server.control_auth <flower-superlink arguments>``
with ``FEDTUNE_CONTROL_TOKEN_FILE`` naming the token file. This replaces one Flower function
(``load_control_authn_plugin``) before the SuperLink starts: flwr is pinned and
tests/integration/test_deploy.py covers it.
"""

from __future__ import annotations

import hmac
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from flwr.cli.constant import ACCESS_TOKEN_STORE_KEY, AUTHN_TYPE_STORE_KEY, REFRESH_TOKEN_STORE_KEY
from flwr.common.constant import ACCESS_TOKEN_KEY, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, AuthnType
from flwr.supercore.auth.typing import AccountAuthCredentials, AccountAuthLoginDetails, AccountInfo
from flwr.supercore.credential_store.file_credential_store import FileCredentialStore
from flwr.superlink.auth_plugin import ControlAuthnPlugin

from fedtune.common import runtime


def new_token(path: Path) -> str:
    """A fresh operator token in ``path`` (mode 0600, created so from the start)."""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token)
    return token


def write_cli_credentials(home: Path, address: str, token: str) -> None:
    """Make ``flwr`` (with FLWR_HOME=home) send ``token`` to the SuperLink at ``address``."""
    home.mkdir(parents=True, exist_ok=True)
    store = FileCredentialStore(home / "credentials.yaml")
    store.set(AUTHN_TYPE_STORE_KEY % address, AuthnType.OIDC.encode())  # the CLI plugin that sends a bearer token
    store.set(ACCESS_TOKEN_STORE_KEY % address, token.encode())
    store.set(REFRESH_TOKEN_STORE_KEY % address, token.encode())
    (home / "credentials.yaml").chmod(0o600)


class OperatorTokenAuthn(ControlAuthnPlugin):
    """Accepts a control-API request only with the operator's bearer token (constant-time compare)."""

    def __init__(self, token: str | None = None) -> None:
        if token is None:
            token = runtime.path(runtime.CONTROL_TOKEN_FILE).read_text().strip()  # type: ignore[union-attr]
        if len(token) < 32:
            raise ValueError("the operator token is too short")
        self._token = token.encode()

    def get_login_details(self) -> AccountAuthLoginDetails | None:
        return None  # no interactive login: the token is provisioned by fedtune-server

    def validate_tokens_in_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> tuple[bool,
                                                                                                AccountInfo | None]:
        for key, value in metadata:
            given = value.encode() if isinstance(value, str) else value
            if key == ACCESS_TOKEN_KEY and hmac.compare_digest(given, self._token):
                return True, AccountInfo(flwr_aid=NOOP_FLWR_AID, account_name=NOOP_ACCOUNT_NAME)
        return False, None

    def get_auth_tokens(self, device_code: str) -> AccountAuthCredentials | None:
        return None

    def refresh_tokens(self, metadata: Sequence[tuple[str, str | bytes]]) -> tuple[
            Sequence[tuple[str, str | bytes]] | None, AccountInfo | None]:
        valid, account = self.validate_tokens_in_metadata(metadata)
        return (metadata, account) if valid else (None, None)


def main(argv: Sequence[str] | None = None) -> None:
    """``flower-superlink`` with :class:`OperatorTokenAuthn` as its control-API authentication."""
    import importlib

    # The package re-exports a function of the module's name: take the module itself.
    superlink = importlib.import_module("flwr.superlink.cli.flower_superlink")
    plugin = OperatorTokenAuthn()  # fails here, before anything listens, if the token file is missing
    superlink.load_control_authn_plugin = lambda: plugin  # type: ignore[attr-defined]
    sys.argv = ["flower-superlink", *(sys.argv[1:] if argv is None else argv)]
    superlink.flower_superlink()


if __name__ == "__main__":
    main()
