"""Message payloads of the example booking service."""

from dto.booking import BookingMsgDTO

__all__ = ["BookingMsgDTO"]
