"""config.toml loading: the defaults file, the schema, and errors that name file, key and rule."""

from __future__ import annotations

import math
import tempfile
import tomllib
from pathlib import Path

import attrs
import pytest
from attrs import field, frozen
from hypothesis import example, given
from hypothesis import strategies as st

from mqbroker.config import (
    AuthConfig,
    Config,
    ConfigError,
    FanoutConfig,
    HistoryConfig,
    LimitsConfig,
    LogConfig,
    MetricsConfig,
    ServerConfig,
    SessionsConfig,
    load_config,
    plugin_settings,
)
from mqbroker.plugins import Plugin
from mqbroker_plugins.redis.settings import RedisSettings
from mqbroker_plugins.sql.settings import SqlSettings

REPO_CONFIG = Path(__file__).resolve().parents[1] / "config.toml"
SERVER_KEYS = ", ".join(a.name for a in attrs.fields(ServerConfig))
SECTIONS = {
    "server": ServerConfig,
    "limits": LimitsConfig,
    "log": LogConfig,
    "history": HistoryConfig,
    "fanout": FanoutConfig,
    "metrics": MetricsConfig,
    "auth": AuthConfig,
    "sessions": SessionsConfig,
}


def write(directory: Path, text: str, name: str = "config.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


# --- The defaults and the repository's config.toml -------------------------------------------


def test_no_path_gives_the_defaults() -> None:
    """load_config(None) is the built-in single-instance configuration."""
    assert load_config(None) == Config()


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    """Every key is optional: an empty file is the defaults."""
    assert load_config(write(tmp_path, "")) == Config()


def test_repo_config_toml_is_the_defaults() -> None:
    """config.toml at the repository root holds exactly the defaults, so they cannot drift."""
    assert load_config(REPO_CONFIG) == Config()


def test_repo_config_toml_names_every_key() -> None:
    """Every section and every key of the schema is spelled out in config.toml."""
    document = tomllib.loads(REPO_CONFIG.read_text(encoding="utf-8"))
    assert set(document) == set(SECTIONS)
    for section, cls in SECTIONS.items():
        assert list(document[section]) == [a.name for a in attrs.fields(cls)], section


def comment_of(key: str) -> str:
    """The comment lines just above `key = ...` in config.toml, joined."""
    lines = REPO_CONFIG.read_text(encoding="utf-8").splitlines()
    at = next(n for n, line in enumerate(lines) if line.startswith(f"{key} = "))
    comment: list[str] = []
    while at > 0 and lines[at - 1].startswith("#"):
        at -= 1
        comment.insert(0, lines[at].removeprefix("#").strip())
    return " ".join(comment)


def test_repo_config_toml_gives_topic_lengths_in_bytes() -> None:
    """max_topic_length counts UTF-8 bytes, as the broker and docs/protocol.md do."""
    comment = comment_of("max_topic_length")
    assert "in UTF-8 bytes" in comment and "in characters" not in comment


def test_repo_config_toml_says_the_client_pings_not_the_broker() -> None:
    """The broker never pings (docs/protocol.md, Keepalive): ping_interval is what it asks of
    its clients, in the welcome (issue 8, case 9)."""
    comment = comment_of("ping_interval")
    assert "to a quiet client" not in comment and "client" in comment and "welcome" in comment


def test_repo_config_toml_sketches_the_redis_plugin() -> None:
    """The commented [plugins.redis] table, once uncommented, is valid TOML holding every
    Redis setting at its default: the file documents all of them and cannot drift."""
    lines = REPO_CONFIG.read_text(encoding="utf-8").splitlines()
    start = lines.index("# [plugins.redis]")
    sketch = "\n".join(line.removeprefix("# ") for line in lines[start:])
    table = tomllib.loads(sketch)["plugins"]["redis"]
    assert table == attrs.asdict(RedisSettings())


def test_repo_config_toml_sketches_the_sql_plugin() -> None:
    """The commented [plugins.sql] table, once uncommented, holds every SQL setting at its
    default."""
    lines = REPO_CONFIG.read_text(encoding="utf-8").splitlines()
    start = lines.index("# [plugins.sql]")
    end = next(n for n in range(start, len(lines)) if lines[n].startswith("# The Redis plugin"))
    sketch = "\n".join(line.removeprefix("# ") for line in lines[start:end])
    table = tomllib.loads(sketch)["plugins"]["sql"]
    assert table == attrs.asdict(SqlSettings())


# --- Reading values --------------------------------------------------------------------------


def test_values_are_read_into_the_schema(tmp_path: Path) -> None:
    """Values land in their fields: arrays become tuples, TOML integers become floats."""
    path = write(
        tmp_path,
        """
        [server]
        port = 0
        ping_interval = 5
        slow_consumer = "drop_oldest"
        [log]
        level = "debug"
        format = "json"
        [history]
        record = ["a/#"]
        [plugins.redis]
        url = "redis://example:6379/1"
        """,
    )
    config = load_config(path)
    assert config.server == ServerConfig(port=0, ping_interval=5.0, slow_consumer="drop_oldest")
    assert type(config.server.ping_interval) is float
    assert config.log == LogConfig(level="debug", format="json")
    assert config.history.record == ("a/#",)
    assert config.plugins == {"redis": {"url": "redis://example:6379/1"}}


def test_path_may_be_a_string(tmp_path: Path) -> None:
    """A str path is read like a Path."""
    path = write(tmp_path, "[metrics]\nport = 9100\n")
    assert load_config(str(path)).metrics.port == 9100


# --- Errors: each names the file, the key path and what was expected --------------------------

BAD_VALUES = [
    pytest.param(
        "[server]\nport = 'abc'",
        "server.port: expected an integer from 0 to 65535, got 'abc' (str)",
        id="string-for-integer",
    ),
    pytest.param(
        "[server]\nport = true",
        "server.port: expected an integer from 0 to 65535, got True (bool)",
        id="boolean-for-integer",
    ),
    pytest.param(
        "[server]\nmax_subscriptions = 10.0",
        "server.max_subscriptions: expected a positive integer, got 10.0 (float)",
        id="float-for-integer",
    ),
    pytest.param(
        "[server]\nidle_timeout = '60'",
        "server.idle_timeout: expected a finite number of seconds greater than 0, got '60' (str)",
        id="string-for-number",
    ),
    pytest.param(
        "[server]\nhost = 5",
        "server.host: expected a host name or IP address, got 5 (int)",
        id="integer-for-string",
    ),
    pytest.param(
        "server = 1",
        "server: expected a table, got 1 (int)",
        id="value-for-section",
    ),
    pytest.param(
        "[history]\nrecord = 'a/#'",
        "history.record: expected an array, got 'a/#' (str)",
        id="string-for-array",
    ),
    pytest.param(
        "[history]\nrecord = ['a/#', 7]",
        "history.record[1]: expected a string, got 7 (int)",
        id="array-item",
    ),
    pytest.param(
        "[log]\nlevel = 'verbose'",
        "log.level: expected one of 'debug', 'info', 'warning', 'error', got 'verbose' (str)",
        id="bad-literal",
    ),
    pytest.param(
        "[log]\nformat = 1",
        "log.format: expected one of 'auto', 'json', 'console', got 1 (int)",
        id="integer-for-literal",
    ),
    pytest.param(
        "[server]\nport = 65536",
        "server.port: expected an integer from 0 to 65535, got 65536 (int)",
        id="port-too-high",
    ),
    pytest.param(
        "[metrics]\nport = -1",
        "metrics.port: expected an integer from 0 to 65535, got -1 (int)",
        id="port-negative",
    ),
    pytest.param(
        "[history]\nmax_bytes = 0",
        "history.max_bytes: expected a positive integer, got 0 (int)",
        id="size-zero",
    ),
    pytest.param(
        "[history]\nmax_age = 0",
        "history.max_age: expected a finite number of seconds greater than 0, got 0.0 (float)",
        id="duration-zero",
    ),
    pytest.param(
        "[server]\nshutdown_grace = -0.5",
        "server.shutdown_grace: expected a finite number of seconds, 0 or more, got -0.5 (float)",
        id="duration-negative",
    ),
    pytest.param(
        "[server]\nhello_timeout = inf",
        "server.hello_timeout: expected a finite number of seconds greater than 0, got inf (float)",
        id="duration-infinite",
    ),
    pytest.param(
        "[server]\nidle_timeout = 10",
        "server.ping_interval: expected a finite number of seconds greater than 0, "
        "less than idle_timeout (10.0), got 20.0 (float)",
        id="ping-not-below-idle",
    ),
    pytest.param(
        "[server]\nallowed_origins = ['https://app.example.com/']",
        "server.allowed_origins[0]: expected an origin such as \"https://app.example.com\" "
        "(or \"*\"), got 'https://app.example.com/' (str)",
        id="origin-with-path",
    ),
    pytest.param(
        "[limits]\npublish_messages_per_second = -1",
        "limits.publish_messages_per_second: expected a finite number, 0 or more (0: no limit), "
        "got -1.0 (float)",
        id="negative-rate",
    ),
    pytest.param(
        "[limits]\nrequests_burst = 'ten'",
        "limits.requests_burst: expected a finite number, 0 or more (0: one second's worth), "
        "got 'ten' (str)",
        id="burst-not-a-number",
    ),
    pytest.param(
        "[limits]\nconnections_per_second_per_peer = inf",
        "limits.connections_per_second_per_peer: expected a finite number, 0 or more "
        "(0: no limit), got inf (float)",
        id="infinite-rate",
    ),
    pytest.param(
        "[limits]\nmax_violations = 0",
        "limits.max_violations: expected a positive integer, got 0 (int)",
        id="no-violations-allowed",
    ),
    pytest.param(
        "[limits]\nviolation_window = 0",
        "limits.violation_window: expected a finite number of seconds greater than 0, "
        "got 0.0 (float)",
        id="violation-window-zero",
    ),
    pytest.param(
        "[fanout]\nplugin = ''",
        "fanout.plugin: expected a plugin name, got '' (str)",
        id="empty-plugin-name",
    ),
    pytest.param(
        "[auth.roles.user.limits]\npublish_messages_per_second = -5",
        "auth.roles.user.limits.publish_messages_per_second: expected a finite number, 0 or "
        "more (0: no limit), got -5.0 (float)",
        id="role-negative-rate",
    ),
    pytest.param(
        "[auth.roles.user.limits]\nmax_violations = 0",
        "auth.roles.user.limits.max_violations: expected a positive integer, got 0 (int)",
        id="role-no-violations-allowed",
    ),
    pytest.param(
        "[auth.roles.user.limits]\nrequests_burst = true",
        "auth.roles.user.limits.requests_burst: expected a finite number, 0 or more (0: one "
        "second's worth), got True (bool)",
        id="role-burst-not-a-number",
    ),
    pytest.param(
        "[auth.roles.user.limits]\nconnections_per_second_per_peer = 5",
        "auth.roles.user.limits.connections_per_second_per_peer: unknown key (known: "
        "publish_messages_per_second, publish_messages_burst, publish_bytes_per_second, "
        "publish_bytes_burst, requests_per_second, requests_burst, max_violations, "
        "violation_window)",
        id="role-per-peer-limit",
    ),
    pytest.param(
        "[auth.roles.user]\nlimits = 5",
        "auth.roles.user.limits: expected a table, got 5 (int)",
        id="role-limits-not-a-table",
    ),
    pytest.param(
        "[auth]\nmode = ''",
        "auth.mode: expected 'anonymous', 'token', 'jwt', 'mtls' or an installed plugin's name, "
        "got '' (str)",
        id="empty-auth-mode",
    ),
    pytest.param(
        "[auth]\nauthenticate_timeout = 0",
        "auth.authenticate_timeout: expected a finite number of seconds greater than 0, "
        "got 0.0 (float)",
        id="authenticate-timeout-zero",
    ),
    pytest.param(
        "[plugins]\nredis = 'redis://x'",
        "plugins.redis: expected a table of plugin settings, got 'redis://x' (str)",
        id="value-for-plugin-table",
    ),
]


@pytest.mark.parametrize(("text", "problem"), BAD_VALUES)
def test_bad_value_is_named_with_file_key_and_expectation(
    tmp_path: Path, text: str, problem: str
) -> None:
    """A wrong type, a value out of range or outside a Literal: one line, file: key: expected."""
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}: {problem}"


def test_unknown_top_level_key_lists_the_known_ones(tmp_path: Path) -> None:
    """An unknown section is refused, naming the sections there are."""
    path = write(tmp_path, "[sever]\nport = 1\n")
    assert error_of(path) == (
        f"{path}: sever: unknown key (did you mean 'server'? "
        "known: server, limits, log, history, fanout, metrics, auth, sessions, plugins)"
    )


def test_unknown_nested_key_lists_the_known_ones(tmp_path: Path) -> None:
    """An unknown key in a section is refused, naming the keys of that section."""
    path = write(tmp_path, "[server]\nbogus = 1\n")
    assert error_of(path) == f"{path}: server.bogus: unknown key (known: {SERVER_KEYS})"


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    """A misspelt key gets a suggestion."""
    path = write(tmp_path, "[server]\nprot = 8000\n")
    assert f"{path}: server.prot: unknown key (did you mean 'port'? known: " in error_of(path)


def test_unknown_key_that_needs_quotes_is_quoted(tmp_path: Path) -> None:
    """A key path is spelt as TOML would spell it."""
    path = write(tmp_path, '"a.b" = 1\n')
    assert error_of(path).startswith(f'{path}: "a.b": unknown key (known: server, ')


def test_several_errors_are_listed_in_document_order(tmp_path: Path) -> None:
    """All type errors and unknown keys of a file are reported at once, one per line."""
    path = write(
        tmp_path,
        "[server]\nport = 'x'\nextra = 1\n[log]\nlevel = 'loud'\n[history]\nrecord = [1]\n",
    )
    lines = error_of(path).splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "server.port",
        "server.extra",
        "log.level",
        "history.record[0]",
    ]
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_relative_path_is_named_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is named the way the caller named it."""
    write(tmp_path, "[server]\nport = 'abc'\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config("config.toml")
    assert str(caught.value) == (
        "config.toml: server.port: expected an integer from 0 to 65535, got 'abc' (str)"
    )


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    """A file that is not TOML is named with the position of the mistake."""
    path = write(tmp_path, "[server]\nport = \n")
    message = error_of(path)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 2, column 8" in message


def test_missing_file(tmp_path: Path) -> None:
    """A file that is not there is named, with the reason."""
    path = tmp_path / "absent.toml"
    assert error_of(path) == f"{path}: cannot read the file: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    """A path that cannot be read as a file is named, with the reason."""
    assert error_of(tmp_path) == f"{tmp_path}: cannot read the file: Is a directory"


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    """TOML is UTF-8; other bytes are named as such rather than crashing."""
    path = tmp_path / "config.toml"
    path.write_bytes(b"[server]\nhost = '\xff'\n")
    assert error_of(path).startswith(f"{path}: not UTF-8 text")


@given(port=st.integers(min_value=-(2**20), max_value=2**20))
@example(port=-1)
@example(port=0)
@example(port=65535)
@example(port=65536)
def test_ports_accepted_exactly_from_0_to_65535(port: int) -> None:
    """The range check on server.port is exact at both ends."""
    with tempfile.TemporaryDirectory() as directory:
        path = write(Path(directory), f"[server]\nport = {port}\n")
        if 0 <= port <= 65535:
            assert load_config(path).server.port == port
        else:
            assert error_of(path) == (
                f"{path}: server.port: expected an integer from 0 to 65535, got {port} (int)"
            )


@given(seconds=st.floats(allow_nan=True, allow_infinity=True))
def test_durations_accepted_exactly_when_finite_and_positive(seconds: float) -> None:
    """A duration such as history.max_age is accepted if and only if finite and above 0."""
    with tempfile.TemporaryDirectory() as directory:
        path = write(Path(directory), f"[history]\nmax_age = {seconds!r}\n")
        if math.isfinite(seconds) and seconds > 0:
            assert load_config(path).history.max_age == seconds
        else:
            assert error_of(path) == (
                f"{path}: history.max_age: expected a finite number of seconds greater than 0, "
                f"got {seconds!r} (float)"
            )


def test_recorded_filters_follow_the_topic_rules(tmp_path: Path) -> None:
    """A recorded filter a session could not subscribe with is refused, with the rule broken."""
    path = write(tmp_path, "[history]\nrecord = ['a/#', 'a/#/b']\n")
    message = error_of(path)
    assert message.startswith(f"{path}: history.record[1]: filter 'a/#/b' ")
    assert "'#' is only allowed as the last level" in message


# --- Plugin settings -------------------------------------------------------------------------


@frozen(kw_only=True)
class StoreSettings:
    """A plugin's settings, as a plugin author would write them."""

    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "mqb:"
    timeout: float = 1.0
    pool_size: int = field(default=4, validator=attrs.validators.ge(1))
    tls: bool = False
    hosts: tuple[str, ...] = ()


STORE = Plugin(name="store", settings_type=StoreSettings)
BARE = Plugin(name="bare")


def with_plugins(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def test_plugin_settings_default_when_no_table() -> None:
    """No [plugins.NAME] table: the settings type's defaults."""
    assert plugin_settings(Config(), STORE) == StoreSettings()


def test_plugin_settings_are_validated_into_the_type(tmp_path: Path) -> None:
    """The table is structured like the rest: arrays to tuples, integers to floats."""
    config = with_plugins(
        tmp_path, "[plugins.store]\nurl = 'redis://h/2'\ntimeout = 3\nhosts = ['a', 'b']\n"
    )
    settings = plugin_settings(config, STORE)
    assert settings == StoreSettings(url="redis://h/2", timeout=3.0, hosts=("a", "b"))


def test_plugin_settings_unknown_key(tmp_path: Path) -> None:
    """An unknown plugin key is named with its full path and the plugin's keys."""
    config = with_plugins(tmp_path, "[plugins.store]\nurll = 'x'\n")
    with pytest.raises(ConfigError) as caught:
        plugin_settings(config, STORE)
    assert str(caught.value) == (
        "config.toml: plugins.store.urll: unknown key (did you mean 'url'? "
        "known: url, key_prefix, timeout, pool_size, tls, hosts)"
    )


def test_plugin_settings_wrong_type_names_the_source(tmp_path: Path) -> None:
    """Errors carry the source the caller names, and TOML's types are not coerced."""
    config = with_plugins(tmp_path, "[plugins.store]\ntls = 'yes'\npool_size = '4'\n")
    with pytest.raises(ConfigError) as caught:
        plugin_settings(config, STORE, source="/etc/mqbroker.toml")
    assert str(caught.value).splitlines() == [
        "/etc/mqbroker.toml: plugins.store.pool_size: expected an integer, got '4' (str)",
        "/etc/mqbroker.toml: plugins.store.tls: expected true or false, got 'yes' (str)",
    ]


def test_plugin_settings_own_validator_is_reported_at_the_table(tmp_path: Path) -> None:
    """A plugin's own attrs validator fails with its own words, at the plugin's table."""
    config = with_plugins(tmp_path, "[plugins.store]\npool_size = 0\n")
    with pytest.raises(ConfigError) as caught:
        plugin_settings(config, STORE)
    assert str(caught.value) == "config.toml: plugins.store: 'pool_size' must be >= 1: 0"


def test_plugin_without_settings_type_takes_none(tmp_path: Path) -> None:
    """A plugin with no settings gets None, and refuses a table with keys in it."""
    assert plugin_settings(Config(), BARE) is None
    assert plugin_settings(with_plugins(tmp_path, "[plugins.bare]\n"), BARE) is None
    config = with_plugins(tmp_path, "[plugins.bare]\nsize = 1\n")
    with pytest.raises(ConfigError) as caught:
        plugin_settings(config, BARE)
    assert str(caught.value) == "config.toml: plugins.bare: the plugin takes no settings (size)"


def test_a_role_overrides_only_the_limits_it_sets(tmp_path: Path) -> None:
    """`[auth.roles.NAME.limits]` is read key by key: what it does not set stays unset (the
    role leaves it to [limits]), so that an override of one key cannot reset the others."""
    path = write(tmp_path, "[auth.roles.broadcaster.limits]\npublish_messages_per_second = 500\n"
                           "max_violations = 40\n[auth.roles.user]\npublish = ['#']\n")
    roles = load_config(path).auth.roles
    assert roles["broadcaster"].limits.overrides() == {"publish_messages_per_second": 500.0,
                                                       "max_violations": 40}
    assert roles["user"].limits.overrides() == {}


@pytest.mark.parametrize("prefix", ["", "a/+", "a/#", "$sys/x", "a//" + "b" * 70000])
def test_sessions_topic_prefix_must_be_plain_levels(tmp_path: Path, prefix: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[sessions]\ntopic_prefix = "{prefix}"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"sessions\.topic_prefix: expected topic levels"):
        load_config(path)
