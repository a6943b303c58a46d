"""What may be shown of a string in logs and messages: secrets masked, floods cut short.

Pure: no I/O. `redact` masks the credentials of URLs (`redis://:***@host:6379/0`, a `password=`
query parameter too); `truncate` cuts a long string and says how much was cut; `for_log` does
both, and is what the log processor applies to every string it writes.
"""

from __future__ import annotations

import re

#: Longest string written whole to a log line: client-supplied strings (a hello's `client`, a
#: topic) can be megabytes, and a log line per event must stay a line.
LOG_STRING_LIMIT = 256

#: scheme://userinfo@ : the userinfo runs to the netloc's last `@`, as urllib and redis-py split.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@")
_PASSWORD_PARAM = re.compile(r"(?P<name>[?&]password=)[^&#\s]*", re.IGNORECASE)
#: A URL cut inside its netloc, at the end of a truncated string: its `@` may have been cut off.
_CUT_NETLOC = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s@]*$")

MASK = "***"


def redact(text: str) -> str:
    """`text` with every URL's password (and a bare userinfo, which may be one) masked.

    `redis://user:pw@host` becomes `redis://user:***@host`, `redis://:pw@host` becomes
    `redis://:***@host`, `redis://pw@host` becomes `redis://***@host`.
    """
    if "://" not in text and "password=" not in text.lower():
        return text
    text = _USERINFO.sub(_mask_userinfo, text)
    return _PASSWORD_PARAM.sub(lambda m: f"{m['name']}{MASK}", text)


def truncate(text: str, limit: int = LOG_STRING_LIMIT) -> str:
    """`text`, or its first `limit` characters followed by `… (+N chars)` naming what was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… (+{len(text) - limit} chars)"


def for_log(text: str, limit: int = LOG_STRING_LIMIT) -> str:
    """`text` as a log may show it: truncated, and with no URL credential, even a cut one."""
    if len(text) <= limit:
        return redact(text)
    # Cut first (a regex over 100 MB would take seconds), then mask: a URL whose `@` fell past
    # the cut has its whole netloc masked, since it may be a password.
    head = _CUT_NETLOC.sub(lambda m: f"{m['scheme']}{MASK}", redact(text[:limit]))
    return f"{head}… (+{len(text) - limit} chars)"


def _mask_userinfo(match: re.Match[str]) -> str:
    user, colon, _password = match["userinfo"].partition(":")
    masked = f"{user}:{MASK}" if colon else MASK
    return f"{match['scheme']}{masked}@"
