"""Retry policies, step timeouts and the caller's deadline, on the sync and async facades."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from orchestrator import (
    AsyncFacade,
    AsyncFacadeContext,
    Context,
    FailedPrecondition,
    Orchestrator,
    RetryPolicy,
    SyncFacade,
    Unavailable,
    step_timeout,
)
from orchestrator.broker import InMemoryBroker
from orchestrator.errors import SagaFailed
from orchestrator.retry import NO_RETRY, caller_deadline
from orchestrator.store import SagaState
from pb.booking_pb2 import BookingRequest, BookingSyncResponse

Ctx = Context[BookingRequest, BookingSyncResponse]
Flow = SyncFacade[BookingRequest, BookingSyncResponse]
QUICK = RetryPolicy(attempts=3, initial_backoff=0.001, max_backoff=0.002)


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "upstream says")


class Flaky:
    """A node that fails with `error` for its first `failures` attempts."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.attempts = 0

    async def __call__(self, request_id: str, ctx: Ctx) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise self.error


@pytest.fixture
async def orchestrator() -> AsyncIterator[Orchestrator]:
    orchestrator = Orchestrator(InMemoryBroker())
    yield orchestrator
    await orchestrator.close()


async def run(orchestrator: Orchestrator, flow: Flow) -> BookingSyncResponse:
    orchestrator.register_sync_facade("Booking", flow)
    await orchestrator.start()
    return await flow.run("r", BookingRequest(ProductID=1), BookingSyncResponse())


def retries(orchestrator: Orchestrator, step: str) -> float:
    value = orchestrator.metrics.registry.get_sample_value(
        "orchestrator_step_retries_total", {"facade": "Booking", "step": step}
    )
    return value or 0.0


def test_backoff_grows_by_the_multiplier_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.3, multiplier=2, jitter=0)

    assert [policy.backoff(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.3, 0.3]


def test_jitter_spreads_the_backoff_within_its_fraction() -> None:
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=1.0, jitter=0.2)

    delays = [policy.backoff(1) for _ in range(200)]
    assert all(0.8 <= delay <= 1.2 for delay in delays)
    assert len(set(delays)) > 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attempts": 0}, "at least 1"),
        ({"initial_backoff": -1}, "must not be negative"),
        ({"jitter": 2}, "fraction"),
    ],
)
def test_a_nonsensical_policy_is_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (rpc_error(grpc.StatusCode.UNAVAILABLE), True),
        (rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), True),
        (rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED), True),
        (rpc_error(grpc.StatusCode.FAILED_PRECONDITION), False),
        (rpc_error(grpc.StatusCode.INVALID_ARGUMENT), False),
        (Unavailable("down"), True),
        (FailedPrecondition("declined"), False),
        (TimeoutError(), True),
        (KeyError("bug"), False),
    ],
)
def test_only_transient_failures_are_retryable(error: Exception, retryable: bool) -> None:
    assert RetryPolicy().is_retryable(error) is retryable


def test_any_error_retries_every_failure() -> None:
    assert RetryPolicy(any_error=True).is_retryable(KeyError("bug"))


async def test_a_transient_failure_is_retried_until_the_step_succeeds(
    orchestrator: Orchestrator,
) -> None:
    node = Flaky(2, rpc_error(grpc.StatusCode.UNAVAILABLE))

    await run(
        orchestrator,
        Flow(request=BookingRequest, response=BookingSyncResponse).use(
            node, name="create", retry=QUICK
        ),
    )

    assert node.attempts == 3
    assert retries(orchestrator, "create") == 2


async def test_a_business_error_is_not_retried(orchestrator: Orchestrator) -> None:
    node = Flaky(5, rpc_error(grpc.StatusCode.FAILED_PRECONDITION))

    with pytest.raises(SagaFailed) as failure:
        await run(
            orchestrator,
            Flow(request=BookingRequest, response=BookingSyncResponse).use(
                node, name="pay", retry=QUICK
            ),
        )

    assert node.attempts == 1
    assert failure.value.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_exhausted_retries_fail_the_step_with_the_last_error(
    orchestrator: Orchestrator,
) -> None:
    node = Flaky(5, rpc_error(grpc.StatusCode.UNAVAILABLE))

    with pytest.raises(SagaFailed) as failure:
        await run(
            orchestrator,
            Flow(request=BookingRequest, response=BookingSyncResponse).use(
                node, name="create", retry=QUICK
            ),
        )

    assert node.attempts == 3
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE


async def test_no_retry_calls_once(orchestrator: Orchestrator) -> None:
    node = Flaky(1, rpc_error(grpc.StatusCode.UNAVAILABLE))

    with pytest.raises(SagaFailed):
        await run(
            orchestrator,
            Flow(request=BookingRequest, response=BookingSyncResponse).use(
                node, name="once", retry=NO_RETRY
            ),
        )
    assert node.attempts == 1


async def test_a_slow_attempt_is_cut_by_the_node_timeout(orchestrator: Orchestrator) -> None:
    async def slow(request_id: str, ctx: Ctx) -> None:
        await asyncio.sleep(10)

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(SagaFailed) as failure:
        await run(
            orchestrator,
            Flow(request=BookingRequest, response=BookingSyncResponse).use(
                slow, timeout=0.05, retry=NO_RETRY
            ),
        )

    assert loop.time() - started < 1
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE
    assert "timed out" in failure.value.failure.reason


async def test_a_timed_out_attempt_is_retried(orchestrator: Orchestrator) -> None:
    attempts = 0

    async def slow_then_fast(request_id: str, ctx: Ctx) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await asyncio.sleep(10)

    await run(
        orchestrator,
        Flow(request=BookingRequest, response=BookingSyncResponse).use(
            slow_then_fast, timeout=0.05, retry=QUICK
        ),
    )
    assert attempts == 2


async def test_step_timeout_tells_a_node_what_its_attempt_has_left(
    orchestrator: Orchestrator,
) -> None:
    seen: list[float | None] = []

    async def look(request_id: str, ctx: Ctx) -> None:
        seen.append(step_timeout(5.0))

    await run(
        orchestrator,
        Flow(request=BookingRequest, response=BookingSyncResponse).use(look, timeout=0.5),
    )

    [left] = seen
    assert left is not None and 0.3 < left <= 0.5


def test_step_timeout_outside_a_step_is_the_default() -> None:
    assert step_timeout(3.0) == 3.0
    assert step_timeout() is None


async def test_the_callers_deadline_is_split_among_the_steps(orchestrator: Orchestrator) -> None:
    budgets: list[float] = []

    async def look(request_id: str, ctx: Ctx) -> None:
        left = step_timeout()
        assert left is not None
        budgets.append(left)

    flow = (
        Flow(request=BookingRequest, response=BookingSyncResponse)
        .use(look, name="a")
        .use(look, name="b")
        .use(look, name="c")
    )
    caller_deadline.set(asyncio.get_running_loop().time() + 0.9)
    await run(orchestrator, flow)

    assert budgets[0] <= 0.31 and budgets[1] <= 0.46 and budgets[2] <= 0.91
    assert budgets[2] > 0.5  # the last step gets everything left


async def test_a_retry_that_cannot_start_before_the_deadline_is_not_made(
    orchestrator: Orchestrator,
) -> None:
    node = Flaky(5, rpc_error(grpc.StatusCode.UNAVAILABLE))
    patient = RetryPolicy(attempts=5, initial_backoff=1.0, max_backoff=1.0, jitter=0)
    caller_deadline.set(asyncio.get_running_loop().time() + 0.2)

    with pytest.raises(SagaFailed):
        await run(
            orchestrator,
            Flow(request=BookingRequest, response=BookingSyncResponse).use(
                node, name="create", retry=patient
            ),
        )
    assert node.attempts == 1


class Dto(AsyncFacadeContext):
    pass


async def test_an_async_node_is_retried_in_place_before_any_rollback(
    orchestrator: Orchestrator,
) -> None:
    attempts = 0

    async def flaky(dto: Dto) -> Dto:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE)
        return dto

    flow = AsyncFacade(dto=Dto).use("hop", flaky, retry=QUICK)
    orchestrator.register_async_facade("Async", flow)
    await orchestrator.start()
    await flow.run("r", Dto(request_id="r"))
    async with asyncio.timeout(5):
        saga = await flow.wait_for("r")

    assert saga.state == SagaState.COMPLETED
    assert attempts == 3
    assert [(step.name, step.attempts) for step in saga.steps] == [("flaky", 1)]


def test_a_timeout_must_be_positive() -> None:
    async def node(request_id: str, ctx: Ctx) -> None:
        pass

    with pytest.raises(ValueError, match="positive"):
        Flow(request=BookingRequest, response=BookingSyncResponse).use(node, timeout=0)
