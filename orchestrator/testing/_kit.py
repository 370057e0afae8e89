"""SagaKit: an orchestrator on the in-memory broker and a store, to test facades against.

The kit builds the Orchestrator, calls the application's registration
functions on it (the very ones production calls), wraps every node and
compensation with its `Faults`, and starts it. Tests run sagas through it to
their end and read the record the store keeps.

The kit's broker stands for a durable one: it outlives a crash of the
orchestrator, as RabbitMQ does, and so does the store. A crash
(`faults.crash_after`) kills the orchestrator where it stands; `recover()`
starts a new one on the same store and broker, registered by the same
functions, and returns the crashed saga once that one has driven it to an end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from google.protobuf.message import Message

from orchestrator.broker.memory import InMemoryBroker
from orchestrator.config import BrokerSettings, DeadLetterSettings, SagaSettings
from orchestrator.context import StepScope
from orchestrator.errors import SagaFailed
from orchestrator.facade.async_ import AsyncFacade
from orchestrator.facade.base import FacadeBase
from orchestrator.facade.sync import SyncFacade
from orchestrator.registry import Orchestrator, UnknownFacadeError
from orchestrator.store import store_from_url
from orchestrator.store.base import SagaStore
from orchestrator.store.memory import InMemorySagaStore
from orchestrator.store.records import SagaRecord
from orchestrator.testing._assertions import describe
from orchestrator.testing._faults import Faults, SimulatedCrash
from orchestrator.testing._run import SagaRun

__all__ = ["Registration", "SagaKit"]

Registration = Callable[[Orchestrator], object]
"""`register(orchestrator)`: registers an application's facades (its return value is ignored)."""

HEARTBEAT_SECONDS = 0.05
"""How often the kit's orchestrator heartbeats and looks for stalled sagas."""
LEASE_SECONDS = 0.25
"""How long after its last heartbeat a crashed orchestrator's sync sagas are orphaned."""
DEAD_LETTER_INTERVAL_SECONDS = 0.05
"""How often dead letters are taken into the store (5 s in production)."""
DEFAULT_BROKER = BrokerSettings(redelivery_delay_seconds=0.01)
"""The kit's broker: production's, with a failed delivery retried after 10 ms, not 50."""


class SagaKit:
    """An Orchestrator on an in-memory broker and a store, with fault injection, for tests.

        async with SagaKit(lambda orchestrator: register_trip(orchestrator, services)) as kit:
            run = await kit.run("Trip", "trip-1", trip)
            assert_saga(run, state="COMPLETED", done=["reserve_seat", "book_room", "charge_card"])

    `registrations` are called with each orchestrator the kit builds (at
    `start()` and again at `recover()`), before it starts. `store_url` is
    `memory://` (one in-memory store kept across a crash) or a SQL store URL
    (`sqlite+aiosqlite:///path.db`). `broker` and `sagas` are the broker's and
    the deadlines' settings; `timeout` bounds every wait of the kit (a saga
    that does not end by then fails the test, saying where it stands).
    """

    def __init__(
        self,
        *registrations: Registration,
        store_url: str = "memory://",
        broker: BrokerSettings | None = None,
        sagas: SagaSettings | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not registrations:
            raise ValueError("SagaKit needs a registration function: register(orchestrator)")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive: {timeout}")
        self._registrations = registrations
        self._store_url = store_url
        self._sagas = sagas
        self.timeout = timeout
        """Seconds any wait of the kit may take before it fails the test."""
        self.broker = InMemoryBroker(broker or DEFAULT_BROKER)
        """The broker, shared by every orchestrator the kit starts."""
        self.faults = Faults(self._crash)
        """The faults armed on the kit's facades."""
        self._store: SagaStore | None = None
        self._orchestrator: Orchestrator | None = None
        self._crashed_at: StepScope | None = None
        self._crashed = asyncio.Event()
        self._buried = False

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> Self:
        """Build the orchestrator, register the facades, start it; idempotent."""
        if self._orchestrator is None:
            self._store = await self._open_store()
            try:
                self._orchestrator = await self._boot()
            except BaseException:
                await self._store.close()
                self._store = None
                raise
        return self

    async def close(self) -> None:
        """Close the orchestrator (or, after a crash, the store it left)."""
        orchestrator, self._orchestrator = self._orchestrator, None
        store, self._store = self._store, None
        if orchestrator is not None and not self._buried:
            await orchestrator.close()  # and its store
        elif store is not None:
            await store.close()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def orchestrator(self) -> Orchestrator:
        """The orchestrator the kit runs now (after a crash: the dead one, until `recover()`)."""
        if self._orchestrator is None:
            raise RuntimeError("the kit is not started: `await kit.start()` or `async with kit`")
        return self._orchestrator

    @property
    def store(self) -> SagaStore:
        """The saga store, open whenever the kit is (also between a crash and `recover()`)."""
        if self._store is None:
            raise RuntimeError("the kit is not started: `await kit.start()` or `async with kit`")
        return self._store

    @property
    def crashed(self) -> bool:
        """True from a `crash_after` fault firing until `recover()`."""
        return self._crashed_at is not None

    async def _open_store(self) -> SagaStore:
        """The store of the next orchestrator: the same in-memory one, or a new connection
        to the same database (the last one's was closed with it)."""
        if isinstance(self._store, InMemorySagaStore):
            return self._store
        store = store_from_url(self._store_url)
        await store.start()
        return store

    async def _boot(self) -> Orchestrator:
        orchestrator = Orchestrator(
            self.broker,
            store=self._store,
            heartbeat_seconds=HEARTBEAT_SECONDS,
            lease_seconds=LEASE_SECONDS,
            sagas=self._sagas,
            dead_letters=DeadLetterSettings(interval_seconds=DEAD_LETTER_INTERVAL_SECONDS),
        )
        for register in self._registrations:
            register(orchestrator)
        facades = orchestrator.facades
        if not facades:
            raise ValueError("the registration functions registered no facade")
        self.faults.registered(
            {
                name: [*facade.steps, *(["rollback"] if facade.definition.rollback_node else [])]
                for name, facade in facades.items()
            }
        )
        for facade in facades.values():
            # Registered, not yet started: the engine runs the same definition, each node
            # and compensation going through the armed faults.
            facade.runtime.definition = self.faults.instrument(facade.runtime.definition)
        try:
            await orchestrator.start()
        except BaseException:
            await orchestrator.close()
            raise
        return orchestrator

    # --- running sagas -------------------------------------------------------------------

    async def run(self, facade: str, request_id: str, request: Any) -> SagaRun:
        """Run a saga of `facade` to its end (or to a crash) and return how it ended.

        `request` is what the facade's `run` takes: the protobuf request of a
        sync facade, the DTO of an async one. A failed sync saga is awaited
        until its rollback ended too; its caller's error is in `failure`.
        """
        flow = self._facade(facade)
        response: Message | None = None
        failure: SagaFailed | None = None
        try:
            async with asyncio.timeout(self.timeout):
                if isinstance(flow, SyncFacade):
                    response = await flow.run(request_id, request)
                elif isinstance(flow, AsyncFacade):
                    await flow.run(request_id, request)
        except SagaFailed as exc:
            failure = exc
        except SimulatedCrash:
            pass
        except TimeoutError:
            raise AssertionError(
                f"{facade}/{request_id}: the facade's run() did not return within {self.timeout}s"
            ) from None
        record = await self._ended_or_crashed(flow, request_id)
        if record is None:
            return SagaRun(await self._record(facade, request_id), crashed=True)
        return SagaRun(record, response=response if failure is None else None, failure=failure)

    async def ended(self, facade: str, request_id: str) -> SagaRecord:
        """The saga once it has reached an end; fails the test after `timeout` seconds."""
        record = await self._ended_or_crashed(self._facade(facade), request_id)
        if record is None:
            raise AssertionError(
                f"the orchestrator crashed before {facade}/{request_id} ended: recover() first"
            )
        return record

    async def saga(self, facade: str, request_id: str) -> SagaRecord | None:
        """The saga as the store holds it now, or None."""
        return await self.store.get(facade, request_id)

    def _facade(self, name: str) -> FacadeBase:
        if self.crashed:
            raise RuntimeError("the orchestrator crashed: `await kit.recover()` first")
        facades = self.orchestrator.facades
        if name not in facades:
            raise UnknownFacadeError(f"no facade named {name!r} (registered: {sorted(facades)})")
        return facades[name]

    async def _ended_or_crashed(self, flow: FacadeBase, request_id: str) -> SagaRecord | None:
        """The saga at its end, or None when the orchestrator crashed first."""
        if not self.crashed:
            ended = asyncio.ensure_future(flow.wait_for(request_id))
            crashed = asyncio.ensure_future(self._crashed.wait())
            try:
                done, _ = await asyncio.wait(
                    (ended, crashed), timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiting in (ended, crashed):
                    waiting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiting
            if ended in done and not self.crashed:
                return ended.result()
            if not done:
                saga = await self.store.get(flow.name, request_id)
                raise AssertionError(
                    f"{flow.name}/{request_id} did not end within {self.timeout}s: "
                    + describe(saga)
                )
        await self._bury()
        return None

    async def _record(self, facade: str, request_id: str) -> SagaRecord:
        saga = await self.store.get(facade, request_id)
        if saga is None:
            raise AssertionError(f"no saga {facade}/{request_id} in the store")
        return saga

    # --- crashing and recovering ---------------------------------------------------------

    def _crash(self, scope: StepScope) -> None:
        """A `crash_after` fault fired: the orchestrator consumes nothing more from now on."""
        self._crashed_at = scope
        self.broker.drop_consumers()
        self._crashed.set()

    async def _bury(self) -> None:
        """Close what the crashed orchestrator left running, and reopen its store to read."""
        if self._buried:
            return
        self._buried = True
        await self.orchestrator.close()
        self._store = await self._open_store()

    async def recover(self) -> SagaRecord:
        """Start a new orchestrator on the same store and broker; return the crashed saga
        once it has driven it to an end (recovery rolls back a sync saga; an async one's
        hop is delivered again)."""
        scope = self._crashed_at
        if scope is None:
            raise RuntimeError("nothing crashed: arm faults.crash_after(step) and run a saga")
        await self._bury()
        self._crashed_at = None
        self._crashed = asyncio.Event()
        self._orchestrator, self._buried = None, False
        self._orchestrator = await self._boot()
        return await self.ended(scope.facade, scope.request_id)
