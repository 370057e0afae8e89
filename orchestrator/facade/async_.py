"""The async facade: each node is a hop through a broker topic, carrying a JSON DTO."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, Self, TypeVar

import grpc
import pydantic

from orchestrator import tracing
from orchestrator.broker.base import DeadLetter, Delivery
from orchestrator.dto import AsyncFacadeContext, Rollback
from orchestrator.errors import AlreadyExists, Failure, classify
from orchestrator.facade.base import DEFAULT_COMPENSATION_RETRY, FacadeBase, RollbackNode
from orchestrator.facade.sync import UNCERTAIN_CODES, payload_digest
from orchestrator.retry import RetryPolicy, call_with_retry
from orchestrator.store.base import SagaState, SagaStore, StepState

__all__ = ["AsyncFacade", "AsyncNode", "SagaEndListener"]

DEFAULT_POLICY = RetryPolicy()

# The routing slip, set by run(): not part of what the caller asked for.
_SLIP_FIELDS = {"request_id", "current_index", "topics", "rollback_topic"}
_NOT_PUBLISHED = "not published"
"""How the step log marks a first hop whose message never reached the broker."""

log = logging.getLogger("orchestrator.facade.async")

DtoT = TypeVar("DtoT", bound=AsyncFacadeContext)

AsyncNode = Callable[[DtoT], Awaitable[DtoT]]
"""`async def node(dto) -> dto`: returning publishes it to the next topic, raising rolls back."""

SagaEndListener = Callable[[DtoT, Failure | None], Awaitable[None]]
"""Called once a saga's last node returned (failure None) or a node failed."""


@dataclass(frozen=True, slots=True)
class _Hop(Generic[DtoT]):
    topic: str
    name: str
    node: AsyncNode[DtoT]
    retry: RetryPolicy
    timeout: float | None


class AsyncFacade(FacadeBase, Generic[DtoT]):
    """Chains nodes through broker topics that the orchestrator publishes and consumes itself.

        flow = AsyncFacade(topic.CANCEL_ASYNC_BOOKING, dto=BookingMsgDTO)
        flow.use(topic.CREATE_ORDER, create_order).use(topic.CREATE_PAYMENT, create_payment)
        flow.consume_rollback(topic.CANCEL_ASYNC_BOOKING, cancel_booking)
        orchestrator.register_async_facade("AsyncBooking", flow)

    A message is acknowledged only after its outcome (the next hop or the
    rollback) is confirmed by the broker, so a crash at any point replays the
    hop: nodes must be idempotent, which the idempotency key makes easy.
    """

    kind = "async"

    def __init__(self, rollback_topic: str, *, dto: type[DtoT]) -> None:
        super().__init__()
        if not rollback_topic:
            raise ValueError("the rollback topic must not be empty")
        self._declared_rollback_topic = rollback_topic
        self._rollback_topic = rollback_topic
        self._dto = dto
        self._hops: list[_Hop[DtoT]] = []
        self._end_listeners: list[SagaEndListener[DtoT]] = []

    @property
    def topics(self) -> list[str]:
        """The node topics, in order."""
        return [hop.topic for hop in self._hops]

    def use(
        self,
        topic: str,
        node: AsyncNode[DtoT],
        *,
        name: str | None = None,
        retry: RetryPolicy = DEFAULT_POLICY,
        timeout: float | None = None,
        compensate: Callable[[DtoT], Awaitable[None]] | None = None,
        compensate_retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY,
    ) -> Self:
        """Append a node that consumes `topic` (the Go original's TopicNodePair).

        `retry` says which failures are retried in place and how; `timeout`
        bounds each attempt. A node still failing after that rolls back.
        `compensate` undoes the node once it has completed, should a later
        step fail: it gets the DTO as the saga left it.
        """
        if not topic:
            raise ValueError("the topic must not be empty")
        if topic in self.topics or topic == self._declared_rollback_topic:
            raise ValueError(f"topic {topic!r} is already used by this facade")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive")
        step_name: str = name or str(getattr(node, "__name__", topic))
        if any(hop.name == step_name for hop in self._hops):
            raise ValueError(f"a step named {step_name!r} is already used; pass name=")
        self._hops.append(_Hop(topic, step_name, node, retry, timeout))
        if compensate is not None:
            self._add_compensation(
                step_name, functools.partial(self._compensate, compensate), compensate_retry
            )
        return self

    def consume_rollback(self, topic: str, node: RollbackNode | None = None) -> Self:
        """Consume the facade's rollback topic (the Go TopicRollbackNodePair).

        The consumer runs the compensations of the completed steps in reverse
        order, then `node`. Compensations alone need no call: the rollback
        topic is consumed whenever there is something to undo.
        """
        if topic != self._declared_rollback_topic:
            expected = self._declared_rollback_topic
            raise ValueError(f"this facade publishes rollbacks to {expected!r}, not {topic!r}")
        self._set_rollback(topic, node)
        return self

    def on_end(self, listener: SagaEndListener[DtoT]) -> Self:
        """Call `listener(dto, failure)` whenever a saga of this facade ends on this replica."""
        self._end_listeners.append(listener)
        return self

    async def start(self) -> None:
        """Declare every topic first, then consume: no hop may publish into a missing queue."""
        if not self._hops:
            raise ValueError(f"async facade {self.name!r} has no nodes")
        for hop in self._hops:
            await self.broker.declare(hop.topic)
        await self.broker.declare(self._rollback_topic)
        await super().start()
        for index, hop in enumerate(self._hops):
            await self.broker.subscribe(hop.topic, self._consumer(index, hop))

    async def run(self, request_id: str, dto: DtoT) -> None:
        """Start a saga: publish the DTO to the first topic and wait for the broker's confirm."""
        dto.request_id = request_id
        dto.current_index = 0
        dto.topics = self.topics
        dto.rollback_topic = self._rollback_topic
        if self._store is not None and not await self._begin(dto):
            return
        with tracing.span(
            f"saga {self.name}", {"saga.request_id": request_id, "saga.kind": "async"}
        ):
            try:
                await self._publish_hop(dto)
            except Exception as exc:
                await self._not_started(dto, exc)
                raise
        self._metrics.started.inc()

    async def _not_started(self, dto: DtoT, exc: Exception) -> None:
        """Record that the first hop was never published, so a retry publishes it.

        The step fails, the saga stays RUNNING: nothing ran, nothing to undo.
        """
        if self._store is None:
            return
        try:
            await self._store.step_finished(
                dto.request_id,
                0,
                state=StepState.FAILED,
                data=dto.model_dump_json(),
                error=f"{_NOT_PUBLISHED}: {classify(exc).reason}",
            )
        except Exception:
            # The caller gets the publish error either way; a retry that finds step 0
            # still RUNNING waits for its lease instead (see _begin).
            log.exception(
                "could not record the unpublished saga",
                extra={"request_id": dto.request_id, "facade": self.name},
            )

    async def _begin(self, dto: DtoT) -> bool:
        """Record the saga, its first hop started; False when this request was already
        accepted (nothing to publish).

        The same id with another request is ALREADY_EXISTS. A saga whose first
        publish failed is published again, its first hop restarted; one whose
        first hop is in flight (a concurrent duplicate) is left alone.
        """
        store = self._require_store()
        payload = dto.model_dump_json(exclude=_SLIP_FIELDS)
        digest = payload_digest(self.name, payload)
        begun = await store.begin(
            request_id=dto.request_id,
            facade=self.name,
            kind=self.kind,
            payload=payload,
            payload_hash=digest,
            owner=self._owner,
            first_step=self._hops[0].name,
        )
        if begun.created:
            return True
        saga = begun.existing
        assert saga is not None
        if saga.facade != self.name or saga.payload_hash != digest:
            raise AlreadyExists(
                f"request id {dto.request_id!r} was already used for another request"
            )
        unpublished = (
            saga.state == SagaState.RUNNING
            and len(saga.steps) == 1
            and saga.steps[0].state == StepState.FAILED
            and saga.steps[0].error.startswith(_NOT_PUBLISHED)
        )
        if unpublished:
            await store.step_started(dto.request_id, 0, self._hops[0].name)
        return unpublished

    async def _publish_hop(self, dto: DtoT) -> None:
        topic = dto.topics[dto.current_index]
        await self.broker.publish(
            topic,
            dto.model_dump_json().encode(),
            message_id=f"{dto.request_id}:{dto.current_index}:{topic}",
            headers=tracing.inject(),
        )

    def _consumer(self, index: int, hop: _Hop[DtoT]) -> Callable[[Delivery], Awaitable[None]]:
        span_name = f"step {hop.name}"
        attributes = {"saga.step": hop.name, "messaging.destination": hop.topic}

        async def consume(delivery: Delivery) -> None:
            with tracing.span(span_name, attributes, parent=delivery.headers):
                await self._handle(index, hop, delivery)

        return consume

    async def _handle(self, index: int, hop: _Hop[DtoT], delivery: Delivery) -> None:
        dto = await self._parse(index, hop, delivery)
        store = self._store
        if store is not None and delivery.redelivered:
            # A redelivery of a hop that already finished must not run it again
            # (the step log is the inbox): only its outcome is published again.
            if await self._replayed(index, hop, dto, store):
                return
            # Another attempt. A first delivery's start is already recorded, with the
            # saga's begin or the previous hop's end: one write per hop, not two.
            await self._journal(store.step_started(dto.request_id, index, hop.name), dto.request_id)
        metrics = self._metrics
        metrics.in_flight.inc()
        started = time.perf_counter()
        try:
            result = await call_with_retry(
                functools.partial(hop.node, dto),
                policy=hop.retry,
                attempt_timeout=hop.timeout,
                deadline=None,
                on_retry=functools.partial(self._retrying, dto.request_id, hop),
            )
        except Exception as exc:
            metrics.observe_step(hop.name, time.perf_counter() - started)
            failure = classify(exc)
            log.log(
                logging.ERROR if failure.bug else logging.INFO,
                "node failed, rolling back",
                exc_info=failure.bug,
                extra=_fields(self.name, dto, hop, failure),
            )
            if store is not None:
                await self._journal(
                    store.step_finished(
                        dto.request_id,
                        index,
                        state=StepState.FAILED,
                        data=dto.model_dump_json(),
                        error=failure.reason,
                        saga_state=SagaState.COMPENSATING,
                        error_code=failure.code.name,
                        error_reason=failure.reason,
                    ),
                    dto.request_id,
                )
            await self._publish_rollback(
                self._rollback_of(dto, hop.name, failure), inline_fallback=False
            )
            metrics.failed(failure.code.name)
            await self._notify_end(dto, failure)
            return
        else:
            metrics.observe_step(hop.name, time.perf_counter() - started)
            result.current_index = index + 1
            last = result.current_index >= len(result.topics)
            following = not last and index + 1 < len(self._hops)
            next_step = self._hops[index + 1].name if following else ""
            if store is not None:
                # One write: the hop's end with the next hop's start (its message is
                # published next), or with the saga's completion.
                await self._journal(
                    store.step_finished(
                        dto.request_id,
                        index,
                        state=StepState.DONE,
                        data=result.model_dump_json(),
                        next_step=next_step,
                        saga_state=SagaState.COMPLETED if last else None,
                    ),
                    dto.request_id,
                )
            await self._advance(result, hop, completion_recorded=True)
        finally:
            metrics.in_flight.dec()

    async def _advance(
        self, result: DtoT, hop: _Hop[DtoT], *, completion_recorded: bool = False
    ) -> None:
        """Publish the next hop, or record the saga completed after its last one."""
        if result.current_index < len(result.topics):
            await self._publish_hop(result)
            return
        if self._store is not None and not completion_recorded:
            await self._journal(
                self._store.set_state(
                    result.request_id, SagaState.COMPLETED, data=result.model_dump_json()
                ),
                result.request_id,
            )
        log.info("saga completed", extra=_fields(self.name, result, hop, None))
        self._metrics.completed.inc()
        await self._notify_end(result, None)

    async def _replayed(self, index: int, hop: _Hop[DtoT], dto: DtoT, store: SagaStore) -> bool:
        """Whether the step log says this hop already ran; then its outcome is re-sent."""
        saga = await store.get(dto.request_id)
        if saga is None or saga.finished:
            return saga is not None
        done = next((s for s in saga.steps if s.index == index and s.state == StepState.DONE), None)
        if done is None:
            return False
        log.info("redelivered hop already done", extra=_fields(self.name, dto, hop, None))
        await self._advance(self._dto.model_validate_json(saga.data), hop)
        return True

    async def _parse(self, index: int, hop: _Hop[DtoT], delivery: Delivery) -> DtoT:
        """The delivery's DTO; a message that can never be handled is dead-lettered."""
        try:
            raw: Any = json.loads(delivery.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DeadLetter(f"malformed JSON: {exc}") from None
        try:
            dto = self._dto.model_validate(raw)
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            await self._reject(raw, hop, f"schema: {where}: {error['msg']}")
        if dto.current_index != index or dto.topics[index : index + 1] != [hop.topic]:
            await self._reject(
                raw,
                hop,
                f"topic index {dto.current_index} does not match {hop.topic!r} "
                f"(position {index} of {len(self._hops)})",
            )
        return dto

    async def _reject(self, raw: Any, hop: _Hop[DtoT], reason: str) -> NoReturn:
        """Dead-letter an invalid message, first rolling its saga back when its id is readable."""
        request_id = raw.get("request_id") if isinstance(raw, dict) else None
        if isinstance(request_id, str) and request_id:
            await self._publish_rollback(
                Rollback(
                    request_id=request_id,
                    facade=self.name,
                    kind="async",
                    failed_step=hop.name,
                    code=grpc.StatusCode.INVALID_ARGUMENT.name,
                    reason=f"invalid message: {reason}",
                    data=raw,
                    completed_steps=self._hop_names_before(hop.name),
                ),
                inline_fallback=False,
            )
        raise DeadLetter(reason)

    def _retrying(self, request_id: str, hop: _Hop[DtoT], exc: BaseException, attempt: int) -> None:
        self._metrics.retried(hop.name)
        log.info(
            "retrying step",
            extra={
                "request_id": request_id,
                "facade": self.name,
                "step": hop.name,
                "topic": hop.topic,
                "attempt": attempt,
                "error": classify(exc).reason,
            },
        )

    def _rollback_of(self, dto: DtoT, step: str, failure: Failure) -> Rollback:
        return Rollback(
            request_id=dto.request_id,
            facade=self.name,
            kind="async",
            failed_step=step,
            code=failure.code.name,
            reason=failure.reason,
            data=dto.model_dump(),
            completed_steps=self._to_compensate(step, failure),
        )

    def _to_compensate(self, step: str, failure: Failure) -> list[str]:
        """The hops before `step`, and `step` itself when it may have taken effect."""
        names = [hop.name for hop in self._hops]
        end = names.index(step) + (1 if failure.code in UNCERTAIN_CODES else 0)
        return names[:end]

    def _hop_names_before(self, step: str) -> list[str]:
        names = [hop.name for hop in self._hops]
        return names[: names.index(step)]

    async def _compensate(
        self, undo: Callable[[DtoT], Awaitable[None]], rollback: Rollback
    ) -> None:
        await undo(self._dto.model_validate(rollback.data))

    async def _notify_end(self, dto: DtoT, failure: Failure | None) -> None:
        for listener in self._end_listeners:
            try:
                await listener(dto, failure)
            except Exception:
                log.exception("saga end listener failed", extra={"request_id": dto.request_id})


def _fields(
    facade: str, dto: AsyncFacadeContext, hop: _Hop[Any], failure: Failure | None
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "request_id": dto.request_id,
        "facade": facade,
        "step": hop.name,
        "topic": hop.topic,
    }
    if failure is not None:
        fields.update(code=failure.code.name, reason=failure.reason)
    return fields
