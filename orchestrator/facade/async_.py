"""The async facade: each node is a hop through a broker topic, carrying a JSON DTO.

What is async-specific lives here: the DTO and its routing slip, publishing a
saga's first hop, and consuming each hop. The journal decides what a hop
message may do: it runs its node only when the saga is at that step and the
message is the one the journal expects there; otherwise nothing is called
upstream and nothing in the record changes (the message is dead-lettered, or
dropped as a duplicate). The one exception is a redelivered hop the journal
shows as just finished: its outcome (the next hop, or the rollback) is
published again, so a crash between the journal write and that publish loses
nothing.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Generic, Literal, Self, TypeVar

import pydantic

from orchestrator import tracing
from orchestrator.broker.base import DeadLetter, Delivery, QueueFull
from orchestrator.config import FacadeKindName
from orchestrator.dto import AsyncFacadeContext, Rollback
from orchestrator.errors import BrokerUnavailable, SagaFailed, classify
from orchestrator.facade._ending import wait_for_end
from orchestrator.facade._in_process import run_in_process
from orchestrator.facade.base import FacadeBase
from orchestrator.facade.definition import (
    DEFAULT_COMPENSATION_RETRY,
    DEFAULT_RETRY,
    StepDefinition,
)
from orchestrator.retry import RetryPolicy, caller_deadline
from orchestrator.store import Position, SagaRecord, SagaState, StepState

__all__ = ["AsyncCompensation", "AsyncFacade", "AsyncNode"]

log = logging.getLogger("orchestrator.facade.async")

DtoT = TypeVar("DtoT", bound=AsyncFacadeContext)

AsyncNode = Callable[[DtoT], Awaitable[DtoT]]
"""`async def node(dto) -> dto`: returning publishes it to the next topic, raising rolls back."""
AsyncCompensation = Callable[[DtoT], Awaitable[None]]
"""`async def undo(dto)`: undoes its step, given the DTO as the saga left it."""

FIRST_HOP_GRACE_SECONDS = 5.0
"""How long a first hop whose saga is not recorded waits for its begin (the publish comes
first; the begin follows the broker's confirm) before it is dead-lettered as `no such saga`."""
PUBLISH_MARGIN_SECONDS = 0.25
"""Left of the caller's deadline after a first publish that timed out: time to record that
nothing was published and answer UNAVAILABLE before the caller gives up."""


class _Verdict(enum.Enum):
    RUN = "run"
    RESTART = "restart"
    REPUBLISH = "republish"
    DROP = "drop"
    DEAD_LETTER = "dead_letter"


class AsyncFacade(FacadeBase, Generic[DtoT]):
    """Chains nodes through broker topics that the orchestrator publishes and consumes itself.

        flow = AsyncFacade(dto=BookingMsgDTO)
        flow.use(topic.CREATE_ORDER, create_order).use(topic.CREATE_PAYMENT, create_payment)
        flow.consume_rollback(topic.CANCEL_ASYNC_BOOKING, cancel_booking)
        orchestrator.register_async_facade("AsyncBooking", flow)

    A message is acknowledged only after its outcome (the next hop or the
    rollback) is confirmed by the broker, so a crash at any point replays the
    hop: nodes must be idempotent, which `step_metadata()`'s key makes easy.
    """

    kind: ClassVar[Literal["sync", "async", "throttling"]] = "async"
    runs_as: ClassVar[frozenset[FacadeKindName]] = frozenset({"async", "throttling", "inline"})

    def __init__(self, *, dto: type[DtoT]) -> None:
        super().__init__()
        if not (isinstance(dto, type) and issubclass(dto, AsyncFacadeContext)):
            raise TypeError(f"dto must be a subclass of AsyncFacadeContext, not {dto!r}")
        self._dto = dto
        # First publishes in flight on this replica, by request id: a duplicate waits for one.
        self._starting: dict[str, asyncio.Future[None]] = {}
        # Hops running on this replica: a second delivery of one is a duplicate.
        self._running: set[tuple[str, int]] = set()

    @property
    def topics(self) -> list[str]:
        """The node topics, in order."""
        return [step.topic for step in self._steps]

    def use(
        self,
        topic: str,
        node: AsyncNode[DtoT],
        *,
        name: str | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        timeout: float | None = None,
        compensate: AsyncCompensation[DtoT] | None = None,
        compensate_retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY,
    ) -> Self:
        """Append a node that consumes `topic` (the Go original's TopicNodePair).

        `retry` says which failures are retried in place and how; `timeout`
        bounds each attempt. A node still failing after that rolls back.
        `compensate(dto)` undoes the node once it may have taken effect, should
        the saga fail: it gets the DTO as the saga left it.
        """
        if not topic:
            raise ValueError("the topic must not be empty")
        if topic in self.topics or topic == self._rollback_topic:
            raise ValueError(f"topic {topic!r} is already used by this facade")
        self._append(
            node,
            name=name or str(getattr(node, "__name__", "") or topic),
            params=("dto",),
            retry=retry,
            timeout=timeout,
            compensate=compensate,
            compensate_params=("dto",),
            compensate_retry=compensate_retry,
            topic=topic,
        )
        return self

    async def start(self) -> None:
        """Declare every topic first, then consume: no hop may publish into a missing queue."""
        runtime = self.runtime
        for step in runtime.definition.steps:
            await runtime.broker.declare(step.topic)
        await super().start()
        for step in runtime.definition.steps:
            await runtime.broker.subscribe(step.topic, self._consumer(step))

    # --- starting a saga -----------------------------------------------------------------

    async def run(self, request_id: str, dto: DtoT) -> DtoT | None:
        """Start a saga: publish the DTO to the first topic, then record the saga.

        As built (`async`) it returns None once the broker confirmed the first
        hop and the saga is recorded: the saga goes on without the caller. Run
        as `throttling` or `inline` (`sagas.facades.<name>.run_as`), it returns
        the saga's final DTO once the saga ended, or raises its failure once
        its compensation has run (see `ThrottlingFacade.run`).

        A request id seen before publishes nothing (unless its first hop is
        recorded as never published); the same request id with another DTO is
        ALREADY_EXISTS. A broker that is down or blocked refuses the call at
        once with UNAVAILABLE, and a first topic at its length limit with
        RESOURCE_EXHAUSTED, both before anything is recorded.
        """
        if self.runtime.kind == "async":
            await self._accept(request_id, dto)
            return None
        return await self._run_to_end(request_id, dto)

    async def _run_to_end(self, request_id: str, dto: DtoT) -> DtoT:
        """Run the saga as throttling (through the broker) or inline (in this task) and wait
        for its end: the final DTO, or its failure raised."""
        runtime = self.runtime
        with runtime.admission.admit():
            if runtime.kind == "inline":
                return await self._run_inline(request_id, dto)
            # Watched from before the begin: this replica's own writes then tell the wait
            # where the saga stands, and only the others' are read (see `Watch`).
            with runtime.watching(request_id, before_begin=True) as watch:
                await self._accept(request_id, dto)
                ended = await wait_for_end(runtime, request_id, watch)
            return await self._outcome(request_id, ended)

    async def _accept(self, request_id: str, dto: DtoT) -> None:
        runtime = self.runtime
        if not runtime.broker.healthy:
            raise BrokerUnavailable("the broker is unavailable: try again later")
        starting = self._starting.get(request_id)
        if starting is not None:
            # The same request, in flight here: answer as it will.
            await asyncio.shield(starting)
            return
        started = self._starting[request_id] = asyncio.get_running_loop().create_future()
        try:
            await self._start(request_id, dto)
        except BaseException as exc:
            started.set_exception(exc)
            started.exception()  # retrieved: a lone first call leaves no warning behind
            raise
        else:
            started.set_result(None)
        finally:
            del self._starting[request_id]

    async def _start(self, request_id: str, dto: DtoT) -> None:
        """Publish the first hop, then record the saga: a publish refused (the first topic
        full, the broker down) leaves no saga behind. The first hop's consumer waits for the
        record (`FIRST_HOP_GRACE_SECONDS`), so no node runs before its saga is recorded."""
        runtime = self.runtime
        body = self._slip(request_id, dto).model_dump_json()
        with tracing.span(
            f"saga {runtime.name}", {"saga.request_id": request_id, "saga.kind": runtime.kind}
        ):
            existing = await runtime.stored_position(request_id)
            if existing is not None:
                runtime.check_same_request(request_id, existing.payload, body)
                if existing.step_states != (StepState.PENDING,):
                    return  # recorded, so its first hop was published: on its way, or beyond
                # Recorded as never published (by an earlier version): publish it now.
                if await runtime.step_restarted(request_id, 0):
                    await self._publish_first(request_id, body, recorded=True)
                return
            await self._publish_first(request_id, body, recorded=False)
            await runtime.begin(request_id, body)

    async def _publish_first(self, request_id: str, body: str, *, recorded: bool) -> None:
        runtime = self.runtime
        first = runtime.definition.steps[0]
        try:
            await runtime.broker.publish(
                first.topic,
                body.encode(),
                message_id=f"{request_id}:0:{first.topic}",
                headers=tracing.inject(),
                timeout=_time_left(),
            )
        except QueueFull as exc:
            if recorded:
                await runtime.step_pending(request_id, 0, f"not published: {exc}")
            raise runtime.admission.queue_full(first.topic) from exc
        except Exception as exc:
            if recorded:
                # Nothing was published (as far as we know): a retry publishes it.
                await runtime.step_pending(request_id, 0, f"not published: {classify(exc).reason}")
            raise

    def _slip(self, request_id: str, dto: DtoT) -> DtoT:
        """`dto` with its routing slip filled in for the first hop."""
        dto.request_id = request_id
        dto.current_index = 0
        dto.topics = self.topics
        dto.rollback_topic = self._rollback_topic
        return dto

    async def _outcome(self, request_id: str, ended: Position) -> DtoT:
        """The final DTO of a COMPLETED saga (its last step's data, which the position
        holds); the failure of any other end, raised, from the whole record."""
        if ended.state == SagaState.COMPLETED:
            data = next((data for data in reversed(ended.step_data) if data is not None), None)
            if data is not None:
                return self._dto.model_validate_json(data)
        saga = await self.runtime.store.get(self.runtime.name, request_id)
        if saga is None:
            raise KeyError(f"no saga {self.runtime.name}/{request_id}")
        if saga.state == SagaState.COMPLETED:
            return self._dto.model_validate_json(saga.data)
        raise self.runtime.failure_of(saga)

    async def _run_inline(self, request_id: str, dto: DtoT) -> DtoT:
        """Run every node in this task, without the broker; the journal and the rollback
        (through the rollback topic) as for any saga."""
        runtime = self.runtime
        body = self._slip(request_id, dto).model_dump_json()
        with tracing.span(
            f"saga {runtime.name}", {"saga.request_id": request_id, "saga.kind": "inline"}
        ):
            existing = await runtime.begin(request_id, body)
            if existing is None:
                carrier = _DtoCarrier(dto)
                try:
                    await run_in_process(runtime, request_id, carrier)
                except SagaFailed:
                    pass  # answered below, once its compensation has run
                else:
                    return carrier.dto
        return await self._outcome(request_id, await wait_for_end(runtime, request_id))

    # --- consuming hops ------------------------------------------------------------------

    def _consumer(self, step: StepDefinition) -> Callable[[Delivery], Awaitable[None]]:
        return functools.partial(self._on_hop, step)

    async def _on_hop(self, step: StepDefinition, delivery: Delivery) -> None:
        runtime = self.runtime
        dto = self._parse(step, delivery)
        request_id = dto.request_id
        running = (request_id, step.index)
        if running in self._running:
            runtime.metrics.message_refused(step.topic, "duplicate")
            return  # the same hop is being handled here now: this copy is a duplicate
        # Taken before the journal is read: a copy delivered meanwhile is the duplicate.
        self._running.add(running)
        try:
            await self._handle_hop(step, dto, delivery)
        finally:
            self._running.discard(running)

    async def _handle_hop(self, step: StepDefinition, dto: DtoT, delivery: Delivery) -> None:
        runtime = self.runtime
        request_id = dto.request_id
        if step.index == 0 and (starting := self._starting.get(request_id)) is not None:
            # Begun on this replica, its first hop published before its begin commits: wait
            # for that begin here (which leaves the saga's position in memory) rather than
            # reading the store until the begin is there.
            await asyncio.wait([starting])
        saga = await runtime.position(request_id)
        verdict, reason = _verdict(saga, step.index, delivery)
        if saga is not None and verdict in (_Verdict.DEAD_LETTER, _Verdict.DROP):
            # What this replica last wrote may be behind the store: another replica may have
            # moved the saga on to this very hop since. Only the store refuses a message.
            saga = await runtime.stored_position(request_id)
            verdict, reason = _verdict(saga, step.index, delivery)
        if saga is None and step.index == 0:
            # A first hop is published before its saga's begin: give the begin time to land.
            saga = await runtime.recorded(request_id, FIRST_HOP_GRACE_SECONDS)
            verdict, reason = _verdict(saga, step.index, delivery)
        if verdict is _Verdict.DEAD_LETTER:
            runtime.metrics.message_refused(step.topic, "dead_lettered")
            raise DeadLetter(f"{reason} ({runtime.name}/{request_id}, step {step.name})")
        if verdict is _Verdict.DROP:
            runtime.metrics.message_refused(step.topic, "duplicate")
            log.info("hop dropped: " + reason, extra=self._fields(request_id, step))
            return
        assert saga is not None
        if verdict is _Verdict.REPUBLISH:
            await self._republish(request_id, saga, step)
            return
        if verdict is _Verdict.RESTART and not await runtime.step_restarted(request_id, step.index):
            return
        # One span for the hop: its node, its journal write and its outcome's publish,
        # so the next hop (or the rollback) carries this trace on.
        with runtime.step_span(step, request_id, parent=delivery.headers):
            await self._run_hop(step, dto)

    async def _run_hop(self, step: StepDefinition, dto: DtoT) -> None:
        runtime = self.runtime
        request_id = dto.request_id
        metrics = runtime.metrics
        metrics.in_flight.inc()
        try:
            result = await runtime.run_step(
                step, request_id, functools.partial(step.action, dto), traced=False
            )
        except Exception as exc:
            await runtime.fail(
                request_id,
                step.index,
                classify(exc),
                cause=exc,
                data=dto.model_dump_json(),
                inline_fallback=False,
            )
            return
        finally:
            metrics.in_flight.dec()
        steps = runtime.definition.steps
        result.current_index = step.index + 1
        body = result.model_dump_json()
        # One write: the hop's end with the next hop's start, or with the saga's completion.
        if not await runtime.step_ended(request_id, step.index, body):
            return  # the saga moved on without this hop (it was stopped meanwhile)
        if step.index + 1 < len(steps):
            await self._publish_hop(steps[step.index + 1], request_id, body)

    async def _republish(self, request_id: str, saga: Position, step: StepDefinition) -> None:
        """Publish again the outcome of hop `step`, which the journal shows just finished."""
        runtime = self.runtime
        log.info(
            "redelivered hop already done: its outcome goes out again",
            extra=self._fields(request_id, step),
        )
        if saga.state == SagaState.COMPENSATING:
            await runtime.roll_back(request_id, inline_fallback=False)
            return
        following = runtime.definition.steps[step.index + 1]
        await self._publish_hop(following, request_id, saga.step_data[step.index] or "")

    async def _publish_hop(self, step: StepDefinition, request_id: str, body: str) -> None:
        await self.runtime.broker.publish(
            step.topic,
            body.encode(),
            message_id=f"{request_id}:{step.index}:{step.topic}",
            headers=tracing.inject(),
        )

    def _parse(self, step: StepDefinition, delivery: Delivery) -> DtoT:
        """The delivery's DTO; a message that can never be handled is dead-lettered, and
        nothing else happens: no message acts on its own."""
        try:
            return self._dto.model_validate_json(delivery.body)
        except pydantic.ValidationError:
            pass  # explained below; the usual message costs one parse
        self.runtime.metrics.message_refused(step.topic, "dead_lettered")
        try:
            raw: Any = json.loads(delivery.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DeadLetter(f"malformed JSON: {exc}") from None
        try:
            self._dto.model_validate(raw)
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise DeadLetter(f"schema: {where}: {error['msg']}") from None
        raise DeadLetter("schema: not a valid JSON message of the facade's DTO")

    def _check_rollback_topic(self, topic: str) -> None:
        if topic in self.topics:
            raise ValueError(f"topic {topic!r} is already a step's topic in this facade")

    def _fields(self, request_id: str, step: StepDefinition) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "facade": self.runtime.name,
            "step": step.name,
            "topic": step.topic,
        }

    # --- FacadeKind ------------------------------------------------------------------------

    def rollback_data(self, saga: SagaRecord) -> dict[str, Any]:
        """The DTO as the saga left it, as a JSON object."""
        data: dict[str, Any] = json.loads(saga.data or saga.payload or "{}")
        return data

    async def resume(self, saga: SagaRecord, index: int) -> None:
        """Publish step `index`'s hop again, with the DTO the journal holds for it."""
        step = self.runtime.definition.steps[index]
        before = saga.step(index - 1) if index else None
        body = (before.data if before is not None else None) or saga.payload
        await self._publish_hop(step, saga.request_id, body)

    async def compensate(self, step: StepDefinition, rollback: Rollback) -> None:
        """Call the compensation with the DTO the saga left."""
        assert step.compensation is not None
        await step.compensation(self._dto.model_validate(rollback.data))


class _DtoCarrier(Generic[DtoT]):
    """The DTO an inline saga's nodes pass on, as `run_in_process` carries it."""

    def __init__(self, dto: DtoT) -> None:
        self.dto = dto

    def call(self, step: StepDefinition) -> Callable[[], Awaitable[Any]]:
        """The node called with the DTO."""
        return functools.partial(step.action, self.dto)

    def took(self, step: StepDefinition, result: Any) -> None:
        """The DTO the node returned, its routing slip at the next hop (as a hop's would be)."""
        result.current_index = step.index + 1
        self.dto = result

    def data(self) -> str:
        """The DTO as JSON."""
        return self.dto.model_dump_json()

    def rollback_data(self) -> dict[str, Any]:
        """The DTO as a JSON object."""
        data: dict[str, Any] = json.loads(self.data())
        return data


def _time_left() -> float | None:
    """What a first publish may take: the caller's deadline, less the time to answer."""
    deadline = caller_deadline.get()
    if deadline is None:
        return None
    left = deadline - asyncio.get_running_loop().time()
    return max(left - min(PUBLISH_MARGIN_SECONDS, left / 4), 0.001)


def _verdict(saga: Position | None, index: int, delivery: Delivery) -> tuple[_Verdict, str]:
    """What the journal lets hop message `delivery` do at step `index`, and why not."""
    if saga is None:
        return _Verdict.DEAD_LETTER, "no such saga"
    if saga.finished:
        return _Verdict.DROP, f"the saga is {saga.state}"
    if index >= len(saga.step_states):
        return _Verdict.DEAD_LETTER, "not the saga's current step (it never started)"
    state = saga.step_states[index]
    current = state in (StepState.RUNNING, StepState.PENDING)
    expected = (saga.step_data[index - 1] if index else saga.payload) or ""
    if delivery.body != expected.encode():
        if current:
            return _Verdict.DEAD_LETTER, "the message does not match the saga's record"
        return _Verdict.DROP, f"step {index} is {state}"
    if current:
        if state == StepState.PENDING or delivery.redelivered:
            return _Verdict.RESTART, ""
        return _Verdict.RUN, ""
    just_finished = (
        state == StepState.DONE
        and saga.state == SagaState.RUNNING
        and len(saga.step_states) == index + 2
    ) or (state == StepState.FAILED and saga.state == SagaState.COMPENSATING)
    if just_finished and delivery.redelivered:
        return _Verdict.REPUBLISH, ""
    return _Verdict.DROP, f"step {index} is {state}"
