"""Rolling a saga back: its rollback message's consumer, its compensations and rollback node.

What is undone, and with which data, comes from the saga's journal; a
rollback message only names the saga. Each compensation runs as its step (for
`step_metadata()`), and the rollback node after them, each under its retry
policy; one still failing after that makes the saga COMPENSATION_FAILED, an
end of its own.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from orchestrator import tracing
from orchestrator.broker.base import DeadLetter, Delivery
from orchestrator.context import StepScope, enter_step, leave_step
from orchestrator.dto import Rollback
from orchestrator.errors import FailedPrecondition, InvalidArgument, classify
from orchestrator.facade.definition import StepDefinition
from orchestrator.request_id import check_request_id
from orchestrator.retry import call_with_retry
from orchestrator.store import CompensationEnded, CompensationState, SagaRecord, SagaState

if TYPE_CHECKING:
    from orchestrator.facade._runtime import SagaRuntime

__all__ = ["Compensation"]

log = logging.getLogger("orchestrator.facade")


class Compensation:
    """The rollback of one facade's sagas, run for its `SagaRuntime`."""

    def __init__(self, runtime: SagaRuntime) -> None:
        self.runtime = runtime

    async def on_rollback(self, delivery: Delivery) -> None:
        """Consume a rollback message: compensate the saga it names, as its journal says.

        Only a COMPENSATING saga is compensated; a finished one makes the
        message a duplicate (dropped), and a saga that is unknown or still
        RUNNING makes it one to dead-letter: it does not act on its own.
        """
        request_id = _rollback_target(delivery.body, self.runtime.name)
        saga = await self.runtime.store.get(self.runtime.name, request_id)
        if saga is None:
            self.runtime.metrics.message_refused(delivery.topic, "unknown_saga")
            raise DeadLetter(
                f"rollback for a saga that does not exist: {self.runtime.name}/{request_id}"
            )
        if saga.state != SagaState.COMPENSATING:
            if saga.finished:
                self.runtime.metrics.message_refused(delivery.topic, "finished")
                log.info(
                    "rollback of a finished saga dropped as a duplicate",
                    extra={**self.runtime.fields(request_id), "state": str(saga.state)},
                )
                return
            self.runtime.metrics.message_refused(delivery.topic, "not_compensating")
            raise DeadLetter(f"rollback for a saga that is {saga.state}, not compensating")
        log.info(
            "rolling back",
            extra={
                **self.runtime.fields(request_id),
                "topic": delivery.topic,
                "attempt": delivery.delivery_count,
            },
        )
        with tracing.span(
            f"rollback {self.runtime.name}",
            {"saga.request_id": request_id},
            parent=delivery.headers,
        ):
            failure = await self.run(saga)
        if failure is not None:
            raise DeadLetter(f"COMPENSATION_FAILED: {failure}")

    async def run(self, saga: SagaRecord) -> str | None:
        """Undo what the journal says may have taken effect, in reverse order, then run the
        rollback node; record how it ended. Returns why it failed, if it did.

        Each compensation and the rollback node run under their retry policies;
        one still failing after them makes the saga COMPENSATION_FAILED.
        """
        request_id = saga.request_id
        pending = tuple(
            step.index
            for step in saga.steps
            if step.compensation in (CompensationState.PENDING, CompensationState.FAILED)
        )
        done, failed, reason = await self._undo(self.rollback_of(saga), pending, journal=True)
        if reason is not None:
            change = CompensationEnded(
                SagaState.COMPENSATION_FAILED, done=done, failed=failed, error=reason
            )
            if await self.runtime.apply(request_id, change):
                self.runtime.metrics.compensation_failed.inc()
                log.error(
                    "compensation failed for good",
                    extra={**self.runtime.fields(request_id), "reason": reason},
                )
            return reason
        if await self.runtime.apply(
            request_id, CompensationEnded(SagaState.COMPENSATED, done=done)
        ):
            self.runtime.metrics.compensated.inc()
            log.info("rolled back", extra=self.runtime.fields(request_id))
        return None

    async def unrecorded(self, rollback: Rollback, indexes: tuple[int, ...]) -> None:
        """Undo the steps `indexes` and run the rollback node without the journal (it could
        not record the failure): the saga's deadline makes recovery finish its record."""
        _, _, reason = await self._undo(rollback, indexes)
        if reason is not None:
            raise RuntimeError(reason)

    async def _undo(
        self, rollback: Rollback, indexes: tuple[int, ...], *, journal: bool = False
    ) -> tuple[tuple[int, ...], int | None, str | None]:
        """Compensate `indexes` in reverse order, then the rollback node: what was undone,
        and the step (or None for the node) and reason of a failure for good.

        With `journal`, each attempt first checks that the saga is still COMPENSATING:
        one an operator settled meanwhile (resolved by hand) is not undone any further.
        """
        done: list[int] = []
        for index in reversed(indexes):
            step = self.runtime.definition.steps[index]
            if step.compensation is not None:
                try:
                    await self._undo_step(step, rollback, journal=journal)
                except Exception as exc:
                    return (
                        tuple(done),
                        index,
                        f"compensation of {step.name} failed: {classify(exc).reason}",
                    )
            done.append(index)
        node = self.runtime.definition.rollback_node
        if node is not None:
            try:
                await self._run_rollback_node(node, rollback, journal=journal)
            except Exception as exc:
                return tuple(done), None, f"rollback node failed: {classify(exc).reason}"
        return tuple(done), None, None

    async def _undo_step(self, step: StepDefinition, rollback: Rollback, *, journal: bool) -> None:
        token = enter_step(
            StepScope(self.runtime.name, rollback.request_id, step.name, "compensation")
        )
        call = functools.partial(self.runtime.facade.compensate, step, rollback)
        try:
            await call_with_retry(
                self._checked(rollback.request_id, call) if journal else call,
                policy=step.compensate_retry,
                attempt_timeout=step.timeout,
                deadline=None,
                on_retry=functools.partial(self._undo_retrying, rollback, step.name),
            )
        finally:
            leave_step(token)

    async def _run_rollback_node(
        self, node: Callable[[Rollback], Awaitable[None]], rollback: Rollback, *, journal: bool
    ) -> None:
        token = enter_step(
            StepScope(self.runtime.name, rollback.request_id, "rollback", "rollback")
        )
        call = functools.partial(node, rollback)
        try:
            await call_with_retry(
                self._checked(rollback.request_id, call) if journal else call,
                policy=self.runtime.definition.rollback_retry,
                attempt_timeout=None,
                deadline=None,
                on_retry=functools.partial(self._undo_retrying, rollback, "rollback"),
            )
        finally:
            leave_step(token)

    def _checked(
        self, request_id: str, call: Callable[[], Awaitable[None]]
    ) -> Callable[[], Awaitable[None]]:
        """`call`, run only while the journal shows the saga COMPENSATING."""

        async def attempt() -> None:
            position = await self.runtime.position(request_id)
            if position is None or position.state != SagaState.COMPENSATING:
                state = "gone" if position is None else str(position.state)
                raise Settled(f"the saga is {state}: an operator settled it meanwhile")
            await call()

        return attempt

    def _undo_retrying(
        self, rollback: Rollback, step: str, exc: BaseException, attempt: int
    ) -> None:
        self.runtime.metrics.retried(f"compensate {step}")
        log.warning(
            "compensation failed, retrying",
            extra={
                **self.runtime.fields(rollback.request_id),
                "step": step,
                "attempt": attempt,
                "reason": classify(exc).reason,
            },
        )

    def rollback_of(self, saga: SagaRecord) -> Rollback:
        """What a rollback node and the compensations receive, from the journal."""
        failed = saga.failed_step
        return Rollback(
            request_id=saga.request_id,
            facade=self.runtime.name,
            kind="sync" if self.runtime.kind == "sync" else "async",
            failed_step=failed.name if failed is not None else "",
            code=saga.error_code,
            reason=saga.error_reason,
            data=self.runtime.facade.rollback_data(saga),
            completed_steps=[
                step.name for step in saga.steps if step.compensation != CompensationState.NONE
            ],
        )


class Settled(FailedPrecondition):
    """The saga left COMPENSATING while its compensation ran (an operator resolved it):
    nothing more is undone. Never retried."""


def _rollback_target(body: bytes, facade: str) -> str:
    """The request id a rollback message names; DeadLetter when it names nothing of ours."""
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeadLetter(f"not a rollback message: malformed JSON: {exc}") from None
    if not isinstance(message, dict):
        raise DeadLetter("not a rollback message: not a JSON object")
    named, request_id = message.get("facade"), message.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise DeadLetter("not a rollback message: no request_id")
    if named != facade:
        raise DeadLetter(f"rollback for facade {named!r} on {facade}'s rollback topic")
    try:
        check_request_id(request_id)
    except InvalidArgument as exc:
        raise DeadLetter(f"not a rollback message: {exc}") from None
    return request_id
