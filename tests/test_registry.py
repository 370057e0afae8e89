"""Orchestrator: the registry of facades, which fixes and checks each facade's definition."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from orchestrator import (
    AsyncFacade,
    AsyncFacadeContext,
    Context,
    Orchestrator,
    Rollback,
    SyncFacade,
)
from orchestrator.broker import InMemoryBroker
from orchestrator.registry import UnknownFacadeError
from pb.booking_pb2 import BookingRequest, BookingSyncResponse

Flow = SyncFacade[BookingRequest, BookingSyncResponse]


async def create_order(request_id: str, ctx: Context[BookingRequest, BookingSyncResponse]) -> None:
    pass


async def forward(dto: AsyncFacadeContext) -> AsyncFacadeContext:
    return dto


async def cancel(rollback: Rollback) -> None:
    pass


def sync_flow() -> Flow:
    """A sync facade of one node."""
    return Flow(request=BookingRequest, response=BookingSyncResponse).use(create_order)


def async_flow(topic: str = "order") -> AsyncFacade[AsyncFacadeContext]:
    """An async facade of one node on `topic`."""
    return AsyncFacade(dto=AsyncFacadeContext).use(topic, forward)


def test_a_registered_facade_is_found_by_name() -> None:
    orchestrator = Orchestrator(InMemoryBroker())
    flow = sync_flow()
    orchestrator.register_sync_facade("Booking", flow)

    assert orchestrator.get_sync_facade("Booking") is flow
    assert flow.name == "Booking"


def test_a_name_is_registered_once_across_kinds() -> None:
    orchestrator = Orchestrator(InMemoryBroker())
    orchestrator.register_sync_facade("Booking", sync_flow())
    with pytest.raises(ValueError, match="already registered"):
        orchestrator.register_async_facade("Booking", async_flow())


def test_an_unknown_name_lists_the_registered_ones() -> None:
    orchestrator = Orchestrator(InMemoryBroker())
    orchestrator.register_sync_facade("Booking", sync_flow())

    with pytest.raises(
        UnknownFacadeError, match=r"no sync facade named 'Bokking' \(registered: Booking\)"
    ):
        orchestrator.get_sync_facade("Bokking")
    with pytest.raises(UnknownFacadeError, match="no async facade"):
        orchestrator.get_async_facade("Booking")


def test_a_facade_belongs_to_one_orchestrator() -> None:
    flow = sync_flow()
    Orchestrator(InMemoryBroker()).register_sync_facade("A", flow)
    with pytest.raises(ValueError, match="already registered as 'A'"):
        Orchestrator(InMemoryBroker()).register_sync_facade("B", flow)


async def test_registration_after_start_is_refused() -> None:
    orchestrator = Orchestrator(InMemoryBroker())
    await orchestrator.start()
    try:
        with pytest.raises(RuntimeError, match=r"before Orchestrator\.start"):
            orchestrator.register_sync_facade("Late", sync_flow())
    finally:
        await orchestrator.close()


def test_a_facade_needs_a_node() -> None:
    orchestrator = Orchestrator(InMemoryBroker())

    with pytest.raises(ValueError, match="a facade needs at least one node"):
        orchestrator.register_sync_facade(
            "Booking", Flow(request=BookingRequest, response=BookingSyncResponse)
        )
    assert orchestrator.facades == {}


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda flow: flow.use(create_order, name="another"), id="use"),
        pytest.param(lambda flow: flow.consume_rollback("cancel", cancel), id="consume_rollback"),
    ],
)
def test_a_facades_definition_cannot_change_after_registration(
    change: Callable[[Flow], object],
) -> None:
    flow = sync_flow()
    Orchestrator(InMemoryBroker()).register_sync_facade("Booking", flow)

    with pytest.raises(RuntimeError, match="'Booking' is registered: its definition is fixed"):
        change(flow)
    assert flow.steps == ["create_order"]
    assert flow.definition.steps[0].name == "create_order"
    assert flow.definition.rollback_topic == ""


def test_two_facades_cannot_share_a_topic() -> None:
    orchestrator = Orchestrator(InMemoryBroker())
    orchestrator.register_async_facade("First", async_flow("order"))

    with pytest.raises(ValueError, match=r"would consume \['order'\], which 'First' consumes"):
        orchestrator.register_async_facade("Second", async_flow("order"))
    assert list(orchestrator.facades) == ["First"]


def test_a_rollback_topic_cannot_be_another_facades_step_topic() -> None:
    orchestrator = Orchestrator(InMemoryBroker())
    orchestrator.register_async_facade("First", async_flow("order"))

    with pytest.raises(ValueError, match=r"would consume \['order'\]"):
        orchestrator.register_sync_facade("Second", sync_flow().consume_rollback("order", cancel))


def test_a_facade_name_holding_a_separator_is_refused() -> None:
    with pytest.raises(ValueError, match="facade name 'Booking/v2'"):
        Orchestrator(InMemoryBroker()).register_sync_facade("Booking/v2", sync_flow())
