"""The SQL store's writer interface, one per database, and what every writer shares.

A `Writer` takes the store's ops (`_ops`) and applies everything queued since
its previous transaction, up to `max_batch`, in one transaction, commits
paced to one per `commit_interval` at most; its callers' futures are resolved
only once their transaction committed or failed. A `Backend` says how the
store talks to one kind of database: its URL, its SQLAlchemy engine (reads
and migrations), its writer, and its change feed where it has one.

What every writer shares: the outcomes of a batch are handed over as a
`Written` (`Writer.hand_over`, which counts them in `WriterStats`), and a
batch whose transaction failed on a statement is split in halves and each
retried, down to the bad op alone (`Halves`), so that one bad op (a too-long
id, a deadlock victim) fails only its caller. A batch that failed any other
way (no connection, a lost one, a failed COMMIT, which may have committed)
fails every op of it with that error, once: the callers' retries decide.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.store.records import Position, SagaRecord
from orchestrator.store.sql._host_feed import HostChangeFeed
from orchestrator.store.sql._listen import PgChangeFeed
from orchestrator.store.sql._ops import BatchFailed, Op

__all__ = ["Backend", "Halves", "Writer", "WriterOptions", "WriterStats", "Written", "brief"]

log = logging.getLogger("orchestrator.store.sql")


class WriterStats:
    """What the writer has done so far: how well group commit is batching, and (on SQLite)
    what its statements cost the event loop."""

    __slots__ = ("failed_batches", "largest_batch", "loop_seconds", "ops", "transactions")

    def __init__(self) -> None:
        self.ops = 0
        """Writes committed (or refused, or failed on their own)."""
        self.transactions = 0
        """Transactions committed."""
        self.largest_batch = 0
        self.failed_batches = 0
        """Transactions that failed (their ops were failed or split and retried)."""
        self.loop_seconds = 0.0
        """CPU seconds the event loop's thread spent in the database library: on SQLite,
        whose statements run on the loop, its batches and the point reads it serves; 0 on
        a database reached by asynchronous I/O (PostgreSQL), whose time interleaves with
        everything else on the loop."""


@dataclass(frozen=True, slots=True)
class WriterOptions:
    """How a store's writer writes."""

    max_batch: int
    """Most ops applied in one transaction."""
    commit_interval: float
    """At most one commit per so many seconds (0: as soon as the previous one is done)."""
    stats: WriterStats
    """Where it counts what it did."""
    announce: bool
    """Announce every committed saga write to the other replicas, where the database can."""


@dataclass(slots=True)
class Written:
    """What a writer did with one batch, for `Writer.hand_over`."""

    outcomes: list[tuple[Op, object]] = field(default_factory=list)
    """Each op with its outcome, or the exception its caller gets."""
    transactions: int = 0
    failed: int = 0


class Writer(abc.ABC):
    """Applies the store's ops in group-committed transactions; see the module docstring."""

    def __init__(self, options: WriterOptions) -> None:
        self._max_batch = options.max_batch
        self._commit_interval = options.commit_interval
        self._stats = options.stats
        self.written: Callable[[Written], None] | None = None
        """Called with each batch once its outcomes are handed over (SQLite's change feed
        announces the sagas it changed)."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Start writing (the schema exists: the store migrated it)."""

    @abc.abstractmethod
    def submit(self, op: Op) -> None:
        """Queue `op`; its future is resolved once its transaction committed or failed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Apply every queued op, then stop writing."""

    @abc.abstractmethod
    async def get(self, facade: str, request_id: str) -> SagaRecord | None:
        """The saga with its steps in order, as committed, or None."""

    @abc.abstractmethod
    async def position(self, facade: str, request_id: str) -> Position | None:
        """Where the saga stands, as committed, or None: a lighter read than `get`."""

    def hand_over(self, written: Written) -> None:
        """Count a batch's outcomes and hand each to its caller (on the loop)."""
        stats = self._stats
        stats.ops += len(written.outcomes)
        stats.transactions += written.transactions
        stats.failed_batches += written.failed
        stats.largest_batch = max(stats.largest_batch, len(written.outcomes))
        for op, outcome in written.outcomes:
            if op.future.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(outcome, BaseException):
                op.future.set_exception(outcome)
            else:
                op.future.set_result(outcome)
        if self.written is not None:
            self.written(written)


class Backend(abc.ABC):
    """How the SQL store talks to one kind of database."""

    commit_interval: float
    """The writer's pacing when the store is given none: at most one commit per so
    many seconds."""

    def __init__(self, url: URL) -> None:
        self.url = url
        """The database URL, with this backend's driver."""

    @abc.abstractmethod
    def engine(self) -> AsyncEngine:
        """The SQLAlchemy engine for reads and migrations; a failed batch's error must
        not quote its parameters (other requests' payloads) to every caller in it."""

    @abc.abstractmethod
    def writer(self, engine: AsyncEngine, options: WriterOptions) -> Writer:
        """The writer, on a connection of its own or `engine`'s."""

    def change_feed(self) -> PgChangeFeed | HostChangeFeed | None:
        """The change feed, where the database has one."""
        return None


class Halves:
    """The parts of a batch a writer applies in turn: the whole batch first, and a part
    whose transaction failed on a statement (maybe one op's fault, maybe a deadlock)
    split in halves, in order (a saga's ops keep theirs), down to the bad op alone:
    log2(n) extra transactions per bad op. Everything of a failed part was rolled back.
    """

    def __init__(self, ops: Sequence[Op], written: Written) -> None:
        self._parts: list[Sequence[Op]] = [ops]  # a stack: the next part last
        self._written = written

    def __iter__(self) -> Iterator[Sequence[Op]]:
        """The parts to apply in turn, each in one transaction; a part's failure, reported
        before the next is taken, may add its halves."""
        while self._parts:
            yield self._parts.pop()

    def committed(self, part: Sequence[Op], outcomes: dict[Op, object]) -> None:
        """`part`'s transaction committed with these outcomes."""
        self._written.transactions += 1
        self._written.outcomes += [(op, outcomes.get(op)) for op in part]

    def failed(self, part: Sequence[Op], failed: BatchFailed) -> None:
        """`part`'s transaction failed: split it, or fail its ops with the cause."""
        self._written.failed += 1
        if failed.isolate and len(part) > 1:
            log.warning(
                "saga store batch of %d writes failed (%s); retrying in halves",
                len(part),
                brief(failed.cause),
            )
            middle = len(part) // 2
            self._parts += [part[middle:], part[:middle]]
            return
        self._written.outcomes += [(op, failed.cause) for op in part]


def brief(exc: BaseException) -> str:
    """The driver's complaint, without the statement SQLAlchemy wraps around it."""
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    text = str(cause)
    return f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"
