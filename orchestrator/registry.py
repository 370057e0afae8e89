"""The Orchestrator: the registry of facades and the owner of their broker."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Callable
from typing import Any

from orchestrator.broker.base import Broker
from orchestrator.facade.async_ import AsyncFacade
from orchestrator.facade.base import FacadeBase
from orchestrator.facade.sync import SyncFacade
from orchestrator.metrics import Metrics
from orchestrator.store.base import FacadeStore, SagaStore, unscoped

__all__ = ["Orchestrator", "UnknownFacadeError"]

log = logging.getLogger("orchestrator")


class UnknownFacadeError(LookupError):
    """No facade is registered under that name."""


class Orchestrator:
    """Registers facades by name and starts their consumers on one broker.

    There is no global instance: build one, hand it to each registration
    function, then `await orchestrator.start()`.
    """

    def __init__(
        self,
        broker: Broker,
        metrics: Metrics | None = None,
        *,
        store: SagaStore | None = None,
        replica_id: str | None = None,
        heartbeat_seconds: float = 2.0,
        lease_seconds: float = 10.0,
    ) -> None:
        """`store` records every saga; with it, this replica (`replica_id`, default a new
        UUID) heartbeats every `heartbeat_seconds` and takes over the sync sagas of
        replicas silent for `lease_seconds`, rolling them back."""
        self.broker = broker
        self.metrics = metrics or Metrics()
        self.store = store
        self.replica_id = replica_id or uuid.uuid4().hex
        self._heartbeat_seconds = heartbeat_seconds
        self._lease_seconds = lease_seconds
        broker.attach_metrics(self.metrics)
        self._sync: dict[str, SyncFacade[Any, Any]] = {}
        self._async: dict[str, AsyncFacade[Any]] = {}
        self._started = False
        self._recovery: asyncio.Task[None] | None = None
        self._saga_listeners: list[Callable[[str], None]] = []

    def register_sync_facade(self, name: str, facade: SyncFacade[Any, Any]) -> None:
        """Register `facade` under `name`; a name can be registered once."""
        self._register(name, facade)
        self._sync[name] = facade

    def register_async_facade(self, name: str, facade: AsyncFacade[Any]) -> None:
        """Register `facade` under `name`; a name can be registered once."""
        self._register(name, facade)
        self._async[name] = facade

    def get_sync_facade(self, name: str) -> SyncFacade[Any, Any]:
        """The sync facade registered under `name`."""
        try:
            return self._sync[name]
        except KeyError:
            raise UnknownFacadeError(self._unknown("sync", name, self._sync)) from None

    def get_async_facade(self, name: str) -> AsyncFacade[Any]:
        """The async facade registered under `name`."""
        try:
            return self._async[name]
        except KeyError:
            raise UnknownFacadeError(self._unknown("async", name, self._async)) from None

    @property
    def facades(self) -> dict[str, FacadeBase]:
        """Every registered facade by name."""
        return {**self._sync, **self._async}

    async def start(self) -> None:
        """Start the store and the broker, then every facade's consumers, then recovery."""
        if self._started:
            return
        if self.store is not None:
            await self.store.start()
            await self.store.heartbeat(self.replica_id)
        await self.broker.start()
        for facade in self.facades.values():
            await facade.start()
        self._started = True
        if self.store is not None:
            self._recovery = asyncio.create_task(self._keep_recovering(self.store))
        log.info(
            "orchestrator started",
            extra={"facades": sorted(self.facades), "replica": self.replica_id},
        )

    async def close(self) -> None:
        """Stop recovering and consuming, then close the broker and the store.

        Unfinished deliveries return to their topics; sync sagas still
        running are left to another replica's recovery.
        """
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
            self._recovery = None
        await self.broker.close()
        if self.store is not None:
            await self.store.close()
        self._started = False

    async def recover_now(self) -> int:
        """Heartbeat, then take over and roll back the orphaned sync sagas; returns how many."""
        store = self.store
        if store is None:
            return 0
        await store.heartbeat(self.replica_id)
        orphans = await store.claim_orphans(
            self.replica_id, stale_after=self._lease_seconds, kind="sync"
        )
        for saga in map(unscoped, orphans):
            facade = self._sync.get(saga.facade)
            if facade is None:
                log.error(
                    "orphaned saga of an unknown facade left as it is",
                    extra={"request_id": saga.request_id, "facade": saga.facade},
                )
                continue
            log.warning(
                "recovering a saga whose replica stopped",
                extra={"request_id": saga.request_id, "facade": saga.facade, "owner": saga.owner},
            )
            await facade.recover(saga)
        return len(orphans)

    async def _keep_recovering(self, store: SagaStore) -> None:
        while True:
            try:
                await self.recover_now()
            except Exception:
                # Recovery must outlive a store or broker hiccup: the next round retries.
                log.exception("recovery round failed")
            await asyncio.sleep(self._heartbeat_seconds)

    def on_saga_change(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call `listener(request_id)` after each store write of this replica's sagas.

        It runs in the event loop, inline with the saga: it must be quick and
        must not raise. Returns a function that removes the listener. The
        status service uses it to wake its watchers at once.
        """
        self._saga_listeners.append(listener)
        return lambda: self._saga_listeners.remove(listener)

    def _saga_changed(self, facade: FacadeBase, request_id: str) -> None:
        facade._saga_changed(request_id)
        for listener in self._saga_listeners:
            listener(request_id)

    def _register(self, name: str, facade: FacadeBase) -> None:
        if not name:
            raise ValueError("a facade needs a name")
        if name in self._sync or name in self._async:
            raise ValueError(f"a facade named {name!r} is already registered")
        if self._started:
            raise RuntimeError("register facades before Orchestrator.start()")
        if "/" in name:
            raise ValueError(f"a facade name cannot contain '/': {name!r}")
        facade.bind(
            name,
            self.broker,
            self.metrics,
            store=(
                FacadeStore(
                    self.store, name, on_change=functools.partial(self._saga_changed, facade)
                )
                if self.store is not None
                else None
            ),
            owner=self.replica_id,
        )

    @staticmethod
    def _unknown(kind: str, name: str, known: dict[str, Any]) -> str:
        names = ", ".join(sorted(known)) or "none"
        return f"no {kind} facade named {name!r} (registered: {names})"
