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
        cls, *, order_address: str, payment_address: str, timeout_seconds: float
    ) -> Upstreams:
        """Open the channels (they connect lazily and reconnect by themselves)."""
        order_channel = grpc.aio.insecure_channel(order_address)
        payment_channel = grpc.aio.insecure_channel(payment_address)
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
