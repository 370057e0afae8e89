"""The async booking DTO: what travels from topic to topic as JSON."""

from typing import Final

from pydantic import Field

from orchestrator import AsyncFacadeContext

INT64_MAX: Final = 2**63 - 1
MAX_COUNT: Final = 1000
"""The most products one booking holds: its payment (count times the unit price) then fits
every upstream and message comfortably."""


class BookingMsgDTO(AsyncFacadeContext):
    """A booking on its way through the async facade; nodes fill in the ids they create."""

    product_id: int = Field(gt=0, le=INT64_MAX)
    count: int = Field(default=1, gt=0, le=MAX_COUNT)
    fault_inject: bool = False
    order_id: int = Field(default=0, ge=0, le=INT64_MAX)
    payment_id: int = Field(default=0, ge=0, le=INT64_MAX)
