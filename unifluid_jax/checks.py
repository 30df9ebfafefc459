"""Config-check helpers: a leaf module (imports nothing of the package) so that config.py, which calls every
component's `validate_config`, and the components, which use these helpers, do not import each other."""
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


def from_presets(cls, presets: dict, section, key: str, kind: str):
    """A frozen-dataclass config from a section: an optional named preset (`section[key]`) plus field
    overrides; list values become tuples (ConfigDict stores tuples as lists)."""
    d = dict(section.to_dict() if hasattr(section, "to_dict") else section or {})
    name = d.pop(key, None)
    if name and name not in presets:
        raise ValueError(f"unknown {kind} {key} {name!r}; choose one of {sorted(presets)}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**{**(presets[name] if name else {}), **d})


def check_choice(value: Any, path: str, choices) -> None:
    check(value in choices, path, f"unknown value {value!r}; choose one of {sorted(choices)}")


def check_tree_shapes(got: dict, want: dict, what: str, owner: str, error: type = ValueError) -> None:
    """`got` / `want`: flattened trees {path tuple: array-like}. Raises `error` at the first tensor that is
    missing, mis-shaped or extra, naming it and both shapes ('the <owner> expects ...')."""
    import numpy as np
    for k, a in want.items():
        name = "/".join(k)
        if k not in got:
            raise error(f"{what}: no tensor {name} (the {owner} expects shape {tuple(np.shape(a))})")
        if tuple(np.shape(got[k])) != tuple(np.shape(a)):
            raise error(f"{what}: tensor {name} has shape {tuple(np.shape(got[k]))}, the {owner} expects "
                        f"{tuple(np.shape(a))}")
    extra = sorted(set(got) - set(want))
    if extra:
        raise error(f"{what}: tensor {'/'.join(extra[0])} {tuple(np.shape(got[extra[0]]))} is not in the "
                    f"{owner}'s params (a bigger model?)")
