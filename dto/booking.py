"""The async booking DTO: what travels from topic to topic as JSON."""

from pydantic import Field

from orchestrator import AsyncFacadeContext


class BookingMsgDTO(AsyncFacadeContext):
    """A booking on its way through the async facade; nodes fill in the ids they create."""

    product_id: int = Field(gt=0)
    count: int = Field(default=1, gt=0)
    fault_inject: bool = False
    order_id: int = 0
    payment_id: int = 0
