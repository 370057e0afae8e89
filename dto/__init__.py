"""Message payloads of the example booking service."""

from dto.booking import MAX_COUNT, BookingMsgDTO

__all__ = ["MAX_COUNT", "BookingMsgDTO"]
