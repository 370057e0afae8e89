"""Orchestrator: the registry of facades."""

from __future__ import annotations

import pytest

from orchestrator import (
    AsyncFacade,
    AsyncFacadeContext,
    InMemoryBroker,
    Orchestrator,
    SyncFacade,
    UnknownFacadeError,
)


def test_a_registered_facade_is_found_by_name() -> None:
    orchestrator = Orchestrator(InMemoryBroker())
    flow: SyncFacade[object, object] = SyncFacade()  # type: ignore[type-var]
    orchestrator.register_sync_facade("Booking", flow)

    assert orchestrator.get_sync_facade("Booking") is flow
    assert flow.name == "Booking"


def test_a_name_is_registered_once_across_kinds() -> None:
    orchestrator = Orchestrator(InMemoryBroker())
    orchestrator.register_sync_facade("Booking", SyncFacade())
    with pytest.raises(ValueError, match="already registered"):
        orchestrator.register_async_facade("Booking", AsyncFacade(dto=AsyncFacadeContext))


def test_an_unknown_name_lists_the_registered_ones() -> None:
    orchestrator = Orchestrator(InMemoryBroker())
    orchestrator.register_sync_facade("Booking", SyncFacade())

    with pytest.raises(
        UnknownFacadeError, match=r"no sync facade named 'Bokking' \(registered: Booking\)"
    ):
        orchestrator.get_sync_facade("Bokking")
    with pytest.raises(UnknownFacadeError, match="no async facade"):
        orchestrator.get_async_facade("Booking")


def test_a_facade_belongs_to_one_orchestrator() -> None:
    flow = SyncFacade()  # type: ignore[var-annotated]
    Orchestrator(InMemoryBroker()).register_sync_facade("A", flow)
    with pytest.raises(ValueError, match="already registered as 'A'"):
        Orchestrator(InMemoryBroker()).register_sync_facade("B", flow)


async def test_registration_after_start_is_refused() -> None:
    orchestrator = Orchestrator(InMemoryBroker())
    await orchestrator.start()
    try:
        with pytest.raises(RuntimeError, match=r"before Orchestrator\.start"):
            orchestrator.register_sync_facade("Late", SyncFacade())
    finally:
        await orchestrator.close()
