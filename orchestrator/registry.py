"""The Orchestrator: the registry of facades, the owner of their broker, store and recovery."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import Any

from orchestrator._dead_letters import DeadLetterCollector, Route
from orchestrator.broker.base import Broker
from orchestrator.config import DeadLetterSettings, SagaSettings
from orchestrator.facade._runtime import SagaPolicy, SagaRuntime
from orchestrator.facade.async_ import AsyncFacade
from orchestrator.facade.base import FacadeBase
from orchestrator.facade.definition import check_name
from orchestrator.facade.sync import SyncFacade
from orchestrator.facade.throttling import ThrottlingFacade
from orchestrator.metrics import Metrics
from orchestrator.store import InMemorySagaStore, SagaStore, Stalled

__all__ = ["Orchestrator", "UnknownFacadeError"]

log = logging.getLogger("orchestrator")

RECOVERY_CONCURRENCY = 16
"""Stalled sagas one replica drives to an end at once."""


class UnknownFacadeError(LookupError):
    """No facade is registered under that name."""


class Orchestrator:
    """Registers facades by name and runs them on one broker and one saga store.

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
        sagas: SagaSettings | None = None,
        dead_letters: DeadLetterSettings | None = None,
    ) -> None:
        """Every saga is recorded in `store` (default: an `InMemorySagaStore`, which keeps
        them as long as the process lives). This replica (`replica_id`, default a new
        UUID) heartbeats every `heartbeat_seconds` and takes over the stalled sagas:
        those past their deadline (`sagas`) and the sync ones of replicas silent for
        `lease_seconds`, driving each to an end. It also takes the facades' dead letters
        into the store for operators (`dead_letters`, on by default)."""
        self.broker = broker
        self.metrics = metrics or Metrics()
        self.store = store if store is not None else InMemorySagaStore()
        self.replica_id = replica_id or uuid.uuid4().hex
        self._heartbeat_seconds = heartbeat_seconds
        self._lease_seconds = lease_seconds
        self._sagas = sagas or SagaSettings()
        self._dead_letter_settings = dead_letters or DeadLetterSettings()
        self.dead_letters: DeadLetterCollector | None = None
        """The dead-letter collector, once started (None when collection is off)."""
        broker.attach_metrics(self.metrics)
        self._sync: dict[str, SyncFacade[Any, Any]] = {}
        self._async: dict[str, AsyncFacade[Any]] = {}
        self._throttling: dict[str, ThrottlingFacade[Any]] = {}
        self._started = False
        self._recovery: asyncio.Task[None] | None = None
        self._saga_listeners: list[Callable[[str, str], None]] = []
        self._unlisten: list[Callable[[], None]] = []
        self._saturation_listeners: list[Callable[[bool], None]] = []

    def register_sync_facade(self, name: str, facade: SyncFacade[Any, Any]) -> None:
        """Register `facade` under `name`; a name can be registered once."""
        self._register(name, facade)
        self._sync[name] = facade

    def register_async_facade(self, name: str, facade: AsyncFacade[Any]) -> None:
        """Register `facade` under `name`; a name can be registered once."""
        self._register(name, facade)
        self._async[name] = facade

    def register_throttling_facade(self, name: str, facade: ThrottlingFacade[Any]) -> None:
        """Register `facade` under `name`; a name can be registered once."""
        self._register(name, facade)
        self._throttling[name] = facade

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

    def get_throttling_facade(self, name: str) -> ThrottlingFacade[Any]:
        """The throttling facade registered under `name`."""
        try:
            return self._throttling[name]
        except KeyError:
            raise UnknownFacadeError(self._unknown("throttling", name, self._throttling)) from None

    @property
    def facades(self) -> dict[str, FacadeBase]:
        """Every registered facade by name."""
        return {**self._sync, **self._async, **self._throttling}

    @property
    def saturated(self) -> list[str]:
        """The facades that refuse new calls on this replica right now (at their
        `max_in_flight`, or their first topic just found full), by name."""
        return sorted(
            name for name, facade in self.facades.items() if facade.runtime.admission.saturated
        )

    def on_saturation(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(any_saturated)` whenever a facade becomes saturated or stops being so
        (the server's `admission` health name follows it)."""
        self._saturation_listeners.append(listener)

    async def start(self) -> None:
        """Start the store and the broker, then every facade's consumers, then recovery."""
        if self._started:
            return
        unknown = sorted(set(self._sagas.facades) - set(self.facades))
        if unknown:
            raise ValueError(f"deadlines configured for facades never registered: {unknown}")
        await self.store.start()
        await self.store.heartbeat(self.replica_id)
        await self.broker.start()
        for facade in self.facades.values():
            # Heard before consuming: a first hop may wait on its saga's begin.
            self._unlisten.append(facade.runtime.listen())
            await facade.start()
        self._started = True
        self._recovery = asyncio.create_task(self._keep_recovering())
        if self._dead_letter_settings.collect:
            self.dead_letters = DeadLetterCollector(
                self.broker,
                self.store,
                self._routes(),
                self.metrics,
                interval=self._dead_letter_settings.interval_seconds,
            )
            self.dead_letters.start()
        log.info(
            "orchestrator started",
            extra={
                "facades": ", ".join(
                    f"{name} ({facade.runtime.kind})"
                    for name, facade in sorted(self.facades.items())
                ),
                "replica": self.replica_id,
            },
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
        if self.dead_letters is not None:
            await self.dead_letters.close()
            self.dead_letters = None
        for unlisten in self._unlisten:
            unlisten()
        self._unlisten.clear()
        await self.broker.close()
        await self.store.close()
        self._started = False

    async def recover_now(self) -> int:
        """Heartbeat, then take over the stalled sagas and drive each to an end; how many.

        Stalled: RUNNING or COMPENSATING past its deadline, or a RUNNING sync
        saga whose replica went silent. A RUNNING one is rolled back (its
        current step may have taken effect); a COMPENSATING one has its
        compensation run here, ending COMPENSATED or COMPENSATION_FAILED.
        """
        await self.store.heartbeat(self.replica_id)
        claimed = await self.store.claim_stalled(
            self.replica_id, stale_after=self._lease_seconds, hold_for=self._hold_for
        )
        gate = asyncio.Semaphore(RECOVERY_CONCURRENCY)

        async def recover(stalled: Stalled) -> None:
            saga = stalled.saga
            facade = self.facades.get(saga.facade)
            if facade is None:
                log.error(
                    "stalled saga of an unknown facade left as it is",
                    extra={"request_id": saga.request_id, "facade": saga.facade},
                )
                return
            async with gate:
                try:
                    await facade.runtime.recover(saga, expired=stalled.expired)
                except Exception:
                    # The saga's deadline was moved, not lifted: a later round retries it.
                    log.exception(
                        "recovering a saga failed",
                        extra={"request_id": saga.request_id, "facade": saga.facade},
                    )

        await asyncio.gather(*(recover(saga) for saga in claimed))
        return len(claimed)

    async def _keep_recovering(self) -> None:
        while True:
            try:
                await self.recover_now()
            except Exception:
                # Recovery must outlive a store or broker hiccup: the next round retries.
                log.exception("recovery round failed")
            await asyncio.sleep(self._heartbeat_seconds)

    @property
    def _hold_for(self) -> float:
        """How long a claimed saga is this replica's before another may claim it again: the
        longest time a compensation may take, so a recovery under way is not doubled."""
        own = (self._sagas.deadlines_of(name)[1] for name in self.facades)
        return max((self._sagas.compensation_seconds, *own))

    def _routes(self) -> dict[str, Route]:
        """Each consumed topic's facade and step, to join dead letters to their sagas."""
        routes: dict[str, Route] = {}
        for name, facade in self.facades.items():
            definition = facade.definition
            for step in definition.steps:
                if step.topic:
                    routes[step.topic] = Route(name, step.name)
            if definition.rollback_topic:
                routes[definition.rollback_topic] = Route(name, "rollback")
        return routes

    def on_saga_change(self, listener: Callable[[str, str], None]) -> Callable[[], None]:
        """Call `listener(facade, request_id)` after each store write of this replica's sagas.

        It runs in the event loop, inline with the saga: it must be quick and
        must not raise. Returns a function that removes the listener. The
        status service uses it to wake its watchers at once.
        """
        self._saga_listeners.append(listener)
        return lambda: self._saga_listeners.remove(listener)

    def saga_changed(self, facade: str, request_id: str) -> None:
        """Tell the `on_saga_change` listeners that the saga changed (the engine's writes do
        it themselves; the admin service does for a dead letter's saga)."""
        for listener in self._saga_listeners:
            listener(facade, request_id)

    def _register(self, name: str, facade: FacadeBase) -> None:
        check_name(name, "facade")
        if name in self.facades:
            raise ValueError(f"a facade named {name!r} is already registered")
        if self._started:
            raise RuntimeError("register facades before Orchestrator.start()")
        run_as = self._sagas.own(name).run_as or facade.kind
        try:
            definition = facade.definition_as(run_as)
        except ValueError as exc:
            raise ValueError(f"sagas.facades.{name}.run_as: {exc}") from None
        own = self._sagas.facades.get(name)
        if run_as == "async" and own is not None and own.max_in_flight:
            raise ValueError(
                f"sagas.facades.{name}.max_in_flight: an async facade's callers do not wait "
                "for their sagas; bound its first topic with broker.topics.<topic>.max_length"
            )
        for other_name, other in self.facades.items():
            shared = set(definition.topics) & set(other.definition.topics)
            if shared:
                raise ValueError(
                    f"facade {name!r} would consume {sorted(shared)}, which {other_name!r} "
                    "consumes: every facade needs topics of its own"
                )
        runtime = SagaRuntime(
            facade,
            definition,
            name,
            broker=self.broker,
            store=self.store,
            metrics=self.metrics.for_facade(name, run_as),
            owner=self.replica_id,
            policy=SagaPolicy(
                *self._sagas.deadlines_of(name),
                # An async caller does not wait for its saga: nothing to bound here.
                max_in_flight=0 if run_as == "async" else self._sagas.max_in_flight_of(name),
                max_wait_seconds=self._sagas.max_wait_of(name),
                retry_pushback_seconds=self._sagas.retry_pushback_seconds,
            ),
            on_change=self.saga_changed,
        )
        runtime.admission.on_saturation(self._saturation_changed)
        facade.attach(runtime)

    def _saturation_changed(self, _saturated: bool) -> None:
        any_saturated = bool(self.saturated)
        for listener in self._saturation_listeners:
            listener(any_saturated)

    @staticmethod
    def _unknown(kind: str, name: str, known: dict[str, Any]) -> str:
        names = ", ".join(sorted(known)) or "none"
        return f"no {kind} facade named {name!r} (registered: {names})"
