"""How many calls a demo upstream serves at once: what a throttled caller must keep bounded.

:class:`CallGauge` is a ``grpc.aio`` server interceptor that counts the calls of
the service's own methods (``/pb.…``) while they run (health checks and
reflection are not counted), and keeps the peak. Tests read it from
:attr:`upstream.server.RunningUpstream.calls`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

__all__ = ["CallGauge"]

_COUNTED_PREFIX = "/pb."

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]


class CallGauge(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts the service's calls in progress, and the most there ever were at once."""

    def __init__(self) -> None:
        self.in_progress = 0
        """Calls of the service's methods running now."""
        self.peak = 0
        """The most calls that ran at once since the start (or the last `reset`)."""
        self.served = 0
        """Calls that finished, however they ended."""

    def reset(self) -> None:
        """Forget the peak (it becomes the calls running now) and the calls served."""
        self.peak = self.in_progress
        self.served = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        """The method's handler, counted while it runs when it is one of the service's own."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or handler.unary_unary is None or not method.startswith(_COUNTED_PREFIX):
            return handler
        behaviour = handler.unary_unary

        async def counted(request: Any, context: Any) -> Any:
            self.in_progress += 1
            self.peak = max(self.peak, self.in_progress)
            try:
                return await behaviour(request, context)
            finally:
                self.in_progress -= 1
                self.served += 1

        return grpc.unary_unary_rpc_method_handler(
            counted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
