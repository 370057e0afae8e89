"""The request id: the caller's x-request-id, validated, or a new UUID."""

from __future__ import annotations

import uuid

import pytest

from orchestrator import InvalidArgument
from orchestrator.request_id import resolve_request_id


def test_the_callers_request_id_is_used() -> None:
    assert resolve_request_id([("x-request-id", "abc-123")]) == "abc-123"


def test_a_missing_request_id_becomes_a_uuid() -> None:
    rid = resolve_request_id([("other", "x")])
    assert str(uuid.UUID(rid)) == rid


def test_an_empty_request_id_becomes_a_uuid() -> None:
    assert uuid.UUID(resolve_request_id([("x-request-id", "")]))


def test_128_characters_are_allowed() -> None:
    assert resolve_request_id([("x-request-id", "a" * 128)]) == "a" * 128


def test_a_request_id_over_128_characters_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="129 characters long; at most 128"):
        resolve_request_id([("x-request-id", "a" * 129)])


@pytest.mark.parametrize("bad", ["a\tb", "a\x00b", "caf\u00e9"])
def test_non_printable_characters_are_invalid(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="non-printable"):
        resolve_request_id([("x-request-id", bad)])
