"""The saga status service: GetSaga, ListSagas and WatchSaga over a real grpc.aio server.

Each test serves `saga_grpc_service` (with reflection) on a free port, over the
in-memory FakeSagaStore, and calls it through a real channel or the real
grpcurl binary; the last serves it the way an application does, from an
OrchestratorServer running a facade.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import timestamp_pb2
from grpc_reflection.v1alpha import reflection

from orchestrator import Orchestrator, SyncFacade
from orchestrator.broker import InMemoryBroker
from orchestrator.config import GrpcSettings
from orchestrator.proto import saga_pb2, saga_pb2_grpc
from orchestrator.server import OrchestratorServer
from orchestrator.status import (
    SAGA_SERVICE_NAME,
    SagaStatusService,
    saga_grpc_service,
    saga_state_from_proto,
    saga_state_to_proto,
    saga_to_proto,
    step_state_from_proto,
    step_state_to_proto,
)
from orchestrator.store import (
    Change,
    CompensationEnded,
    InMemorySagaStore,
    NewSaga,
    SagaRecord,
    SagaState,
    StepEnded,
    StepFailed,
    StepRecord,
    StepRestarted,
    StepState,
)
from pb.booking_pb2 import BookingRequest, BookingSyncResponse
from tests.support.fake_store import FakeSagaStore
from tests.support.processes import grpcurl_binary

FAST_POLL = 0.02
"""A poll interval short enough that watch tests never wait on it for long."""
BOUND = 5.0
"""Seconds any single wait in these tests may take before it fails."""
FACADES = ("booking", "refund")
"""The facades the service knows: where a request id alone is looked up."""


@dataclass
class Served:
    """A running status service: its store, its servicer, a stub on it, and its port."""

    store: FakeSagaStore
    status: SagaStatusService
    stub: saga_pb2_grpc.SagaServiceAsyncStub
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def serving(poll_interval: float = FAST_POLL) -> AsyncIterator[Served]:
    """Serve the status service and reflection on a free port, as OrchestratorServer would,
    over a store without a change feed: watchers poll it."""
    store = FakeSagaStore(feed=False)
    service, status = saga_grpc_service(store, poll_interval=poll_interval, facades=FACADES)
    server = grpc.aio.server()
    service.add_to_server(service.servicer, server)
    reflection.enable_server_reflection([service.name, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Served(store, status, saga_pb2_grpc.SagaServiceStub(channel), port)
    finally:
        await server.stop(None)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serving() as running:
        yield running


async def begin(
    store: FakeSagaStore,
    request_id: str,
    *,
    facade: str = "booking",
    kind: str = "sync",
    deadline_at: datetime | None = None,
) -> None:
    """A RUNNING saga at its first step, create_order."""
    created = await store.begin(
        NewSaga(
            facade=facade,
            request_id=request_id,
            kind=kind,
            payload="{}",
            payload_hash="h",
            owner="replica-1",
            first_step="create_order",
            deadline_at=deadline_at,
        )
    )
    assert created is None


async def write(store: FakeSagaStore, request_id: str, change: Change) -> None:
    """Apply `change` to the booking saga `request_id`; it must be accepted."""
    assert await store.apply("booking", request_id, change)


ORDER_RETRIED = StepRestarted(0)
ORDER_DONE = StepEnded(0, '{"order": 1}', next_step="create_payment")
PAYMENT_DECLINED = StepFailed(
    1,
    "FAILED_PRECONDITION",
    "payment declined",
    undo=(0,),
    deadline_at=datetime(2030, 1, 1, tzinfo=UTC),
)
UNDONE = CompensationEnded(SagaState.COMPENSATED, done=(0,))


async def compensated_saga(store: FakeSagaStore, request_id: str) -> None:
    """A saga whose first step was retried and succeeded, whose second failed, rolled back."""
    await begin(store, request_id)
    for change in (ORDER_RETRIED, ORDER_DONE, PAYMENT_DECLINED, UNDONE):
        await write(store, request_id, change)


async def stored(store: FakeSagaStore, request_id: str, facade: str = "booking") -> SagaRecord:
    record = await store.get(facade, request_id)
    assert record is not None
    return record


def utc(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


WatchCall = grpc.aio.UnaryStreamCall[saga_pb2.WatchSagaRequest, saga_pb2.Saga]


async def next_message(call: WatchCall) -> saga_pb2.Saga:
    """The stream's next message, within BOUND seconds."""
    async with asyncio.timeout(BOUND):
        message = await call.read()
    assert isinstance(message, saga_pb2.Saga), "the stream ended"
    return message


async def ends(call: WatchCall) -> bool:
    """Whether the stream ends (within BOUND seconds) without another message."""
    async with asyncio.timeout(BOUND):
        # Anything but a Saga is grpc.aio.EOF (which grpc-stubs does not declare).
        return not isinstance(await call.read(), saga_pb2.Saga)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (bounded) until `condition()` is true."""
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {BOUND}s"
        await asyncio.sleep(0.01)


# GetSaga


async def test_get_saga_returns_state_facade_kind_and_steps(served: Served) -> None:
    await compensated_saga(served.store, "r-1")
    record = await stored(served.store, "r-1")

    saga = await served.stub.GetSaga(saga_pb2.GetSagaRequest(request_id="r-1"))

    assert (saga.request_id, saga.facade, saga.kind) == ("r-1", "booking", "sync")
    assert saga.state == saga_pb2.COMPENSATED
    assert (saga.error_code, saga.error_reason) == ("FAILED_PRECONDITION", "payment declined")
    assert utc(saga.created_at) == record.created_at
    assert utc(saga.updated_at) == record.updated_at
    order, payment = saga.steps
    assert (order.index, order.name, order.state, order.attempts, order.error) == (
        0,
        "create_order",
        saga_pb2.STEP_DONE,
        2,
        "",
    )
    assert (payment.index, payment.name, payment.state, payment.attempts, payment.error) == (
        1,
        "create_payment",
        saga_pb2.STEP_FAILED,
        1,
        "payment declined",
    )
    for sent, kept in zip(saga.steps, record.steps, strict=True):
        assert utc(sent.started_at) == kept.started_at
        assert kept.finished_at is not None
        assert utc(sent.finished_at) == kept.finished_at


async def test_get_saga_leaves_finished_at_unset_while_a_step_runs(served: Served) -> None:
    await begin(served.store, "r-1")

    saga = await served.stub.GetSaga(saga_pb2.GetSagaRequest(request_id="r-1"))

    (step,) = saga.steps
    assert step.state == saga_pb2.STEP_RUNNING
    assert step.HasField("started_at")
    assert not step.HasField("finished_at")


async def test_get_saga_of_an_unknown_id_is_not_found_naming_it(served: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await served.stub.GetSaga(saga_pb2.GetSagaRequest(request_id="no-such-request"))

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-request" in (raised.value.details() or "")


async def test_get_saga_with_an_empty_id_is_invalid_argument(served: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await served.stub.GetSaga(saga_pb2.GetSagaRequest(request_id=""))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_get_saga_with_an_id_over_128_characters_is_invalid_argument(
    served: Served,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await served.stub.GetSaga(saga_pb2.GetSagaRequest(request_id="x" * 129))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "129" in (raised.value.details() or "")


async def test_get_saga_names_one_facades_saga_of_a_request_id_held_by_several(
    served: Served,
) -> None:
    await begin(served.store, "shared", facade="booking", kind="sync")
    await begin(served.store, "shared", facade="refund", kind="async")

    saga = await served.stub.GetSaga(saga_pb2.GetSagaRequest(request_id="shared", facade="refund"))

    assert (saga.request_id, saga.facade, saga.kind) == ("shared", "refund", "async")


async def test_get_saga_without_a_facade_for_an_id_held_by_several_is_failed_precondition(
    served: Served,
) -> None:
    await begin(served.store, "shared", facade="booking")
    await begin(served.store, "shared", facade="refund")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await served.stub.GetSaga(saga_pb2.GetSagaRequest(request_id="shared"))

    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "(booking, refund): name one in facade" in (raised.value.details() or "")


async def test_get_saga_in_a_facade_without_that_id_is_not_found_naming_both(
    served: Served,
) -> None:
    await begin(served.store, "r-1", facade="booking")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await served.stub.GetSaga(saga_pb2.GetSagaRequest(request_id="r-1", facade="refund"))

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'r-1' in facade 'refund'" in (raised.value.details() or "")


async def test_get_saga_shows_the_steps_to_undo_while_the_saga_compensates(
    served: Served,
) -> None:
    await begin(served.store, "r-1")
    await write(served.store, "r-1", ORDER_DONE)
    await write(served.store, "r-1", PAYMENT_DECLINED)

    saga = await served.stub.GetSaga(saga_pb2.GetSagaRequest(request_id="r-1"))

    assert saga.state == saga_pb2.COMPENSATING
    assert [(step.name, step.compensation) for step in saga.steps] == [
        ("create_order", saga_pb2.COMPENSATION_STATE_PENDING),
        ("create_payment", saga_pb2.COMPENSATION_STATE_NONE),
    ]
    assert not any(step.HasField("compensated_at") for step in saga.steps)


async def test_get_saga_shows_when_each_step_was_undone(served: Served) -> None:
    await compensated_saga(served.store, "r-1")
    record = await stored(served.store, "r-1")

    saga = await served.stub.GetSaga(saga_pb2.GetSagaRequest(request_id="r-1"))

    order, payment = saga.steps
    assert order.compensation == saga_pb2.COMPENSATION_STATE_DONE
    assert record.steps[0].compensated_at is not None
    assert utc(order.compensated_at) == record.steps[0].compensated_at
    assert (order.compensation_error, payment.compensation) == (
        "",
        saga_pb2.COMPENSATION_STATE_NONE,
    )


async def test_get_saga_shows_a_compensation_that_failed_and_why(served: Served) -> None:
    await begin(served.store, "r-1")
    await write(served.store, "r-1", ORDER_DONE)
    await write(served.store, "r-1", PAYMENT_DECLINED)
    reason = "compensation of create_order failed: order service gone"
    await write(
        served.store,
        "r-1",
        CompensationEnded(SagaState.COMPENSATION_FAILED, failed=0, error=reason),
    )

    saga = await served.stub.GetSaga(saga_pb2.GetSagaRequest(request_id="r-1"))

    assert (saga.state, saga.error_reason) == (saga_pb2.COMPENSATION_FAILED, reason)
    order = saga.steps[0]
    assert (order.compensation, order.compensation_error) == (
        saga_pb2.COMPENSATION_STATE_FAILED,
        reason,
    )
    assert order.HasField("compensated_at")


async def test_get_saga_shows_the_deadline_of_a_running_saga(served: Served) -> None:
    deadline = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=5)
    await begin(served.store, "r-1", deadline_at=deadline)

    saga = await served.stub.GetSaga(saga_pb2.GetSagaRequest(request_id="r-1"))

    assert utc(saga.deadline_at) == deadline


async def test_get_saga_leaves_the_deadline_of_a_finished_saga_unset(served: Served) -> None:
    await begin(served.store, "r-1", deadline_at=datetime.now(UTC) + timedelta(minutes=5))
    await write(served.store, "r-1", StepEnded(0, "{}", complete=True))

    saga = await served.stub.GetSaga(saga_pb2.GetSagaRequest(request_id="r-1"))

    assert saga.state == saga_pb2.COMPLETED
    assert not saga.HasField("deadline_at")


# ListSagas


async def list_ids(served: Served, **fields: object) -> list[str]:
    response = await served.stub.ListSagas(saga_pb2.ListSagasRequest(**fields))  # type: ignore[arg-type]
    return [saga.request_id for saga in response.sagas]


async def test_list_sagas_filters_by_facade(served: Served) -> None:
    await begin(served.store, "b-1", facade="booking")
    await begin(served.store, "r-1", facade="refund")
    await begin(served.store, "b-2", facade="booking")

    assert await list_ids(served, facade="booking") == ["b-2", "b-1"]


async def test_list_sagas_filters_by_state(served: Served) -> None:
    await begin(served.store, "running")
    await compensated_saga(served.store, "compensated")
    await begin(served.store, "completed")
    await write(served.store, "completed", StepEnded(0, "{}", complete=True))

    assert await list_ids(served, state=saga_pb2.COMPENSATED) == ["compensated"]
    assert await list_ids(served, state=saga_pb2.RUNNING) == ["running"]


async def test_list_sagas_with_unspecified_state_lists_every_state(served: Served) -> None:
    await begin(served.store, "running")
    await compensated_saga(served.store, "compensated")

    assert await list_ids(served, state=saga_pb2.SAGA_STATE_UNSPECIFIED) == [
        "compensated",
        "running",
    ]


async def test_list_sagas_filters_by_request_id_prefix(served: Served) -> None:
    for request_id in ("order-1", "refund-1", "order-2"):
        await begin(served.store, request_id)

    assert await list_ids(served, request_id_prefix="order-") == ["order-2", "order-1"]


async def test_list_sagas_with_a_prefix_longer_than_a_request_id_is_invalid_argument(
    served: Served,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await served.stub.ListSagas(saga_pb2.ListSagasRequest(request_id_prefix="x" * 129))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id_prefix is 129 characters long; at most 128" in (raised.value.details() or "")


async def test_list_sagas_returns_newest_first(served: Served) -> None:
    for request_id in ("first", "second", "third"):
        await begin(served.store, request_id)

    assert await list_ids(served) == ["third", "second", "first"]


async def test_list_sagas_pages_with_next_page_token_until_empty(served: Served) -> None:
    for i in range(5):
        await begin(served.store, f"r-{i}")

    pages: list[list[str]] = []
    token = ""
    while True:
        response = await served.stub.ListSagas(
            saga_pb2.ListSagasRequest(page_size=2, page_token=token)
        )
        pages.append([saga.request_id for saga in response.sagas])
        token = response.next_page_token
        if not token:
            break

    assert pages == [["r-4", "r-3"], ["r-2", "r-1"], ["r-0"]]


async def test_list_sagas_page_size_defaults_to_50(served: Served) -> None:
    for i in range(51):
        await begin(served.store, f"r-{i}")

    response = await served.stub.ListSagas(saga_pb2.ListSagasRequest())

    assert len(response.sagas) == 50
    assert response.next_page_token


async def test_list_sagas_page_size_is_capped_at_500(served: Served) -> None:
    for i in range(501):
        await begin(served.store, f"r-{i}")

    response = await served.stub.ListSagas(saga_pb2.ListSagasRequest(page_size=10_000))

    assert len(response.sagas) == 500
    assert response.next_page_token


async def test_list_sagas_with_a_negative_page_size_is_invalid_argument(served: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await served.stub.ListSagas(saga_pb2.ListSagasRequest(page_size=-1))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_sagas_with_a_token_the_store_rejects_is_invalid_argument(
    served: Served,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await served.stub.ListSagas(saga_pb2.ListSagasRequest(page_token="forged"))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in (raised.value.details() or "")


async def test_list_sagas_with_an_undefined_state_number_is_invalid_argument(
    served: Served,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await served.stub.ListSagas(saga_pb2.ListSagasRequest(state=99))  # type: ignore[arg-type]

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# WatchSaga


async def test_watch_saga_streams_running_then_step_updates_then_compensated_and_ends(
    served: Served,
) -> None:
    store = served.store
    await begin(store, "r-1")
    call = served.stub.WatchSaga(saga_pb2.WatchSagaRequest(request_id="r-1"))
    # Each write waits for the message that shows it, so no two writes can
    # fall between the same two polls and be reported as one change.
    seen = [await next_message(call)]
    for change in (ORDER_RETRIED, ORDER_DONE, PAYMENT_DECLINED, UNDONE):
        await write(store, "r-1", change)
        seen.append(await next_message(call))

    assert await ends(call)
    assert await call.code() == grpc.StatusCode.OK
    assert [saga.state for saga in seen] == [
        *[saga_pb2.RUNNING] * 3,
        saga_pb2.COMPENSATING,
        saga_pb2.COMPENSATED,
    ]
    assert [[(step.name, step.state, step.attempts) for step in saga.steps] for saga in seen] == [
        [("create_order", saga_pb2.STEP_RUNNING, 1)],
        [("create_order", saga_pb2.STEP_RUNNING, 2)],
        [("create_order", saga_pb2.STEP_DONE, 2), ("create_payment", saga_pb2.STEP_RUNNING, 1)],
        [("create_order", saga_pb2.STEP_DONE, 2), ("create_payment", saga_pb2.STEP_FAILED, 1)],
        [("create_order", saga_pb2.STEP_DONE, 2), ("create_payment", saga_pb2.STEP_FAILED, 1)],
    ]
    assert seen[-1] == saga_to_proto(await stored(store, "r-1"))


async def test_watch_saga_on_a_finished_saga_sends_one_message_and_ends(served: Served) -> None:
    await compensated_saga(served.store, "r-1")

    async with asyncio.timeout(BOUND):
        call = served.stub.WatchSaga(saga_pb2.WatchSagaRequest(request_id="r-1"))
        messages = [saga async for saga in call]

    assert messages == [saga_to_proto(await stored(served.store, "r-1"))]
    assert await call.code() == grpc.StatusCode.OK


async def test_watch_saga_sends_nothing_while_the_saga_does_not_change(served: Served) -> None:
    await begin(served.store, "r-1")
    call = served.stub.WatchSaga(saga_pb2.WatchSagaRequest(request_id="r-1"))
    await next_message(call)
    polls = served.store.gets

    await until(lambda: served.store.gets >= polls + 5, "polled five more times")
    await write(served.store, "r-1", StepEnded(0, "{}", complete=True))

    assert (await next_message(call)).state == saga_pb2.COMPLETED


async def test_watch_saga_of_an_unknown_id_is_not_found(served: Served) -> None:
    call = served.stub.WatchSaga(saga_pb2.WatchSagaRequest(request_id="no-such-request"))

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await next_message(call)

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-request" in (raised.value.details() or "")
    await until(lambda: served.status.active_watches == 0, "watch cleaned up")


async def test_watch_saga_names_one_facades_saga_of_a_request_id_held_by_several(
    served: Served,
) -> None:
    await begin(served.store, "shared", facade="booking")
    await begin(served.store, "shared", facade="refund")
    call = served.stub.WatchSaga(saga_pb2.WatchSagaRequest(request_id="shared", facade="booking"))
    await next_message(call)

    await write(served.store, "shared", StepEnded(0, "{}", complete=True))

    assert (await next_message(call)).state == saga_pb2.COMPLETED
    assert await ends(call)
    assert (await stored(served.store, "shared", "refund")).state == SagaState.RUNNING


async def test_watch_saga_without_a_facade_for_an_id_held_by_several_is_failed_precondition(
    served: Served,
) -> None:
    await begin(served.store, "shared", facade="booking")
    await begin(served.store, "shared", facade="refund")
    call = served.stub.WatchSaga(saga_pb2.WatchSagaRequest(request_id="shared"))

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await next_message(call)

    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "booking, refund" in (raised.value.details() or "")
    await until(lambda: served.status.active_watches == 0, "no watch left")


async def test_notify_wakes_a_watcher_well_before_the_poll_interval() -> None:
    async with serving(poll_interval=30.0) as served:
        await begin(served.store, "r-1")
        call = served.stub.WatchSaga(saga_pb2.WatchSagaRequest(request_id="r-1"))
        await next_message(call)
        await until(lambda: served.status.active_watches == 1, "watching")

        await write(served.store, "r-1", ORDER_DONE)
        started = time.monotonic()
        served.status.notify("booking", "r-1")
        saga = await next_message(call)
        elapsed = time.monotonic() - started

        assert [step.name for step in saga.steps] == ["create_order", "create_payment"]
        assert elapsed < 1.0, f"notify took {elapsed:.2f}s to wake the watcher"
        call.cancel()


async def test_notify_without_watchers_does_nothing(served: Served) -> None:
    served.status.notify("booking", "nobody-watches-this")

    assert served.status.active_watches == 0


async def test_cancelling_the_watch_stops_the_server_side_loop(served: Served) -> None:
    await begin(served.store, "r-1")
    call = served.stub.WatchSaga(saga_pb2.WatchSagaRequest(request_id="r-1"))
    await next_message(call)
    (watcher,) = set(served.store.readers)  # the server-side task of the call, which polls
    assert served.status.active_watches == 1

    call.cancel()

    await until(watcher.done, "the watch's server task done")
    assert served.status.active_watches == 0
    polls = served.store.gets
    await asyncio.sleep(FAST_POLL * 5)
    assert served.store.gets == polls, "the store is still being polled"


async def test_the_watch_deadline_stops_the_server_side_loop(served: Served) -> None:
    await begin(served.store, "r-1")
    call = served.stub.WatchSaga(saga_pb2.WatchSagaRequest(request_id="r-1"), timeout=0.3)
    await next_message(call)
    (watcher,) = set(served.store.readers)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await next_message(call)

    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until(watcher.done, "the watch's server task done")
    assert served.status.active_watches == 0


# The service descriptor and converters


def test_saga_grpc_service_names_the_proto_service() -> None:
    service, status = saga_grpc_service(FakeSagaStore(), poll_interval=1.5)

    assert service.name == SAGA_SERVICE_NAME
    assert saga_pb2.DESCRIPTOR.services_by_name["SagaService"].full_name == SAGA_SERVICE_NAME
    assert service.servicer is status
    assert status.poll_interval == 1.5


def test_every_saga_state_maps_to_its_proto_value_and_back() -> None:
    for state in SagaState:
        value = saga_state_to_proto(state)
        assert saga_pb2.SagaState.Name(value) == state.value
        assert saga_state_from_proto(value) is state
    assert saga_state_from_proto(saga_pb2.SAGA_STATE_UNSPECIFIED) is None


def test_every_step_state_maps_to_its_proto_value_and_back() -> None:
    for state in StepState:
        value = step_state_to_proto(state)
        assert saga_pb2.StepState.Name(value) == f"STEP_{state.value}"
        assert step_state_from_proto(value) is state


def test_saga_to_proto_takes_naive_times_as_utc() -> None:
    naive = datetime(2024, 5, 1, 12, 30, 15, 123456)
    record = SagaRecord(
        request_id="r-1",
        facade="booking",
        kind="async",
        state=SagaState.RUNNING,
        payload="{}",
        payload_hash="h",
        data="{}",
        owner="replica-1",
        created_at=naive,
        updated_at=naive,
        steps=(
            StepRecord(1, "b", StepState.RUNNING, 1, naive),
            StepRecord(0, "a", StepState.DONE, 1, naive, naive),
        ),
    )

    saga = saga_to_proto(record)

    assert utc(saga.created_at) == naive.replace(tzinfo=UTC)
    assert [step.name for step in saga.steps] == ["a", "b"]


# The real grpcurl binary, through reflection


async def grpcurl(*args: str) -> tuple[int, str, str]:
    """Run grpcurl without blocking the loop that serves it; (exit status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        str(grpcurl_binary()),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(BOUND * 2):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"grpcurl {' '.join(args)} did not finish within {BOUND * 2}s")
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_grpcurl_lists_the_service_through_reflection(served: Served) -> None:
    status, stdout, stderr = await grpcurl("-plaintext", served.target, "list")

    assert status == 0, stderr
    assert SAGA_SERVICE_NAME in stdout.split()


async def test_grpcurl_get_saga_prints_the_saga_with_snake_case_fields(served: Served) -> None:
    await compensated_saga(served.store, "grpcurl-1")
    body = json.dumps({"request_id": "grpcurl-1"})

    status, stdout, stderr = await grpcurl(
        "-plaintext", "-d", body, served.target, f"{SAGA_SERVICE_NAME}/GetSaga"
    )

    assert status == 0, stderr
    saga = json.loads(stdout)
    assert saga["request_id"] == "grpcurl-1"
    assert saga["state"] == "COMPENSATED"
    assert saga["error_code"] == "FAILED_PRECONDITION"
    assert {"created_at", "updated_at"} <= set(saga)
    assert [(s["name"], s["state"], s["attempts"]) for s in saga["steps"]] == [
        ("create_order", "STEP_DONE", 2),
        ("create_payment", "STEP_FAILED", 1),
    ]
    assert {"started_at", "finished_at"} <= set(saga["steps"][0])
    assert "requestId" not in stdout


async def test_grpcurl_watch_saga_on_a_finished_saga_prints_it_once_and_exits_0(
    served: Served,
) -> None:
    await compensated_saga(served.store, "grpcurl-2")
    body = json.dumps({"request_id": "grpcurl-2"})

    status, stdout, stderr = await grpcurl(
        "-plaintext", "-d", body, served.target, f"{SAGA_SERVICE_NAME}/WatchSaga"
    )

    assert status == 0, stderr
    decoder = json.JSONDecoder()
    messages, rest = [], stdout.strip()
    while rest:
        message, end = decoder.raw_decode(rest)
        messages.append(message)
        rest = rest[end:].strip()
    assert [(m["request_id"], m["state"]) for m in messages] == [("grpcurl-2", "COMPENSATED")]


# A served orchestrator: its own writes wake the watchers


async def test_a_served_orchestrators_watchers_see_each_step_without_waiting_for_a_poll() -> None:
    gates = {"create_order": asyncio.Event(), "create_payment": asyncio.Event()}

    def gated(name: str) -> Callable[..., Awaitable[None]]:
        async def node(request_id: str, ctx: object) -> None:
            await gates[name].wait()

        node.__name__ = name
        return node

    flow = SyncFacade(request=BookingRequest, response=BookingSyncResponse)
    flow.use(gated("create_order")).use(gated("create_payment"))
    orchestrator = Orchestrator(InMemoryBroker(), store=InMemorySagaStore())
    orchestrator.register_sync_facade("Booking", flow)
    server = OrchestratorServer(orchestrator, GrpcSettings(host="127.0.0.1", port=0), [])
    port = await server.start()
    assert server.status is not None
    server.status.poll_interval = 60.0  # so only the orchestrator's own notifications can wake
    begun = asyncio.Event()
    orchestrator.on_saga_change(lambda facade, request_id: begun.set())
    run = asyncio.create_task(flow.run("w-1", BookingRequest(), BookingSyncResponse()))
    try:
        async with asyncio.timeout(BOUND):
            await begun.wait()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = saga_pb2_grpc.SagaServiceStub(channel).WatchSaga(
                saga_pb2.WatchSagaRequest(request_id="w-1")
            )
            first = await next_message(call)
            gates["create_order"].set()
            second = await next_message(call)
            gates["create_payment"].set()
            last = await next_message(call)

            assert [(s.name, s.state) for s in first.steps] == [
                ("create_order", saga_pb2.STEP_RUNNING)
            ]
            assert [(s.name, s.state) for s in second.steps] == [
                ("create_order", saga_pb2.STEP_DONE),
                ("create_payment", saga_pb2.STEP_RUNNING),
            ]
            assert last.state == saga_pb2.COMPLETED
            assert await ends(call)
        await run
    finally:
        run.cancel()
        await server.stop(0)
