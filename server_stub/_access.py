"""Who may read what was collected and change the policy: bearer tokens, or loopback.

``Access`` is the whole decision, kept apart from routing so that every page
that needs it (the JSON API, the HTML console) asks the same question:

- ``POST /v1/update`` and ``/healthz`` are open to anyone (the app never asks).
- With a read token and/or an admin token configured, a request must carry
  ``Authorization: Bearer <token>``: the read token grants reading, the admin
  token grants reading and changing the policy. Tokens are compared in
  constant time. With only an admin token, reading needs it too.
- With no token configured, loopback clients (``REMOTE_ADDR`` 127.0.0.0/8 or
  ``::1``) may read and change the policy; anyone else is refused (403).
- With a read token but no admin token, nobody may change the policy.

Behind a reverse proxy every request comes from the proxy's address, usually
loopback: configure a token there, or everyone the proxy serves is "local".
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional, Tuple

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

__all__ = ["Access", "Grant", "Refusal", "bearer_token", "is_loopback"]

_LOOPBACK_ONLY = (
    "reading collected data needs a token when the client is not on this machine: "
    "start the server with --read-token TOKEN (or TELEMETRY_READ_TOKEN) and send "
    "'Authorization: Bearer TOKEN'"
)
_ADMIN_NOT_CONFIGURED = (
    "changing the policy needs the admin token: start the server with --admin-token TOKEN "
    "(or TELEMETRY_ADMIN_TOKEN) and send 'Authorization: Bearer TOKEN'"
)


class Grant(enum.IntEnum):
    """What a request may do; a higher grant includes the lower ones."""

    NONE = 0
    READ = 1
    ADMIN = 2


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused: its status (401/403), message and headers."""

    status: int
    message: str
    headers: Tuple[Tuple[str, str], ...] = ()


_UNAUTHORIZED = Refusal(401, "a valid bearer token is required", (("WWW-Authenticate", "Bearer"),))


def bearer_token(environ: Mapping[str, object]) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    header = environ.get("HTTP_AUTHORIZATION")
    if not isinstance(header, str):
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def is_loopback(address: object) -> bool:
    """Whether ``address`` (a ``REMOTE_ADDR``) is this machine: 127.0.0.0/8, ``::1``, or
    an IPv4-mapped loopback address."""
    if not isinstance(address, str):
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _same(given: str, expected: Optional[str]) -> bool:
    if expected is None:
        return False
    # compare_digest on bytes: constant time for any characters (str needs ASCII).
    return hmac.compare_digest(given.encode(), expected.encode())


@dataclass(frozen=True)
class Access:
    """The configured tokens (None: not configured) and the decisions they imply."""

    read_token: Optional[str] = None
    admin_token: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("read_token", "admin_token"):
            token = getattr(self, name)
            if token is not None and (not token or token != token.strip() or " " in token):
                raise ValueError(f"{name} must be a non-empty string without spaces")

    def __repr__(self) -> str:  # never show the tokens
        read = "set" if self.read_token else None
        admin = "set" if self.admin_token else None
        return f"Access(read_token={read!r}, admin_token={admin!r})"

    @property
    def tokens_configured(self) -> bool:
        return self.read_token is not None or self.admin_token is not None

    def grant_for_token(self, token: Optional[str]) -> Grant:
        """The grant a token obtained elsewhere carries (e.g. one kept in a console session).

        ``ADMIN`` for the admin token, ``READ`` for the read token, else ``NONE``;
        both comparisons always run, in constant time.
        """
        if token is None:
            return Grant.NONE
        is_admin = _same(token, self.admin_token)
        is_reader = _same(token, self.read_token)
        if is_admin:
            return Grant.ADMIN
        return Grant.READ if is_reader else Grant.NONE

    def grant(self, environ: WSGIEnvironment, token: Optional[str] = None) -> Grant:
        """What this request may do.

        ``token`` is one the caller obtained elsewhere (a console session cookie);
        without it, the request's ``Authorization: Bearer`` header is used. With no
        token configured, loopback clients get ``ADMIN`` and others ``NONE``.
        """
        if not self.tokens_configured:
            return Grant.ADMIN if is_loopback(environ.get("REMOTE_ADDR")) else Grant.NONE
        return self.grant_for_token(token if token is not None else bearer_token(environ))

    def check(
        self, environ: WSGIEnvironment, needed: Grant, token: Optional[str] = None
    ) -> Optional[Refusal]:
        """None when the request may do what ``needed`` allows, else why not (401/403).

        ``token`` as for ``grant``.
        """
        granted = self.grant(environ, token)
        if granted >= needed:
            return None
        if not self.tokens_configured:
            return Refusal(403, _LOOPBACK_ONLY)
        if needed is Grant.ADMIN and self.admin_token is None:
            return Refusal(403, _ADMIN_NOT_CONFIGURED)  # no token could do it
        if needed is Grant.ADMIN and granted is Grant.READ:
            return Refusal(403, "this token may read but not change the policy")
        return _UNAUTHORIZED
