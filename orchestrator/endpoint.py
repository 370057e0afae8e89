"""`@endpoint`: the glue between a gRPC servicer method and the facades."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from orchestrator import tracing
from orchestrator.errors import ResourceExhausted, SagaError, SagaFailed, classify
from orchestrator.request_id import REQUEST_ID_HEADER, resolve_request_id
from orchestrator.retry import caller_deadline
from orchestrator.workers import WORKER_METADATA, current_worker

__all__ = ["RETRY_PUSHBACK_TRAILER", "endpoint"]

log = logging.getLogger("orchestrator.endpoint")

ServicerT = TypeVar("ServicerT")
RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

RETRY_PUSHBACK_TRAILER = "grpc-retry-pushback-ms"
"""Trailer of a RESOURCE_EXHAUSTED answer: milliseconds to wait before retrying (gRPC's own
retry policy honours it)."""

EndpointMethod = Callable[
    [ServicerT, RequestT, grpc.aio.ServicerContext[Any, Any], str], Awaitable[ResponseT]
]


def endpoint(
    method: EndpointMethod[ServicerT, RequestT, ResponseT],
) -> Callable[[ServicerT, RequestT, grpc.aio.ServicerContext[Any, Any]], Awaitable[ResponseT]]:
    """Wrap `async def method(self, request, context, request_id)` as a gRPC servicer method.

    It resolves the request id (the caller's `x-request-id`, validated, or a
    new UUID, which it returns as `x-request-id` response metadata), and turns every
    failure into a status that fits its cause, with the request id in the
    message: SagaFailed and SagaError keep their code, anything else is INTERNAL.
    A call refused by admission (RESOURCE_EXHAUSTED) carries how long to wait
    before retrying in the `grpc-retry-pushback-ms` trailer. Under a supervisor,
    every answer names the worker that gave it (`x-orchestrator-worker`).
    The caller's gRPC deadline becomes the sync facades' budget (`caller_deadline`).
    With tracing on, a W3C `traceparent` in the caller's metadata becomes the
    parent of the saga's spans (`tracing.incoming`).
    """

    worker = current_worker()
    # A supervised worker names itself in every answer's trailers: which one served it.
    named: tuple[tuple[str, str], ...] = () if worker is None else ((WORKER_METADATA, str(worker)),)

    @functools.wraps(method)
    async def wrapper(
        self: ServicerT, request: RequestT, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ResponseT:
        metadata = context.invocation_metadata()
        try:
            request_id = resolve_request_id(metadata)
        except SagaError as exc:
            await context.abort(exc.code, str(exc))
        if not any(key == REQUEST_ID_HEADER and value for key, value in metadata or ()):
            # Only a made id is news to the caller. Echoing a sent one would cost
            # a separate send: grpc.aio cannot queue headers to go with the reply.
            await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
        if named:
            context.set_trailing_metadata(named)
        remaining = context.time_remaining()
        if remaining is not None:
            # The facades split what is left of the caller's deadline among their steps.
            caller_deadline.set(asyncio.get_running_loop().time() + remaining)
        try:
            with tracing.incoming(metadata):
                return await method(self, request, context, request_id)
        except SagaFailed as exc:
            await context.abort(exc.code, str(exc), trailing_metadata=named)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            failure = classify(exc)
            if failure.bug:
                log.exception("endpoint failed", extra={"request_id": request_id})
            trailers = named
            if isinstance(exc, ResourceExhausted):
                trailers += ((RETRY_PUSHBACK_TRAILER, str(round(exc.retry_after * 1000))),)
            await context.abort(
                failure.code,
                f"{failure.reason} (request_id={request_id})",
                trailing_metadata=trailers,
            )

    return wrapper
