"""The limits a broker's welcome announced, as a typed read-only value (`client.limits`)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs
from attrs import field, frozen


def _read_only(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(raw))


@frozen(kw_only=True)
class Limits:
    """The welcome's `limits` (docs/protocol.md, "Limits"): every key the protocol defines, with
    its default when the broker did not send it (or sent a value of the wrong type), and `raw`,
    the map as the broker sent it (keys this client does not know included)."""

    max_frame_bytes: int = 1048576
    max_frame_items: int = 1000
    max_message_bytes: int = 1047552
    max_subscriptions: int = 1000
    max_wildcard_subscriptions: int = 100
    max_wildcard_filters: int = 10000
    max_topic_length: int = 1024
    max_topic_levels: int = 32
    outbox_messages: int = 10000
    outbox_bytes: int = 16777216
    slow_consumer: str = "disconnect"
    ping_interval: float = 20.0
    idle_timeout: float = 60.0
    dedup_window: float = 120.0
    max_session_batch: int = 100
    max_session_page: int = 1000
    publish_messages_per_second: float = 0.0
    publish_messages_burst: float = 0.0
    publish_bytes_per_second: float = 0.0
    publish_bytes_burst: float = 0.0
    requests_per_second: float = 0.0
    requests_burst: float = 0.0
    max_violations: int = 10
    violation_window: float = 10.0
    raw: Mapping[str, Any] = field(factory=dict, converter=_read_only)

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Limits:
        """The limits of a welcome's map; values of the wrong type are left at their default."""
        known: dict[str, Any] = {}
        for attribute in attrs.fields(cls):
            value: Any = raw.get(attribute.name)
            if attribute.name != "raw" and _fits(value, attribute.default):
                known[attribute.name] = (float(value) if isinstance(attribute.default, float)
                                         else value)
        return cls(raw=raw, **known)


def _fits(value: Any, default: Any) -> bool:
    """Whether `value` is of the type of the limit whose default is `default`."""
    if isinstance(value, bool):
        return False  # a bool is an int to Python, never a limit
    if isinstance(default, float):
        return isinstance(value, int | float)
    return isinstance(value, type(default))
