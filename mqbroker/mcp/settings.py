"""How mqbroker.mcp uses the broker: `StoreSettings`, every wait bounded by one of them."""

from __future__ import annotations

from attrs import define

#: The default topic of a session's events; `{session}` is the SDK's session id. The broker
#: records it by default ([history] record).
DEFAULT_TOPIC = "mcp/session/{session}/message"
#: The broker's default `[sessions] topic_prefix`: a session's topics are `{prefix}/{id}/...`.
DEFAULT_PREFIX = "mcp/session"


@define
class StoreSettings:
    """How the store uses the broker; every wait is bounded by one of these (seconds)."""

    #: The topic of a session's events (`{session}` is replaced by the session id).
    topic: str = DEFAULT_TOPIC
    #: How long `store_event` may wait for room when `max_in_flight` publishes are unanswered
    #: (the broker slow or away); past it the event is not stored (a gap on replay).
    store_wait: float = 1.0
    #: Publishes sent and not yet acknowledged, at most.
    max_in_flight: int = 500
    #: How long a publish the broker refused as unavailable is retried (same msg_id: never
    #: delivered twice) before the event counts as lost.
    retry_window: float = 10.0
    #: How long a replay may take, and a forget.
    replay_timeout: float = 30.0
    forget_timeout: float = 5.0
    #: How long the first connection to the broker is retried (the broker may start later).
    connect_timeout: float = 10.0
    #: Register each session in the broker's session registry, and watch its owner's presence
    #: (docs/mcp.md, "Sessions across instances"). False: neither (resumes as before).
    registry: bool = True
    #: The broker's `[sessions] topic_prefix`: where the session's lifecycle and presence
    #: topics are, and its owner's subscription (`{prefix}/{session}/owner`).
    prefix: str = DEFAULT_PREFIX
    #: A registered session's TTL: it expires this long after its owner's last touch (the
    #: owner touches its sessions every third of it), and the broker then forgets its history.
    session_ttl: float = 60.0
    #: The registry user the sessions belong to. None: the broker credential's principal with
    #: `auth=`, "mqbroker.mcp" in anonymous mode (where a user must be named).
    registry_user: str | None = None
    #: How long any one registry or presence request may take.
    registry_timeout: float = 2.0
    #: After the owner's presence leaves, how long it has to come back (a reconnect of its
    #: broker connection) before a resumed request it owns is answered with the gap error.
    owner_grace: float = 1.0

    def topic_of(self, session: str) -> str:
        return self.topic.replace("{session}", session)

    def session_topic(self, session: str, level: str) -> str:
        """`{prefix}/{session}/{level}`: `lifecycle`, `presence`, `owner`."""
        return f"{self.prefix}/{session}/{level}"

    def inside_session(self, session: str) -> bool:
        """Whether the session's event topic is one of its registry topics (so that deleting
        the session forgets its history and ends its subscriptions)."""
        return self.topic_of(session).startswith(f"{self.prefix}/{session}/")
