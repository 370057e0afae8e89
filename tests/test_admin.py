"""Operators act on sagas and dead letters through SagaAdmin, on a real RabbitMQ.

The booking service runs in process with a SQLite journal, its upstreams are
the real Order and Payment services over gRPC; the admin API is called over
gRPC like any client would. Each test is judged from the ledgers and the
journal: every saga reaches an end, each compensation happens once, a
message acts only where the journal lets it.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from main import BookingApp
from main import running_app as run_booking_app
from orchestrator.config import BrokerSettings
from orchestrator.proto import saga_pb2, saga_pb2_grpc
from orchestrator.store import SagaRecord, SagaState
from pb import booking_pb2_grpc
from tests.support.app_fixtures import Upstreams
from tests.support.sagas import Outcome, kept_dead_letters, outcome_of
from tests.test_booking_async import queues_drained
from tests.test_journal_governs import ASYNC_BOOKING, book, finished, journal_settings
from topic import CANCEL_ASYNC_BOOKING, CREATE_ORDER, CREATE_PAYMENT

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


@pytest.fixture
async def app(
    upstreams: Upstreams, rabbit_settings: BrokerSettings, tmp_path: Path
) -> AsyncIterator[BookingApp]:
    settings = journal_settings(upstreams, rabbit_settings, tmp_path)
    settings = settings.model_copy(
        update={"dead_letters": settings.dead_letters.model_validate({"interval_seconds": 0.1})}
    )
    async with run_booking_app(settings) as app:
        yield app


@dataclass
class Site:
    """The running booking service, its upstreams, and clients of its gRPC services."""

    app: BookingApp
    upstreams: Upstreams
    booking: booking_pb2_grpc.BookingServiceAsyncStub
    admin: saga_pb2_grpc.SagaAdminAsyncStub
    status: saga_pb2_grpc.SagaServiceAsyncStub


@pytest.fixture
async def site(app: BookingApp, upstreams: Upstreams) -> AsyncIterator[Site]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
        yield Site(
            app,
            upstreams,
            booking_pb2_grpc.BookingServiceStub(channel),
            saga_pb2_grpc.SagaAdminStub(channel),
            saga_pb2_grpc.SagaServiceStub(channel),
        )


def failing(exc: Exception) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return fail


async def state_of(app: BookingApp, request_id: str) -> SagaState:
    saga = await app.orchestrator.store.get(ASYNC_BOOKING, request_id)
    assert saga is not None
    return saga.state


async def until(app: BookingApp, request_id: str, state: SagaState) -> SagaRecord:
    flow = app.orchestrator.get_async_facade(ASYNC_BOOKING)
    async with asyncio.timeout(30):
        return await flow.runtime.wait_until(request_id, lambda saga: saga.state == state)


def counted(app: BookingApp, action: str, outcome: str) -> float:
    return float(app.orchestrator.metrics.operator_actions.labels(action, outcome)._value.get())


async def compensation_failed(
    app: BookingApp,
    booking: booking_pb2_grpc.BookingServiceAsyncStub,
    upstreams: Upstreams,
    request_id: str,
) -> pytest.MonkeyPatch:
    """A saga whose payment hop cannot run (its upstream fails past the retries) and whose
    rollback node fails too: it ends COMPENSATION_FAILED, its rollback dead-lettered.
    Undo the returned patch to bring the upstreams back."""
    outage = pytest.MonkeyPatch()
    outage.setattr(
        upstreams.payment.ledger, "create_payment", failing(RuntimeError("payments are down"))
    )
    outage.setattr(
        upstreams.order.ledger, "cancel_order_by_key", failing(RuntimeError("orders are down"))
    )
    await book(booking, request_id)
    [saga] = (await finished(app, [request_id])).values()
    assert saga.state == SagaState.COMPENSATION_FAILED
    return outage


# --- retry -----------------------------------------------------------------------------


async def test_a_compensation_failed_saga_is_listed_with_its_dead_letter_and_retried_to_compensated(
    site: Site,
    calls: Counter[str],
    rabbit_settings: BrokerSettings,
) -> None:
    outage = await compensation_failed(site.app, site.booking, site.upstreams, "cf-1")
    [letter] = (await kept_dead_letters(site.app.orchestrator, [CANCEL_ASYNC_BOOKING], 1)).values()
    listed = await site.admin.ListDeadLetters(saga_pb2.ListDeadLettersRequest(facade=ASYNC_BOOKING))
    [shown] = listed.dead_letters
    assert (shown.id, shown.topic, shown.request_id, shown.step) == (
        letter.id,
        CANCEL_ASYNC_BOOKING,
        "cf-1",
        "rollback",
    )
    assert shown.saga_state == saga_pb2.COMPENSATION_FAILED
    assert shown.reason.startswith("COMPENSATION_FAILED: rollback node failed")

    outage.undo()  # the upstreams are back
    cancels_before = calls["cancel_order_by_key"]
    saga = await site.admin.RetrySaga(
        saga_pb2.RetrySagaRequest(request_id="cf-1", note="orders are back")
    )
    assert saga.state == saga_pb2.COMPENSATING

    ended = await until(site.app, "cf-1", SagaState.COMPENSATED)
    assert ended.state == SagaState.COMPENSATED
    assert outcome_of("cf-1", site.upstreams.order.ledger, site.upstreams.payment.ledger) == (
        Outcome.COMPENSATED
    )
    assert calls["cancel_order_by_key"] - cancels_before == 1
    assert counted(site.app, "retry", "done") == 1
    assert await queues_drained(rabbit_settings) == {}


async def test_a_retry_is_recorded_on_the_saga_with_its_actor_and_note(
    site: Site,
) -> None:
    outage = await compensation_failed(site.app, site.booking, site.upstreams, "cf-2")
    outage.undo()

    await site.admin.RetrySaga(
        saga_pb2.RetrySagaRequest(request_id="cf-2", note="fixed the orders")
    )
    await until(site.app, "cf-2", SagaState.COMPENSATED)

    saga = await site.status.GetSaga(saga_pb2.GetSagaRequest(request_id="cf-2"))
    [action] = saga.actions
    assert (action.action, action.actor, action.note) == ("retry", "anonymous", "fixed the orders")
    assert action.at.ToDatetime() <= saga.updated_at.ToDatetime()


async def test_retrying_a_completed_saga_is_refused_naming_its_state_and_changes_nothing(
    site: Site,
) -> None:
    await book(site.booking, "done-1")
    [before] = (await finished(site.app, ["done-1"])).values()

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await site.admin.RetrySaga(saga_pb2.RetrySagaRequest(request_id="done-1", note="why not"))

    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "COMPLETED" in (refused.value.details() or "")
    assert "done-1" in (refused.value.details() or "")
    assert await site.app.orchestrator.store.get(ASYNC_BOOKING, "done-1") == before
    assert await site.app.orchestrator.store.actions(ASYNC_BOOKING, "done-1") == []
    assert counted(site.app, "retry", "refused") == 1


# --- dead letters: a poisoned hop ------------------------------------------------------


async def poisoned(app: BookingApp, request_id: str, booking: Any) -> str:
    """Book a saga whose first hop cannot be handled (its journal read fails every time):
    the hop is dead-lettered at the delivery limit and the saga stays RUNNING, nothing
    called upstream. Returns the dead letter's id; the cause is removed after."""
    runtime = app.orchestrator.get_async_facade(ASYNC_BOOKING).runtime
    read = runtime.position

    async def broken(rid: str) -> Any:
        if rid == request_id:
            raise RuntimeError("the journal is unreachable")
        return await read(rid)

    runtime.position = broken  # type: ignore[method-assign]
    try:
        await book(booking, request_id)
        kept = await kept_dead_letters(app.orchestrator, [CREATE_ORDER], 1)
    finally:
        runtime.position = read  # type: ignore[method-assign]
    [letter] = [letter for letter in kept.values() if letter.request_id == request_id]
    assert letter.reason.startswith("delivery limit")
    return letter.id


async def test_a_poisoned_hop_replayed_after_the_cause_is_fixed_completes_its_saga(
    site: Site,
    rabbit_settings: BrokerSettings,
) -> None:
    letter_id = await poisoned(site.app, "poisoned-1", site.booking)
    assert await state_of(site.app, "poisoned-1") == SagaState.RUNNING
    assert site.upstreams.order.ledger.count_orders("poisoned-1") == 0

    replayed = await site.admin.ReplayDeadLetter(
        saga_pb2.ReplayDeadLetterRequest(id=letter_id, note="journal is back")
    )

    assert replayed.state == saga_pb2.DEAD_LETTER_REPLAYED
    assert replayed.settled_by == "anonymous"
    await until(site.app, "poisoned-1", SagaState.COMPLETED)
    assert outcome_of("poisoned-1", site.upstreams.order.ledger, site.upstreams.payment.ledger) == (
        Outcome.COMPLETED
    )
    waiting = await site.admin.ListDeadLetters(saga_pb2.ListDeadLettersRequest())
    assert [letter.id for letter in waiting.dead_letters] == []
    actions = await site.app.orchestrator.store.actions(ASYNC_BOOKING, "poisoned-1")
    assert [(a.action, a.dead_letter_id) for a in actions] == [("replay", letter_id)]
    assert await queues_drained(rabbit_settings) == {}


async def test_a_retried_running_saga_completes_and_replaying_its_stale_message_changes_nothing(
    site: Site,
    calls: Counter[str],
) -> None:
    letter_id = await poisoned(site.app, "poisoned-2", site.booking)

    await site.admin.RetrySaga(saga_pb2.RetrySagaRequest(request_id="poisoned-2", note="try again"))
    done = await until(site.app, "poisoned-2", SagaState.COMPLETED)
    calls_before = Counter(calls)

    await site.admin.ReplayDeadLetter(saga_pb2.ReplayDeadLetterRequest(id=letter_id))
    await asyncio.sleep(0.5)  # the replayed hop is consumed, and dropped

    assert await site.app.orchestrator.store.get(ASYNC_BOOKING, "poisoned-2") == done
    assert calls == calls_before
    assert outcome_of("poisoned-2", site.upstreams.order.ledger, site.upstreams.payment.ledger) == (
        Outcome.COMPLETED
    )


async def test_a_dead_letter_is_settled_once_when_a_replay_and_a_discard_race(
    site: Site,
) -> None:
    letter_id = await poisoned(site.app, "poisoned-3", site.booking)

    outcomes = await asyncio.gather(
        site.admin.ReplayDeadLetter(saga_pb2.ReplayDeadLetterRequest(id=letter_id)),
        site.admin.DiscardDeadLetter(
            saga_pb2.DiscardDeadLetterRequest(id=letter_id, note="drop it")
        ),
        site.admin.ReplayDeadLetter(saga_pb2.ReplayDeadLetterRequest(id=letter_id)),
        return_exceptions=True,
    )

    won = [o for o in outcomes if isinstance(o, saga_pb2.DeadLetter)]
    lost = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(won) == 1
    assert [error.code() for error in lost] == [grpc.StatusCode.FAILED_PRECONDITION] * 2
    actions = await site.app.orchestrator.store.actions(ASYNC_BOOKING, "poisoned-3")
    assert len(actions) == 1


async def test_a_discarded_dead_letter_leaves_the_list_with_its_note_and_cannot_be_replayed(
    site: Site,
    calls: Counter[str],
) -> None:
    letter_id = await poisoned(site.app, "poisoned-4", site.booking)

    discarded = await site.admin.DiscardDeadLetter(
        saga_pb2.DiscardDeadLetterRequest(id=letter_id, note="a test order")
    )
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await site.admin.ReplayDeadLetter(saga_pb2.ReplayDeadLetterRequest(id=letter_id))

    assert (discarded.state, discarded.note) == (saga_pb2.DEAD_LETTER_DISCARDED, "a test order")
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "DISCARDED" in (again.value.details() or "")
    waiting = await site.admin.ListDeadLetters(saga_pb2.ListDeadLettersRequest())
    assert waiting.dead_letters == []
    gone = await site.admin.ListDeadLetters(
        saga_pb2.ListDeadLettersRequest(state=saga_pb2.DEAD_LETTER_DISCARDED)
    )
    assert [letter.id for letter in gone.dead_letters] == [letter_id]
    assert calls == Counter()


# --- compensate and resolve ------------------------------------------------------------


async def test_compensating_a_running_saga_fences_its_late_hop(
    site: Site,
    calls: Counter[str],
    rabbit_settings: BrokerSettings,
) -> None:
    # The payment hop is held back on its way to the broker until the saga is compensated.
    broker = site.app.orchestrator.broker
    publish = broker.publish
    release = asyncio.Event()
    held = asyncio.Event()

    async def delayed(topic: str, body: bytes, **kwargs: Any) -> None:
        if topic == CREATE_PAYMENT:
            held.set()
            await release.wait()
        await publish(topic, body, **kwargs)

    broker.publish = delayed  # type: ignore[method-assign]
    await book(site.booking, "late-1")
    async with asyncio.timeout(10):
        await held.wait()

    saga = await site.admin.CompensateSaga(
        saga_pb2.CompensateSagaRequest(request_id="late-1", reason="customer called")
    )
    assert saga.state in (saga_pb2.COMPENSATING, saga_pb2.COMPENSATED)
    ended = await until(site.app, "late-1", SagaState.COMPENSATED)
    release.set()
    await asyncio.sleep(0.5)  # the late hop arrives, and does nothing

    assert await site.app.orchestrator.store.get(ASYNC_BOOKING, "late-1") == ended
    assert "customer called" in ended.error_reason
    assert calls["create_payment"] == 0
    assert outcome_of("late-1", site.upstreams.order.ledger, site.upstreams.payment.ledger) == (
        Outcome.COMPENSATED
    )
    assert await queues_drained(rabbit_settings) == {}


async def test_resolving_a_compensation_failed_saga_ends_it_resolved_with_the_note(
    site: Site,
) -> None:
    (await compensation_failed(site.app, site.booking, site.upstreams, "cf-3")).undo()

    saga = await site.admin.ResolveSaga(
        saga_pb2.ResolveSagaRequest(request_id="cf-3", note="cancelled order 7 by hand")
    )

    assert saga.state == saga_pb2.RESOLVED
    assert [(a.action, a.note) for a in saga.actions] == [("resolve", "cancelled order 7 by hand")]
    assert await state_of(site.app, "cf-3") == SagaState.RESOLVED
    assert counted(site.app, "resolve", "done") == 1


async def test_a_saga_resolved_while_its_rollback_retries_is_not_undone_any_further(
    site: Site,
) -> None:
    attempts: list[float] = []

    def cancel_failing(*args: Any, **kwargs: Any) -> Any:
        attempts.append(asyncio.get_running_loop().time())
        raise RuntimeError("orders are down")

    outage = pytest.MonkeyPatch()
    outage.setattr(
        site.upstreams.payment.ledger, "create_payment", failing(RuntimeError("payments down"))
    )
    outage.setattr(site.upstreams.order.ledger, "cancel_order_by_key", cancel_failing)
    try:
        await book(site.booking, "rs-1")
        async with asyncio.timeout(10):
            while not attempts:  # noqa: ASYNC110 (the rollback node's first attempt)
                await asyncio.sleep(0.01)

        await site.admin.ResolveSaga(
            saga_pb2.ResolveSagaRequest(request_id="rs-1", note="cancelled by hand")
        )
        resolved_after = len(attempts)
        # The rollback node's policy would try 5 times within about 3 s.
        await asyncio.sleep(4)
    finally:
        outage.undo()

    assert len(attempts) <= resolved_after + 1  # at most the attempt already under way
    assert await state_of(site.app, "rs-1") == SagaState.RESOLVED


@pytest.mark.parametrize(
    ("call", "code", "words"),
    [
        ("retry-blank", grpc.StatusCode.INVALID_ARGUMENT, "request_id is required"),
        ("resolve-no-note", grpc.StatusCode.INVALID_ARGUMENT, "note is required"),
        ("retry-unknown", grpc.StatusCode.NOT_FOUND, "nobody-1"),
        ("compensate-unknown-facade", grpc.StatusCode.NOT_FOUND, "NoSuchFacade"),
        ("discard-unknown", grpc.StatusCode.NOT_FOUND, "no dead letter"),
    ],
)
async def test_bad_admin_requests_are_refused_before_any_effect(
    site: Site,
    call: str,
    code: grpc.StatusCode,
    words: str,
) -> None:
    requests: dict[str, Callable[[], Awaitable[Any]]] = {
        "retry-blank": lambda: site.admin.RetrySaga(saga_pb2.RetrySagaRequest(request_id="  ")),
        "resolve-no-note": lambda: site.admin.ResolveSaga(
            saga_pb2.ResolveSagaRequest(request_id="any-1")
        ),
        "retry-unknown": lambda: site.admin.RetrySaga(
            saga_pb2.RetrySagaRequest(request_id="nobody-1")
        ),
        "compensate-unknown-facade": lambda: site.admin.CompensateSaga(
            saga_pb2.CompensateSagaRequest(facade="NoSuchFacade", request_id="x-1")
        ),
        "discard-unknown": lambda: site.admin.DiscardDeadLetter(
            saga_pb2.DiscardDeadLetterRequest(id="f" * 32, note="n")
        ),
    }
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await requests[call]()

    assert refused.value.code() == code
    assert words in (refused.value.details() or "")
    page = await site.app.orchestrator.store.list_sagas()
    assert page.sagas == []


def test_replayed_messages_lose_the_headers_dead_lettering_gave_them() -> None:
    from orchestrator.admin import _replayed_headers

    headers = {
        "traceparent": "00-abc-def-01",
        "x-orchestrator-reason": "delivery limit 5 reached",
        "x-orchestrator-dead-letter-id": "abc",
        "x-first-death-reason": "rejected",
    }
    assert _replayed_headers(headers) == {"traceparent": "00-abc-def-01"}
    assert json.dumps(headers)  # plain text headers, as the store keeps them
