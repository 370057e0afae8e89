"""Clients of the upstream Order and Payment services, made once and shared by every node."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from pb import order_pb2_grpc, payment_pb2_grpc


@dataclass(slots=True)
class Upstreams:
    """One channel and stub per upstream service, and the timeout of each call."""

    order: order_pb2_grpc.OrderServiceAsyncStub
    payment: payment_pb2_grpc.PaymentServiceAsyncStub
    timeout_seconds: float
    _channels: tuple[grpc.aio.Channel, ...] = ()

    @classmethod
    def connect(
        cls,
        *,
        order_address: str,
        payment_address: str,
        timeout_seconds: float,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> Upstreams:
        """Open the channels (they connect lazily and reconnect by themselves).

        With `credentials` (`grpc.ssl_channel_credentials(...)`) they speak TLS.
        """
        order_channel = _channel(order_address, credentials)
        payment_channel = _channel(payment_address, credentials)
        return cls(
            order=order_pb2_grpc.OrderServiceStub(order_channel),
            payment=payment_pb2_grpc.PaymentServiceStub(payment_channel),
            timeout_seconds=timeout_seconds,
            _channels=(order_channel, payment_channel),
        )

    async def close(self) -> None:
        """Close the channels."""
        for channel in self._channels:
            await channel.close(None)


def _channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, credentials)
