"""The sync facade: nodes run one after another in the caller's gRPC request.

What is sync-specific lives here: the protobuf request and response travel
from node to node in a `Context`, in process, and the caller waits for the
outcome. Everything else (the journal, retries, rollback) is the engine's.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Self, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from orchestrator import tracing
from orchestrator._proto_json import message_dict, message_json
from orchestrator.context import Context
from orchestrator.dto import Rollback
from orchestrator.errors import FailedPrecondition
from orchestrator.facade._in_process import run_in_process
from orchestrator.facade.base import FacadeBase
from orchestrator.facade.definition import (
    DEFAULT_COMPENSATION_RETRY,
    DEFAULT_RETRY,
    StepDefinition,
)
from orchestrator.retry import RetryPolicy
from orchestrator.store import SagaRecord, SagaState

__all__ = ["SyncCompensation", "SyncFacade", "SyncNode"]

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)

SyncNode = Callable[[str, Context[RequestT, ResponseT]], Awaitable[None]]
"""`async def node(request_id, ctx)`: returning runs the next node, raising rolls back."""
SyncCompensation = SyncNode[RequestT, ResponseT]
"""`async def undo(request_id, ctx)`: undoes its step, given the Context as the saga left it."""

_NODE_PARAMS = ("request_id", "ctx")


class SyncFacade(FacadeBase, Generic[RequestT, ResponseT]):
    """Chains nodes over one protobuf request and response, in process.

    flow = SyncFacade(request=BookingRequest, response=BookingSyncResponse)
    flow.use(create_order).use(create_payment)
    flow.consume_rollback(topic.CANCEL_SYNC_BOOKING, cancel_booking)
    orchestrator.register_sync_facade("SyncBooking", flow)
    """

    kind = "sync"
    runs_as = frozenset({"sync"})

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
        safely with the broker; ResourceExhausted, before anything, when the
        facade already has `max_in_flight` calls in progress on this replica.
        """
        runtime = self.runtime
        with (
            runtime.admission.admit(),
            tracing.span(
                f"saga {runtime.name}", {"saga.request_id": request_id, "saga.kind": "sync"}
            ),
        ):
            existing = await runtime.begin(request_id, message_json(request))
            if existing is not None:
                return await self._replay(existing)
            ctx = Context(request_id, request, response or self.response_type(), runtime.name)
            return await self._run(ctx)

    async def _replay(self, saga: SagaRecord) -> ResponseT:
        """The outcome of a request run before: its response, or its failure."""
        saga = await self.runtime.wait_until(
            saga.request_id, lambda s: s.state != SagaState.RUNNING, past_running=True
        )
        if saga.state == SagaState.COMPLETED:
            return json_format.ParseDict(json.loads(saga.data or "{}"), self.response_type())
        raise self.runtime.failure_of(saga)

    async def _run(self, ctx: Context[RequestT, ResponseT]) -> ResponseT:
        await run_in_process(self.runtime, ctx.request_id, _ContextCarrier(ctx))
        return ctx.response

    # --- FacadeKind ------------------------------------------------------------------------

    def rollback_data(self, saga: SagaRecord) -> dict[str, Any]:
        """The protobuf request and the response as the saga left it, as JSON objects."""
        return {
            "request": json.loads(saga.payload or "{}"),
            "response": json.loads(saga.data or "{}"),
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


class _ContextCarrier(Generic[RequestT, ResponseT]):
    """The Context a sync saga's steps share, as `run_in_process` carries it."""

    def __init__(self, ctx: Context[RequestT, ResponseT]) -> None:
        self.ctx = ctx

    def call(self, step: StepDefinition) -> Callable[[], Awaitable[Any]]:
        """The node called with the request id and the Context."""
        return functools.partial(step.action, self.ctx.request_id, self.ctx)

    def took(self, step: StepDefinition, result: Any) -> None:
        """Nothing: a sync node leaves what it made in the Context."""

    def data(self) -> str:
        """The response as the steps built it so far."""
        return message_json(self.ctx.response)

    def rollback_data(self) -> dict[str, Any]:
        """The request and the response so far, as JSON objects."""
        return {
            "request": message_dict(self.ctx.request),
            "response": message_dict(self.ctx.response),
        }
