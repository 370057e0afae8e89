"""The sync facade: nodes run one after another in the caller's gRPC request.

What is sync-specific lives here: the protobuf request and response travel
from node to node in a `Context`, in process, and the caller waits for the
outcome. Everything else (the journal, retries, rollback) is the engine's.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Self, TypeVar

from google.protobuf import json_format
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from orchestrator import tracing
from orchestrator.context import Context
from orchestrator.dto import Rollback
from orchestrator.errors import FailedPrecondition, Failure, SagaFailed, classify
from orchestrator.facade.base import FacadeBase
from orchestrator.facade.definition import (
    DEFAULT_COMPENSATION_RETRY,
    DEFAULT_RETRY,
    StepDefinition,
)
from orchestrator.retry import RetryPolicy, caller_deadline
from orchestrator.store import SagaRecord, SagaState

__all__ = ["SyncCompensation", "SyncFacade", "SyncNode"]

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)

SyncNode = Callable[[str, Context[RequestT, ResponseT]], Awaitable[None]]
"""`async def node(request_id, ctx)`: returning runs the next node, raising rolls back."""
SyncCompensation = SyncNode[RequestT, ResponseT]
"""`async def undo(request_id, ctx)`: undoes its step, given the Context as the saga left it."""

_NODE_PARAMS = ("request_id", "ctx")

log = logging.getLogger("orchestrator.facade.sync")


def _json(message: Message) -> str:
    return json.dumps(MessageToDict(message, preserving_proto_field_name=True), sort_keys=True)


class SyncFacade(FacadeBase, Generic[RequestT, ResponseT]):
    """Chains nodes over one protobuf request and response, in process.

    flow = SyncFacade(request=BookingRequest, response=BookingSyncResponse)
    flow.use(create_order).use(create_payment)
    flow.consume_rollback(topic.CANCEL_SYNC_BOOKING, cancel_booking)
    orchestrator.register_sync_facade("SyncBooking", flow)
    """

    kind = "sync"

    def __init__(self, *, request: type[RequestT], response: type[ResponseT]) -> None:
        super().__init__()
        for role, message in (("request", request), ("response", response)):
            if not (isinstance(message, type) and issubclass(message, Message)):
                raise TypeError(f"{role} must be a protobuf message class, not {message!r}")
        self.request_type = request
        self.response_type = response

    def use(
        self,
        node: SyncNode[RequestT, ResponseT],
        *,
        name: str | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        timeout: float | None = None,
        compensate: SyncCompensation[RequestT, ResponseT] | None = None,
        compensate_retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY,
    ) -> Self:
        """Append a node: an `async def node(request_id, ctx)`.

        `name` (default: the function's name) labels it in logs, errors,
        metrics and idempotency keys; `retry` says which failures are retried
        and how; `timeout` bounds each attempt (the caller's deadline may cut
        it shorter). `compensate(request_id, ctx)` undoes the node once it may
        have taken effect, should the saga fail: it gets the Context as the
        saga left it.
        """
        self._append(
            node,
            name=name,
            params=_NODE_PARAMS,
            retry=retry,
            timeout=timeout,
            compensate=compensate,
            compensate_params=_NODE_PARAMS,
            compensate_retry=compensate_retry,
        )
        return self

    async def run(
        self, request_id: str, request: RequestT, response: ResponseT | None = None
    ) -> ResponseT:
        """Run every node in order and return the response they built.

        A request id seen before gets its recorded outcome instead (waiting
        while its first run is still going). Raises SagaFailed, carrying the
        gRPC status for the caller, once the rollback of a failed run is
        safely with the broker.
        """
        runtime = self.runtime
        with tracing.span(
            f"saga {runtime.name}", {"saga.request_id": request_id, "saga.kind": "sync"}
        ):
            existing = await runtime.begin(request_id, _json(request))
            if existing is not None:
                return await self._replay(existing)
            ctx = Context(request_id, request, response or self.response_type(), runtime.name)
            return await self._run(ctx)

    async def _replay(self, saga: SagaRecord) -> ResponseT:
        """The outcome of a request run before: its response, or its failure."""
        saga = await self.runtime.wait_until(
            saga.request_id, lambda s: s.state != SagaState.RUNNING
        )
        if saga.state == SagaState.COMPLETED:
            return json_format.ParseDict(json.loads(saga.data or "{}"), self.response_type())
        raise self.runtime.failure_of(saga)

    async def _run(self, ctx: Context[RequestT, ResponseT]) -> ResponseT:
        runtime = self.runtime
        steps = runtime.definition.steps
        loop = asyncio.get_running_loop()
        deadline = caller_deadline.get()
        metrics = runtime.metrics
        metrics.in_flight.inc()
        try:
            for step in steps:
                # The caller's time left is split evenly among the steps still to run.
                share = (
                    None
                    if deadline is None
                    else loop.time() + (deadline - loop.time()) / (len(steps) - step.index)
                )
                try:
                    await runtime.run_step(
                        step,
                        ctx.request_id,
                        functools.partial(step.action, ctx.request_id, ctx),
                        deadline=share,
                    )
                except asyncio.CancelledError:
                    # The caller went away mid-saga: what was done must still be undone.
                    await asyncio.shield(self._fail(ctx, step, classify(asyncio.CancelledError())))
                    raise
                except Exception as exc:
                    failure = classify(exc)
                    await self._fail(ctx, step, failure, cause=exc)
                    raise SagaFailed(
                        request_id=ctx.request_id,
                        facade=runtime.name,
                        step=step.name,
                        failure=failure,
                    ) from exc
                # The step's start is already recorded, with the saga's begin or the previous
                # step's end: one durable write per step, not two.
                if not await runtime.step_ended(ctx.request_id, step.index, _json(ctx.response)):
                    raise await self._stopped(ctx.request_id)
        finally:
            metrics.in_flight.dec()
        return ctx.response

    async def _stopped(self, request_id: str) -> SagaFailed:
        """The failure of a saga the journal says was stopped while it ran here (by its
        deadline's recovery, say): the caller gets what stopped it."""
        saga = await self.runtime.store.get(self.runtime.name, request_id)
        if saga is None or saga.state in (SagaState.RUNNING, SagaState.COMPLETED):
            raise RuntimeError(f"saga {self.runtime.name}/{request_id} refused its step's end")
        return self.runtime.failure_of(saga)

    async def _fail(
        self,
        ctx: Context[RequestT, ResponseT],
        step: StepDefinition,
        failure: Failure,
        cause: BaseException | None = None,
    ) -> None:
        runtime = self.runtime
        try:
            await runtime.fail(
                ctx.request_id,
                step.index,
                failure,
                cause=cause,
                data=_json(ctx.response),
                inline_fallback=True,
            )
        except Exception:
            # The store could not record the failure. Undo what this replica knows was
            # done right away; the saga's deadline makes recovery finish its record.
            log.exception(
                "could not record the failed step; compensating from memory",
                extra={"request_id": ctx.request_id, "facade": runtime.name, "step": step.name},
            )
            await self._compensate_unrecorded(ctx, step, failure)

    async def _compensate_unrecorded(
        self, ctx: Context[RequestT, ResponseT], step: StepDefinition, failure: Failure
    ) -> None:
        runtime = self.runtime
        undo = runtime.to_undo(step.index, failure)
        rollback = Rollback(
            request_id=ctx.request_id,
            facade=runtime.name,
            kind="sync",
            failed_step=step.name,
            code=failure.code.name,
            reason=failure.reason,
            data=self._data(ctx.request, ctx.response),
            completed_steps=[runtime.definition.steps[index].name for index in undo],
        )
        try:
            await runtime.compensation.unrecorded(rollback, undo)
        except Exception:
            log.exception(
                "compensating from memory failed; recovery will retry once the store is back",
                extra={"request_id": ctx.request_id, "facade": runtime.name},
            )

    # --- FacadeKind ------------------------------------------------------------------------

    def rollback_data(self, saga: SagaRecord) -> dict[str, Any]:
        """The protobuf request and the response as the saga left it, as JSON objects."""
        return {
            "request": json.loads(saga.payload or "{}"),
            "response": json.loads(saga.data or "{}"),
        }

    @staticmethod
    def _data(request: Message, response: Message) -> dict[str, Any]:
        return {
            "request": MessageToDict(request, preserving_proto_field_name=True),
            "response": MessageToDict(response, preserving_proto_field_name=True),
        }

    async def resume(self, saga: SagaRecord, index: int) -> None:
        """Refused: a sync saga's steps run inside its caller's call, which is gone."""
        raise FailedPrecondition(
            f"sync saga {self.runtime.name}/{saga.request_id} runs inside its caller's call: "
            "it cannot be run again from here"
        )

    async def compensate(self, step: StepDefinition, rollback: Rollback) -> None:
        """Call the compensation with the request id and the Context the saga left."""
        assert step.compensation is not None
        request = json_format.ParseDict(rollback.data.get("request", {}), self.request_type())
        response = json_format.ParseDict(rollback.data.get("response", {}), self.response_type())
        ctx = Context(rollback.request_id, request, response, rollback.facade)
        await step.compensation(rollback.request_id, ctx)
