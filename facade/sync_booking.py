"""The sync booking facade: create the order, then the payment, in the caller's request."""

from facade import SYNC_BOOKING
from node import Upstreams, cancel_booking_node, create_order_sync_node, create_payment_sync_node
from orchestrator import Orchestrator, SyncFacade
from pb.booking_pb2 import BookingRequest, BookingSyncResponse
from topic import CANCEL_SYNC_BOOKING


def register(orchestrator: Orchestrator, upstreams: Upstreams) -> None:
    """Register the SyncBooking facade, rolled back through the cancel_sync_booking topic."""
    flow = SyncFacade(request=BookingRequest, response=BookingSyncResponse)
    flow.use(create_order_sync_node(upstreams)).use(create_payment_sync_node(upstreams))
    flow.consume_rollback(CANCEL_SYNC_BOOKING, cancel_booking_node(upstreams))
    orchestrator.register_sync_facade(SYNC_BOOKING, flow)
