"""A saga journal written by hand, for the baselines' `--journal`: the durability the
framework's store gives, as code written without the framework would get it.

The plain baselines keep no record: a crash loses whatever was in flight, a
redelivered hop runs its upstream call again, and a hop for a saga that never
began still takes effect. With `--journal FILE` a baseline keeps one row per
saga in a SQLite file set up as the framework's store is (WAL,
``synchronous=NORMAL``): the saga's row is committed before its first effect,
each step's end before the next hop is published (or the answer given), and a
consumer reads the row before its upstream call, dropping a hop for a saga
that is not at that step. It is written as such code usually is, once
profiled: `sqlite3` on the event loop (a commit here costs tens of
microseconds, less than a trip to a thread), each write a transaction of its
own, and the checkpoints, which fsync, moved off the loop (SQLite's automatic
ones stall the loop for up to tens of milliseconds: a throttling bench's
baseline ran at 60% of the framework's throughput with them) to a thread
every `CHECKPOINT_SECONDS`.

What it leaves out of the framework's journal: the steps' own rows, owners,
deadlines, the change feed, and publishing again the outcome of a hop that is
redelivered after its end was recorded (its message is acked, and the saga
stops there). So the framework's CPU per saga against this baseline's is the
framework's price over hand-written code with the same guarantee of a record
before every effect.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

__all__ = [
    "CHECKPOINT_SECONDS",
    "COMPLETED",
    "RUNNING",
    "Journal",
    "add_journal_option",
    "journal_summary",
]

RUNNING: Final = "RUNNING"
COMPLETED: Final = "COMPLETED"
CHECKPOINT_SECONDS: Final = 0.5
"""How often the WAL is checkpointed into the database file (the framework's store's interval)."""

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS sagas ("
    " request_id TEXT PRIMARY KEY,"
    " state TEXT NOT NULL,"
    " step INTEGER NOT NULL,"
    " data TEXT NOT NULL,"
    " created_at TEXT NOT NULL,"
    " updated_at TEXT NOT NULL)"
)
_BEGIN: Final = (
    "INSERT INTO sagas (request_id, state, step, data, created_at, updated_at)"
    " VALUES (?, 'RUNNING', 0, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING"
)
_AT: Final = "SELECT step FROM sagas WHERE request_id = ? AND state = 'RUNNING'"
_STEP_DONE: Final = (
    "UPDATE sagas SET step = step + 1, state = ?, data = ?, updated_at = ?"
    " WHERE request_id = ? AND step = ? AND state = 'RUNNING'"
)


def _now() -> str:
    return datetime.now(UTC).isoformat()


class Journal:
    """One SQLite file of sagas, each write committed before the caller goes on."""

    def __init__(self, path: str | Path) -> None:
        # Autocommit: every statement is a transaction of its own, committed when it returns.
        # Baseline copies sharing the file (`--processes`) wait for each other's writes.
        self._conn = sqlite3.connect(str(path), isolation_level=None, timeout=5.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints off the loop: `start`
        self._conn.execute(_SCHEMA)
        self._checkpointer = sqlite3.connect(str(path), check_same_thread=False, timeout=5.0)
        self._checkpointing: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Checkpoint in the background from now on (on the running loop's default executor)."""
        self._checkpointing = asyncio.get_running_loop().create_task(self._checkpoints())

    async def _checkpoints(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            with contextlib.suppress(sqlite3.Error):  # tried again at the next round
                await asyncio.to_thread(
                    self._checkpointer.execute, "PRAGMA wal_checkpoint(PASSIVE)"
                )

    def begin(self, request_id: str, data: str) -> bool:
        """Record a new saga at its first step; False when the request id has one already."""
        now = _now()
        return self._conn.execute(_BEGIN, (request_id, data, now, now)).rowcount == 1

    def at(self, request_id: str) -> int | None:
        """The step a running saga is at; None when there is no such saga, or it ended."""
        row = self._conn.execute(_AT, (request_id,)).fetchone()
        return None if row is None else int(row[0])

    def step_done(self, request_id: str, step: int, data: str, *, last: bool) -> bool:
        """Record step `step` done with the saga's `data` (COMPLETED after the `last` one);
        False when the saga was not at that step."""
        state = COMPLETED if last else RUNNING
        moved = self._conn.execute(_STEP_DONE, (state, data, _now(), request_id, step))
        return moved.rowcount == 1

    async def close(self) -> None:
        """Stop checkpointing and close the file."""
        if self._checkpointing is not None:
            self._checkpointing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointing
        self._checkpointer.close()
        self._conn.close()


def add_journal_option(parser: argparse.ArgumentParser) -> None:
    """A baseline's `--journal FILE`."""
    parser.add_argument(
        "--journal",
        type=Path,
        metavar="FILE",
        help="keep a saga journal by hand in this SQLite file (bench/_journal.py)",
    )


def journal_summary(path: Path) -> dict[str, int]:
    """How many sagas the journal at `path` holds in each state (empty when there is none)."""
    if not path.exists():
        return {}
    conn = sqlite3.connect(str(path))
    try:
        rows = conn.execute("SELECT state, count(*) FROM sagas GROUP BY state").fetchall()
    except sqlite3.OperationalError:
        return {}  # no table: the baseline never opened it
    finally:
        conn.close()
    return {str(state): int(count) for state, count in rows}
