"""What logs and messages may show of a string (mqbroker.redact): no URL credential, ever, and
long strings cut with their length noted."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqbroker.redact import LOG_STRING_LIMIT, for_log, redact, truncate


@pytest.mark.parametrize(("text", "shown"), [
    ("redis://:s3cret@10.0.0.1:6379/0", "redis://:***@10.0.0.1:6379/0"),
    ("redis://alice:s3cret@host:6379/2", "redis://alice:***@host:6379/2"),
    ("rediss://s3cret@host", "rediss://***@host"),
    ("unix://:s3cret@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
    ("unix:///run/redis.sock?db=1&password=s3cret", "unix:///run/redis.sock?db=1&password=***"),
    ("redis://:p@ss:w@rd@host/0", "redis://:***@host/0"),
    ("got 'redis://u:s3cret@h:1/0' (str)", "got 'redis://u:***@h:1/0' (str)"),
    ("two: redis://:a1@h1/0 and redis://:b2@h2/0", "two: redis://:***@h1/0 and redis://:***@h2/0"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("no url here", "no url here"),
])
def test_url_credentials_are_masked(text: str, shown: str) -> None:
    """A password (or a bare userinfo, which may be one) never survives; the rest does."""
    assert redact(text) == shown
    assert for_log(text) == shown


def test_long_strings_are_cut_with_their_length_noted() -> None:
    """Past the limit, the first characters are kept and the number cut is said."""
    assert truncate("abcdef", limit=3) == "abc… (+3 chars)"
    assert truncate("abc", limit=3) == "abc"
    text = "x" * 5_000_000
    assert for_log(text) == "x" * LOG_STRING_LIMIT + f"… (+{5_000_000 - LOG_STRING_LIMIT} chars)"


def test_a_url_cut_before_its_at_sign_shows_no_password() -> None:
    """Truncation comes first (a regex over megabytes would be slow): a URL cut inside its
    credentials has its whole netloc masked."""
    text = "x" * (LOG_STRING_LIMIT - 12) + "redis://:s3cret-password@host/0"
    shown = for_log(text)
    assert "s3cret" not in shown and shown.endswith("redis://***… (+19 chars)")


@given(st.text(alphabet="ab:@/?#&=.x ", max_size=40), st.text(alphabet="ab:@/.", max_size=20),
       st.integers(5, 80))
def test_a_password_never_shows(before: str, after: str, limit: int) -> None:
    """Wherever a URL's password sits in a string, and wherever the string is cut, no part of
    the password is shown (its letters are the only capitals the string can hold)."""
    text = f"{before}redis://user:SECRETPW@host/0{after}"
    assert not set(for_log(text, limit)) & set("SECRTPW")
