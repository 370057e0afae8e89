"""The saga status service (`orchestrator.v1.SagaService`): read-only gRPC access to the store.

`GetSaga` returns one saga, `ListSagas` pages through them newest first, and
`WatchSaga` streams one saga as it changes until it reaches a final state.
`OrchestratorServer` serves it beside the application's services; to serve
it elsewhere::

    saga_service, status = saga_grpc_service(store, facades=[...])

A saga is named by its facade and request id. Without a facade, the request
id is looked up in every registered facade: found in one, that saga; in
several, FAILED_PRECONDITION naming them (the same id sent to two endpoints is
two sagas).

Watchers are woken at once by this replica's writes, through
`status.notify(facade, request_id)`, which `OrchestratorServer` subscribes to
`Orchestrator.on_saga_change`. Other replicas' writes reach them through the
store's change feed where it has one (`SagaStore.subscribe_changes`: LISTEN /
NOTIFY on PostgreSQL, datagrams between the processes on one SQLite file), and
while that feed is live a watcher reads the store only every
`safety_poll_interval` besides; without one, or while it is down, watchers
poll the store every `poll_interval`.

Page tokens: the store's `list_sagas` raises ValueError for a `page_token` it
did not issue (or cannot parse); the service answers INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from orchestrator.proto import saga_pb2, saga_pb2_grpc
from orchestrator.request_id import MAX_REQUEST_ID_LENGTH
from orchestrator.service import GrpcService
from orchestrator.store import (
    ActionRecord,
    CompensationState,
    SagaRecord,
    SagaState,
    SagaStore,
    StepRecord,
    StepState,
)

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_SAFETY_POLL_INTERVAL",
    "MAX_PAGE_SIZE",
    "SAGA_SERVICE_NAME",
    "SagaStatusService",
    "action_to_proto",
    "resolve_facade",
    "saga_grpc_service",
    "saga_state_from_proto",
    "saga_state_to_proto",
    "saga_to_proto",
    "step_state_from_proto",
    "step_state_to_proto",
    "to_timestamp",
]

SAGA_SERVICE_NAME = "orchestrator.v1.SagaService"
"""The full name of the service, for reflection and health."""
DEFAULT_PAGE_SIZE = 50
"""Sagas a ListSagas page holds when the request says 0."""
MAX_PAGE_SIZE = 500
"""Larger page sizes are lowered to this, so one call cannot load the whole store."""
DEFAULT_POLL_INTERVAL = 0.2
"""Seconds between a watcher's reads of a store that announces no changes."""
DEFAULT_SAFETY_POLL_INTERVAL = 5.0
"""Seconds between a watcher's reads while the store's change feed is live: only a safety net."""

ServicerContext = grpc.aio.ServicerContext[Any, Any]

_SAGA_STATES: dict[SagaState, saga_pb2.SagaState.ValueType] = {
    SagaState.RUNNING: saga_pb2.RUNNING,
    SagaState.COMPLETED: saga_pb2.COMPLETED,
    SagaState.COMPENSATING: saga_pb2.COMPENSATING,
    SagaState.COMPENSATED: saga_pb2.COMPENSATED,
    SagaState.COMPENSATION_FAILED: saga_pb2.COMPENSATION_FAILED,
    SagaState.RESOLVED: saga_pb2.RESOLVED,
}
_SAGA_STATES_FROM_PROTO = {value: state for state, value in _SAGA_STATES.items()}
_STEP_STATES: dict[StepState, saga_pb2.StepState.ValueType] = {
    StepState.RUNNING: saga_pb2.STEP_RUNNING,
    StepState.DONE: saga_pb2.STEP_DONE,
    StepState.FAILED: saga_pb2.STEP_FAILED,
    StepState.PENDING: saga_pb2.STEP_PENDING,
}
_STEP_STATES_FROM_PROTO = {value: state for state, value in _STEP_STATES.items()}
_COMPENSATION_STATES: dict[CompensationState, saga_pb2.CompensationState.ValueType] = {
    CompensationState.NONE: saga_pb2.COMPENSATION_STATE_NONE,
    CompensationState.PENDING: saga_pb2.COMPENSATION_STATE_PENDING,
    CompensationState.DONE: saga_pb2.COMPENSATION_STATE_DONE,
    CompensationState.FAILED: saga_pb2.COMPENSATION_STATE_FAILED,
}


def saga_state_to_proto(state: SagaState) -> saga_pb2.SagaState.ValueType:
    """The protobuf value of a saga state."""
    return _SAGA_STATES[state]


def saga_state_from_proto(value: int) -> SagaState | None:
    """The saga state of a protobuf value; None for SAGA_STATE_UNSPECIFIED.

    Raises ValueError for a number the enum does not define (proto3 enums are open).
    """
    if value == saga_pb2.SAGA_STATE_UNSPECIFIED:
        return None
    try:
        return _SAGA_STATES_FROM_PROTO[saga_pb2.SagaState.ValueType(value)]
    except KeyError:
        raise ValueError(f"unknown saga state {value}") from None


def step_state_to_proto(state: StepState) -> saga_pb2.StepState.ValueType:
    """The protobuf value of a step state."""
    return _STEP_STATES[state]


def step_state_from_proto(value: int) -> StepState:
    """The step state of a protobuf value; ValueError for UNSPECIFIED or an unknown number."""
    try:
        return _STEP_STATES_FROM_PROTO[saga_pb2.StepState.ValueType(value)]
    except KeyError:
        raise ValueError(f"not a step state: {value}") from None


def to_timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """`moment` as a Timestamp; a naive datetime is taken as UTC."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _step_to_proto(step: StepRecord) -> saga_pb2.Step:
    return saga_pb2.Step(
        index=step.index,
        name=step.name,
        state=step_state_to_proto(step.state),
        attempts=step.attempts,
        started_at=to_timestamp(step.started_at),
        # Left unset while the step runs, so clients can tell "not yet" from a time.
        finished_at=to_timestamp(step.finished_at) if step.finished_at is not None else None,
        error=step.error,
        compensation=_COMPENSATION_STATES[step.compensation],
        compensated_at=to_timestamp(step.compensated_at) if step.compensated_at else None,
        compensation_error=step.compensation_error,
    )


def action_to_proto(action: ActionRecord) -> saga_pb2.OperatorAction:
    """The OperatorAction message of an action on a saga's record."""
    return saga_pb2.OperatorAction(
        action=action.action,
        actor=action.actor,
        note=action.note,
        at=to_timestamp(action.at),
        dead_letter_id=action.dead_letter_id,
    )


def saga_to_proto(record: SagaRecord, actions: Sequence[ActionRecord] = ()) -> saga_pb2.Saga:
    """The Saga message of a stored saga, steps by index, with the operators' `actions`.
    Payload, data and owner stay private."""
    return saga_pb2.Saga(
        actions=[action_to_proto(action) for action in actions],
        request_id=record.request_id,
        facade=record.facade,
        kind=record.kind,
        state=saga_state_to_proto(record.state),
        steps=[_step_to_proto(step) for step in sorted(record.steps, key=lambda s: s.index)],
        error_code=record.error_code,
        error_reason=record.error_reason,
        created_at=to_timestamp(record.created_at),
        updated_at=to_timestamp(record.updated_at),
        deadline_at=to_timestamp(record.deadline_at) if record.deadline_at else None,
    )


async def _checked_request_id(request_id: str, context: ServicerContext) -> str:
    """`request_id`, or abort with INVALID_ARGUMENT when no saga could have it."""
    if not request_id:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request_id is {len(request_id)} characters long; at most {MAX_REQUEST_ID_LENGTH}",
        )
    return request_id


def _not_found(request_id: str, facade: str = "") -> str:
    where = f" in facade {facade!r}" if facade else ""
    return f"no saga with request_id {request_id!r}{where}"


async def resolve_facade(
    store: SagaStore,
    facades: Sequence[str],
    facade: str,
    request_id: str,
    context: ServicerContext,
) -> str:
    """The facade of the saga named by `request_id` (and `facade`, when given); aborts with
    NOT_FOUND, or FAILED_PRECONDITION when several of `facades` hold the id."""
    if facade:
        return facade
    holders = [f for f in facades if await store.get(f, request_id) is not None]
    if not holders:
        await context.abort(grpc.StatusCode.NOT_FOUND, _not_found(request_id))
    if len(holders) > 1:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"request_id {request_id!r} is held by sagas of several facades "
            f"({', '.join(sorted(holders))}): name one in facade",
        )
    return holders[0]


class SagaStatusService(saga_pb2_grpc.SagaServiceServicer):
    """Serves `orchestrator.v1.SagaService` from a SagaStore.

    Local writes reach a watcher at once when the framework calls `notify`;
    other replicas' through the store's change feed (it subscribes at once),
    with a read every `safety_poll_interval` while that feed is live.
    Without a live feed, `poll_interval` is how often a watcher reads the
    store: the longest a change made by another replica takes to reach it.
    """

    def __init__(
        self,
        store: SagaStore,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        safety_poll_interval: float = DEFAULT_SAFETY_POLL_INTERVAL,
        facades: Sequence[str] = (),
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive; got {poll_interval}")
        if safety_poll_interval <= 0:
            raise ValueError(f"safety_poll_interval must be positive; got {safety_poll_interval}")
        self._store = store
        self._facades = tuple(facades)
        self.poll_interval = poll_interval
        self.safety_poll_interval = safety_poll_interval
        # One event per running watch, by request id; notify() sets them.
        self._wakers: dict[tuple[str, str], set[asyncio.Event]] = {}
        self._unsubscribe = store.subscribe_changes(self.notify, self.notify_all)

    def close(self) -> None:
        """Stop hearing of the store's changes (watchers fall back on polling)."""
        self._unsubscribe()

    @property
    def active_watches(self) -> int:
        """WatchSaga calls in progress on this servicer."""
        return sum(len(wakers) for wakers in self._wakers.values())

    def notify(self, facade: str, request_id: str) -> None:
        """Wake the watchers of the saga now rather than at their next poll.

        Call it after each write to the saga, from the event loop's thread
        (asyncio events are not thread-safe). Cheap when nobody watches.
        """
        for waker in self._wakers.get((facade, request_id), ()):
            waker.set()

    def notify_all(self) -> None:
        """Wake every watcher now: changes may have gone unannounced (the store's change
        feed dropped or came back). Same rules as `notify`."""
        for wakers in self._wakers.values():
            for waker in wakers:
                waker.set()

    async def _resolve(self, facade: str, request_id: str, context: ServicerContext) -> str:
        return await resolve_facade(self._store, self._facades, facade, request_id, context)

    async def GetSaga(
        self, request: saga_pb2.GetSagaRequest, context: ServicerContext
    ) -> saga_pb2.Saga:
        """The saga of `request_id`; NOT_FOUND naming it when there is none."""
        request_id = await _checked_request_id(request.request_id, context)
        facade = await self._resolve(request.facade, request_id, context)
        record = await self._store.get(facade, request_id)
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, _not_found(request_id, facade))
        return saga_to_proto(record, await self._store.actions(facade, request_id))

    async def ListSagas(
        self, request: saga_pb2.ListSagasRequest, context: ServicerContext
    ) -> saga_pb2.ListSagasResponse:
        """A page of sagas, newest first, filtered by facade, state and request id prefix."""
        if request.page_size < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"page_size must not be negative; got {request.page_size}",
            )
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        if len(request.request_id_prefix) > MAX_REQUEST_ID_LENGTH:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request_id_prefix is {len(request.request_id_prefix)} characters long; "
                f"at most {MAX_REQUEST_ID_LENGTH}",
            )
        try:
            state = saga_state_from_proto(request.state)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            page = await self._store.list_sagas(
                facade=request.facade,
                state=state,
                page_size=page_size,
                page_token=request.page_token,
                request_id_prefix=request.request_id_prefix,
            )
        except ValueError as exc:
            # Only a token can be the caller's fault; without one a ValueError is a bug.
            if not request.page_token:
                raise
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid page_token: {exc}")
        return saga_pb2.ListSagasResponse(
            sagas=[saga_to_proto(record) for record in page.sagas],
            next_page_token=page.next_page_token,
        )

    async def WatchSaga(
        self, request: saga_pb2.WatchSagaRequest, context: ServicerContext
    ) -> AsyncIterator[saga_pb2.Saga]:
        """The saga now, then each time it changes; ends after a final state is sent.

        A change is anything the Saga message shows (state, updated_at, steps,
        error). The loop ends with the call: grpc cancels it when the client
        cancels or the deadline passes.
        """
        request_id = await _checked_request_id(request.request_id, context)
        facade = await self._resolve(request.facade, request_id, context)
        key = (facade, request_id)
        waker = asyncio.Event()
        wakers = self._wakers.setdefault(key, set())
        wakers.add(waker)
        try:
            sent: saga_pb2.Saga | None = None
            while True:
                # Cleared before the read, so a notify() that lands during it
                # is not lost: the wait below then returns at once.
                waker.clear()
                record = await self._store.get(facade, request_id)
                if record is None:
                    # Unknown at the start, or deleted while watched.
                    await context.abort(grpc.StatusCode.NOT_FOUND, _not_found(request_id, facade))
                saga = saga_to_proto(record, await self._store.actions(facade, request_id))
                if saga != sent:
                    yield saga
                    sent = saga
                if record.finished:
                    return
                # Asked at each turn: the feed may have dropped or come back meanwhile
                # (either way notify_all woke this watcher).
                wait = (
                    self.safety_poll_interval
                    if self._store.announces_changes
                    else self.poll_interval
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await waker.wait()
        finally:
            wakers.discard(waker)
            if not wakers and self._wakers.get(key) is wakers:
                del self._wakers[key]


def saga_grpc_service(
    store: SagaStore,
    *,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    safety_poll_interval: float = DEFAULT_SAFETY_POLL_INTERVAL,
    facades: Sequence[str] = (),
) -> tuple[GrpcService, SagaStatusService]:
    """The status service over `store`, ready for OrchestratorServer, and its servicer.

    `facades` are the registered facade names, where a request id alone is looked up.
    Keep the servicer to call `notify(facade, request_id)` after the framework's writes.
    """
    servicer = SagaStatusService(
        store,
        poll_interval=poll_interval,
        safety_poll_interval=safety_poll_interval,
        facades=facades,
    )
    service = GrpcService(
        SAGA_SERVICE_NAME, saga_pb2_grpc.add_SagaServiceServicer_to_server, servicer
    )
    return service, servicer
