"""The test kit (`orchestrator.testing`): running sagas to their end, faults, crash and recovery.

Its facades here are small and their nodes count what they did, so each test
can tell the kit's fault from the node's effect: a failed step never calls
its node, a lost answer calls it, a crash stops the saga where it stood.
The example trip (`tests/test_example_trip.py`) is the kit used as an
application would; the README's testing section is run as a user's test
module by `tests/test_readme_examples.py`.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.context import Context
from orchestrator.dto import AsyncFacadeContext
from orchestrator.errors import Unavailable
from orchestrator.facade.async_ import AsyncFacade
from orchestrator.facade.sync import SyncFacade
from orchestrator.registry import Orchestrator
from orchestrator.retry import NO_RETRY
from orchestrator.testing import SagaKit, SimulatedCrash, assert_saga
from pb.booking_pb2 import BookingRequest, BookingSyncResponse

Ctx = Context[BookingRequest, BookingSyncResponse]
ROOT = Path(__file__).resolve().parent.parent


class Effects:
    """What the nodes and compensations of a facade did, by name, in order."""

    def __init__(self) -> None:
        self.log: list[str] = []

    @property
    def counts(self) -> Counter[str]:
        return Counter(self.log)

    def register_booking(self, orchestrator: Orchestrator) -> None:
        """A sync facade: order (undone by cancel), pay (undone by refund), ship."""

        async def order(request_id: str, ctx: Ctx) -> None:
            self.log.append("order")
            ctx.response.OrderID = 7

        async def pay(request_id: str, ctx: Ctx) -> None:
            self.log.append("pay")
            ctx.response.PaymentID = 8

        async def ship(request_id: str, ctx: Ctx) -> None:
            self.log.append("ship")

        async def cancel(request_id: str, ctx: Ctx) -> None:
            self.log.append(f"cancel {ctx.response.OrderID}")

        async def refund(request_id: str, ctx: Ctx) -> None:
            self.log.append("refund")

        flow = SyncFacade(request=BookingRequest, response=BookingSyncResponse)
        flow.use(order, compensate=cancel).use(pay, compensate=refund, retry=NO_RETRY)
        flow.use(ship).consume_rollback("booking.rollback")
        orchestrator.register_sync_facade("Booking", flow)


class Parcel(AsyncFacadeContext):
    """The DTO of the async facade below."""

    weight: int = 1


def register_parcel(orchestrator: Orchestrator, release: asyncio.Event) -> None:
    """An async facade whose first hop waits for `release`."""

    async def pick(dto: Parcel) -> Parcel:
        await release.wait()
        return dto

    async def deliver(dto: Parcel) -> Parcel:
        return dto

    flow = AsyncFacade(dto=Parcel).use("parcel.pick", pick).use("parcel.deliver", deliver)
    orchestrator.register_async_facade("Parcel", flow)


@pytest.fixture
def effects() -> Effects:
    return Effects()


@pytest.fixture
async def kit(effects: Effects) -> AsyncIterator[SagaKit]:
    async with SagaKit(effects.register_booking, timeout=5) as kit:
        yield kit


def booking() -> BookingRequest:
    return BookingRequest(ProductID=1)


async def test_a_saga_is_run_to_its_end_with_its_response_and_record(
    kit: SagaKit, effects: Effects
) -> None:
    run = await kit.run("Booking", "b-1", booking())

    assert run.response == BookingSyncResponse(OrderID=7, PaymentID=8)
    assert run.failure is None and not run.crashed
    assert_saga(run, state="COMPLETED", done=["order", "pay", "ship"], compensated=[])
    assert effects.log == ["order", "pay", "ship"]


async def test_a_failed_step_never_calls_its_node_and_rolls_the_saga_back(
    kit: SagaKit, effects: Effects
) -> None:
    fault = kit.faults.fail("pay")

    run = await kit.run("Booking", "b-2", booking())

    assert run.failure is not None and run.failure.code.name == "FAILED_PRECONDITION"
    assert "fault injected: pay failed" in str(run.failure)
    assert_saga(run, state="COMPENSATED", failed="pay", compensated=["order"])
    assert effects.log == ["order", "cancel 7"]
    assert fault.hits == 1


async def test_a_lost_answer_leaves_the_effect_and_compensates_its_step_too(
    kit: SagaKit, effects: Effects
) -> None:
    kit.faults.lose_answer("pay")

    run = await kit.run("Booking", "b-3", booking())

    assert run.failure is not None and run.failure.code.name == "UNAVAILABLE"
    assert_saga(run, state="COMPENSATED", failed="pay", compensated=["order", "pay"])
    assert effects.log == ["order", "pay", "refund", "cancel 7"]


async def test_a_fault_fires_only_its_times_and_on_its_request_id(
    kit: SagaKit, effects: Effects
) -> None:
    flaky = kit.faults.fail("order", error=Unavailable("down"), times=2)
    other = kit.faults.fail("ship", request_id="b-5")

    first = await kit.run("Booking", "b-4", booking())
    second = await kit.run("Booking", "b-5", booking())

    assert_saga(first, state="COMPLETED")
    assert (flaky.hits, flaky.spent) == (2, True)
    assert_saga(second, state="COMPENSATED", failed="ship")
    assert other.hits == 1


async def test_a_crash_after_a_step_stops_the_sync_saga_where_it_stood(
    kit: SagaKit, effects: Effects
) -> None:
    kit.faults.crash_after("pay")

    run = await kit.run("Booking", "b-6", booking())

    assert run.crashed and kit.crashed
    assert_saga(run, state="RUNNING", done=["order"])
    assert run.record.steps[1].state == "RUNNING"
    assert effects.log == ["order", "pay"]
    with pytest.raises(RuntimeError, match="recover"):
        await kit.run("Booking", "b-7", booking())


async def test_recovery_rolls_a_crashed_sync_saga_back_with_its_uncertain_step(
    kit: SagaKit, effects: Effects
) -> None:
    kit.faults.crash_after("pay")
    await kit.run("Booking", "b-8", booking())

    saga = await kit.recover()

    assert_saga(saga, state="COMPENSATED", compensated=["order", "pay"], error_code="ABORTED")
    assert effects.log == ["order", "pay", "refund", "cancel 7"]
    assert not kit.crashed
    assert_saga(await kit.run("Booking", "b-9", booking()), state="COMPLETED")


async def test_a_sync_facade_run_by_hand_sees_the_crash(kit: SagaKit) -> None:
    kit.faults.crash_after("order")

    with pytest.raises(SimulatedCrash, match="after order of Booking/b-10"):
        await kit.orchestrator.get_sync_facade("Booking").run("b-10", booking())
    assert kit.crashed


async def test_a_compensation_failing_for_good_ends_compensation_failed(
    kit: SagaKit, effects: Effects
) -> None:
    kit.faults.fail("ship")
    kit.faults.fail_compensation("pay")

    run = await kit.run("Booking", "b-11", booking())

    assert_saga(
        run, state="COMPENSATION_FAILED", compensated=[], compensation_failed="pay", failed="ship"
    )
    assert "refund" not in effects.log and "cancel 7" not in effects.log


async def test_a_fault_on_a_step_no_facade_has_is_refused_naming_the_steps(kit: SagaKit) -> None:
    with pytest.raises(ValueError, match=r"no step named 'shipp'.*'order', 'pay', 'ship'"):
        kit.faults.fail("shipp")
    with pytest.raises(ValueError, match="no facade named 'Shop'"):
        kit.faults.fail("ship", facade="Shop")
    with pytest.raises(ValueError, match="times must be at least 1"):
        kit.faults.fail("ship", times=0)


async def test_a_fault_armed_before_start_is_checked_at_start(effects: Effects) -> None:
    kit = SagaKit(effects.register_booking)
    kit.faults.lose_answer("cancel")

    with pytest.raises(ValueError, match="no step named 'cancel'"):
        await kit.start()
    await kit.close()


async def test_a_saga_that_does_not_end_in_time_fails_saying_where_it_stands() -> None:
    release = asyncio.Event()
    async with SagaKit(lambda o: register_parcel(o, release), timeout=0.3) as kit:
        with pytest.raises(AssertionError) as failed:
            await kit.run("Parcel", "p-1", Parcel(request_id="p-1"))
        release.set()
        saga = await kit.ended("Parcel", "p-1")

    assert str(failed.value) == ("Parcel/p-1 did not end within 0.3s: RUNNING [pick RUNNING]")
    assert_saga(saga, state="COMPLETED")


async def test_assert_saga_names_every_difference_and_shows_the_record(kit: SagaKit) -> None:
    kit.faults.fail("pay")
    run = await kit.run("Booking", "b-12", booking())

    with pytest.raises(AssertionError) as failed:
        assert_saga(run, state="COMPLETED", done=["order"], compensated=[])

    assert str(failed.value) == (
        "saga Booking/b-12 is not as expected:\n"
        "  state: expected 'COMPLETED', got 'COMPENSATED'\n"
        "  compensated: expected [], got ['order']\n"
        "  the record: COMPENSATED FAILED_PRECONDITION: fault injected: pay failed "
        "[order DONE (undo DONE), pay FAILED]"
    )


async def test_the_kit_refuses_what_it_cannot_do_yet(effects: Effects) -> None:
    with pytest.raises(ValueError, match="registration function"):
        SagaKit()
    kit = SagaKit(effects.register_booking)
    with pytest.raises(RuntimeError, match="not started"):
        _ = kit.orchestrator
    async with kit:
        with pytest.raises(RuntimeError, match="nothing crashed"):
            await kit.recover()
        with pytest.raises(
            LookupError, match=r"no facade named 'Shop' \(registered: \['Booking'\]"
        ):
            await kit.run("Shop", "s-1", booking())


def run_pytest(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    """Run `source` as a test module of its own, as a user's project would."""
    (tmp_path / "test_user.py").write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_plugins_kit_fixture_asks_for_the_facades_it_is_not_given(tmp_path: Path) -> None:
    done = run_pytest(
        tmp_path,
        "import pytest\n\n@pytest.mark.asyncio\nasync def test_kit(orchestrator_kit):\n    pass\n",
    )

    assert done.returncode == 1, done.stdout + done.stderr
    assert "define a fixture `orchestrator_facades`" in done.stdout
