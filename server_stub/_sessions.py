"""Console sessions and CSRF tokens: signed cookies, nothing kept on the server.

A session cookie holds a grant, an expiry and a random nonce, signed with
HMAC-SHA256 keyed by the token that granted it. No token ever leaves the
server, every worker and machine sharing the tokens accepts the cookie (no
session table to share), and changing a token ends every session it opened.
Logging out removes the cookie from the browser; a copied cookie stays valid
until it expires (``SESSION_SECONDS``).

Forms carry a CSRF token: with a session, an HMAC of its nonce; with no token
configured (loopback use, no session), the value of a random ``HttpOnly``
cookie that a page of another site can neither read nor send
(``SameSite=Strict``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional

from ._access import Access, Grant

__all__ = [
    "CSRF_COOKIE",
    "SESSION_COOKIE",
    "SESSION_SECONDS",
    "Session",
    "Sessions",
    "cookie_header",
    "request_cookies",
    "same_secret",
]

SESSION_COOKIE = "telemetry_session"
CSRF_COOKIE = "telemetry_csrf"
SESSION_SECONDS = 12 * 3600
_VERSION = "s1"
_MAX_COOKIE_HEADER = 8192


@dataclass(frozen=True)
class Session:
    """A verified session: what it may do, until when, and its random nonce."""

    grant: Grant
    expires: int
    nonce: str


def request_cookies(environ: Mapping[str, object]) -> Dict[str, str]:
    """The request's cookies by name (the first of a repeated name wins); bad ones skipped."""
    header = environ.get("HTTP_COOKIE")
    cookies: Dict[str, str] = {}
    if not isinstance(header, str) or len(header) > _MAX_COOKIE_HEADER:
        return cookies
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in cookies:
            cookies[name] = value.strip().strip('"')
    return cookies


def cookie_header(name: str, value: str, *, max_age: int, secure: bool) -> tuple[str, str]:
    """A ``Set-Cookie`` header: ``HttpOnly; SameSite=Strict; Path=/`` always."""
    flags = f"Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict"
    if secure:
        flags += "; Secure"
    return ("Set-Cookie", f"{name}={value}; {flags}")


class Sessions:
    """Issues and verifies session cookies and CSRF tokens for the tokens ``access`` holds."""

    def __init__(self, access: Access, *, clock: Callable[[], float]) -> None:
        self._access = access
        self._clock = clock

    def token_for(self, grant: Grant) -> Optional[str]:
        """The configured token that carries ``grant`` (for sub-requests and signatures)."""
        if grant is Grant.ADMIN:
            return self._access.admin_token
        if grant is Grant.READ:
            return self._access.read_token
        return None

    def issue(self, grant: Grant) -> str:
        """A cookie value for a new session with ``grant`` (which must have a token)."""
        expires = int(self._clock()) + SESSION_SECONDS
        nonce = secrets.token_hex(16)
        body = f"{_VERSION}.{int(grant)}.{expires}.{nonce}"
        return f"{body}.{self._sign(grant, body)}"

    def verify(self, value: Optional[str]) -> Optional[Session]:
        """The session a cookie value stands for, or None (forged, expired, or its token gone)."""
        if not value or len(value) > 256:
            return None
        parts = value.split(".")
        if len(parts) != 5 or parts[0] != _VERSION:
            return None
        _, grant_text, expires_text, nonce, signature = parts
        if grant_text not in ("1", "2") or not expires_text.isdigit():
            return None
        grant = Grant(int(grant_text))
        expected = self._sign(grant, ".".join(parts[:4]))
        if expected is None or not hmac.compare_digest(signature.encode(), expected.encode()):
            return None
        expires = int(expires_text)
        if expires <= self._clock():
            return None
        return Session(grant=grant, expires=expires, nonce=nonce)

    def csrf_token(self, session: Session) -> str:
        """The CSRF token that forms of this session must send back."""
        return self._sign(session.grant, f"csrf.{session.nonce}") or ""

    def _sign(self, grant: Grant, message: str) -> Optional[str]:
        token = self.token_for(grant)
        if token is None:
            return None
        key = hashlib.sha256(b"telemetry console session\0" + token.encode()).digest()
        return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def same_secret(given: Optional[str], expected: Optional[str]) -> bool:
    """Constant-time equality of two non-empty secrets."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())
