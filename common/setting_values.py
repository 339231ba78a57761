"""Values of settings as TOML and the CLI give them, turned into typed fields (``common.settings``' parsing)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, get_args, get_type_hints


def legacy_dp(config: Mapping[str, Any], problems: list[str]) -> Mapping[str, Any]:
    """Accept the older ``dp = true|false`` key: true is dp-mode dp, false is dp-mode off (unless dp-mode names
    the other non-private mode, clip-only)."""
    if "dp" not in config:
        return config
    out = {k: v for k, v in config.items() if k != "dp"}
    try:
        private = coerce("dp", bool, config["dp"])
    except ValueError as err:
        problems.append(str(err))
        return out
    if "dp-mode" not in out:
        out["dp-mode"] = "dp" if private else "off"
    elif private != (out["dp-mode"] == "dp"):
        problems.append(f"dp={str(private).lower()} contradicts dp-mode={out['dp-mode']!r}; give dp-mode only")
    return out


def key_of(name: str) -> str:
    return name.replace("_", "-")


def coerce(name: str, kind: Any, value: Any) -> Any:
    """Convert a TOML/CLI value to the field's type; raise ValueError with the reason."""
    if get_args(kind) and all(isinstance(a, str) for a in get_args(kind)):
        if value not in get_args(kind):
            raise ValueError(f"{key_of(name)} must be one of {', '.join(get_args(kind))}, got {value!r}")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key_of(name)} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{key_of(name)} must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key_of(name)} must be an integer, got {value!r}") from None
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key_of(name)} must be a number, got {value!r}") from None
    return str(value)


def build_section(section: type, config: Mapping[str, Any], problems: list[str]) -> Any:
    hints = get_type_hints(section)
    kwargs = {}
    for f in dataclasses.fields(section):
        key = key_of(f.name)
        if key in config:
            try:
                kwargs[f.name] = coerce(f.name, hints[f.name], config[key])
            except ValueError as err:
                problems.append(str(err))
    return section(**kwargs)
