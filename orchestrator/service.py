"""A gRPC service the orchestrator's server serves: its name, servicer and registration.

Registering through `GrpcService.register` also makes a request that cannot be
decoded an INVALID_ARGUMENT naming the message and the request id, where gRPC
itself would answer UNKNOWN ("Unexpected DecodeError").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from orchestrator.request_id import REQUEST_ID_HEADER

__all__ = ["GrpcService"]


@dataclass(frozen=True, slots=True)
class GrpcService:
    """A servicer and how to add it: `GrpcService("pb.BookingService", add_..._to_server, obj)`."""

    name: str
    """The service's full name, for reflection and health."""
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: object

    def register(self, server: grpc.aio.Server) -> None:
        """Add the servicer to `server`, each method refusing an undecodable request."""
        self.add_to_server(self.servicer, _Guarded(server))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """What a request that could not be decoded is handed to its method as."""

    message: str
    error: str


class _Guarded:
    """The server as generated `add_*_to_server` code sees it: method handlers go in guarded.

    Generated code calls only these two methods of the server it is given.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(
        self, handlers: Iterable[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self._server.add_generic_rpc_handlers(tuple(_GuardedGeneric(h) for h in handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        guarded = {method: _guarded(handler) for method, handler in handlers.items()}
        self._server.add_registered_method_handlers(service, guarded)  # type: ignore[attr-defined]


class _GuardedGeneric(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(self, handler: grpc.GenericRpcHandler[Any, Any]) -> None:
        self._handler = handler

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        found = self._handler.service(handler_call_details)
        return None if found is None else _guarded(found)


def _guarded(handler: Any) -> Any:
    """`handler` with a deserializer that never raises, and a method that refuses what it
    could not decode (unary requests only: a stream's messages are the method's to read)."""
    deserialize = handler.request_deserializer
    if deserialize is None or handler.request_streaming:
        return handler
    message = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = getattr(message, "full_name", "request")

    def lenient(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:
            return _Undecodable(name, f"{type(exc).__name__}: {exc}")

    if handler.response_streaming:
        stream = handler.unary_stream

        async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, _Undecodable):
                await _refuse(request, context)
            async for response in stream(request, context):
                yield response

        return handler._replace(request_deserializer=lenient, unary_stream=streaming)
    unary = handler.unary_unary

    async def single(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, _Undecodable):
            await _refuse(request, context)
        return await unary(request, context)

    return handler._replace(request_deserializer=lenient, unary_unary=single)


async def _refuse(request: _Undecodable, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    request_id = next(
        (
            value
            for key, value in context.invocation_metadata() or ()
            if key == REQUEST_ID_HEADER and isinstance(value, str) and value.isprintable()
        ),
        "",
    )
    where = f" (request_id={request_id[:128]})" if request_id else ""
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request is not a valid {request.message}: {request.error}{where}",
    )
