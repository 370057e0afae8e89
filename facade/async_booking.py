"""The async booking facade: create_order and create_payment as hops through the broker."""

from dto import BookingMsgDTO
from facade import ASYNC_BOOKING
from node import Upstreams, cancel_booking_node, create_order_async_node, create_payment_async_node
from orchestrator import AsyncFacade, Orchestrator
from topic import CANCEL_ASYNC_BOOKING, CREATE_ORDER, CREATE_PAYMENT


def register(orchestrator: Orchestrator, upstreams: Upstreams) -> AsyncFacade[BookingMsgDTO]:
    """Register the AsyncBooking facade, rolled back through the cancel_async_booking topic."""
    flow = AsyncFacade(dto=BookingMsgDTO)
    flow.use(CREATE_ORDER, create_order_async_node(upstreams))
    flow.use(CREATE_PAYMENT, create_payment_async_node(upstreams))
    flow.consume_rollback(CANCEL_ASYNC_BOOKING, cancel_booking_node(upstreams))
    orchestrator.register_async_facade(ASYNC_BOOKING, flow)
    return flow
