"""The `mqbroker` command line: --version, check-config, and how serve builds its Config."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mqbroker import __version__
from mqbroker.cli import build_config, check_plugins, main, parse_args
from mqbroker.config import (
    Config,
    ConfigError,
    FanoutConfig,
    HistoryConfig,
    LogConfig,
    ServerConfig,
)

REPO_CONFIG = Path(__file__).resolve().parents[1] / "config.toml"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m mqbroker ARGS`, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "mqbroker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write(directory: Path, text: str) -> Path:
    path = directory / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- As a process ----------------------------------------------------------------------------


def test_version() -> None:
    """--version prints the package version and exits 0."""
    done = run("--version")
    assert (done.returncode, done.stdout) == (0, f"mqbroker {__version__}\n")


def test_check_config_ok() -> None:
    """check-config on a good file prints "ok: PATH" and exits 0."""
    done = run("check-config", str(REPO_CONFIG))
    assert (done.returncode, done.stdout, done.stderr) == (0, f"ok: {REPO_CONFIG}\n", "")


def test_check_config_bad_value(tmp_path: Path) -> None:
    """check-config on a bad file prints the error on stderr, no traceback, and exits 2."""
    path = write(tmp_path, "[server]\nport = 'abc'\n")
    done = run("check-config", str(path))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"{path}: server.port: expected an integer from 0 to 65535, got 'abc' (str)\n"
    )


def test_check_config_missing_file(tmp_path: Path) -> None:
    """check-config on a missing file says so and exits 2."""
    path = tmp_path / "nowhere.toml"
    done = run("check-config", str(path))
    assert done.returncode == 2
    assert done.stderr == f"{path}: cannot read the file: No such file or directory\n"


def test_check_config_syntax_error(tmp_path: Path) -> None:
    """check-config on a file that is not TOML names the position and exits 2."""
    path = write(tmp_path, "[server\n")
    done = run("check-config", str(path))
    assert done.returncode == 2
    assert done.stderr.startswith(f"{path}: invalid TOML: ")
    assert "Traceback" not in done.stderr


def test_console_script_returns_main_status(tmp_path: Path) -> None:
    """The installed `mqbroker` script exits with main()'s status."""
    script = shutil.which("mqbroker", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.fail("no `mqbroker` script next to the interpreter: pip install -e '.[test]'")
    bad = subprocess.run(
        [script, "check-config", str(tmp_path / "nowhere.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    good = subprocess.run(
        [script, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (good.returncode, good.stdout) == (0, f"mqbroker {__version__}\n")


@pytest.mark.parametrize(("table", "shown"), [
    ("url = 'http://alice:s3cret@10.0.0.1:6379/0'", "got 'http://alice:***@10.0.0.1:6379/0'"),
    ("shards = ['redis://:s3cret@10.0.0.2/0', 'redis://:s3cret@10.0.0.2/0']",
     "got ['redis://:***@10.0.0.2/0', 'redis://:***@10.0.0.2/0']"),
])
def test_check_config_does_not_echo_a_url_password(tmp_path: Path, table: str, shown: str) -> None:
    """A bad Redis URL is named in the error with its password masked, never echoed."""
    path = write(tmp_path, f"[fanout]\nplugin = 'redis'\n[plugins.redis]\n{table}\n")
    done = run("check-config", str(path))
    assert (done.returncode, done.stdout) == (2, "")
    assert "s3cret" not in done.stderr
    assert shown in done.stderr


# --- In process ------------------------------------------------------------------------------


def test_check_config_unknown_plugin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config loads the plugins the file names: a missing one is a config error."""
    path = write(tmp_path, "[fanout]\nplugin = 'nope'\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: fanout.plugin: no plugin named 'nope' is installed")


def test_check_config_table_of_unknown_plugin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A [plugins.NAME] table for a plugin that is not installed is refused (a typo, likely)."""
    path = write(tmp_path, "[plugins.memroy]\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: plugins.memroy: no plugin named 'memroy' is installed")


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a command, argparse prints the usage and exits 2."""
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2
    assert "usage: mqbroker" in capsys.readouterr().err


def test_serve_help_says_it_uses_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """serve --help says that without --config it runs on the built-in defaults."""
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "built-in defaults" in " ".join(capsys.readouterr().out.split())


def test_serve_without_config_builds_the_defaults() -> None:
    """serve with no flags runs on Config() (not on any config.toml nearby)."""
    assert build_config(parse_args(["serve"])) == Config()


def test_serve_reads_the_config_file(tmp_path: Path) -> None:
    """serve --config PATH loads that file."""
    path = write(tmp_path, "[server]\nport = 9000\n[log]\nformat = 'json'\n")
    config = build_config(parse_args(["serve", "--config", str(path)]))
    assert config == Config(server=ServerConfig(port=9000), log=LogConfig(format="json"))


def test_serve_flags_override_the_file(tmp_path: Path) -> None:
    """--host, --port and --log-level replace the file's values; the rest stays."""
    path = write(tmp_path, "[server]\nhost = '10.0.0.1'\nport = 9000\nmax_subscriptions = 5\n")
    args = ["serve", "--config", str(path), "--host", "::", "--port", "0", "--log-level", "debug"]
    assert build_config(parse_args(args)) == Config(
        server=ServerConfig(host="::", port=0, max_subscriptions=5),
        log=LogConfig(level="debug"),
    )


def test_serve_flag_out_of_range_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A flag value is validated like the file's, named by its flag; main exits 2."""
    with pytest.raises(ConfigError, match=r"^--port: expected an integer from 0 to 65535, got"):
        build_config(parse_args(["serve", "--port", "70000"]))
    assert main(["serve", "--host", ""]) == 2
    assert capsys.readouterr().err == "--host: expected a host name or IP address, got '' (str)\n"


def test_serve_bad_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """serve with a bad --config prints the error and exits 2 before starting anything."""
    path = write(tmp_path, "[log]\nlevel = 'loud'\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"{path}: log.level: expected one of ")


def test_serve_unknown_log_level_is_a_usage_error() -> None:
    """--log-level takes only the levels the config accepts."""
    with pytest.raises(SystemExit) as caught:
        parse_args(["serve", "--log-level", "loud"])
    assert caught.value.code == 2


def test_a_missing_plugin_dependency_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With only the base install (no redis-py), check-config names the extra to install."""
    monkeypatch.setitem(sys.modules, "redis", None)  # importing it now fails, as if absent
    for module in [m for m in sys.modules if m.startswith("mqbroker_plugins.redis")]:
        monkeypatch.delitem(sys.modules, module)
    config = Config(history=HistoryConfig(plugin="redis"), fanout=FanoutConfig(plugin="redis"))
    with pytest.raises(ConfigError) as raised:
        check_plugins(config, source="x.toml")
    assert str(raised.value).startswith("x.toml: history.plugin: plugin 'redis' cannot be imported")
    assert str(raised.value).endswith("pip install 'mqbroker[redis]'")


def test_unusable_tls_files_are_a_config_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config and serve read the TLS files, and name the key, before starting anything."""
    missing = tmp_path / "absent.pem"
    path = write(tmp_path, f"[server]\ntls_cert = '{missing}'\ntls_key = '{missing}'\n")
    expected = f"{path}: server.tls_cert: cannot read {str(missing)!r}: No such file or directory\n"
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == expected
    assert main(["serve", "--config", str(path)]) == 2
    assert capsys.readouterr().err == expected
