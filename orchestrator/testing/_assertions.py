"""Asserting a saga's record: its state, which steps ran, failed and were undone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.store.records import CompensationState, SagaRecord, SagaState, StepState
from orchestrator.testing._run import SagaRun

__all__ = ["assert_saga", "describe"]


def assert_saga(
    saga: SagaRecord | SagaRun | None,
    *,
    state: SagaState | str | None = None,
    done: Sequence[str] | None = None,
    failed: str | None = None,
    compensated: Sequence[str] | None = None,
    compensation_failed: str | None = None,
    error_code: str | None = None,
    attempts: Mapping[str, int] | None = None,
) -> SagaRecord:
    """Fail the test unless the saga's record says what is given (what is not, is not checked).

    `done`: the steps that completed, in order; `failed`: the step whose
    failure stopped the saga; `compensated`: the steps whose compensation
    is done, in step order; `compensation_failed`: the step whose
    compensation failed for good; `error_code`: the gRPC status name the saga
    failed with; `attempts`: how many times the journal recorded each named
    step starting (redeliveries and restarts, not in-place retries). The
    error names every difference and shows the whole record. Returns the
    record.
    """
    record = saga.record if isinstance(saga, SagaRun) else saga
    if record is None:
        raise AssertionError("there is no such saga")
    actual: dict[str, Any] = {
        "state": str(record.state),
        "done": [step.name for step in record.steps if step.state == StepState.DONE],
        "failed": next((s.name for s in record.steps if s.state == StepState.FAILED), None),
        "compensated": _undone(record, CompensationState.DONE),
        "compensation_failed": next(iter(_undone(record, CompensationState.FAILED)), None),
        "error_code": record.error_code,
        "attempts": {step.name: step.attempts for step in record.steps},
    }
    expected: dict[str, Any] = {
        "state": None if state is None else str(state),
        "done": None if done is None else list(done),
        "failed": failed,
        "compensated": None if compensated is None else list(compensated),
        "compensation_failed": compensation_failed,
        "error_code": error_code,
        "attempts": None if attempts is None else dict(attempts),
    }
    if attempts is not None:
        actual["attempts"] = {name: actual["attempts"].get(name) for name in attempts}
    wrong = [
        f"  {key}: expected {want!r}, got {actual[key]!r}"
        for key, want in expected.items()
        if want is not None and actual[key] != want
    ]
    if wrong:
        raise AssertionError(
            f"saga {record.facade}/{record.request_id} is not as expected:\n"
            + "\n".join(wrong)
            + f"\n  the record: {describe(record)}"
        )
    return record


def _undone(record: SagaRecord, state: CompensationState) -> list[str]:
    return [step.name for step in record.steps if step.compensation == state]


def describe(saga: SagaRecord | None) -> str:
    """Where a saga stands, in a line: its state, its error and each step's."""
    if saga is None:
        return "no such saga"
    steps = ", ".join(
        f"{step.name} {step.state}"
        + (f" (undo {step.compensation})" if step.compensation else "")
        + (f" x{step.attempts}" if step.attempts > 1 else "")
        for step in saga.steps
    )
    error = f" {saga.error_code}: {saga.error_reason}" if saga.error_code else ""
    return f"{saga.state}{error} [{steps}]"
