"""Running a saga's steps one after another in the caller's task.

The sync facade runs its sagas this way, and so does an async or throttling
facade configured to run `inline` (for development: no hops through the
broker). What travels from step to step differs (a protobuf Context, a DTO):
a `Carrier` says how a step is called with it and what the journal records
of it. The rest is the engine's: each step under its retry policy within its
share of the caller's deadline, one journal write per step, and a failure
recorded and rolled back through the rollback topic, or compensated from
memory when the store cannot record it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.dto import Rollback
from orchestrator.errors import Failure, SagaFailed, classify
from orchestrator.facade.definition import StepDefinition
from orchestrator.retry import caller_deadline
from orchestrator.store import SagaState

if TYPE_CHECKING:
    from orchestrator.facade._runtime import SagaRuntime

__all__ = ["Carrier", "run_in_process"]

log = logging.getLogger("orchestrator.facade")


class Carrier(Protocol):
    """What travels from step to step in process, and how each step is called with it."""

    def call(self, step: StepDefinition) -> Callable[[], Awaitable[Any]]:
        """One attempt of `step`'s node on what the carrier holds."""

    def took(self, step: StepDefinition, result: Any) -> None:
        """Keep what `step`'s node returned."""

    def data(self) -> str:
        """The saga's data now, as the journal records it (JSON)."""

    def rollback_data(self) -> dict[str, Any]:
        """The saga's data as a `Rollback` carries it (to compensate without the journal)."""


async def run_in_process(runtime: SagaRuntime, request_id: str, carrier: Carrier) -> None:
    """Run every step of the saga begun for `request_id`, in order, in this task.

    The caller's time left is split evenly among the steps still to run. A
    failing step is recorded and its rollback handed to the broker before
    SagaFailed (carrying the status) is raised; a caller that goes away
    mid-saga has what was done undone all the same.
    """
    steps = runtime.definition.steps
    loop = asyncio.get_running_loop()
    deadline = caller_deadline.get()
    metrics = runtime.metrics
    metrics.in_flight.inc()
    try:
        for step in steps:
            share = (
                None
                if deadline is None
                else loop.time() + (deadline - loop.time()) / (len(steps) - step.index)
            )
            try:
                result = await runtime.run_step(
                    step, request_id, carrier.call(step), deadline=share
                )
            except asyncio.CancelledError:
                # The caller went away mid-saga: what was done must still be undone.
                failure = classify(asyncio.CancelledError())
                await asyncio.shield(_fail(runtime, request_id, carrier, step, failure))
                raise
            except Exception as exc:
                failure = classify(exc)
                await _fail(runtime, request_id, carrier, step, failure, cause=exc)
                raise SagaFailed(
                    request_id=request_id, facade=runtime.name, step=step.name, failure=failure
                ) from exc
            carrier.took(step, result)
            # The step's start is already recorded, with the saga's begin or the previous
            # step's end: one durable write per step, not two.
            if not await runtime.step_ended(request_id, step.index, carrier.data()):
                raise await _stopped(runtime, request_id)
    finally:
        metrics.in_flight.dec()


async def _stopped(runtime: SagaRuntime, request_id: str) -> SagaFailed:
    """The failure of a saga the journal says was stopped while it ran here (by its
    deadline's recovery, say): the caller gets what stopped it."""
    saga = await runtime.store.get(runtime.name, request_id)
    if saga is None or saga.state in (SagaState.RUNNING, SagaState.COMPLETED):
        raise RuntimeError(f"saga {runtime.name}/{request_id} refused its step's end")
    return runtime.failure_of(saga)


async def _fail(
    runtime: SagaRuntime,
    request_id: str,
    carrier: Carrier,
    step: StepDefinition,
    failure: Failure,
    *,
    cause: BaseException | None = None,
) -> None:
    try:
        await runtime.fail(
            request_id,
            step.index,
            failure,
            cause=cause,
            data=carrier.data(),
            inline_fallback=True,
        )
    except Exception:
        # The store could not record the failure. Undo what this replica knows was
        # done right away; the saga's deadline makes recovery finish its record.
        log.exception(
            "could not record the failed step; compensating from memory",
            extra={"request_id": request_id, "facade": runtime.name, "step": step.name},
        )
        await _compensate_unrecorded(runtime, request_id, carrier, step, failure)


async def _compensate_unrecorded(
    runtime: SagaRuntime,
    request_id: str,
    carrier: Carrier,
    step: StepDefinition,
    failure: Failure,
) -> None:
    undo = runtime.to_undo(step.index, failure)
    rollback = Rollback(
        request_id=request_id,
        facade=runtime.name,
        kind="sync" if runtime.kind == "sync" else "async",
        failed_step=step.name,
        code=failure.code.name,
        reason=failure.reason,
        data=carrier.rollback_data(),
        completed_steps=[runtime.definition.steps[index].name for index in undo],
    )
    try:
        await runtime.compensation.unrecorded(rollback, undo)
    except Exception:
        log.exception(
            "compensating from memory failed; recovery will retry once the store is back",
            extra={"request_id": request_id, "facade": runtime.name},
        )
