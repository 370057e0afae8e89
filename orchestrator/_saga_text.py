"""How a saga's fields read as text: the words the command line and the console share.

Both show the messages of `orchestrator.v1.SagaService` and `SagaAdmin` (the
protobuf `Saga`, `Step`, `OperatorAction` and `DeadLetter`), so a state, a
duration or an error reads the same in a terminal and in a browser. Styling
(Rich colours, CSS classes) is each one's own.
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from orchestrator.proto import saga_pb2

__all__ = [
    "compensation_name",
    "dead_letter_state_name",
    "error_text",
    "moment",
    "progress",
    "saga_state_name",
    "step_state_name",
    "took",
    "took_seconds",
    "utc_text",
]


def saga_state_name(value: int) -> str:
    """`RUNNING`, `COMPLETED`, ...: a saga state as its name."""
    return saga_pb2.SagaState.Name(saga_pb2.SagaState.ValueType(value))


def step_state_name(value: int) -> str:
    """`RUNNING`, `DONE`, `FAILED` or `PENDING`: a step state without its `STEP_` prefix."""
    return saga_pb2.StepState.Name(saga_pb2.StepState.ValueType(value)).removeprefix("STEP_")


def compensation_name(value: int) -> str:
    """`PENDING`, `DONE` or `FAILED`; empty when the step has nothing to undo."""
    name = saga_pb2.CompensationState.Name(saga_pb2.CompensationState.ValueType(value))
    short = name.removeprefix("COMPENSATION_STATE_")
    return "" if short == "NONE" else short


def dead_letter_state_name(value: int) -> str:
    """`WAITING`, `REPLAYED` or `DISCARDED`."""
    name = saga_pb2.DeadLetterState.Name(saga_pb2.DeadLetterState.ValueType(value))
    return name.removeprefix("DEAD_LETTER_").removeprefix("STATE_")


def moment(message: Message, field: str) -> datetime | None:
    """The timestamp `field` of `message` as an aware UTC datetime; None when unset."""
    if not message.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=UTC)


def utc_text(when: datetime | None) -> str:
    """`YYYY-MM-DD HH:MM:SS` in UTC; empty for None."""
    return "" if when is None else when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def took_seconds(step: saga_pb2.Step) -> float | None:
    """How long the step's latest attempt took, in seconds; None while it runs."""
    began, ended = moment(step, "started_at"), moment(step, "finished_at")
    if began is None or ended is None:
        return None
    return (ended - began).total_seconds()


def took(step: saga_pb2.Step) -> str:
    """How long the step's latest attempt took, `1.234s`; empty while it runs."""
    seconds = took_seconds(step)
    return "" if seconds is None else f"{seconds:.3f}s"


def error_text(code: str, reason: str) -> str:
    """`CODE: reason`, or whichever of the two there is."""
    return f"{code}: {reason}" if code and reason else code or reason


def progress(saga: saga_pb2.Saga) -> str:
    """The saga's latest step and how many steps it has run, `create_payment (2)`."""
    if not saga.steps:
        return ""
    return f"{saga.steps[-1].name} ({len(saga.steps)})"
