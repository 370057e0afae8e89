"""The saga engine: one runtime under every facade, governed by the saga's journal.

A `SagaRuntime` runs the sagas of one registered facade. It is written once
for both kinds: the idempotent begin, running a step under its retry policy
and timeout, the journal's compare-and-set writes (a step's end, its
failure), which steps to undo, the rollback message, and the recovery of a
saga nobody else will finish; its `Compensation` (`_compensation`) consumes
the rollback message and undoes the saga. A facade adds only what its kind
is: the sync facade runs every step in the caller's task on a protobuf
Context; the async facade makes each step a hop through a broker topic.

The journal governs. Every write names where it expects the saga; a refused
write means the saga moved on without this caller (a duplicate message, a
replica that lost its lease, recovery or an operator acting first), and the
caller does nothing more. A rollback message only says "this saga"; what is
undone, and with which data, comes from the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import grpc

from orchestrator import tracing
from orchestrator.broker.base import Broker
from orchestrator.context import StepScope, enter_step, leave_step
from orchestrator.dto import Rollback
from orchestrator.errors import (
    AlreadyExists,
    BrokerUnavailable,
    Failure,
    SagaFailed,
    classify,
)
from orchestrator.facade._admission import Admission
from orchestrator.facade._compensation import Compensation
from orchestrator.facade._operations import Operations
from orchestrator.facade._positions import Positions
from orchestrator.facade._watch import Watch
from orchestrator.facade.definition import SagaDefinition, StepDefinition
from orchestrator.metrics import FacadeMetrics
from orchestrator.request_id import check_request_id
from orchestrator.retry import call_with_retry
from orchestrator.store import (
    ActionRecord,
    Change,
    CompensationRetried,
    NewSaga,
    OperatorChange,
    Position,
    Resolved,
    Retried,
    SagaRecord,
    SagaState,
    SagaStore,
    StepEnded,
    StepFailed,
    StepPending,
    StepRestarted,
    StepState,
)

__all__ = ["UNCERTAIN_CODES", "FacadeKind", "SagaPolicy", "SagaRuntime"]

log = logging.getLogger("orchestrator.facade")

T = TypeVar("T")

UNCERTAIN_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
"""Failures after which the step may still have taken effect (a lost answer, a timeout, a
crash): its compensation runs too, and must tolerate undoing what never happened."""


_OPERATOR_CHANGES = (Retried, CompensationRetried, Resolved)
"""The moves only an operator makes: they go through `SagaStore.act`."""


class FacadeKind(Protocol):
    """What the engine asks of a facade's kind: its saga data for a rollback, and how its
    compensations are called."""

    def rollback_data(self, saga: SagaRecord) -> dict[str, Any]:
        """The saga's data as a `Rollback` carries it, rebuilt from the journal."""

    async def compensate(self, step: StepDefinition, rollback: Rollback) -> None:
        """Call `step`'s compensation with the arguments its kind gives it."""

    async def resume(self, saga: SagaRecord, index: int) -> None:
        """Run step `index` of a RUNNING saga again, from the journal (an operator's retry);
        a kind that cannot (a sync saga runs in its caller's call) raises FailedPrecondition
        before any effect."""


@dataclass(frozen=True, slots=True)
class SagaPolicy:
    """How long a facade's sagas may take, and how many of its calls this replica takes."""

    deadline_seconds: float = 300.0
    """A saga still RUNNING this long after it began is rolled back by recovery."""
    compensation_seconds: float = 120.0
    """A saga still COMPENSATING this long has its compensation run by recovery; one
    that cannot succeed then ends COMPENSATION_FAILED."""
    max_in_flight: int = 0
    """Calls in progress on this replica at most (sync runs, throttling and inline callers
    waiting); 0: no limit."""
    max_wait_seconds: float = 180.0
    """How long a throttling call waits for its saga's end at most."""
    retry_pushback_seconds: float = 1.0
    """How long a caller refused by admission is asked to wait."""


def payload_digest(facade: str, payload: str) -> str:
    """What tells one request from another under the same request id."""
    return hashlib.sha256(f"{facade}\n{payload}".encode()).hexdigest()


class SagaRuntime:
    """Runs the sagas of one registered facade against its journal and broker."""

    def __init__(
        self,
        facade: FacadeKind,
        definition: SagaDefinition,
        name: str,
        *,
        broker: Broker,
        store: SagaStore,
        metrics: FacadeMetrics,
        owner: str,
        policy: SagaPolicy,
        on_change: Callable[[str, str], None],
    ) -> None:
        self.facade = facade
        self.definition = definition
        self.name = name
        self.broker = broker
        self.store = store
        self.metrics = metrics
        self.owner = owner
        self.policy = policy
        self._on_change = on_change
        self._positions = Positions()
        self._clock = time.monotonic
        self.compensation = Compensation(self)
        """Its sagas' rollback: the rollback topic's consumer, compensations, rollback node."""
        self.operations = Operations(self)
        """What operators may do to its sagas: retry, compensate, resolve."""
        self.admission = Admission(
            name,
            max_in_flight=policy.max_in_flight,
            retry_after=policy.retry_pushback_seconds,
            metrics=metrics,
        )
        """Whether a new call is taken on this replica (`max_in_flight`, a full first topic)."""
        # Callers of this replica waiting on a saga, by request id: this replica's writes
        # wake them, and the store's change feed (`listen`) every other replica's.
        self._waiters: dict[str, set[Watch]] = {}

    @property
    def kind(self) -> str:
        """How its sagas run: `sync`, `async`, `throttling` or `inline`."""
        return self.definition.kind

    def listen(self) -> Callable[[], None]:
        """Hear of every other replica's writes to this facade's sagas through the store's
        change feed (`SagaStore.subscribe_changes`), waking the callers waiting on them
        (this replica's own writes wake them directly); returns a function that stops it."""
        return self.store.subscribe_changes(self._heard, self._wake_all, others_only=True)

    # --- beginning ---------------------------------------------------------------------

    async def begin(self, request_id: str, payload: str) -> SagaRecord | None:
        """Record a new saga, its first step started; or the one this request began before.

        The same request id with another payload is ALREADY_EXISTS; a request id
        no saga could carry is INVALID_ARGUMENT. Both are raised before any effect.
        """
        check_request_id(request_id)
        digest = payload_digest(self.name, payload)
        now = datetime.now(UTC)
        existing = await self.store.begin(
            NewSaga(
                facade=self.name,
                request_id=request_id,
                kind=self.kind,
                payload=payload,
                payload_hash=digest,
                owner=self.owner,
                first_step=self.definition.steps[0].name,
                deadline_at=now + timedelta(seconds=self.policy.deadline_seconds),
            )
        )
        if existing is None:
            self.metrics.started.inc()
            started = None
            if self.kind != "sync":  # only hops are checked against a position
                started = Position(SagaState.RUNNING, payload, (StepState.RUNNING,), (None,))
                self._positions.put(request_id, started, self._clock())
            self._changed(request_id, started)
            return None
        if existing.payload_hash != digest:
            raise self._another_request(request_id)
        return existing

    def check_same_request(self, request_id: str, recorded: str, payload: str) -> None:
        """ALREADY_EXISTS unless `payload` is the request the saga of `request_id` recorded."""
        if recorded != payload:
            raise self._another_request(request_id)

    def _another_request(self, request_id: str) -> AlreadyExists:
        return AlreadyExists(
            f"request id {request_id!r} was already used for another {self.name} request"
        )

    # --- steps -------------------------------------------------------------------------

    async def run_step(
        self,
        step: StepDefinition,
        request_id: str,
        call: Callable[[], Awaitable[T]],
        *,
        deadline: float | None = None,
        traced: bool = True,
    ) -> T:
        """Run one step's node under its retry policy and timeout, within `deadline` (loop
        time), as the running step (for `step_metadata()`), timed, and traced unless the
        caller's span already covers the step (`traced=False`)."""
        token = enter_step(StepScope(self.name, request_id, step.name, "action"))
        started = time.perf_counter()
        try:
            with self.step_span(step, request_id) if traced else contextlib.nullcontext():
                return await call_with_retry(
                    call,
                    policy=step.retry,
                    attempt_timeout=step.timeout,
                    deadline=deadline,
                    on_retry=functools.partial(self._retrying, request_id, step),
                )
        finally:
            self.metrics.observe_step(step.name, time.perf_counter() - started)
            leave_step(token)

    def step_span(
        self,
        step: StepDefinition,
        request_id: str,
        parent: Mapping[str, str] | None = None,
    ) -> contextlib.AbstractContextManager[object]:
        """The span of one step (a child of `parent`'s trace context when given)."""
        return tracing.span(
            f"step {step.name}",
            {"saga.request_id": request_id, "saga.step": step.name},
            parent=parent,
        )

    def _retrying(
        self, request_id: str, step: StepDefinition, exc: BaseException, attempt: int
    ) -> None:
        self.metrics.retried(step.name)
        log.info(
            "retrying step",
            extra={
                "request_id": request_id,
                "facade": self.name,
                "step": step.name,
                "attempt": attempt,
                "error": classify(exc).reason,
            },
        )

    async def step_ended(self, request_id: str, index: int, data: str) -> bool:
        """Record step `index` done (the next one started, or the saga COMPLETED after the
        last); False when the journal refused it."""
        steps = self.definition.steps
        last = index == len(steps) - 1
        change = (
            StepEnded(index, data, complete=True)
            if last
            else StepEnded(index, data, next_step=steps[index + 1].name)
        )
        if not await self.apply(request_id, change):
            return False
        if last:
            self.metrics.completed.inc()
            log.info("saga completed", extra={"request_id": request_id, "facade": self.name})
        return True

    async def step_restarted(self, request_id: str, index: int) -> bool:
        """Record another attempt of the current step `index`; False when refused."""
        return await self.apply(request_id, StepRestarted(index))

    async def step_pending(self, request_id: str, index: int, reason: str) -> bool:
        """Record that step `index`'s message never reached the broker; False when refused."""
        return await self.apply(request_id, StepPending(index, reason))

    async def position(self, request_id: str) -> Position | None:
        """Where the saga stands: as this replica last wrote it if that is recent (see
        `_positions`), else as the store says."""
        known = self._positions.get(request_id, self._clock())
        if known is not None:
            return known
        return await self.stored_position(request_id)

    async def stored_position(self, request_id: str) -> Position | None:
        """Where the saga stands as the store says (another replica may have moved it past
        what this replica last wrote of it)."""
        position = await self.store.position(self.name, request_id)
        if position is not None:
            self._positions.put(request_id, position, self._clock())
        else:
            self._positions.forget(request_id)
        return position

    async def apply(
        self,
        request_id: str,
        change: Change | OperatorChange,
        action: ActionRecord | None = None,
    ) -> bool:
        """Apply a journal write (with the operator's `action` that makes it, recorded in
        the same write); a refusal is counted and logged, never raised."""
        if action is not None:
            applied = await self.store.act(self.name, request_id, change, action)
        else:
            assert not isinstance(change, _OPERATOR_CHANGES)
            applied = await self.store.apply(self.name, request_id, change)
        if applied:
            position = None
            if isinstance(change, _OPERATOR_CHANGES):
                self._positions.forget(request_id)
            else:
                position = self._positions.applied(request_id, change, self._clock())
            self._changed(request_id, position)
            return True
        self._positions.forget(request_id)
        kind = type(change).__name__
        self.metrics.refused(kind)
        log.info(
            "journal refused a write: the saga is not where it expected",
            extra={"request_id": request_id, "facade": self.name, "write": kind},
        )
        return False

    # --- failing and rolling back ------------------------------------------------------

    def to_undo(self, index: int, failure: Failure, *, uncertain: bool = False) -> tuple[int, ...]:
        """The steps to compensate when step `index` fails: those before it, and itself when
        it may have taken effect (an uncertain failure)."""
        if uncertain or failure.code in UNCERTAIN_CODES:
            return tuple(range(index + 1))
        return tuple(range(index))

    async def fail(
        self,
        request_id: str,
        index: int,
        failure: Failure,
        *,
        cause: BaseException | None = None,
        data: str | None = None,
        inline_fallback: bool,
        uncertain: bool = False,
        action: ActionRecord | None = None,
    ) -> bool:
        """Step `index` failed: record it and roll the saga back; False when the journal
        refused (the saga was no longer at that step: someone else rolled it back).

        The journal write comes first; then the rollback message goes to the
        broker. With `inline_fallback` (a sync caller, recovery: nobody would
        redeliver) a broker that refuses it makes the compensation run here.
        """
        log.log(
            logging.ERROR if failure.bug else logging.INFO,
            "step failed",
            exc_info=cause if failure.bug else None,
            extra={
                **self.fields(request_id),
                "step": self.definition.steps[index].name,
                "code": failure.code.name,
                "reason": failure.reason,
            },
        )
        undo = self.to_undo(index, failure, uncertain=uncertain)
        compensating = self.definition.undoing(undo)
        change = StepFailed(
            index,
            failure.code.name,
            failure.reason,
            undo=undo,
            deadline_at=(
                datetime.now(UTC) + timedelta(seconds=self.policy.compensation_seconds)
                if compensating
                else None
            ),
            then=SagaState.COMPENSATING if compensating else SagaState.COMPENSATED,
            data=data,
        )
        if not await self.apply(request_id, change, action):
            return False
        self.metrics.failed(failure.code.name)
        if not compensating:
            self.metrics.compensated.inc()
            log.info("nothing to undo: compensated", extra=self.fields(request_id))
            return True
        await self.roll_back(request_id, inline_fallback=inline_fallback)
        return True

    async def roll_back(self, request_id: str, *, inline_fallback: bool) -> None:
        """Hand the saga's rollback to the broker: a message naming the saga, on the
        facade's rollback topic, consumed by `compensation.on_rollback` on any replica."""
        body = json.dumps({"facade": self.name, "request_id": request_id}).encode()
        try:
            await self.broker.publish(
                self.definition.rollback_topic,
                body,
                message_id=f"{self.name}:{request_id}:rollback",
                headers=tracing.inject(),
            )
        except BrokerUnavailable:
            if not inline_fallback:
                raise
            # Nobody would deliver it again: run it here rather than leave it half-done.
            log.warning(
                "broker refused the rollback, running it inline", extra=self.fields(request_id)
            )
            saga = await self.store.get(self.name, request_id)
            if saga is not None and saga.state == SagaState.COMPENSATING:
                await self.compensation.run(saga)

    # --- recovery ----------------------------------------------------------------------

    async def recover(self, saga: SagaRecord, *, expired: bool) -> None:
        """Drive a stalled saga to an end: roll back a RUNNING one (its current step may
        have taken effect), compensate a COMPENSATING one here."""
        request_id = saga.request_id
        cause = "deadline" if expired else "orphaned"
        self.metrics.recovered(cause)
        log.warning(
            "recovering a stalled saga",
            extra={**self.fields(request_id), "state": str(saga.state), "cause": cause},
        )
        if saga.state == SagaState.COMPENSATING:
            await self.compensation.run(saga)
            return
        current = saga.current_step
        if saga.state != SagaState.RUNNING or current is None:
            return
        if expired:
            failure = Failure(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the saga outlived its deadline ({self.policy.deadline_seconds:g}s) "
                f"at {current.name}; it was rolled back",
            )
        else:
            failure = Failure(
                grpc.StatusCode.ABORTED,
                f"the replica running the saga stopped at {current.name}; it was rolled back",
            )
        await self.fail(request_id, current.index, failure, inline_fallback=True, uncertain=True)

    # --- waiting on a saga -------------------------------------------------------------

    def _changed(self, request_id: str, position: Position | None) -> None:
        """This replica wrote the saga, leaving it at `position` when known."""
        for watch in self._waiters.get(request_id, ()):
            watch.wrote(position)
        self._on_change(self.name, request_id)

    def _heard(self, facade: str, request_id: str) -> None:
        if facade == self.name:
            for watch in self._waiters.get(request_id, ()):
                watch.heard()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for watch in waiters:
                watch.heard()

    @contextlib.contextmanager
    def watching(self, request_id: str, *, before_begin: bool = False) -> Iterator[Watch]:
        """A `Watch` of the saga: woken on every write to it heard here (this replica's, and
        every other replica's through the change feed), for as long as the block runs;
        `before_begin` when the caller has not begun the saga yet (see `Watch`)."""
        watch = Watch(before_begin=before_begin)
        waiters = self._waiters.setdefault(request_id, set())
        waiters.add(watch)
        try:
            yield watch
        finally:
            waiters.discard(watch)
            if not waiters:
                del self._waiters[request_id]

    async def wait_until(
        self,
        request_id: str,
        done: Callable[[SagaRecord], bool],
        *,
        past_running: bool = False,
    ) -> SagaRecord:
        """The saga once `done(saga)` holds (the caller bounds the wait).

        The saga is read again only when it changed: this replica's writes wake
        the wait at once, and while the store announces every replica's
        (`announces_changes`: the change feed `listen` hears), so do theirs,
        and a gap in that feed. A store that announces nothing right now (one
        without a feed, or one whose feed is down) is read again once a second
        for a saga run here, and every 0.01 s backing off to 0.2 s for one run
        elsewhere. With `past_running` (`done` never holds for a RUNNING saga:
        waiting for its end), each wake reads the saga's position first, and the
        whole record only once it left RUNNING.
        """
        with self.watching(request_id) as watch:
            changed = watch.event
            delay = 0.01
            while True:
                # Cleared before the read: a write landing during it wakes the next wait.
                changed.clear()
                if past_running and self.store.announces_changes:
                    position = await self.store.position(self.name, request_id)
                    if position is None:
                        raise KeyError(f"no saga {self.name}/{request_id}")
                    if position.state == SagaState.RUNNING:
                        await changed.wait()
                        continue
                saga = await self.store.get(self.name, request_id)
                if saga is None:
                    raise KeyError(f"no saga {self.name}/{request_id}")
                if done(saga):
                    return saga
                if self.store.announces_changes:
                    # Every change, and the feed dropping, sets it: nothing to poll for.
                    await changed.wait()
                    continue
                local = saga.owner == self.owner
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0 if local else delay):
                        await changed.wait()
                delay = min(delay * 2, 0.2)

    async def recorded(self, request_id: str, within: float) -> Position | None:
        """Where the saga stands once it is recorded, waiting up to `within` seconds for its
        begin (a first hop is published before its saga's begin commits); None after that.
        Woken as `wait_until` is; a store that announces nothing is read every 0.05 s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        with self.watching(request_id) as watch:
            changed = watch.event
            while True:
                changed.clear()
                position = await self.store.position(self.name, request_id)
                if position is not None:
                    return position
                left = deadline - loop.time()
                if left <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(
                        left if self.store.announces_changes else min(left, 0.05)
                    ):
                        await changed.wait()

    def failure_of(self, saga: SagaRecord) -> SagaFailed:
        """The error a caller gets for a saga that failed, as its first run raised it."""
        failed = saga.failed_step
        code = grpc.StatusCode[saga.error_code] if saga.error_code else grpc.StatusCode.ABORTED
        return SagaFailed(
            request_id=saga.request_id,
            facade=self.name,
            step=failed.name if failed is not None else "?",
            failure=Failure(code, saga.error_reason or "the saga failed"),
        )

    def fields(self, request_id: str) -> dict[str, Any]:
        """The log fields that name a saga of this facade."""
        return {"request_id": request_id, "facade": self.name}
