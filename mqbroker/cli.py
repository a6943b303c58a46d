"""The `mqbroker` command: serve, check-config, sessions (mqbroker.sessions_cli) and --version.

`main` returns the exit status (the console script passes it to `sys.exit`): 0 on success,
2 for a configuration the broker cannot use, printed on standard error without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

import attrs

from mqbroker import __version__, logs, sessions_cli
from mqbroker.config import (
    BUILT_IN_AUTH_MODES,
    Config,
    ConfigError,
    LogLevel,
    load_config,
    plugin_settings,
)
from mqbroker.plugins import PluginError, load_auth_plugin, load_plugin
from mqbroker.tls import server_context

#: The exit status for a configuration the broker cannot use: argparse's for a bad command line.
EXIT_CONFIG = 2

#: (flag, section, key): the flags `serve` lays over the configuration file.
_OVERRIDES = (
    ("--host", "server", "host"),
    ("--port", "server", "port"),
    ("--log-level", "log", "level"),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: `sys.argv[1:]`) and return the exit status."""
    args = parse_args(argv)
    if args.command == "sessions":
        return sessions_cli.run(args)
    try:
        if args.command == "check-config":
            return check_config(args.path)
        config = build_config(args)
        # Checked before start-up, so that a bad plugin name is a message, not a traceback.
        source = str(args.config or "built-in defaults")
        check_plugins(config, source=source)
        server_context(config.server, source=source)  # TLS files: said now, not per client
        return serve(config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_CONFIG


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line; argparse itself exits 2 on a malformed one."""
    return _parser().parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    """`serve`'s configuration: the --config file (or the defaults), then the flags over it."""
    config = load_config(args.config)
    for flag, section, key in _OVERRIDES:
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None:
            config = _override(config, flag, section, {key: value})
    return config


def check_config(path: Path) -> int:
    """Validate the file at `path` and the settings of the plugins it names; print the verdict."""
    source = str(path)
    config = load_config(path)
    check_plugins(config, source=source)
    server_context(config.server, source=source)
    print(f"ok: {source}")
    return 0


def serve(config: Config) -> int:
    """Run the broker until SIGINT or SIGTERM."""
    logs.configure(config.log)
    # Imported here so that check-config and --version need neither trio nor the server.
    import trio

    from mqbroker.daemon import run
    from mqbroker.server.listener import ListenError

    try:
        trio.run(run, config)
    except KeyboardInterrupt:
        # The daemon handles SIGINT once it runs; this is a ^C during start-up.
        return 130
    except BaseExceptionGroup as group:
        # A taken port is the operator's to fix, like a bad config: one line, no traceback.
        cannot_listen, rest = group.split(ListenError)
        if cannot_listen is None or rest is not None:
            raise
        for error in _leaves(cannot_listen):
            print(f"mqbroker: {error}", file=sys.stderr)
        return 2
    return 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions inside nested groups (each nursery on the way up wraps them once)."""
    return [leaf for error in group.exceptions
            for leaf in (_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])]


def _override(config: Config, flag: str, section: str, change: dict[str, object]) -> Config:
    """`config` with one flag's value in its section, validated like the file."""
    try:
        changed = attrs.evolve(getattr(config, section), **change)
    except ValueError as error:
        raise ConfigError(f"{flag}: {error}") from error
    return attrs.evolve(config, **{section: changed})


def check_plugins(config: Config, *, source: str) -> None:
    """Every plugin the configuration names loads, and every `[plugins.NAME]` table fits it.

    Raises ConfigError naming `source` and the key that names the plugin.
    """
    for key, name, provides in _named_plugins(config):
        try:
            plugin = load_auth_plugin(name) if key == "auth.mode" else load_plugin(name)
        except (PluginError, ImportError) as error:
            raise ConfigError(f"{source}: {key}: {error}") from error
        if provides and getattr(plugin, provides) is None:
            raise ConfigError(f"{source}: {key}: plugin {name!r} does not provide {provides}")
        plugin_settings(config, plugin, source=source)


def _named_plugins(config: Config) -> list[tuple[str, str, str]]:
    """(key, plugin name, the factory it must provide) for each plugin named, once each."""
    named = [
        ("history.plugin", config.history.plugin, "open_history"),
        ("fanout.plugin", config.fanout.plugin, "open_fanout"),
        ("sessions.plugin", config.sessions.plugin, "open_sessions"),
    ]
    if config.auth.mode not in BUILT_IN_AUTH_MODES:
        named.append(("auth.mode", config.auth.mode, "open_authenticator"))
    chosen = {name for _, name, _ in named}
    tables = [(f"plugins.{name}", name, "") for name in config.plugins if name not in chosen]
    return [*named, *tables]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqbroker", description="An MQTT-style topic pub/sub broker over WebSocket."
    )
    parser.add_argument("--version", action="version", version=f"mqbroker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    check = commands.add_parser(
        "check-config",
        help="validate a configuration file and exit",
        description="Validate a config.toml (and the settings of the plugins it names): "
        "prints 'ok: PATH' and exits 0, or prints what is wrong and exits 2.",
    )
    check.add_argument("path", type=Path, metavar="PATH")
    sessions_cli.add_parser(commands)
    return parser


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "serve",
        help="run the broker",
        description="Run the broker until SIGINT or SIGTERM. Without --config it runs on the "
        "built-in defaults (single instance, in-memory history and fan-out); the flags "
        "override the file.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="a config.toml (default: none, the built-in defaults; not ./config.toml)",
    )
    parser.add_argument("--host", metavar="H", help="[server] host: the address to listen on")
    parser.add_argument(
        "--port", type=int, metavar="N", help="[server] port: the port to listen on (0: any free)"
    )
    parser.add_argument(
        "--log-level", choices=get_args(LogLevel), help="[log] level: the least severe to log"
    )
