"""The context a sync facade hands from node to node."""

from __future__ import annotations

from typing import Generic, TypeVar

from google.protobuf.message import Message

from orchestrator import tracing

__all__ = ["IDEMPOTENCY_KEY_HEADER", "Context", "idempotency_metadata"]

IDEMPOTENCY_KEY_HEADER = "x-idempotency-key"

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)


def idempotency_metadata(request_id: str, step: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for an upstream call made by `step` of saga `request_id`.

    The idempotency key is stable across retries and redeliveries of the same
    step, so an upstream that honours it applies the call once. With tracing
    on, the trace context rides along (`traceparent`).
    """
    metadata = (("x-request-id", request_id), (IDEMPOTENCY_KEY_HEADER, f"{request_id}:{step}"))
    trace_context = tracing.inject()
    return metadata + tuple(trace_context.items()) if trace_context else metadata


class Context(Generic[RequestT, ResponseT]):
    """The protobuf request and the response being built, shared by a sync facade's nodes.

    It replaces the Go original's `LoadPbReq`/`SetPbResp`: nodes read
    `ctx.request` and write `ctx.response` directly, typed.
    """

    __slots__ = ("facade", "request", "request_id", "response")

    def __init__(
        self, request_id: str, request: RequestT, response: ResponseT, facade: str = ""
    ) -> None:
        self.request_id = request_id
        self.request = request
        self.response = response
        self.facade = facade

    def upstream_metadata(self, step: str) -> tuple[tuple[str, str], ...]:
        """Metadata for an upstream call made by `step`: request id and idempotency key."""
        return idempotency_metadata(self.request_id, step)
