"""What an operator may do to a saga: run it again, roll it back now, or settle it by hand.

Each action is a journal write like any other (a compare-and-set on where
the saga stands), made together with the `ActionRecord` that says who did it
and why: refused, nothing is written and nothing runs. What follows a write
is the engine's ordinary machinery: a rollback message for the compensation,
a hop published again for an async step.

- **retry**: a COMPENSATION_FAILED saga runs its remaining compensations
  again (its failed one first, in reverse order as always); a RUNNING async
  saga runs its current step again (its hop published again: for one whose
  message was lost or dead-lettered). A RUNNING sync saga cannot: it runs
  inside its caller's call, which is gone.
- **compensate**: a RUNNING saga is rolled back now, its current step
  included (it may have taken effect). A hop still on its way finds the saga
  COMPENSATING and does nothing; a node running meanwhile has its end
  refused by the journal.
- **resolve**: the saga ends RESOLVED; nothing runs.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import grpc

from orchestrator.access import current_principal
from orchestrator.errors import FailedPrecondition, Failure
from orchestrator.store import (
    RESOLVABLE,
    ActionRecord,
    CompensationRetried,
    Resolved,
    Retried,
    SagaRecord,
    SagaState,
)

if TYPE_CHECKING:
    from orchestrator.facade._runtime import SagaRuntime

__all__ = ["MAX_NOTE_LENGTH", "Operations", "Refused", "operator_action"]

log = logging.getLogger("orchestrator.admin")

MAX_NOTE_LENGTH = 2000
"""The longest note (or reason) an operator may give."""


def operator_action(name: str, note: str, *, dead_letter_id: str = "") -> ActionRecord:
    """The record of action `name` by the caller running now (`current_principal`)."""
    return ActionRecord(
        action=name,
        actor=current_principal().name,
        note=note,
        at=datetime.now(UTC),
        dead_letter_id=dead_letter_id,
    )


class Refused(FailedPrecondition):
    """The saga is not in a state the action applies to; nothing was done."""


class Operations:
    """The operator actions on the sagas of one `SagaRuntime`."""

    def __init__(self, runtime: SagaRuntime) -> None:
        self.runtime = runtime

    async def retry(self, saga: SagaRecord, note: str) -> None:
        """Run the saga again from where it stopped; Refused when it cannot be."""
        runtime = self.runtime
        action = operator_action("retry", note)
        if saga.state == SagaState.COMPENSATION_FAILED:
            deadline = datetime.now(UTC) + timedelta(seconds=runtime.policy.compensation_seconds)
            self._applied(
                await runtime.apply(saga.request_id, CompensationRetried(deadline), action),
                saga,
                "retry",
            )
            self._log(saga, action)
            await runtime.roll_back(saga.request_id, inline_fallback=True)
            return
        current = saga.current_step
        if saga.state != SagaState.RUNNING or current is None:
            raise Refused(
                f"saga {runtime.name}/{saga.request_id} is {saga.state}: only a "
                "COMPENSATION_FAILED or RUNNING saga can be retried"
            )
        if runtime.kind == "sync":
            raise Refused(
                f"saga {runtime.name}/{saga.request_id} is a RUNNING sync saga: it runs inside "
                "its caller's call, so it cannot be run again from here; compensate or "
                "resolve it (recovery rolls it back at its deadline)"
            )
        deadline = datetime.now(UTC) + timedelta(seconds=runtime.policy.deadline_seconds)
        self._applied(
            await runtime.apply(saga.request_id, Retried(current.index, deadline), action),
            saga,
            "retry",
        )
        self._log(saga, action)
        await runtime.facade.resume(saga, current.index)

    async def compensate(self, saga: SagaRecord, reason: str) -> None:
        """Roll a RUNNING saga back now, its current step included."""
        runtime = self.runtime
        current = saga.current_step
        if saga.state != SagaState.RUNNING or current is None:
            raise Refused(
                f"saga {runtime.name}/{saga.request_id} is {saga.state}: only a RUNNING saga "
                "can be compensated"
            )
        action = operator_action("compensate", reason)
        failure = Failure(
            grpc.StatusCode.ABORTED,
            f"compensated by {action.actor}: {reason}"
            if reason
            else f"compensated by {action.actor}",
        )
        self._applied(
            await runtime.fail(
                saga.request_id,
                current.index,
                failure,
                inline_fallback=True,
                uncertain=True,
                action=action,
            ),
            saga,
            "compensate",
        )
        self._log(saga, action)

    async def resolve(self, saga: SagaRecord, note: str) -> None:
        """End the saga RESOLVED: an operator settled it by hand."""
        runtime = self.runtime
        if saga.state not in RESOLVABLE:
            raise Refused(
                f"saga {runtime.name}/{saga.request_id} is {saga.state}: only a RUNNING, "
                "COMPENSATING or COMPENSATION_FAILED saga can be resolved"
            )
        action = operator_action("resolve", note)
        change = Resolved(saga.state, f"resolved by {action.actor}: {note}")
        self._applied(await runtime.apply(saga.request_id, change, action), saga, "resolve")
        self._log(saga, action)

    def _applied(self, applied: bool, saga: SagaRecord, name: str) -> None:
        if not applied:
            raise Refused(
                f"saga {self.runtime.name}/{saga.request_id} moved while the {name} was being "
                f"made (it was {saga.state}): look at it again"
            )

    def _log(self, saga: SagaRecord, action: ActionRecord) -> None:
        log.warning(
            "operator action",
            extra={
                **self.runtime.fields(saga.request_id),
                "action": action.action,
                "actor": action.actor,
                "note": action.note,
                "state": str(saga.state),
            },
        )
