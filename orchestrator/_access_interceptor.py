"""The grpc.aio server interceptor that enforces `AccessPolicy` on SagaService and SagaAdmin.

Each protected method's handler is wrapped: before it runs, the call is
authenticated and its role checked (UNAUTHENTICATED or PERMISSION_DENIED
otherwise), and it then runs inside `bound_principal`. A protected method this
server does not implement is refused the same way before it answers
UNIMPLEMENTED, so an unauthenticated caller learns nothing of what is served.
Every other service (health, reflection, the application's) passes untouched.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from orchestrator._access_policy import AccessPolicy, Refusal, required_role
from orchestrator.access import Principal, bound_principal

__all__ = ["AccessInterceptor"]

log = logging.getLogger("orchestrator.access")

if TYPE_CHECKING:  # generic in the stubs only
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class AccessInterceptor(_Interceptor):
    """Authenticates and authorizes calls to the orchestrator's own services."""

    def __init__(self, policy: AccessPolicy) -> None:
        self._policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        """The method's handler, wrapped when the method is a protected one."""
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if required_role(method) is None:
            return handler  # type: ignore[return-value]  # None: gRPC answers UNIMPLEMENTED
        if handler is None:
            return grpc.unary_unary_rpc_method_handler(self._guard_unary(method, _unimplemented))
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._guard_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._guard_stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # Neither proto service has client-streaming methods; refuse rather than run unchecked.
        return grpc.unary_unary_rpc_method_handler(self._guard_unary(method, _unimplemented))

    def _guard_unary(
        self, method: str, behavior: Callable[..., Any]
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            principal = await self._admit(method, context)
            with bound_principal(principal):
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result

        return guarded

    def _guard_stream(
        self, method: str, behavior: Callable[..., Any]
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
        async def guarded(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            principal = await self._admit(method, context)
            with bound_principal(principal):
                result = behavior(request, context)
                if inspect.isawaitable(result):  # a method that writes with context.write
                    await result
                    return
                async for response in result:
                    yield response

        return guarded

    async def _admit(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        decision = self._policy.decide(
            method, context.invocation_metadata() or (), context.auth_context()
        )
        if isinstance(decision, Refusal):
            log.warning(
                "call refused",
                extra={"method": method, "code": decision.code.name, "peer": context.peer()},
            )
            await context.abort(decision.code, decision.message)
        assert isinstance(decision, Principal)
        log.debug("call admitted", extra={"method": method, "principal": decision.name})
        return decision


async def _unimplemented(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
