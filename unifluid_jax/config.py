"""Config validation: turns nonsense into one clear error before anything compiles or writes.

Each component owns the checks for its own section (`validate_config(section, path)` next to the module);
`validate` here walks the whole config and reports the first problem with its dotted path and a fix.
"""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value is invalid. The message names the field (dotted path), the value and how to fix it."""


def check(ok: bool, path: str, message: str) -> None:
    """Raises ConfigError(`config.<path>: <message>`) unless `ok`."""
    if not ok:
        raise ConfigError(f"config.{path}: {message}")


def check_positive(section: Any, path: str, *fields: str, allow_zero: bool = False) -> None:
    for f in fields:
        v = section[f]
        ok = v >= 0 if allow_zero else v > 0
        check(ok, f"{path}.{f}", f"must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")


def check_choice(value: Any, path: str, choices) -> None:
    check(value in choices, path, f"unknown value {value!r}; choose one of {sorted(choices)}")
