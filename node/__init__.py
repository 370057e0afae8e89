"""Nodes of the example booking service: each one calls an upstream service."""

from node.booking import (
    cancel_booking_node,
    create_order_async_node,
    create_order_sync_node,
    create_payment_async_node,
    create_payment_sync_node,
)
from node.upstream import Upstreams

__all__ = [
    "Upstreams",
    "cancel_booking_node",
    "create_order_async_node",
    "create_order_sync_node",
    "create_payment_async_node",
    "create_payment_sync_node",
]
