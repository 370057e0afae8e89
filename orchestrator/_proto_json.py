"""A protobuf message as the journal records it: protobuf's JSON mapping, keys sorted.

`message_json(m)` is exactly `json.dumps(MessageToDict(m,
preserving_proto_field_name=True), sort_keys=True)`. A sync saga writes its request at
its begin and its response at every step's end, and `MessageToDict` walks a message in
Python, descriptor by descriptor. For a message of plain scalar fields (strings,
booleans, integers, not repeated, no nested message, enum, bytes or float, no
extensions, not a well-known type: a typical request or response) the mapping is simple
enough to take from `ListFields()` directly, which lists exactly the fields
`MessageToDict` prints: 64-bit integers become strings, the other scalars stay as they
are. Any other message goes through `MessageToDict`. Which path a message type takes is
decided once per type.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

__all__ = ["message_dict", "message_json"]

_AS_IS: Final = frozenset(
    {
        FieldDescriptor.TYPE_STRING,
        FieldDescriptor.TYPE_BOOL,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_SFIXED32,
    }
)
"""Scalars whose JSON value is the Python value."""
_AS_STRING: Final = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
"""Scalars protobuf's JSON mapping writes as strings (64-bit integers)."""

_plain: dict[Any, bool] = {}
"""Whether each message type seen has only plain scalar fields."""


def _is_plain(descriptor: Any) -> bool:
    plain = _plain.get(descriptor)
    if plain is None:
        plain = (
            # Well-known types have JSON forms of their own (a Timestamp is a string);
            # extensions are printed by their full names.
            not descriptor.full_name.startswith("google.protobuf.")
            and not descriptor.extension_ranges
            and all(
                not field.is_repeated and (field.type in _AS_IS or field.type in _AS_STRING)
                for field in descriptor.fields
            )
        )
        _plain[descriptor] = plain
    return plain


def message_dict(message: Message) -> dict[str, Any]:
    """`MessageToDict(message, preserving_proto_field_name=True)`, faster for plain messages."""
    if not _is_plain(message.DESCRIPTOR):
        return MessageToDict(message, preserving_proto_field_name=True)
    return {
        field.name: str(value) if field.type in _AS_STRING else value
        for field, value in message.ListFields()
    }


_dumps: Final[Callable[[dict[str, Any]], str]] = json.JSONEncoder(sort_keys=True).encode


def message_json(message: Message) -> str:
    """The message as JSON, keys sorted: what the journal records of a protobuf message."""
    return _dumps(message_dict(message))
