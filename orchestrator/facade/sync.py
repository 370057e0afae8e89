"""The sync facade: nodes run one after another in the caller's gRPC request."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import time
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Self, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from orchestrator import tracing
from orchestrator.context import Context
from orchestrator.dto import Rollback
from orchestrator.errors import AlreadyExists, Failure, SagaFailed, classify
from orchestrator.facade.base import DEFAULT_COMPENSATION_RETRY, FacadeBase, RollbackNode
from orchestrator.retry import RetryPolicy, call_with_retry, caller_deadline
from orchestrator.store.base import SagaRecord, SagaState, StepState

__all__ = ["SyncFacade", "SyncNode"]

DEFAULT_POLICY = RetryPolicy()

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


def _json(message: Message) -> str:
    return json.dumps(MessageToDict(message, preserving_proto_field_name=True), sort_keys=True)


def payload_digest(facade: str, payload: str) -> str:
    """What tells one request from another under the same request id."""
    return hashlib.sha256(f"{facade}\n{payload}".encode()).hexdigest()


log = logging.getLogger("orchestrator.facade.sync")

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)

SyncNode = Callable[[str, Context[RequestT, ResponseT]], Awaitable[None]]
"""`async def node(request_id, ctx)`: returning runs the next node, raising rolls back."""


@dataclass(frozen=True, slots=True)
class _Step(Generic[RequestT, ResponseT]):
    name: str
    node: SyncNode[RequestT, ResponseT]
    retry: RetryPolicy
    timeout: float | None


class SyncFacade(FacadeBase, Generic[RequestT, ResponseT]):
    """Chains nodes over one protobuf request and response, in process.

    flow = SyncFacade[BookingRequest, BookingSyncResponse]()
    flow.use(create_order).use(create_payment)
    flow.consume_rollback(topic.CANCEL_SYNC_BOOKING, cancel_booking)
    orchestrator.register_sync_facade("SyncBooking", flow)
    """

    kind = "sync"

    def __init__(self) -> None:
        super().__init__()
        self._steps: list[_Step[RequestT, ResponseT]] = []

    def use(
        self,
        node: SyncNode[RequestT, ResponseT],
        *,
        name: str | None = None,
        retry: RetryPolicy = DEFAULT_POLICY,
        timeout: float | None = None,
        compensate: SyncNode[RequestT, ResponseT] | None = None,
        compensate_retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY,
    ) -> Self:
        """Append a node.

        `name` (default: the function's name) labels it in logs, errors and
        metrics; `retry` says which failures are retried and how; `timeout`
        bounds each attempt (the caller's deadline may cut it shorter).
        `compensate` undoes the node once it has completed, should a later
        step fail: it gets the request id and the Context as the saga left it.
        """
        step_name: str = name or str(getattr(node, "__name__", f"step{len(self._steps) + 1}"))
        if any(step.name == step_name for step in self._steps):
            raise ValueError(f"a step named {step_name!r} is already used; pass name=")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive")
        self._steps.append(_Step(step_name, node, retry, timeout))
        if compensate is not None:
            self._add_compensation(
                step_name, functools.partial(self._compensate, compensate), compensate_retry
            )
        return self

    def consume_rollback(self, topic: str, node: RollbackNode | None = None) -> Self:
        """On failure, publish a Rollback to `topic` and consume it here.

        The consumer runs the compensations of the completed steps in reverse
        order, then `node` (the Go original's facade-level rollback node).
        """
        self._set_rollback(topic, node)
        return self

    async def start(self) -> None:
        """Check that compensations can rebuild their Context, then consume the rollback."""
        if self._compensations:
            self._types()
        await super().start()

    def _types(self) -> tuple[type[RequestT], type[ResponseT]]:
        """The protobuf classes of `SyncFacade[Request, Response]()`, to rebuild a Context."""
        alias = getattr(self, "__orig_class__", None)
        arguments = typing.get_args(alias)
        if len(arguments) != 2 or not all(isinstance(a, type) for a in arguments):
            raise TypeError(
                "compensations need the message types: create the facade as "
                "SyncFacade[RequestMessage, ResponseMessage]()"
            )
        return arguments[0], arguments[1]

    async def _compensate(self, undo: SyncNode[RequestT, ResponseT], rollback: Rollback) -> None:
        request_type, response_type = self._types()
        request = json_format.ParseDict(rollback.data.get("request", {}), request_type())
        response = json_format.ParseDict(rollback.data.get("response", {}), response_type())
        await undo(rollback.request_id, Context(rollback.request_id, request, response, self.name))

    @property
    def steps(self) -> list[str]:
        """The step names, in order."""
        return [step.name for step in self._steps]

    async def run(self, request_id: str, request: RequestT, response: ResponseT) -> ResponseT:
        """Run every node in order and return the response they built.

        Raises SagaFailed, carrying the gRPC status for the caller, once the
        rollback of a failed run is safely with the broker.
        """
        with tracing.span(
            f"saga {self.name}", {"saga.request_id": request_id, "saga.kind": "sync"}
        ):
            if self._store is not None:
                replayed = await self._begin(request_id, request, response)
                if replayed is not None:
                    return replayed
            return await self._run(request_id, request, response)

    async def _begin(
        self, request_id: str, request: RequestT, response: ResponseT
    ) -> ResponseT | None:
        """Record the saga; for a request id seen before, its outcome instead of a new run.

        The same request again gets the stored response or error (waiting for
        it while the first run is still going); the same id with another
        request is ALREADY_EXISTS.
        """
        store = self._require_store()
        payload = _json(request)
        begun = await store.begin(
            request_id=request_id,
            facade=self.name,
            kind=self.kind,
            payload=payload,
            payload_hash=payload_digest(self.name, payload),
            owner=self._owner,
            first_step=self._steps[0].name if self._steps else "",
        )
        if begun.created:
            return None
        saga = begun.existing
        assert saga is not None
        if saga.facade != self.name or saga.payload_hash != payload_digest(self.name, payload):
            raise AlreadyExists(f"request id {request_id!r} was already used for another request")
        saga = await self._outcome_of(saga)
        if saga.state == SagaState.COMPLETED:
            return json_format.ParseDict(json.loads(saga.data or "{}"), response)
        failed = next((step.name for step in saga.steps if step.state == StepState.FAILED), "?")
        code = grpc.StatusCode[saga.error_code] if saga.error_code else grpc.StatusCode.ABORTED
        raise SagaFailed(
            request_id=request_id,
            facade=self.name,
            step=failed,
            failure=Failure(code, saga.error_reason or "the saga failed"),
        )

    async def _outcome_of(self, saga: SagaRecord) -> SagaRecord:
        """Wait while the first run of this request is RUNNING (the caller's deadline bounds it).

        This replica's writes to the saga wake the wait at once, so a run of its
        own is read once a change (and once a second, should a wake be lost); a
        run on another replica is polled, backing off to 0.2 s.
        """
        store = self._require_store()
        local = saga.owner == self._owner
        delay, ceiling = (1.0, 1.0) if local else (0.01, 0.2)
        with self._watching(saga.request_id) as changed:
            while saga.state == SagaState.RUNNING:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await changed.wait()
                # Cleared before the read: a write landing during it wakes the next wait.
                changed.clear()
                delay = min(delay * 2, ceiling)
                latest = await store.get(saga.request_id)
                assert latest is not None
                saga = latest
        return saga

    async def _run(self, request_id: str, request: RequestT, response: ResponseT) -> ResponseT:
        ctx = Context(request_id, request, response, self.name)
        metrics = self._metrics
        metrics.started.inc()
        metrics.in_flight.inc()
        loop = asyncio.get_running_loop()
        deadline = caller_deadline.get()
        try:
            for index, step in enumerate(self._steps):
                started = time.perf_counter()
                # The caller's time left is split evenly among the steps still to run.
                share = (
                    None
                    if deadline is None
                    else loop.time() + (deadline - loop.time()) / (len(self._steps) - index)
                )
                try:
                    # The step's start is already recorded, with the saga's begin or the
                    # previous step's end: one durable write per step, not two.
                    with tracing.span(f"step {step.name}", {"saga.step": step.name}):
                        await call_with_retry(
                            functools.partial(step.node, request_id, ctx),
                            policy=step.retry,
                            attempt_timeout=step.timeout,
                            deadline=share,
                            on_retry=functools.partial(self._retrying, request_id, step.name),
                        )
                    if self._store is not None:
                        last = index == len(self._steps) - 1
                        await self._store.step_finished(
                            request_id,
                            index,
                            state=StepState.DONE,
                            data=_json(ctx.response),
                            next_step="" if last else self._steps[index + 1].name,
                            saga_state=SagaState.COMPLETED if last else None,
                        )
                except asyncio.CancelledError:
                    # The caller went away mid-saga: what was done must still be undone.
                    failure = classify(asyncio.CancelledError())
                    metrics.failed(failure.code.name)
                    await asyncio.shield(self._fail(ctx, step.name, failure))
                    raise
                except Exception as exc:
                    failure = classify(exc)
                    metrics.failed(failure.code.name)
                    log.log(
                        logging.ERROR if failure.bug else logging.INFO,
                        "step failed",
                        exc_info=failure.bug,
                        extra={
                            "request_id": request_id,
                            "facade": self.name,
                            "step": step.name,
                            "code": failure.code.name,
                            "reason": failure.reason,
                        },
                    )
                    await self._fail(ctx, step.name, failure)
                    raise SagaFailed(
                        request_id=request_id, facade=self.name, step=step.name, failure=failure
                    ) from exc
                finally:
                    metrics.observe_step(step.name, time.perf_counter() - started)
        finally:
            metrics.in_flight.dec()
        if self._store is not None and not self._steps:
            await self._store.set_state(request_id, SagaState.COMPLETED, data=_json(ctx.response))
        metrics.completed.inc()
        return ctx.response

    def _recovery_data(self, saga: SagaRecord) -> dict[str, Any]:
        return {
            "request": json.loads(saga.payload or "{}"),
            "response": json.loads(saga.data or "{}"),
        }

    def _to_compensate(self, step: str, failure: Failure) -> list[str]:
        """The steps before `step`, and `step` itself when it may have taken effect."""
        names = self.steps
        end = names.index(step) + (1 if failure.code in UNCERTAIN_CODES else 0)
        return names[:end]

    def _retrying(self, request_id: str, step: str, exc: BaseException, attempt: int) -> None:
        self._metrics.retried(step)
        log.info(
            "retrying step",
            extra={
                "request_id": request_id,
                "facade": self.name,
                "step": step,
                "attempt": attempt,
                "error": classify(exc).reason,
            },
        )

    async def _fail(self, ctx: Context[RequestT, ResponseT], step: str, failure: Failure) -> None:
        if self._store is not None:
            try:
                await self._store.step_finished(
                    ctx.request_id,
                    self.steps.index(step),
                    state=StepState.FAILED,
                    data=_json(ctx.response),
                    error=failure.reason,
                    saga_state=SagaState.COMPENSATING,
                    error_code=failure.code.name,
                    error_reason=failure.reason,
                )
            except Exception:
                # The rollback must go out all the same: this replica is alive, so
                # recovery would never take a saga left RUNNING here.
                log.exception(
                    "could not record the failed step; rolling back anyway",
                    extra={"request_id": ctx.request_id, "facade": self.name, "step": step},
                )
        data: dict[str, Any] = {
            "request": MessageToDict(ctx.request, preserving_proto_field_name=True),
            "response": MessageToDict(ctx.response, preserving_proto_field_name=True),
        }
        await self._publish_rollback(
            Rollback(
                request_id=ctx.request_id,
                facade=self.name,
                kind="sync",
                failed_step=step,
                code=failure.code.name,
                reason=failure.reason,
                data=data,
                completed_steps=self._to_compensate(step, failure),
            ),
            inline_fallback=True,
        )
