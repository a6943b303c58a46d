"""Registering a plugin as a real installed distribution would: a `*.dist-info` folder with an
`entry_points.txt`, found by importlib.metadata on sys.path (or a subprocess's PYTHONPATH)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mqbroker.plugins import ENTRY_POINT_GROUP


def register_plugin(directory: Path, name: str, target: str) -> Path:
    """Make `directory` hold a distribution publishing `name = target` in the plugins group;
    put `directory` on sys.path (or PYTHONPATH) for the broker to find it. Returns it."""
    dist_info = directory / f"mqbroker_test_{name}-0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: mqbroker-test-{name}\nVersion: 0\n", encoding="utf-8")
    (dist_info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n{name} = {target}\n", encoding="utf-8")
    return directory


def install_plugin(monkeypatch: pytest.MonkeyPatch, directory: Path, name: str,
                   target: str) -> None:
    """Register `name = target` in `directory` and put it on sys.path for this test."""
    monkeypatch.syspath_prepend(str(register_plugin(directory, name, target)))
