"""Settings dataclasses that describe themselves, so one loader can read any of them.

Each protocol keeps its knobs in a frozen dataclass with defaults. That dataclass is also its
configuration section: every field is a configuration key of the same name unless its
metadata says otherwise (:func:`config_key`), and ``validate()`` names the field it refuses
by raising :class:`SettingError`. The daemon's loader reads TOML and flags into these classes
and turns a ``SettingError`` into a message naming the key and the file; nothing here reads
a file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

__all__ = ["SettingError", "check_choice", "check_range", "config_key", "config_keys"]

_KEY = "callboard.config_key"


class SettingError(ValueError):
    """A setting a protocol cannot work with; ``name`` is the field, ``reason`` says why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def config_key(key: str | None) -> dict[str, Any]:
    """Field metadata: read the field from configuration key ``key`` (None: not configurable).

    For a field whose configuration name predates it, or one the configuration must not set
    (a secret, a value the daemon fills in from elsewhere).
    """
    return {_KEY: key}


def config_keys(cls: type[Any]) -> dict[str, str]:
    """Configuration key → field name, for every configurable field of a settings class."""
    keys: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        key = f.metadata.get(_KEY, f.name)
        if key is not None:
            keys[key] = f.name
    return keys


def check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise SettingError(name, f"{value} is out of range ({low}..{high})")


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    options = tuple(choices)
    if value not in options:
        raise SettingError(name, f"{value!r} is not one of {', '.join(options)}")
