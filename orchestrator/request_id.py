"""The request id: read from `x-request-id` metadata, or made when absent."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from orchestrator.errors import InvalidArgument

__all__ = ["MAX_REQUEST_ID_LENGTH", "REQUEST_ID_HEADER", "new_request_id", "resolve_request_id"]

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_LENGTH = 128


def new_request_id() -> str:
    """A fresh request id (a UUID4 in its canonical text form)."""
    return str(uuid.uuid4())


def resolve_request_id(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The request id a caller sent, validated, or a new one when it sent none.

    Raises InvalidArgument when the id is longer than 128 characters or holds
    non-printable characters: such an id would poison logs and message headers.
    """
    for key, value in metadata or ():
        if key != REQUEST_ID_HEADER:
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if not text:
            break
        if len(text) > MAX_REQUEST_ID_LENGTH:
            raise InvalidArgument(
                f"x-request-id is {len(text)} characters long; at most {MAX_REQUEST_ID_LENGTH}"
            )
        if not text.isprintable() or not text.isascii():
            raise InvalidArgument("x-request-id holds non-printable characters")
        return text
    return new_request_id()
