"""What sync and async facades share: a name, a broker, and the rollback topic."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pydantic

from orchestrator import tracing
from orchestrator.broker.base import Broker, DeadLetter, Delivery
from orchestrator.dto import Rollback
from orchestrator.errors import BrokerUnavailable, classify
from orchestrator.metrics import Metrics
from orchestrator.retry import RetryPolicy, call_with_retry
from orchestrator.store.base import SagaRecord, SagaState, SagaStore, StepState

__all__ = ["DEFAULT_COMPENSATION_RETRY", "Compensation", "FacadeBase", "RollbackNode"]

log = logging.getLogger("orchestrator.facade")

RollbackNode = Callable[[Rollback], Awaitable[None]]
"""Undoes a failed saga; raising makes the broker deliver the rollback again later."""

Compensation = Callable[[Rollback], Awaitable[None]]
"""Undoes one completed step, given the rollback (each facade adapts it to its node types)."""

DEFAULT_COMPENSATION_RETRY = RetryPolicy(
    attempts=5, initial_backoff=0.1, max_backoff=2.0, any_error=True
)
"""Compensations must succeed: every failure is retried, up to five attempts in about 3 s."""


@dataclass(frozen=True, slots=True)
class _Compensation:
    undo: Compensation
    retry: RetryPolicy


class FacadeBase:
    """A facade before and after it is registered with an Orchestrator."""

    kind: str = ""

    def __init__(self) -> None:
        self._name = ""
        self._broker: Broker | None = None
        self._metrics = Metrics().for_facade("", self.kind)
        self._rollback_topic = ""
        self._rollback_node: RollbackNode | None = None
        self._compensations: dict[str, _Compensation] = {}
        self._rollback_consumed = False
        self._store: SagaStore | None = None
        self._owner = ""
        # Callers waiting on a saga's outcome, by request id; this replica's writes wake them.
        self._change_waiters: dict[str, set[asyncio.Event]] = {}

    @property
    def name(self) -> str:
        """The name it was registered under."""
        return self._name

    @property
    def rollback_topic(self) -> str:
        """The topic its rollback messages go to; empty when it has no rollback."""
        return self._rollback_topic

    @property
    def broker(self) -> Broker:
        """The broker of the Orchestrator it is registered with."""
        if self._broker is None:
            raise RuntimeError(f"{type(self).__name__} is not registered with an Orchestrator")
        return self._broker

    def _set_rollback(self, topic: str, node: RollbackNode | None) -> None:
        if not topic:
            raise ValueError("the rollback topic must not be empty")
        if self._rollback_consumed:
            raise ValueError(f"rollback is already consumed from {self._rollback_topic!r}")
        self._rollback_consumed = True
        self._rollback_topic = topic
        self._rollback_node = node

    def _add_compensation(self, step: str, undo: Compensation, retry: RetryPolicy) -> None:
        self._compensations[step] = _Compensation(undo, retry)

    @property
    def _consumes_rollback(self) -> bool:
        return self._rollback_node is not None or bool(self._compensations)

    def bind(
        self,
        name: str,
        broker: Broker,
        metrics: Metrics,
        *,
        store: SagaStore | None = None,
        owner: str = "",
    ) -> None:
        """Called by Orchestrator registration; a facade belongs to one orchestrator.

        With a `store`, every saga of the facade is recorded there, run by
        replica `owner`.
        """
        if self._broker is not None:
            raise ValueError(f"facade is already registered as {self._name!r}")
        self._name = name
        self._broker = broker
        self._metrics = metrics.for_facade(name, self.kind)
        self._store = store
        self._owner = owner

    async def _journal(self, write: Awaitable[None], request_id: str) -> None:
        """Apply a store write; a saga the store never began is handled unrecorded.

        Such messages come from before the store was turned on, or were
        forged: refusing them would wedge their consumer for nothing.
        """
        try:
            await write
        except KeyError:
            log.warning(
                "saga unknown to the store, not recorded",
                extra={"request_id": request_id, "facade": self._name},
            )

    def _saga_changed(self, request_id: str) -> None:
        """Wake the callers of this replica waiting on the saga (its store was written)."""
        for event in self._change_waiters.get(request_id, ()):
            event.set()

    @contextlib.contextmanager
    def _watching(self, request_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever this replica writes the saga, for as long as the block runs."""
        event = asyncio.Event()
        waiters = self._change_waiters.setdefault(request_id, set())
        waiters.add(event)
        try:
            yield event
        finally:
            waiters.discard(event)
            if not waiters:
                del self._change_waiters[request_id]

    def _require_store(self) -> SagaStore:
        if self._store is None:
            raise RuntimeError(f"facade {self._name!r} has no saga store")
        return self._store

    async def recover(self, saga: SagaRecord) -> None:
        """Finish a saga whose replica died: undo what it did (compensations, rollback node).

        The steps that finished, and the one that was running (it may have
        taken effect), are compensated through the rollback topic.
        """
        data = self._recovery_data(saga)
        uncertain = [step.name for step in saga.steps if step.state != StepState.FAILED]
        rollback = Rollback(
            request_id=saga.request_id,
            facade=self._name,
            kind="sync" if self.kind == "sync" else "async",
            failed_step=uncertain[-1] if uncertain else "",
            code=grpc.StatusCode.ABORTED.name,
            reason="the replica running the saga stopped; it was rolled back",
            data=data,
            completed_steps=uncertain,
        )
        store = self._require_store()
        await store.set_state(
            saga.request_id,
            SagaState.COMPENSATING,
            error_code=rollback.code,
            error_reason=rollback.reason,
        )
        if self._consumes_rollback:
            await self._publish_rollback(rollback, inline_fallback=False)
        else:
            await store.set_state(saga.request_id, SagaState.COMPENSATED)

    def _recovery_data(self, saga: SagaRecord) -> dict[str, Any]:
        """The saga's data for its rollback, rebuilt from the store."""
        return json.loads(saga.data) if saga.data else {}

    async def start(self) -> None:
        """Declare the facade's topics and start consuming them (the broker is started)."""
        if self._compensations and not self._rollback_topic:
            raise ValueError(
                f"facade {self.name!r} has compensations but no rollback topic: "
                "call consume_rollback(topic) so they survive a crash"
            )
        if self._consumes_rollback:
            await self.broker.declare(self._rollback_topic)
            await self.broker.subscribe(self._rollback_topic, self._on_rollback)

    async def _publish_rollback(self, rollback: Rollback, *, inline_fallback: bool) -> None:
        """Hand the rollback to the broker.

        With `inline_fallback`, a broker that cannot take it makes the rollback
        node run here instead (a sync caller has nothing to redeliver);
        without, the error propagates so the input message is redelivered.
        """
        if not self._consumes_rollback:
            return
        body = rollback.model_dump_json().encode()
        try:
            await self.broker.publish(
                self._rollback_topic,
                body,
                message_id=f"{rollback.request_id}:rollback",
                headers=tracing.inject(),
            )
        except BrokerUnavailable:
            if not inline_fallback:
                raise
            # Losing the rollback would leave the saga half-done: run it here instead.
            log.warning(
                "broker refused the rollback, running it inline",
                extra={"request_id": rollback.request_id, "facade": self._name},
            )
            try:
                await self._undo(rollback)
            except Exception:
                log.exception(
                    "inline rollback failed; the saga is left half-done",
                    extra={"request_id": rollback.request_id, "facade": self._name},
                )

    async def _on_rollback(self, delivery: Delivery) -> None:
        try:
            rollback = Rollback.model_validate_json(delivery.body)
        except pydantic.ValidationError as exc:
            raise DeadLetter(f"not a rollback message: {exc.errors()[0]['msg']}") from None
        log.info(
            "rolling back",
            extra={
                "request_id": rollback.request_id,
                "facade": rollback.facade,
                "step": rollback.failed_step,
                "topic": delivery.topic,
                "attempt": delivery.delivery_count,
            },
        )
        with tracing.span(
            f"rollback {rollback.facade}",
            {"saga.request_id": rollback.request_id, "saga.step": rollback.failed_step},
            parent=delivery.headers,
        ):
            await self._undo(rollback)

    async def _undo(self, rollback: Rollback) -> None:
        """Compensate the completed steps in reverse order, then run the rollback node.

        A compensation still failing after its retries makes the saga
        COMPENSATION_FAILED: the rollback is dead-lettered with that reason,
        never dropped. A failing rollback node is delivered again later.
        """
        for step in reversed(rollback.completed_steps):
            compensation = self._compensations.get(step)
            if compensation is None:
                continue
            try:
                await call_with_retry(
                    functools.partial(compensation.undo, rollback),
                    policy=compensation.retry,
                    attempt_timeout=None,
                    deadline=None,
                    on_retry=functools.partial(self._compensation_retrying, rollback, step),
                )
            except Exception as exc:
                reason = classify(exc).reason
                self._metrics.compensation_failed.inc()
                if self._store is not None:
                    await self._journal(
                        self._store.set_state(
                            rollback.request_id,
                            SagaState.COMPENSATION_FAILED,
                            error_reason=f"compensation of {step} failed: {reason}",
                        ),
                        rollback.request_id,
                    )
                log.error(
                    "compensation failed for good",
                    extra={
                        "request_id": rollback.request_id,
                        "facade": self._name,
                        "step": step,
                        "reason": reason,
                    },
                )
                raise DeadLetter(f"COMPENSATION_FAILED at {step}: {reason}") from exc
        if self._rollback_node is not None:
            await self._rollback_node(rollback)
        if self._store is not None:
            await self._journal(
                self._store.set_state(rollback.request_id, SagaState.COMPENSATED),
                rollback.request_id,
            )
        self._metrics.compensated.inc()
        log.info("rolled back", extra={"request_id": rollback.request_id, "facade": self._name})

    def _compensation_retrying(
        self, rollback: Rollback, step: str, exc: BaseException, attempt: int
    ) -> None:
        self._metrics.retried(f"compensate {step}")
        log.warning(
            "compensation failed, retrying",
            extra={
                "request_id": rollback.request_id,
                "facade": self._name,
                "step": step,
                "attempt": attempt,
                "reason": classify(exc).reason,
            },
        )
