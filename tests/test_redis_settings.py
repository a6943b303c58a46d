"""`[plugins.redis]`: validated by the config loader into RedisSettings, every key defaulted."""

from __future__ import annotations

from typing import Any

import pytest

from mqbroker.config import Config, ConfigError, plugin_settings
from mqbroker.plugins import load_plugin
from mqbroker_plugins.redis import RedisSettings


def settings(table: dict[str, Any]) -> Any:
    return plugin_settings(Config(plugins={"redis": table}), load_plugin("redis"))


def test_the_plugin_is_found_by_its_entry_point_name() -> None:
    """`plugin = "redis"` names this plugin, which offers both extension points."""
    plugin = load_plugin("redis")
    assert plugin.name == "redis" and plugin.settings_type is RedisSettings
    assert plugin.open_history is not None and plugin.open_fanout is not None


def test_an_empty_table_is_the_defaults() -> None:
    """Every key has a default: no table at all is a local Redis under the "mqb:" prefix."""
    assert settings({}) == RedisSettings()
    assert RedisSettings().url == "redis://127.0.0.1:6379/0"
    assert RedisSettings().key_prefix == "mqb:"


@pytest.mark.parametrize(
    "url", ["redis://h:1/2", "rediss://user:pw@h/0", "unix:///run/redis.sock?db=1"]
)
def test_the_three_url_schemes_are_accepted(url: str) -> None:
    """redis://, rediss:// (TLS) and unix:// are what redis-py connects to."""
    assert settings({"url": url, "publish_timeout": 2}).url == url


@pytest.mark.parametrize(
    ("table", "key", "expected"),
    [
        ({"url": "http://h:6379"}, "plugins.redis.url", "redis://, rediss:// or unix://"),
        ({"url": 6379}, "plugins.redis.url", "redis://, rediss:// or unix://"),
        ({"key_prefix": ""}, "plugins.redis.key_prefix", "non-empty key prefix"),
        ({"pool_size": 0}, "plugins.redis.pool_size", "1 or more"),
        ({"probe_interval": 0}, "plugins.redis.probe_interval", "greater than 0"),
        ({"publish_timeout": -1}, "plugins.redis.publish_timeout", "0 or more"),
        ({"socket_timeout": "5"}, "plugins.redis.socket_timeout", "seconds"),
        ({"probe_intervall": 1}, "plugins.redis.probe_intervall", "probe_interval"),
    ],
)
def test_a_bad_table_names_the_key_and_what_it_expects(
    table: dict[str, Any], key: str, expected: str
) -> None:
    """A wrong value or an unknown key is a ConfigError naming the key path and the rule."""
    with pytest.raises(ConfigError) as raised:
        settings(table)
    assert key in str(raised.value)
    assert expected in str(raised.value)
