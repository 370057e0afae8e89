"""gRPC servicers of the example booking service."""

from handler.booking import BookingHandler

__all__ = ["BookingHandler"]
