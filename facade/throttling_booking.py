"""The throttling booking facade: the async booking's nodes, with the caller waiting for the end.

Its topics' `concurrency` in app.yaml is the pace: however many callers wait,
no more bookings than that reach the upstreams at once from each replica.
"""

from dto import BookingMsgDTO
from facade import THROTTLING_BOOKING
from node import Upstreams, cancel_booking_node, create_order_async_node, create_payment_async_node
from orchestrator import Orchestrator, ThrottlingFacade
from topic import CANCEL_THROTTLING_BOOKING, THROTTLING_CREATE_ORDER, THROTTLING_CREATE_PAYMENT


def register(orchestrator: Orchestrator, upstreams: Upstreams) -> ThrottlingFacade[BookingMsgDTO]:
    """Register the ThrottlingBooking facade, rolled back through cancel_throttling_booking."""
    flow = ThrottlingFacade(dto=BookingMsgDTO)
    flow.use(THROTTLING_CREATE_ORDER, create_order_async_node(upstreams))
    flow.use(THROTTLING_CREATE_PAYMENT, create_payment_async_node(upstreams))
    flow.consume_rollback(CANCEL_THROTTLING_BOOKING, cancel_booking_node(upstreams))
    orchestrator.register_throttling_facade(THROTTLING_BOOKING, flow)
    return flow
