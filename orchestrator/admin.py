"""The operators' service (`orchestrator.v1.SagaAdmin`): act on sagas and dead letters.

`OrchestratorServer` serves it beside `SagaService`; its access rules (read
for the listing, operate for the actions) are the server's access
interceptor's. Every action is checked before any effect (bad input is
INVALID_ARGUMENT, a saga or dead letter that is not there NOT_FOUND, one in a
state the action does not apply to FAILED_PRECONDITION naming the state),
written to the saga's record with the caller and the note, logged, and
counted in `orchestrator_operator_actions_total` by action and outcome.

Replaying a dead letter puts its message back on its topic as it was; the
journal decides whether it still applies (a hop for a saga that moved on is
dropped or dead-lettered again, with its reason). A replay or a discard
settles the dead letter once: the second is FAILED_PRECONDITION.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Mapping
from typing import Any, NoReturn

import grpc

from orchestrator.broker.base import (
    DEAD_LETTER_ID_HEADER,
    DEAD_LETTERED_AT_HEADER,
    DELIVERIES_HEADER,
    REASON_HEADER,
)
from orchestrator.errors import BrokerUnavailable
from orchestrator.facade._operations import MAX_NOTE_LENGTH, Refused, operator_action
from orchestrator.facade._runtime import SagaRuntime
from orchestrator.proto import saga_pb2, saga_pb2_grpc
from orchestrator.registry import Orchestrator
from orchestrator.request_id import MAX_REQUEST_ID_LENGTH
from orchestrator.service import GrpcService
from orchestrator.status import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    resolve_facade,
    saga_state_to_proto,
    saga_to_proto,
    to_timestamp,
)
from orchestrator.store import (
    DeadLetterRecord,
    DeadLetterState,
    SagaRecord,
)

__all__ = ["SAGA_ADMIN_NAME", "SagaAdminService", "admin_grpc_service"]

log = logging.getLogger("orchestrator.admin")

SAGA_ADMIN_NAME = "orchestrator.v1.SagaAdmin"
"""The full name of the service, for reflection, health and access rules."""

ServicerContext = grpc.aio.ServicerContext[Any, Any]

_LETTER_STATES: dict[DeadLetterState, saga_pb2.DeadLetterState.ValueType] = {
    DeadLetterState.WAITING: saga_pb2.DEAD_LETTER_WAITING,
    DeadLetterState.REPLAYED: saga_pb2.DEAD_LETTER_REPLAYED,
    DeadLetterState.DISCARDED: saga_pb2.DEAD_LETTER_DISCARDED,
}
_LETTER_STATES_FROM_PROTO = {value: state for state, value in _LETTER_STATES.items()}
_DEAD_LETTER_HEADERS = (
    REASON_HEADER,
    DEAD_LETTER_ID_HEADER,
    DEAD_LETTERED_AT_HEADER,
    DELIVERIES_HEADER,
    "x-orchestrator-topic",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
    "x-last-death-reason",
    "x-last-death-queue",
    "x-last-death-exchange",
)
"""Headers a message got by being dead-lettered: a replay puts it back without them."""


class SagaAdminService(saga_pb2_grpc.SagaAdminServicer):
    """Serves `orchestrator.v1.SagaAdmin` for an Orchestrator's facades."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator

    # --- sagas ---------------------------------------------------------------------------

    async def RetrySaga(
        self, request: saga_pb2.RetrySagaRequest, context: ServicerContext
    ) -> saga_pb2.Saga:
        """Run a COMPENSATION_FAILED saga's compensations, or a RUNNING async saga's
        current step, again."""
        note = await _note(request.note, context, required=False)
        runtime, saga = await self._saga(request.facade, request.request_id, context)
        await self._act("retry", context, runtime.operations.retry(saga, note))
        return await self._saga_message(runtime, saga.request_id)

    async def CompensateSaga(
        self, request: saga_pb2.CompensateSagaRequest, context: ServicerContext
    ) -> saga_pb2.Saga:
        """Roll a RUNNING saga back now."""
        reason = await _note(request.reason, context, required=False, name="reason")
        runtime, saga = await self._saga(request.facade, request.request_id, context)
        await self._act("compensate", context, runtime.operations.compensate(saga, reason))
        return await self._saga_message(runtime, saga.request_id)

    async def ResolveSaga(
        self, request: saga_pb2.ResolveSagaRequest, context: ServicerContext
    ) -> saga_pb2.Saga:
        """End a saga RESOLVED: an operator settled it by hand."""
        note = await _note(request.note, context, required=True)
        runtime, saga = await self._saga(request.facade, request.request_id, context)
        await self._act("resolve", context, runtime.operations.resolve(saga, note))
        return await self._saga_message(runtime, saga.request_id)

    async def _saga(
        self, facade: str, request_id: str, context: ServicerContext
    ) -> tuple[SagaRuntime, SagaRecord]:
        if not request_id.strip():
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        if len(request_id) > MAX_REQUEST_ID_LENGTH:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request_id is {len(request_id)} characters long; at most {MAX_REQUEST_ID_LENGTH}",
            )
        facades = self.orchestrator.facades
        if facade and facade not in facades:
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no facade named {facade!r} (registered: {', '.join(sorted(facades))})",
            )
        store = self.orchestrator.store
        name = await resolve_facade(store, sorted(facades), facade, request_id, context)
        saga = await store.get(name, request_id)
        if saga is None:
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no saga with request_id {request_id!r} in facade {name!r}",
            )
        return facades[name].runtime, saga

    async def _act(self, name: str, context: ServicerContext, action: Awaitable[None]) -> None:
        counter = self.orchestrator.metrics.operator_actions
        try:
            await action
        except Refused as exc:
            counter.labels(name, "refused").inc()
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except BrokerUnavailable as exc:
            # Recorded, but its message did not go out: recovery finishes it at its deadline.
            counter.labels(name, "failed").inc()
            await _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"the {name} was recorded but the broker refused its message ({exc}); "
                "recovery finishes it at the saga's deadline, or retry",
            )
        counter.labels(name, "done").inc()

    async def _saga_message(self, runtime: SagaRuntime, request_id: str) -> saga_pb2.Saga:
        store = self.orchestrator.store
        saga = await store.get(runtime.name, request_id)
        assert saga is not None  # sagas are never deleted while the process acts on them
        return saga_to_proto(saga, await store.actions(runtime.name, request_id))

    # --- dead letters --------------------------------------------------------------------

    async def ListDeadLetters(
        self, request: saga_pb2.ListDeadLettersRequest, context: ServicerContext
    ) -> saga_pb2.ListDeadLettersResponse:
        """A page of dead letters, newest first, each joined to its saga."""
        if request.page_size < 0:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"page_size must not be negative; got {request.page_size}",
            )
        if request.state == saga_pb2.DEAD_LETTER_STATE_UNSPECIFIED:
            state = DeadLetterState.WAITING
        elif request.state in _LETTER_STATES_FROM_PROTO:
            state = _LETTER_STATES_FROM_PROTO[request.state]
        else:
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"unknown state {request.state}"
            )
        try:
            page = await self.orchestrator.store.list_dead_letters(
                topic=request.topic,
                facade=request.facade,
                state=state,
                page_size=min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE),
                page_token=request.page_token,
            )
        except ValueError as exc:
            if not request.page_token:
                raise
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"invalid page_token: {exc}")
        return saga_pb2.ListDeadLettersResponse(
            dead_letters=[await self._letter_message(letter) for letter in page.letters],
            next_page_token=page.next_page_token,
        )

    async def ReplayDeadLetter(
        self, request: saga_pb2.ReplayDeadLetterRequest, context: ServicerContext
    ) -> saga_pb2.DeadLetter:
        """Put a dead letter's message back on its topic, once."""
        note = await _note(request.note, context, required=False)
        letter = await self._waiting_letter(request.id, "replay", context)
        action = operator_action("replay", note, dead_letter_id=letter.id)
        store = self.orchestrator.store
        counter = self.orchestrator.metrics.operator_actions
        if not await store.settle_dead_letter(letter.id, DeadLetterState.REPLAYED, action):
            await self._settled_meanwhile(letter.id, "replay", context)
        try:
            await self.orchestrator.broker.publish(
                letter.topic,
                letter.body,
                message_id=letter.message_id,
                headers=_replayed_headers(letter.headers),
            )
        except BrokerUnavailable as exc:
            await store.unsettle_dead_letter(letter.id)
            counter.labels("replay", "failed").inc()
            await _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"dead letter {letter.id} (request_id {letter.request_id!r}) was not replayed: "
                f"{exc}; it is still waiting",
            )
        counter.labels("replay", "done").inc()
        self._logged(letter, "replay", action.actor, note)
        return await self._letter_message(await self._letter(letter.id))

    async def DiscardDeadLetter(
        self, request: saga_pb2.DiscardDeadLetterRequest, context: ServicerContext
    ) -> saga_pb2.DeadLetter:
        """Drop a dead letter with a note, once."""
        note = await _note(request.note, context, required=True)
        letter = await self._waiting_letter(request.id, "discard", context)
        action = operator_action("discard", note, dead_letter_id=letter.id)
        store = self.orchestrator.store
        if not await store.settle_dead_letter(letter.id, DeadLetterState.DISCARDED, action):
            await self._settled_meanwhile(letter.id, "discard", context)
        self.orchestrator.metrics.operator_actions.labels("discard", "done").inc()
        self._logged(letter, "discard", action.actor, note)
        return await self._letter_message(await self._letter(letter.id))

    async def _waiting_letter(
        self, letter_id: str, verb: str, context: ServicerContext
    ) -> DeadLetterRecord:
        if not letter_id.strip() or len(letter_id) > 64:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "id: 1 to 64 characters")
        letter = await self.orchestrator.store.get_dead_letter(letter_id)
        if letter is None:
            self.orchestrator.metrics.operator_actions.labels(verb, "not_found").inc()
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"no dead letter {letter_id!r}")
        if letter.state != DeadLetterState.WAITING:
            await self._settled_meanwhile(letter_id, verb, context)
        return letter

    async def _settled_meanwhile(
        self, letter_id: str, verb: str, context: ServicerContext
    ) -> NoReturn:
        letter = await self._letter(letter_id)
        self.orchestrator.metrics.operator_actions.labels(verb, "refused").inc()
        when = letter.settled_at.isoformat() if letter.settled_at else "?"
        await _abort(
            context,
            grpc.StatusCode.FAILED_PRECONDITION,
            f"dead letter {letter_id} (request_id {letter.request_id!r}) was already "
            f"{letter.state} by {letter.settled_by or '?'} at {when}",
        )

    async def _letter(self, letter_id: str) -> DeadLetterRecord:
        letter = await self.orchestrator.store.get_dead_letter(letter_id)
        assert letter is not None  # dead letters are never deleted
        return letter

    async def _letter_message(self, letter: DeadLetterRecord) -> saga_pb2.DeadLetter:
        saga_state = saga_pb2.SAGA_STATE_UNSPECIFIED
        if letter.facade and letter.request_id:
            position = await self.orchestrator.store.position(letter.facade, letter.request_id)
            if position is not None:
                saga_state = saga_state_to_proto(position.state)
        return saga_pb2.DeadLetter(
            id=letter.id,
            topic=letter.topic,
            facade=letter.facade,
            request_id=letter.request_id,
            step=letter.step,
            saga_state=saga_state,
            reason=letter.reason,
            delivery_count=letter.delivery_count,
            dead_lettered_at=to_timestamp(letter.dead_lettered_at),
            body=letter.body,
            message_id=letter.message_id,
            state=_LETTER_STATES[letter.state],
            settled_at=to_timestamp(letter.settled_at) if letter.settled_at else None,
            settled_by=letter.settled_by,
            note=letter.note,
        )

    def _logged(self, letter: DeadLetterRecord, verb: str, actor: str, note: str) -> None:
        if letter.facade and letter.request_id:
            self.orchestrator.saga_changed(letter.facade, letter.request_id)
        log.warning(
            "operator action",
            extra={
                "action": verb,
                "actor": actor,
                "note": note,
                "dead_letter": letter.id,
                "topic": letter.topic,
                "facade": letter.facade,
                "request_id": letter.request_id,
            },
        )


async def _note(value: str, context: ServicerContext, *, required: bool, name: str = "note") -> str:
    if required and not value.strip():
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{name} is required")
    if len(value) > MAX_NOTE_LENGTH:
        await _abort(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{name} is {len(value)} characters long; at most {MAX_NOTE_LENGTH}",
        )
    return value.strip()


async def _abort(context: ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: abort raises")


def _replayed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {key: value for key, value in headers.items() if key not in _DEAD_LETTER_HEADERS}


def admin_grpc_service(orchestrator: Orchestrator) -> GrpcService:
    """The admin service of `orchestrator`, ready for `OrchestratorServer`."""
    return GrpcService(
        SAGA_ADMIN_NAME,
        saga_pb2_grpc.add_SagaAdminServicer_to_server,
        SagaAdminService(orchestrator),
    )
