"""Rate limits (mqbroker.ratelimit): token buckets, violation windows, the per-peer table."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from mqbroker.auth import Principal, access_of
from mqbroker.config import AuthConfig, Config, LimitsConfig, RoleConfig, RoleLimitsConfig
from mqbroker.ratelimit import (
    RATE_KEYS,
    PeerLimiter,
    Rates,
    SessionLimits,
    TokenBucket,
    Violations,
    bucket,
    most_generous,
)

#: A client's requests: (seconds since the previous one, units asked).
requests = st.lists(
    st.tuples(st.floats(0, 5, allow_nan=False), st.integers(1, 20)), max_size=200)
rates = st.floats(0.1, 1000, allow_nan=False)
bursts = st.floats(1, 1000, allow_nan=False)


@given(rates, bursts, requests)
def test_never_more_than_burst_plus_rate_times_elapsed_over_any_interval(
    rate: float, burst: float, steps: list[tuple[float, int]]
) -> None:
    """Whatever the requests, the units admitted between any two of them (both included) are at
    most burst + rate x the time between them."""
    limiter = TokenBucket(rate, burst)
    now, admitted = 0.0, []
    for gap, n in steps:
        now += gap
        if limiter.take(n, now):
            admitted.append((now, n))
    for (i, (start, _)), (j, (end, _)) in itertools.combinations_with_replacement(
            enumerate(admitted), 2):
        units = sum(n for _, n in admitted[i:j + 1])
        assert units <= burst + rate * (end - start) + 1e-6


@given(rates, bursts, st.floats(0, 100, allow_nan=False))
def test_a_client_within_the_rate_is_never_refused(rate: float, burst: float, start: float
                                                   ) -> None:
    """One unit every 1/rate seconds always passes: the limit costs a paced client nothing."""
    limiter = TokenBucket(rate, burst)
    assert all(limiter.take(1, start + k / rate) for k in range(200))


def test_a_full_bucket_admits_a_burst_then_refuses_until_it_refills() -> None:
    limiter = TokenBucket(rate=10, burst=5)
    assert [limiter.take(1, 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not limiter.take(1, 0.05)  # half a token
    assert limiter.take(1, 0.1)


def test_a_refused_request_takes_nothing() -> None:
    """A request too big for what is left does not drain the bucket: a smaller one still passes."""
    limiter = TokenBucket(rate=1, burst=10)
    assert not limiter.take(11, 0.0)
    assert limiter.take(10, 0.0)


def test_a_rate_of_0_is_no_limit_and_a_burst_of_0_is_one_seconds_worth() -> None:
    assert bucket(0, 100) is None
    limiter = bucket(20, 0)
    assert limiter is not None and limiter.burst == 20
    fractional = bucket(0.5, 0)
    assert fractional is not None and fractional.burst == 1  # one request must fit


def test_violations_close_after_max_within_the_window() -> None:
    violations = Violations(max_violations=3, window=10.0)
    assert not violations.record(0.0)
    assert not violations.record(1.0)
    assert violations.record(2.0)


def test_violations_older_than_the_window_do_not_count() -> None:
    violations = Violations(max_violations=3, window=10.0)
    assert not violations.record(0.0)
    assert not violations.record(5.0)
    assert not violations.record(10.0)  # the first is out of the window
    assert violations.record(11.0)


@given(st.lists(st.floats(0, 3, allow_nan=False), max_size=300), st.integers(1, 10))
def test_violations_hold_at_most_max_violations_times(gaps: list[float], most: int) -> None:
    violations = Violations(max_violations=most, window=100.0)
    now = 0.0
    for gap in gaps:
        now += gap
        violations.record(now)
        assert len(violations._times) <= most


def test_each_peer_has_its_own_bucket() -> None:
    limiter = PeerLimiter(rate=1, burst=2)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [True, True, False]
    assert limiter.take("b", 0.0)
    assert limiter.take("a", 1.0)


def test_the_peer_table_is_bounded_and_forgets_the_least_recently_seen() -> None:
    limiter = PeerLimiter(rate=1, burst=1, max_peers=3)
    for peer in ("a", "b", "c"):
        assert limiter.take(peer, 0.0)
    assert not limiter.take("a", 0.0)  # a is now the most recently seen
    for n in range(1000):
        limiter.take(f"flood-{n}", 0.0)
        assert len(limiter) <= 3
    assert limiter.take("a", 0.0)  # forgotten, so a full bucket again


def session_limits(**rates: float) -> SessionLimits:
    return SessionLimits.of(LimitsConfig(**rates))  # type: ignore[arg-type]


def test_a_frame_with_many_refusals_is_one_violation() -> None:
    """A batch over the limit counts once: max_violations counts frames, not requests."""
    limits = session_limits(publish_messages_per_second=1, max_violations=2)
    limits.new_frame()
    refusals = [limits.refused(0.0) for _ in range(100)]
    assert not any(r.exceeded for r in refusals)
    limits.new_frame()
    assert limits.refused(0.0).exceeded


def test_the_refusal_log_line_is_written_once_per_window() -> None:
    limits = session_limits(requests_per_second=1, max_violations=1000, violation_window=10)
    logged = []
    for second in range(30):
        limits.new_frame()
        logged.append(limits.refused(float(second)).log)
    assert [n for n, log in enumerate(logged) if log] == [0, 10, 20]


def test_dropped_publishes_without_id_are_reported_once_per_frame() -> None:
    limits = session_limits(publish_messages_per_second=1)
    limits.new_frame()
    assert [limits.report_unacknowledged() for _ in range(3)] == [True, False, False]
    limits.new_frame()
    assert limits.report_unacknowledged()


def test_a_publish_over_the_bytes_limit_takes_no_message_token() -> None:
    limits = session_limits(publish_messages_per_second=1, publish_messages_burst=1,
                            publish_bytes_per_second=1, publish_bytes_burst=100)
    assert limits.publish(101, 0.0) == "publish_bytes_per_second"
    assert limits.publish(100, 0.0) is None
    assert limits.publish(1, 0.0) == "publish_messages_per_second"
    assert limits.request(0.0) is None  # no request limit


def test_a_run_within_both_limits_is_taken_whole_and_one_over_takes_nothing() -> None:
    """publish_run admits a whole run at once (the common case, one check per run), or takes
    nothing so that its publishes are checked one by one."""
    limits = session_limits(publish_messages_per_second=1, publish_messages_burst=10,
                            publish_bytes_per_second=1, publish_bytes_burst=1000)
    assert limits.publish_run(5, 500, 0.0)
    assert not limits.publish_run(6, 100, 0.0)  # over the messages left: nothing taken
    assert not limits.publish_run(1, 501, 0.0)  # over the bytes left: nothing taken
    assert limits.publish_run(5, 500, 0.0)
    assert limits.publish(1, 0.0) == "publish_messages_per_second"


@given(st.lists(st.tuples(st.floats(0, 2, allow_nan=False), st.integers(1, 30),
                          st.integers(0, 3000)), max_size=100))
def test_runs_never_admit_more_than_the_buckets_allow(steps: list[tuple[float, int, int]]
                                                       ) -> None:
    limits = session_limits(publish_messages_per_second=10, publish_messages_burst=20,
                            publish_bytes_per_second=1000, publish_bytes_burst=2000)
    now = messages = size = 0.0
    for gap, count, run_bytes in steps:
        now += gap
        if limits.publish_run(count, run_bytes, now):
            messages, size = messages + count, size + run_bytes
    assert messages <= 20 + 10 * now + 1e-6
    assert size <= 2000 + 1000 * now + 1e-6


# --- a principal's limits: one per role, combined -----------------------------------------------

#: (rate, burst) pairs as a role may set them: 0 is no limit, and a burst 0 one second's worth.
role_rates = st.builds(
    lambda m, mb, b, bb, r, rb, v, w: Rates.of(LimitsConfig(
        publish_messages_per_second=m, publish_messages_burst=mb, publish_bytes_per_second=b,
        publish_bytes_burst=bb, requests_per_second=r, requests_burst=rb, max_violations=v,
        violation_window=w)),
    *[st.sampled_from([0.0, 1.0, 20.0, 500.0]) for _ in range(6)],
    st.integers(1, 50), st.sampled_from([0.5, 10.0, 60.0]))


def at_least_as_generous(a: Rates, b: Rates) -> bool:
    """Whether a session limited by `a` may do everything one limited by `b` may."""
    for rate, burst in [("publish_messages_per_second", "publish_messages_burst"),
                        ("publish_bytes_per_second", "publish_bytes_burst"),
                        ("requests_per_second", "requests_burst")]:
        if getattr(a, rate) == 0:
            continue
        if getattr(b, rate) == 0 or getattr(a, rate) < getattr(b, rate) or \
                getattr(a, burst) < getattr(b, burst):
            return False
    return a.max_violations >= b.max_violations and a.violation_window <= b.violation_window


@given(st.lists(role_rates, min_size=1, max_size=4), st.randoms())
def test_roles_combine_into_the_most_generous_of_each_key_in_any_order(
        roles: list[Rates], random: Any) -> None:
    """A principal's limits are at least as generous as each of its roles' (a role only adds),
    no more generous than the best value of each key, and the order of roles does not matter."""
    combined = most_generous(roles)
    assert all(at_least_as_generous(combined, role) for role in roles)
    for key in RATE_KEYS:
        assert getattr(combined, key) in [getattr(role, key) for role in roles]
    shuffled = list(roles)
    random.shuffle(shuffled)
    assert most_generous(shuffled) == combined


def test_most_generous_examples() -> None:
    user = Rates.of(LimitsConfig(publish_messages_per_second=20, publish_bytes_per_second=1000,
                                 max_violations=3, violation_window=30))
    service = Rates.of(LimitsConfig(publish_messages_per_second=500, publish_messages_burst=50,
                                    max_violations=5, violation_window=60))
    both = most_generous([user, service])
    # 0 (no limit) is the most generous rate: the service role has no bytes limit.
    assert both == Rates(publish_messages_per_second=500, publish_messages_burst=50,
                         publish_bytes_per_second=0, publish_bytes_burst=0,
                         max_violations=5, violation_window=30)


def test_rates_resolve_bursts_as_the_welcome_tells_them() -> None:
    rates = Rates.of(LimitsConfig(publish_messages_per_second=0.5, requests_per_second=7,
                                  requests_burst=2))
    assert (rates.publish_messages_burst, rates.requests_burst, rates.publish_bytes_burst) == (
        1.0, 2.0, 0.0)
    assert rates.session_limited and not Rates().session_limited


def test_a_principals_limits_are_its_roles_or_the_defaults() -> None:
    """Only roles with a limits table count; a principal with none gets [limits]; a role's
    table overrides the keys it sets and keeps [limits]'s others."""
    config = Config(limits=LimitsConfig(publish_messages_per_second=5, requests_per_second=2),
                    auth=AuthConfig(mode="token", roles={
                        "user": RoleConfig(limits=RoleLimitsConfig(
                            publish_messages_per_second=20)),
                        "service": RoleConfig(limits=RoleLimitsConfig(
                            publish_messages_per_second=0, max_violations=50)),
                        "reader": RoleConfig(subscribe=("#",))}))
    access = access_of(config)

    def rates(*roles: str) -> Rates:
        return access.rates_of(Principal(name="p", roles=roles))

    assert rates() == rates("reader") == Rates.of(config.limits)
    assert rates("user") == Rates(publish_messages_per_second=20, publish_messages_burst=20,
                                  requests_per_second=2, requests_burst=2)
    assert rates("user", "reader") == rates("reader", "user") == rates("user")
    assert rates("user", "service").publish_messages_per_second == 0  # no limit
    assert rates("user", "service").max_violations == 50
    assert rates("unknown-role") == Rates.of(config.limits)
