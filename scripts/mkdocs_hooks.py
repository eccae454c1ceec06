"""MkDocs hooks: reference tables rendered from the pydantic models, so the docs have one source of truth.

A page asks for a table with an HTML comment on a line of its own:

    <!-- settings-reference -->                        every key of the YAML config (server/settings.py)
    <!-- schema-table: server.protocol.schemas:GenerateRequest -->  the fields of one pydantic model

Each row is a field's name, type, default and description, read from the model at build time.
"""

from __future__ import annotations

import importlib
import re
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

_MARKER = re.compile(r"^<!-- (settings-reference|schema-table: ([\w.]+):(\w+)) -->$", re.MULTILINE)


def type_name(annotation: Any) -> str:
    """A short, readable type: `int | None`, `"auto" | "cpu"`, `list[str]`, `RoutingUpdate`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a).lower() for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "-"
    if field.default is PydanticUndefined:
        return "required"
    value = field.default
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|").replace("[", "\\[")


def field_rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        rows.append(
            f"| `{prefix}{name}` | `{type_name(field.annotation)}` | {_cell(default_text(field))} "
            f"| {_cell(field.description or '')} |"
        )
    return rows


def schema_table(model: type[BaseModel]) -> str:
    return "\n".join(["| field | type | default | meaning |", "|---|---|---|---|", *field_rows(model)])


def settings_reference() -> str:
    """One table per section of the YAML config, in the order of `Settings`."""
    from server.settings import Settings

    parts = []
    for section, field in Settings.model_fields.items():
        if field.exclude:
            continue
        model = field.annotation
        if typing.get_origin(model) is list:  # a list of entries (models:): the table of one entry
            (model,) = typing.get_args(model)
            section = f"{section}[]"
        parts += [f"### `{section}`", ""]
        if model.__doc__ and model.__doc__ != BaseModel.__doc__:
            parts += [" ".join(model.__doc__.split()), ""]
        parts += ["| key | type | default | meaning |", "|---|---|---|---|", *field_rows(model, f"{section}."), ""]
    return "\n".join(parts)


def render_markers(markdown: str) -> str:
    def replace(match: re.Match) -> str:
        if match.group(1) == "settings-reference":
            return settings_reference()
        model = getattr(importlib.import_module(match.group(2)), match.group(3))
        return schema_table(model)

    return _MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs' hook signature)
    return render_markers(markdown)
