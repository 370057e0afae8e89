"""A gRPC service the orchestrator's server serves: its name, servicer and registration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

__all__ = ["GrpcService"]


@dataclass(frozen=True, slots=True)
class GrpcService:
    """A servicer and how to add it: `GrpcService("pb.BookingService", add_..._to_server, obj)`."""

    name: str
    """The service's full name, for reflection and health."""
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: object
