"""Plugins: what a plugin provides, and how the broker finds one by name.

Every plugin, built-in or third-party, is an object of type `Plugin` published in the
`mqbroker.plugins` entry-point group; `[history] plugin = "NAME"`, `[fanout] plugin = "NAME"`,
`[sessions] plugin = "NAME"` and `[auth] mode = "NAME"` (any name but the built-in modes) in
config.toml pick one by its entry-point name, and `[plugins.NAME]` holds its settings.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from importlib.metadata import entry_points
from typing import Any

from attrs import frozen

from mqbroker.auth import Authenticator
from mqbroker.config import BUILT_IN_AUTH_MODES
from mqbroker.fanout import Fanout, FanoutContext
from mqbroker.history import HistoryStore
from mqbroker.sessions import PresenceStore, SessionStore

ENTRY_POINT_GROUP = "mqbroker.plugins"

#: (plugin settings, [history] settings) -> an async context manager owning the store.
HistoryFactory = Callable[[Any, Any], AbstractAsyncContextManager[HistoryStore]]
#: (plugin settings, context) -> an async context manager owning the fan-out.
FanoutFactory = Callable[[Any, FanoutContext], AbstractAsyncContextManager[Fanout]]
#: (plugin settings) -> an async context manager owning the authenticator (and whatever it
#: needs open while the broker runs: an HTTP client, a key cache...).
AuthenticatorFactory = Callable[[Any], AbstractAsyncContextManager[Authenticator]]
#: (plugin settings, [sessions] settings) -> an async context manager owning the store.
SessionsFactory = Callable[[Any, Any], AbstractAsyncContextManager[SessionStore]]
PresenceFactory = Callable[[Any, Any], AbstractAsyncContextManager[PresenceStore]]


@frozen(kw_only=True)
class Plugin:
    """What a plugin offers. Any of the factories may be None."""

    name: str
    #: An attrs class the `[plugins.NAME]` table is validated into; every field needs a default.
    settings_type: type[Any] | None = None
    open_history: HistoryFactory | None = None
    open_fanout: FanoutFactory | None = None
    open_authenticator: AuthenticatorFactory | None = None
    #: The session registry's stores ([sessions] plugin = "NAME").
    open_sessions: SessionsFactory | None = None
    open_presence: PresenceFactory | None = None


class PluginError(Exception):
    """A plugin named in the configuration is missing or does not provide what is asked."""


def available_plugins() -> dict[str, Any]:
    """Entry-point name -> entry point, for every installed plugin."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_plugin(name: str) -> Plugin:
    """Import the plugin registered under `name`; raises PluginError naming what is installed."""
    found = available_plugins()
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise PluginError(f"no plugin named {name!r} is installed (installed: {known})")
    try:
        plugin = found[name].load()
    except ModuleNotFoundError as error:
        raise PluginError(_missing_module(found[name], name, error)) from error
    if not isinstance(plugin, Plugin):
        raise PluginError(f"entry point {name!r} is not an mqbroker.plugins.Plugin")
    return plugin


def load_auth_plugin(mode: str) -> Plugin:
    """The plugin an `[auth] mode` that is not built in names; PluginError (naming the
    built-in modes and the installed plugins) when there is none, or it has no authenticator."""
    try:
        plugin = load_plugin(mode)
    except PluginError as error:
        raise PluginError(f"{error}; the built-in modes are "
                          f"{', '.join(BUILT_IN_AUTH_MODES)}") from error
    if plugin.open_authenticator is None:
        raise PluginError(f"plugin {mode!r} provides no authenticator")
    return plugin


def _missing_module(entry_point: Any, name: str, error: ModuleNotFoundError) -> str:
    """What to do about a plugin whose dependency is missing. The built-in plugins' optional
    dependencies are the package's extras of the same name (`mqbroker[redis]`)."""
    message = f"plugin {name!r} cannot be imported: {error}"
    if str(entry_point.value).startswith("mqbroker_plugins."):
        message += f"; install it with: pip install 'mqbroker[{name}]'"
    return message
