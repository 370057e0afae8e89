"""How the command-line tool shows sagas and dead letters: Rich tables, or JSON for scripts.

Tables are columns without borders. On a terminal, headers are underlined and
states have their colours, and free-text columns (errors, notes) wrap to the
terminal's width; when stdout is not a terminal, or NO_COLOR is set, they are
plain text without any escape code, one row a line, so that `grep` and `awk`
work on them. `--output json`
prints the protobuf messages as `google.protobuf.json_format` writes them,
with snake_case field names and every field present.
"""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text

from orchestrator._saga_text import (
    compensation_name,
    dead_letter_state_name,
    error_text,
    moment,
    progress,
    saga_state_name,
    step_state_name,
    took,
    utc_text,
)
from orchestrator.proto import saga_pb2

__all__ = ["OutputFormat", "Renderer", "to_json"]

_PLAIN_WIDTH = 4096
"""Line width when stdout is not a terminal: wide enough that no row wraps."""

SAGA_STATE_STYLES = {
    "RUNNING": "bold yellow",
    "COMPLETED": "bold green",
    "COMPENSATING": "bold magenta",
    "COMPENSATED": "cyan",
    "COMPENSATION_FAILED": "bold red",
    "RESOLVED": "bold blue",
}
STEP_STATE_STYLES = {"RUNNING": "yellow", "DONE": "green", "FAILED": "red", "PENDING": "dim"}
COMPENSATION_STYLES = {"PENDING": "yellow", "DONE": "cyan", "FAILED": "bold red"}
_FLEXIBLE = frozenset({"ERROR", "NOTE", "REASON", "LATEST STEP"})
"""Columns of free text, which wrap; every other column keeps its width."""
_NUMERIC = frozenset({"#", "ATTEMPTS", "TOOK", "DELIVERIES"})
_MIN_FLEXIBLE = 16
"""The narrowest a free-text column gets before the other columns give way too."""
DEAD_LETTER_STYLES = {"WAITING": "bold yellow", "REPLAYED": "green", "DISCARDED": "dim"}


class OutputFormat(enum.StrEnum):
    """What a command prints on stdout."""

    TABLE = "table"
    """Tables for people."""
    JSON = "json"
    """The protobuf messages as JSON, for scripts."""


def to_json(message: Message, *, indent: int | None = 2) -> str:
    """`message` as JSON: snake_case field names, every field present (even at its default)."""
    return json_format.MessageToJson(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        indent=indent,
    )


def _when(message: Message, field: str) -> str:
    """The timestamp `field` of `message` as `YYYY-MM-DD HH:MM:SS` UTC; empty when unset."""
    return utc_text(moment(message, field))


def _saga_state(value: int) -> Text:
    name = saga_state_name(value)
    return Text(name, style=SAGA_STATE_STYLES.get(name, ""))


def _step_state(value: int) -> Text:
    name = step_state_name(value)
    return Text(name, style=STEP_STATE_STYLES.get(name, ""))


def _compensation(value: int) -> Text:
    short = compensation_name(value)
    return Text(short, style=COMPENSATION_STYLES.get(short, ""))


def _dead_letter_state(value: int) -> Text:
    short = dead_letter_state_name(value)
    return Text(short, style=DEAD_LETTER_STYLES.get(short, ""))


def _width(cell: str | Text) -> int:
    """How many terminal cells `cell` takes."""
    return (Text(cell) if isinstance(cell, str) else cell).cell_len


class Renderer:
    """Prints results in the chosen format: tables on `console`, JSON on stdout."""

    def __init__(self, output: OutputFormat, console: Console | None = None) -> None:
        self.output = output
        if console is None:
            console = Console(highlight=False)
            if not console.is_terminal or os.environ.get("NO_COLOR"):
                width = console.width if console.is_terminal else _PLAIN_WIDTH
                console = Console(highlight=False, color_system=None, width=width)
        self.console = console
        self._fancy = console.color_system is not None

    def _table(self, title: str | None = None) -> Table:
        return Table(
            title=title,
            title_justify="left",
            title_style="bold" if self._fancy else "",
            box=None,
            header_style="bold underline" if self._fancy else "",
            pad_edge=False,
        )

    def _rows(
        self, title: str | None, columns: Sequence[str], rows: Sequence[Sequence[str | Text]]
    ) -> RenderableType:
        """A table of `rows`. Only the columns named in `_FLEXIBLE` wrap when the terminal
        is narrow; the others (ids, names, states, times) keep their full width. When
        those alone do not fit, each row is a record of its own instead (a line per
        column), so that nothing is cut off at the terminal's edge."""
        widths = {
            header: max([len(header), *(_width(row[index]) for row in rows)])
            for index, header in enumerate(columns)
        }
        fixed = [width for header, width in widths.items() if header not in _FLEXIBLE]
        needed = sum(fixed) + 2 * (len(columns) - 1) + _MIN_FLEXIBLE * (len(columns) - len(fixed))
        if needed > self.console.width:
            return self._records(title, columns, rows)
        table = self._table(title)
        for header in columns:
            if header in _FLEXIBLE:
                table.add_column(header, overflow="fold")
                continue
            justify: JustifyMethod = "right" if header in _NUMERIC else "left"
            table.add_column(header, no_wrap=True, min_width=widths[header], justify=justify)
        for row in rows:
            table.add_row(*row)
        return table

    def _records(
        self, title: str | None, columns: Sequence[str], rows: Sequence[Sequence[str | Text]]
    ) -> RenderableType:
        """`rows` one under another, each a column name and its value a line."""
        parts: list[RenderableType] = []
        if title:
            parts.append(Text(title, style="bold" if self._fancy else ""))
        for number, row in enumerate(rows):
            if number:
                parts.append(Text(""))
            record = Table.grid(padding=(0, 2))
            record.add_column(style="bold" if self._fancy else "", no_wrap=True)
            record.add_column(overflow="fold")
            for header, cell in zip(columns, row, strict=True):
                record.add_row(header, cell)
            parts.append(record)
        return Group(*parts)

    def _print(self, renderable: RenderableType = "", **options: Any) -> None:
        """Print `renderable`; plain output loses the blanks Rich pads its lines with."""
        if self._fancy:
            self.console.print(renderable, **options)
            return
        with self.console.capture() as captured:
            self.console.print(renderable, **options)
        text = "\n".join(line.rstrip() for line in captured.get().splitlines())
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def _json(self, message: Message) -> None:
        sys.stdout.write(to_json(message) + "\n")
        sys.stdout.flush()

    # sagas

    def saga_list(self, page: saga_pb2.ListSagasResponse) -> None:
        """A table of sagas, one a row, newest first."""
        if self.output is OutputFormat.JSON:
            self._json(page)
            return
        if not page.sagas:
            self._print("No sagas match.")
            return
        rows = [
            (
                saga.request_id,
                saga.facade,
                _saga_state(saga.state),
                _when(saga, "updated_at"),
                saga.error_code,
                progress(saga),
            )
            for saga in page.sagas
        ]
        columns = ("REQUEST ID", "FACADE", "STATE", "UPDATED (UTC)", "FAILED WITH", "LATEST STEP")
        table = self._rows(None, columns, rows)
        self._print(table)
        if page.next_page_token:
            self._print(
                f"(more sagas than the {len(page.sagas)} shown: raise --limit)", style="dim"
            )

    def saga(self, saga: saga_pb2.Saga) -> None:
        """One saga: its fields, its steps' timeline and what operators did to it."""
        if self.output is OutputFormat.JSON:
            self._json(saga)
            return
        fields = Table.grid(padding=(0, 2))
        fields.add_column(style="bold" if self._fancy else "")
        fields.add_column()
        fields.add_row("Request id", saga.request_id)
        fields.add_row("Facade", f"{saga.facade} ({saga.kind})")
        fields.add_row("State", _saga_state(saga.state))
        if saga.error_code or saga.error_reason:
            fields.add_row("Error", error_text(saga.error_code, saga.error_reason))
        fields.add_row("Created (UTC)", _when(saga, "created_at"))
        fields.add_row("Updated (UTC)", _when(saga, "updated_at"))
        if saga.HasField("deadline_at"):
            fields.add_row("Deadline (UTC)", _when(saga, "deadline_at"))
        self._print(fields)
        self._print()
        self._steps(saga)
        self._print()
        self._actions(saga)

    def _steps(self, saga: saga_pb2.Saga) -> None:
        if not saga.steps:
            self._print("No steps yet.")
            return
        rows = []
        for step in saga.steps:
            errors = [step.error]
            if step.compensation_error:
                errors.append(f"compensation: {step.compensation_error}")
            rows.append(
                (
                    str(step.index),
                    step.name,
                    _step_state(step.state),
                    str(step.attempts),
                    _when(step, "started_at"),
                    took(step),
                    _compensation(step.compensation),
                    "; ".join(error for error in errors if error),
                )
            )
        columns = ("#", "STEP", "STATE", "ATTEMPTS", "STARTED (UTC)", "TOOK", "UNDONE", "ERROR")
        table = self._rows("Steps", columns, rows)
        self._print(table)

    def _actions(self, saga: saga_pb2.Saga) -> None:
        if not saga.actions:
            self._print("No operator actions.")
            return
        rows = [
            (_when(action, "at"), action.action, action.actor, action.dead_letter_id, action.note)
            for action in saga.actions
        ]
        columns = ("AT (UTC)", "ACTION", "ACTOR", "DEAD LETTER", "NOTE")
        table = self._rows("Operator actions", columns, rows)
        self._print(table)

    def saga_change(self, saga: saga_pb2.Saga) -> None:
        """One line for one change a watch saw (compact JSON with `--output json`)."""
        if self.output is OutputFormat.JSON:
            sys.stdout.write(to_json(saga, indent=None) + "\n")
            sys.stdout.flush()
            return
        line = Text()
        line.append(_when(saga, "updated_at"))
        line.append("  ")
        line.append_text(_saga_state(saga.state))
        steps = []
        for step in saga.steps:
            part = Text(f"{step.name} ")
            part.append_text(_step_state(step.state))
            undone = _compensation(step.compensation)
            if undone.plain:
                part.append(" undo ")
                part.append_text(undone)
            steps.append(part)
        if steps:
            line.append("  ")
            line.append_text(Text(", ").join(steps))
        error = error_text(saga.error_code, saga.error_reason)
        if error:
            line.append(f"  {error}", style="red" if self._fancy else "")
        self._print(line, soft_wrap=True)

    # dead letters

    def dead_letter_list(self, page: saga_pb2.ListDeadLettersResponse) -> None:
        """A table of dead letters, one a row, newest first."""
        if self.output is OutputFormat.JSON:
            self._json(page)
            return
        if not page.dead_letters:
            self._print("No dead letters match.")
            return
        rows = [
            (
                letter.id,
                letter.topic,
                letter.facade,
                letter.request_id,
                letter.step,
                _saga_state(letter.saga_state) if letter.saga_state else Text(""),
                str(letter.delivery_count),
                _dead_letter_state(letter.state),
                _when(letter, "dead_lettered_at"),
                letter.reason,
            )
            for letter in page.dead_letters
        ]
        columns = (
            "ID",
            "TOPIC",
            "FACADE",
            "REQUEST ID",
            "STEP",
            "SAGA",
            "DELIVERIES",
            "STATE",
            "DEAD-LETTERED (UTC)",
            "REASON",
        )
        table = self._rows(None, columns, rows)
        self._print(table)
        if page.next_page_token:
            self._print(
                f"(more dead letters than the {len(page.dead_letters)} shown: raise --limit)",
                style="dim",
            )

    def dead_letter(self, letter: saga_pb2.DeadLetter) -> None:
        """One dead letter and what became of it."""
        if self.output is OutputFormat.JSON:
            self._json(letter)
            return
        fields = Table.grid(padding=(0, 2))
        fields.add_column(style="bold" if self._fancy else "")
        fields.add_column()
        fields.add_row("Id", letter.id)
        fields.add_row("Topic", letter.topic)
        if letter.request_id:
            fields.add_row("Saga", f"{letter.facade} {letter.request_id} (step {letter.step})")
        fields.add_row("State", _dead_letter_state(letter.state))
        fields.add_row("Settled (UTC)", _when(letter, "settled_at"))
        fields.add_row("Settled by", letter.settled_by)
        fields.add_row("Note", letter.note)
        fields.add_row("Reason", letter.reason)
        self._print(fields)
