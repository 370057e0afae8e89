"""What the pages show, built from the messages SagaService and SagaAdmin answer.

The words come from `orchestrator._saga_text`, which the command line uses
too, so a state, a duration or an error reads the same in both. Times stay
aware UTC datetimes here; the templates write them as UTC and the page's
script shows them in the viewer's time zone, the UTC value on hover.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlencode

from orchestrator._access_policy import ADMIN_SERVICE
from orchestrator._saga_text import (
    compensation_name,
    dead_letter_state_name,
    error_text,
    moment,
    progress,
    saga_state_name,
    step_state_name,
    took,
    took_seconds,
)
from orchestrator.proto import saga_pb2
from orchestrator.store import FINAL_STATES

__all__ = [
    "DEAD_LETTER_ACTIONS",
    "SAGA_ACTIONS",
    "ActionInfo",
    "ActionView",
    "DeadLetterView",
    "SagaRow",
    "SagaView",
    "StepView",
    "TimelineEntry",
    "dead_letter_view",
    "payload_text",
    "saga_actions",
    "saga_row",
    "saga_url",
    "saga_view",
]

BODY_SHOWN = 4096
"""Characters of a dead letter's body the page shows; the rest is cut."""


def saga_url(facade: str, request_id: str, path: str = "/saga") -> str:
    """The page of a saga: its facade and request id go in the query, whatever they hold."""
    return f"{path}?{urlencode({'facade': facade, 'id': request_id})}"


@dataclass(frozen=True, slots=True)
class SagaRow:
    """One saga of the list."""

    request_id: str
    facade: str
    kind: str
    state: str
    created_at: datetime | None
    updated_at: datetime | None
    error_code: str
    error: str
    progress: str
    url: str


def saga_row(saga: saga_pb2.Saga) -> SagaRow:
    """The list's row of `saga`."""
    return SagaRow(
        request_id=saga.request_id,
        facade=saga.facade,
        kind=saga.kind,
        state=saga_state_name(saga.state),
        created_at=moment(saga, "created_at"),
        updated_at=moment(saga, "updated_at"),
        error_code=saga.error_code,
        error=error_text(saga.error_code, saga.error_reason),
        progress=progress(saga),
        url=saga_url(saga.facade, saga.request_id),
    )


@dataclass(frozen=True, slots=True)
class StepView:
    """One step of a saga."""

    index: int
    name: str
    state: str
    attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    took: str
    seconds: float | None
    error: str
    compensation: str
    compensated_at: datetime | None
    compensation_error: str


@dataclass(frozen=True, slots=True)
class ActionView:
    """One operator action on a saga."""

    action: str
    actor: str
    note: str
    at: datetime | None
    dead_letter_id: str


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    """One moment of a saga's life: a step began or ended, was undone, or an operator acted."""

    at: datetime | None
    kind: str
    """`step`, `compensation`, `action`, or `saga` (its end)."""
    title: str
    state: str
    """The state the entry led to (a step's, a compensation's), or the action's name."""
    detail: str
    took: str = ""


@dataclass(frozen=True, slots=True)
class SagaView:
    """A saga's page."""

    request_id: str
    facade: str
    kind: str
    state: str
    finished: bool
    error: str
    created_at: datetime | None
    updated_at: datetime | None
    deadline_at: datetime | None
    steps: Sequence[StepView]
    actions: Sequence[ActionView]
    timeline: Sequence[TimelineEntry]
    total_seconds: float | None
    url: str


def saga_view(saga: saga_pb2.Saga) -> SagaView:
    """The page of `saga`: its fields, steps, operators' actions and their timeline."""
    steps = [
        StepView(
            index=step.index,
            name=step.name,
            state=step_state_name(step.state),
            attempts=step.attempts,
            started_at=moment(step, "started_at"),
            finished_at=moment(step, "finished_at"),
            took=took(step),
            seconds=took_seconds(step),
            error=step.error,
            compensation=compensation_name(step.compensation),
            compensated_at=moment(step, "compensated_at"),
            compensation_error=step.compensation_error,
        )
        for step in saga.steps
    ]
    actions = [
        ActionView(
            action=action.action,
            actor=action.actor,
            note=action.note,
            at=moment(action, "at"),
            dead_letter_id=action.dead_letter_id,
        )
        for action in saga.actions
    ]
    state = saga_state_name(saga.state)
    created, updated = moment(saga, "created_at"), moment(saga, "updated_at")
    return SagaView(
        request_id=saga.request_id,
        facade=saga.facade,
        kind=saga.kind,
        state=state,
        finished=state in FINAL_STATES,
        error=error_text(saga.error_code, saga.error_reason),
        created_at=created,
        updated_at=updated,
        deadline_at=moment(saga, "deadline_at"),
        steps=steps,
        actions=actions,
        timeline=_timeline(
            steps, actions, updated, state, error_text(saga.error_code, saga.error_reason)
        ),
        total_seconds=(updated - created).total_seconds() if created and updated else None,
        url=saga_url(saga.facade, saga.request_id),
    )


def _timeline(
    steps: Sequence[StepView],
    actions: Sequence[ActionView],
    updated: datetime | None,
    state: str,
    error: str,
) -> list[TimelineEntry]:
    """Every moment of the saga in order of time, and its end once it has one; one without a
    time (a compensation still pending) comes last. Ties keep the order steps,
    compensations, actions."""
    entries: list[TimelineEntry] = []
    for step in steps:
        attempts = f"attempt {step.attempts}" if step.attempts > 1 else ""
        entries.append(
            TimelineEntry(step.started_at, "step", f"{step.name} started", "RUNNING", attempts)
        )
        if step.finished_at is not None:
            entries.append(
                TimelineEntry(
                    step.finished_at,
                    "step",
                    f"{step.name} {'done' if step.state == 'DONE' else step.state.lower()}",
                    step.state,
                    step.error,
                    step.took,
                )
            )
    for step in steps:
        if step.compensation == "DONE":
            entries.append(
                TimelineEntry(
                    step.compensated_at, "compensation", f"{step.name} undone", "DONE", ""
                )
            )
        elif step.compensation == "FAILED":
            entries.append(
                TimelineEntry(
                    step.compensated_at or updated,
                    "compensation",
                    f"undoing {step.name} failed",
                    "FAILED",
                    step.compensation_error,
                )
            )
        elif step.compensation == "PENDING":
            entries.append(
                TimelineEntry(None, "compensation", f"{step.name} to undo", "PENDING", "")
            )
    for action in actions:
        detail = action.note
        if action.dead_letter_id:
            detail = f"{detail} (dead letter {action.dead_letter_id})".strip()
        entries.append(
            TimelineEntry(
                action.at, "action", f"{action.action} by {action.actor}", action.action, detail
            )
        )
    timed = [entry for entry in entries if entry.at is not None]
    untimed = [entry for entry in entries if entry.at is None]
    ordered = sorted(timed, key=lambda entry: entry.at or datetime.min) + untimed
    if state in FINAL_STATES:
        # Its last write is its end; why it ended so, when no step says it already.
        detail = error if state in ("COMPENSATION_FAILED", "RESOLVED") else ""
        ordered.append(TimelineEntry(updated, "saga", f"saga {state}", state, detail))
    return ordered


def payload_text(payload: str) -> str:
    """A saga's request as indented JSON (as stored when it is not JSON)."""
    try:
        return json.dumps(json.loads(payload), indent=2, ensure_ascii=False, sort_keys=True)
    except ValueError:
        return payload


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    """One dead letter, joined to its saga."""

    id: str
    topic: str
    facade: str
    request_id: str
    step: str
    saga_state: str
    saga_url: str
    reason: str
    delivery_count: int
    dead_lettered_at: datetime | None
    state: str
    settled_at: datetime | None
    settled_by: str
    note: str
    body: str
    body_cut: bool


def dead_letter_view(letter: saga_pb2.DeadLetter) -> DeadLetterView:
    """The list's entry of `letter`."""
    body = letter.body.decode("utf-8", "replace")
    return DeadLetterView(
        id=letter.id,
        topic=letter.topic,
        facade=letter.facade,
        request_id=letter.request_id,
        step=letter.step,
        saga_state=saga_state_name(letter.saga_state) if letter.saga_state else "",
        saga_url=saga_url(letter.facade, letter.request_id)
        if letter.facade and letter.request_id
        else "",
        reason=letter.reason,
        delivery_count=letter.delivery_count,
        dead_lettered_at=moment(letter, "dead_lettered_at"),
        state=dead_letter_state_name(letter.state),
        settled_at=moment(letter, "settled_at"),
        settled_by=letter.settled_by,
        note=letter.note,
        body=body[:BODY_SHOWN],
        body_cut=len(body) > BODY_SHOWN,
    )


@dataclass(frozen=True, slots=True)
class ActionInfo:
    """An operator action as the console offers it: what it calls and what it does."""

    name: str
    method: str
    """The SagaAdmin method it calls, whose role it needs."""
    explains: str
    note_label: str
    note_required: bool


_ADMIN = f"/{ADMIN_SERVICE}/"
SAGA_ACTIONS = {
    info.name: info
    for info in (
        ActionInfo(
            "retry",
            f"{_ADMIN}RetrySaga",
            "Run it again from where it stopped: a COMPENSATION_FAILED saga runs its remaining "
            "compensations (and its rollback node) again; a RUNNING async saga runs its current "
            "step again (its hop is published again).",
            "Note",
            False,
        ),
        ActionInfo(
            "compensate",
            f"{_ADMIN}CompensateSaga",
            "Roll the saga back now, its current step included. A hop still on its way finds it "
            "compensating and does nothing.",
            "Reason",
            False,
        ),
        ActionInfo(
            "resolve",
            f"{_ADMIN}ResolveSaga",
            "Record that it was settled by hand: it ends RESOLVED, and nothing runs.",
            "Note",
            True,
        ),
    )
}
"""The actions on a saga, by name."""
DEAD_LETTER_ACTIONS = {
    info.name: info
    for info in (
        ActionInfo(
            "replay",
            f"{_ADMIN}ReplayDeadLetter",
            "Put the message back on its topic as it was; the saga's journal decides whether "
            "it still applies.",
            "Note",
            False,
        ),
        ActionInfo(
            "discard",
            f"{_ADMIN}DiscardDeadLetter",
            "Drop the message, with a note saying why.",
            "Note",
            True,
        ),
    )
}
"""The actions on a dead letter, by name."""


def saga_actions(saga: SagaView) -> list[ActionInfo]:
    """The actions the admin API applies to `saga` in its state (it checks them again)."""
    names: list[str] = []
    if saga.state == "COMPENSATION_FAILED":
        names = ["retry", "resolve"]
    elif saga.state == "RUNNING":
        names = (
            ["retry", "compensate", "resolve"]
            if saga.kind == "async"
            else ["compensate", "resolve"]
        )
    elif saga.state == "COMPENSATING":
        names = ["resolve"]
    return [SAGA_ACTIONS[name] for name in names]
