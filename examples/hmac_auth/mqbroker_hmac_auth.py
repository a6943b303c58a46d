"""An example authenticator plugin for mqbroker: HMAC-signed credentials.

A credential is `v1.<claims>.<signature>`: the claims a JSON object in base64url (`sub`, the
principal; `roles`; `sessions`, the ids `{session}` stands for; `exp`, a Unix time), the
signature the HMAC-SHA256 of `v1.<claims>` under a secret the broker and the issuer share.
It is what an application that already holds a secret can mint without a JWT library.

Install it beside mqbroker (`pip install examples/hmac_auth`), then in config.toml:

    [auth]
    mode = "hmac"                      # the entry point's name
    [auth.roles.user]
    publish = ["mcp/session/{session}/#"]
    [plugins.hmac]
    secret_file = "/etc/mqbroker/hmac.secret"   # at least 32 characters

and mint a credential with `issue(secret, "alice", roles=["user"], sessions=["s1"])`.
The plugin is found through the `mqbroker.plugins` entry point group (pyproject.toml), like
the built-in history and fan-out plugins.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
from attrs import field, frozen

from mqbroker.auth import AuthFailed, Principal
from mqbroker.config import SettingMismatch
from mqbroker.plugins import Plugin

VERSION = "v1"
MIN_SECRET_CHARS = 32


def read_secret(path: str) -> str:
    """The secret in the file at `path` (surrounding whitespace ignored); "" when unreadable."""
    try:
        return Path(path).read_text(encoding="utf-8").strip() if path else ""
    except (OSError, UnicodeDecodeError):
        return ""


def _readable_secret(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    """Checked when the config is (`mqbroker check-config` included), not at the first hello."""
    if len(read_secret(value)) < MIN_SECRET_CHARS:
        expected = f"a file holding a secret of at least {MIN_SECRET_CHARS} characters"
        raise SettingMismatch(expected, value, (attribute.name,))


def _leeway(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise SettingMismatch("a finite number of seconds, 0 or more", value, (attribute.name,))


@frozen(kw_only=True)
class HmacSettings:
    """`[plugins.hmac]`."""

    secret_file: str = field(default="", validator=_readable_secret)
    #: Seconds of clock difference allowed on `exp`.
    leeway: float = field(default=30.0, validator=_leeway)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, signed: str) -> str:
    return _b64(hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest())


def issue(secret: str, sub: str, *, roles: Sequence[str] = (), sessions: Sequence[str] = (),
          lifetime: float = 3600.0, now: float | None = None) -> str:
    """A credential for `sub`, valid for `lifetime` seconds."""
    exp = (time.time() if now is None else now) + lifetime
    claims = {"sub": sub, "roles": list(roles), "sessions": list(sessions), "exp": exp}
    signed = f"{VERSION}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_sign(secret, signed)}"


@frozen(kw_only=True)
class HmacAuthenticator:
    """Checks `v1.<claims>.<signature>` credentials (mqbroker.auth.Authenticator)."""

    secret: str = field(repr=False)
    leeway: float = 30.0

    async def authenticate(self, credential: str | None) -> Principal:
        # Nothing to wait for: the check is a hash. A scheme asking a server (an OAuth
        # introspection endpoint, say) would await its HTTP client here, within the broker's
        # [auth] authenticate_timeout.
        if not credential:
            raise AuthFailed("no credential")
        version, _, rest = credential.partition(".")
        claims_text, _, signature = rest.partition(".")
        if version != VERSION or not claims_text or not signature:
            raise AuthFailed("not a v1 credential")
        expected = _sign(self.secret, f"{version}.{claims_text}")
        if not hmac.compare_digest(expected, signature):
            raise AuthFailed("bad signature")
        try:
            claims = json.loads(_unb64(claims_text))
        except (ValueError, binascii.Error):
            raise AuthFailed("claims are not base64url JSON") from None
        return self._principal(claims)

    def _principal(self, claims: Any) -> Principal:
        if not isinstance(claims, dict):
            raise AuthFailed("claims are not an object")
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise AuthFailed("no exp")
        if exp + self.leeway < time.time():
            raise AuthFailed("credential expired")
        sub, roles, sessions = claims.get("sub"), claims.get("roles", []), claims.get(
            "sessions", [])
        if not isinstance(sub, str) or not _strings(roles) or not _strings(sessions):
            raise AuthFailed("sub, roles or sessions of the wrong type")
        # The broker checks the names themselves (no / + # { } $ or spaces): a name it
        # refuses is the issuer's mistake, answered `internal`; refuse it here instead.
        if not all(_name(n) for n in (sub, *roles, *sessions)):
            raise AuthFailed("a name holds / + # { } $ or spaces")
        return Principal(name=sub, roles=tuple(roles), sessions=tuple(sessions),
                         expires=float(exp) + self.leeway)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _name(text: str) -> bool:
    return bool(text) and not any(c in "/+#{}$" or c.isspace() for c in text)


@asynccontextmanager
async def open_hmac_authenticator(settings: HmacSettings) -> AsyncIterator[HmacAuthenticator]:
    """The authenticator, open while the broker runs (nothing to open or close here)."""
    yield HmacAuthenticator(secret=read_secret(settings.secret_file), leeway=settings.leeway)


plugin = Plugin(name="hmac", settings_type=HmacSettings,
                open_authenticator=open_hmac_authenticator)
