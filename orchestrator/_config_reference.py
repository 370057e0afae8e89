"""The configuration reference in Markdown, generated from the settings models.

Each key's type, bounds, default and description (its attribute docstring)
come from the pydantic models themselves, so the README's table cannot drift
from what `load_settings` accepts (`tools/config_reference.py` writes it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

__all__ = ["markdown_reference"]


def markdown_reference(model: type[BaseModel], environment: Mapping[str, str]) -> str:
    """A Markdown table of every key of `model`, then one of the `environment` variables
    (name: what it does)."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    rows += _reference_rows(model, "")
    rows += ["", "| environment variable | effect |", "|---|---|"]
    rows += [f"| `{name}` | {effect} |" for name, effect in environment.items()]
    return "\n".join(rows) + "\n"


def _reference_rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        description = " ".join((field.description or "").split()).replace("|", "\\|")
        nested = _nested_model(field.annotation)
        if nested is not None:
            if get_origin(field.annotation) is dict:
                rows.append(f"| `{key}` | mapping | `{{}}` | {description} |")
                rows += _reference_rows(nested, f"{key}.<name>.")
            elif get_origin(field.annotation) is list:
                rows.append(f"| `{key}` | list | `[]` | {description} |")
                rows += _reference_rows(nested, f"{key}[].")
            else:
                optional = " (optional)" if _allows_none(field.annotation) else ""
                rows.append(f"| `{key}` | section{optional} | | {description} |")
                rows += _reference_rows(nested, f"{key}.")
            continue
        bounds = "".join(
            f", {symbol} {getattr(meta, attr)}"
            for meta in field.metadata
            for attr, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))
            if getattr(meta, attr, None) is not None
        )
        rows.append(
            f"| `{key}` | {_type_name(field.annotation)}{bounds} | {_default_of(field)} "
            f"| {description} |"
        )
    return rows


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):
        found = _nested_model(argument)
        if found is not None:
            return found
    return None


def _allows_none(annotation: Any) -> bool:
    return type(None) in get_args(annotation)


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Annotated:
        return _type_name(get_args(annotation)[0])
    if _allows_none(annotation):
        (inner,) = (arg for arg in get_args(annotation) if arg is not type(None))
        return f"{_type_name(inner)} (optional)"
    if get_origin(annotation) is Literal:
        return " \\| ".join(f"`{value}`" for value in get_args(annotation))
    if annotation is SecretStr:
        return "string (secret)"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default_of(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        value = str(value).lower()
    return f"`{value}`" if value not in ("", None) else ('`""`' if value == "" else "")
