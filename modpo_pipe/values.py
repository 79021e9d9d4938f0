"""A setting's value as TOML or a flag gives it, checked and converted to the field's type; and back to TOML."""

from __future__ import annotations

import contextlib
import math
import typing
from typing import Any

from modpo_pipe.errors import ModpoError


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:  # list[str].__name__ is just "list"
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one TOML or flag value to the field's type; `where` names the key for the error."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            if not math.isfinite(number):
                raise ModpoError(f"{where} must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            # repeated flags arrive as a list, each item possibly comma-separated
            return [part.strip() for item in value for part in item.split(",") if part.strip()]
    elif origin is dict:
        value_type = typing.get_args(tp)[1]
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            value = _parse_pairs(value, where)
        if isinstance(value, dict):
            return {str(k): coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    raise ModpoError(f"{where} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _parse_pairs(value: str | list[str], where: str) -> dict[str, str]:
    """`a=1,b=2` or a list of `a=x` items (repeated flags) into a dict."""
    items = value if isinstance(value, list) else [value]
    pairs: dict[str, str] = {}
    for item in items:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            name, sep, val = part.partition("=")
            if not sep or not name.strip():
                raise ModpoError(f"{where}: expected NAME=VALUE, got {part!r}")
            if name.strip() in pairs:
                raise ModpoError(f"{where}: {name.strip()!r} given twice")
            pairs[name.strip()] = val.strip()
    return pairs


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)
