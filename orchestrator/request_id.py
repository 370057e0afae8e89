"""The request id: read from `x-request-id` metadata, or made when absent."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from orchestrator.errors import InvalidArgument

__all__ = [
    "MAX_REQUEST_ID_LENGTH",
    "REQUEST_ID_HEADER",
    "check_request_id",
    "new_request_id",
    "resolve_request_id",
]

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_LENGTH = 128


def new_request_id() -> str:
    """A fresh request id (a UUID4 in its canonical text form)."""
    return str(uuid.uuid4())


def check_request_id(request_id: str) -> str:
    """`request_id`, or InvalidArgument when no saga can carry it.

    At most 128 printable ASCII characters, and not only spaces: such an id
    would poison logs, message headers and idempotency keys.
    """
    if not request_id or request_id.isspace():
        raise InvalidArgument("the request id is empty or only white space")
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument(
            f"the request id is {len(request_id)} characters long; at most {MAX_REQUEST_ID_LENGTH}"
        )
    if not request_id.isascii() or not request_id.isprintable():
        raise InvalidArgument("the request id holds non-printable or non-ASCII characters")
    return request_id


def resolve_request_id(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The request id a caller sent in `x-request-id`, checked, or a new one when it sent none.

    Raises InvalidArgument (see `check_request_id`) for an id no saga can carry.
    """
    for key, value in metadata or ():
        if key != REQUEST_ID_HEADER:
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if not text:
            break
        try:
            return check_request_id(text)
        except InvalidArgument as exc:
            raise InvalidArgument(f"x-request-id: {exc}") from None
    return new_request_id()
