"""SQLite store of the demo upstreams' orders and payments.

The store is used synchronously from the event loop: every statement is a few
microseconds against a local file, far cheaper than handing it to a thread.
Each service keeps its records in its own table, with its own idempotency
table mapping an ``x-idempotency-key`` to the record it created, so the order
and payment services may share one database file without their keys clashing.

Each service also keeps tombstones: the request ids it was asked to compensate
(cancel or refund by request id), and the idempotency keys whose create it was
asked to undo (cancel or refund by key). A create for a tombstoned request id,
or with a tombstoned key, is refused unless its key already made a record (a
replay, answered with that record), so a compensation that overtakes its action
(or a retried action that arrives after it) leaves nothing behind. Undoing by
key touches only the record that one create made: another create of the same
request id, under another key, is neither cancelled nor refused.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Generic, TypeVar

MEMORY: Final = ":memory:"

# Status names match the proto enum value names, so servicers can map them
# with ``Enum.Value(name)`` and the database stays readable with the sqlite3 CLI.
CREATED: Final = "CREATED"
CANCELLED: Final = "CANCELLED"
PAID: Final = "PAID"
REFUNDED: Final = "REFUNDED"

# Every statement is IF NOT EXISTS, so a ledger file made by an older version
# gains the tables it lacks (the key tombstones came later) when it is opened.
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    product_id INTEGER NOT NULL,
    count INTEGER NOT NULL,
    status TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_request_id ON orders (request_id);
CREATE TABLE IF NOT EXISTS order_idempotency (
    key TEXT PRIMARY KEY,
    order_id INTEGER NOT NULL REFERENCES orders (id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS order_tombstones (
    request_id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS order_key_tombstones (
    key TEXT PRIMARY KEY,
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS payments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    order_id INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    status TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_request_id ON payments (request_id);
CREATE TABLE IF NOT EXISTS payment_idempotency (
    key TEXT PRIMARY KEY,
    payment_id INTEGER NOT NULL REFERENCES payments (id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS payment_tombstones (
    request_id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS payment_key_tombstones (
    key TEXT PRIMARY KEY,
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class OrderRecord:
    """One row of the orders table."""

    id: int
    request_id: str
    product_id: int
    count: int
    status: str


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    """One row of the payments table."""

    id: int
    request_id: str
    order_id: int
    amount: int
    status: str


class AlreadyCompensated(Exception):
    """A create refused because its request id, or its idempotency key, was already undone.

    ``idempotency_key`` is set when the key was tombstoned (undone by key), and
    ``None`` when the request id was (undone by request id).
    """

    def __init__(self, request_id: str, *, idempotency_key: str | None = None) -> None:
        if idempotency_key is None:
            message = f"request {request_id!r} was already compensated"
        else:
            message = (
                f"the create with idempotency key {idempotency_key!r}"
                f" of request {request_id!r} was already compensated"
            )
        super().__init__(message)
        self.request_id = request_id
        self.idempotency_key = idempotency_key


R = TypeVar("R", OrderRecord, PaymentRecord)


@dataclass(frozen=True, slots=True)
class _Table(Generic[R]):
    """Where one kind of record lives; the names are constants, never user input."""

    name: str
    keys: str
    key_column: str
    tombstones: str
    key_tombstones: str
    columns: tuple[str, str]
    record: Callable[..., R]

    @property
    def select(self) -> str:
        return f"SELECT id, request_id, {', '.join(self.columns)}, status FROM {self.name}"


_ORDERS: Final = _Table(
    "orders",
    "order_idempotency",
    "order_id",
    "order_tombstones",
    "order_key_tombstones",
    ("product_id", "count"),
    OrderRecord,
)
_PAYMENTS: Final = _Table(
    "payments",
    "payment_idempotency",
    "payment_id",
    "payment_tombstones",
    "payment_key_tombstones",
    ("order_id", "amount"),
    PaymentRecord,
)


class Ledger:
    """The orders and payments of the demo upstreams, in one SQLite database.

    ``path`` is a file (created with its parent folders; it keeps the data
    across restarts) or ``":memory:"``. Not thread-safe: use it from the event
    loop's thread only. Close it with :meth:`close`.
    """

    def __init__(self, path: str = MEMORY) -> None:
        self.path = path
        if path != MEMORY:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: the module's implicit transactions would open
        # too late for BEGIN IMMEDIATE, so transactions are explicit instead.
        self._db = sqlite3.connect(path, isolation_level=None)
        if path != MEMORY:
            # WAL lets readers run beside the writer; NORMAL skips the fsync per
            # commit, which WAL keeps safe against corruption (not power loss).
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database; calling it again does nothing."""
        self._db.close()

    # Orders.

    def create_order(
        self, request_id: str, product_id: int, count: int, *, idempotency_key: str | None = None
    ) -> OrderRecord:
        """Insert a CREATED order, or return the one ``idempotency_key`` already made.

        Raises :class:`AlreadyCompensated` when ``request_id`` or
        ``idempotency_key`` is tombstoned and the key made no order yet.
        """
        return self._create(_ORDERS, request_id, (product_id, count), CREATED, idempotency_key)

    def cancel_order(self, order_id: int) -> OrderRecord | None:
        """Cancel one order (a no-op when already cancelled); ``None`` when unknown."""
        return self._set_status_by_id(_ORDERS, order_id, CANCELLED)

    def cancel_orders_of(self, request_id: str) -> OrderRecord | None:
        """Cancel every order of ``request_id`` and tombstone it; return the latest, if any."""
        return self._set_status_by_request(_ORDERS, request_id, CANCELLED)

    def cancel_order_by_key(self, idempotency_key: str) -> OrderRecord | None:
        """Cancel the order ``idempotency_key`` made and tombstone the key; that order, if any.

        The key is tombstoned even when it made no order (``None``), so its
        create is refused if it arrives later. Other orders of the same request
        id are left alone. Calling it again changes nothing.
        """
        return self._set_status_by_key(_ORDERS, idempotency_key, CANCELLED)

    def get_order(self, order_id: int) -> OrderRecord | None:
        """The order with this id, if any."""
        return self._get_by_id(_ORDERS, order_id)

    def latest_order_of(self, request_id: str) -> OrderRecord | None:
        """The most recent order of ``request_id``, if any."""
        return self._latest_of(_ORDERS, request_id)

    def orders_of(self, request_id: str) -> list[OrderRecord]:
        """Every order of ``request_id``, oldest first."""
        return self._all_of(_ORDERS, request_id)

    def request_ids(self) -> set[str]:
        """Every request id with an order or a payment in this ledger."""
        rows = self._db.execute(
            "SELECT request_id FROM orders UNION SELECT request_id FROM payments"
        )
        return {row[0] for row in rows}

    def count_orders(self, request_id: str) -> int:
        """How many orders ``request_id`` has."""
        return self._count(_ORDERS, request_id)

    # Payments.

    def create_payment(
        self, request_id: str, order_id: int, amount: int, *, idempotency_key: str | None = None
    ) -> PaymentRecord:
        """Insert a PAID payment, or return the one ``idempotency_key`` already made.

        Raises :class:`AlreadyCompensated` when ``request_id`` or
        ``idempotency_key`` is tombstoned and the key made no payment yet.
        """
        return self._create(_PAYMENTS, request_id, (order_id, amount), PAID, idempotency_key)

    def refund_payment(self, payment_id: int) -> PaymentRecord | None:
        """Refund one payment (a no-op when already refunded); ``None`` when unknown."""
        return self._set_status_by_id(_PAYMENTS, payment_id, REFUNDED)

    def refund_payments_of(self, request_id: str) -> PaymentRecord | None:
        """Refund every payment of ``request_id`` and tombstone it; return the latest, if any."""
        return self._set_status_by_request(_PAYMENTS, request_id, REFUNDED)

    def refund_payment_by_key(self, idempotency_key: str) -> PaymentRecord | None:
        """Refund the payment ``idempotency_key`` made and tombstone the key; that payment, if any.

        The key is tombstoned even when it made no payment (``None``), so its
        create is refused if it arrives later. Other payments of the same
        request id are left alone. Calling it again changes nothing.
        """
        return self._set_status_by_key(_PAYMENTS, idempotency_key, REFUNDED)

    def get_payment(self, payment_id: int) -> PaymentRecord | None:
        """The payment with this id, if any."""
        return self._get_by_id(_PAYMENTS, payment_id)

    def latest_payment_of(self, request_id: str) -> PaymentRecord | None:
        """The most recent payment of ``request_id``, if any."""
        return self._latest_of(_PAYMENTS, request_id)

    def payments_of(self, request_id: str) -> list[PaymentRecord]:
        """Every payment of ``request_id``, oldest first."""
        return self._all_of(_PAYMENTS, request_id)

    def count_payments(self, request_id: str) -> int:
        """How many payments ``request_id`` has."""
        return self._count(_PAYMENTS, request_id)

    # The shared implementation.

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so the idempotency lookup and
        # the insert cannot interleave with another process sharing the file.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _create(
        self,
        table: _Table[R],
        request_id: str,
        values: tuple[int, int],
        status: str,
        idempotency_key: str | None,
    ) -> R:
        with self._transaction() as db:
            if idempotency_key is not None:
                made = self._made_by(table, idempotency_key)
                if made is not None:
                    # A replay answers with the record as it stands now, even
                    # when a compensation has since cancelled or refunded it.
                    return made
                if db.execute(
                    f"SELECT 1 FROM {table.key_tombstones} WHERE key = ?", (idempotency_key,)
                ).fetchone():
                    raise AlreadyCompensated(request_id, idempotency_key=idempotency_key)
            if db.execute(
                f"SELECT 1 FROM {table.tombstones} WHERE request_id = ?", (request_id,)
            ).fetchone():
                raise AlreadyCompensated(request_id)
            cursor = db.execute(
                f"INSERT INTO {table.name} (request_id, {', '.join(table.columns)}, status)"
                " VALUES (?, ?, ?, ?)",
                (request_id, *values, status),
            )
            record_id = cursor.lastrowid
            assert record_id is not None  # always set by an INSERT into a rowid table
            if idempotency_key is not None:
                db.execute(
                    f"INSERT INTO {table.keys} (key, {table.key_column}) VALUES (?, ?)",
                    (idempotency_key, record_id),
                )
        return table.record(record_id, request_id, *values, status)

    def _set_status_by_id(self, table: _Table[R], record_id: int, status: str) -> R | None:
        with self._transaction() as db:
            db.execute(
                f"UPDATE {table.name} SET status = ? WHERE id = ? AND status != ?",
                (status, record_id, status),
            )
            return self._get_by_id(table, record_id)

    def _set_status_by_request(self, table: _Table[R], request_id: str, status: str) -> R | None:
        with self._transaction() as db:
            db.execute(
                f"UPDATE {table.name} SET status = ? WHERE request_id = ? AND status != ?",
                (status, request_id, status),
            )
            # Tombstoned whether or not anything was found: a create still in
            # flight (or retried with a new key) must not outlive its undo.
            db.execute(
                f"INSERT OR IGNORE INTO {table.tombstones} (request_id) VALUES (?)",
                (request_id,),
            )
            return self._latest_of(table, request_id)

    def _set_status_by_key(self, table: _Table[R], idempotency_key: str, status: str) -> R | None:
        with self._transaction() as db:
            db.execute(
                f"UPDATE {table.name} SET status = ? WHERE id = "
                f"(SELECT {table.key_column} FROM {table.keys} WHERE key = ?) AND status != ?",
                (status, idempotency_key, status),
            )
            # Tombstoned whether or not the key made a record: its create may
            # still be in flight, and must not outlive its undo.
            db.execute(
                f"INSERT OR IGNORE INTO {table.key_tombstones} (key) VALUES (?)",
                (idempotency_key,),
            )
            return self._made_by(table, idempotency_key)

    def _made_by(self, table: _Table[R], idempotency_key: str) -> R | None:
        row = self._db.execute(
            f"{table.select} WHERE id = "
            f"(SELECT {table.key_column} FROM {table.keys} WHERE key = ?)",
            (idempotency_key,),
        ).fetchone()
        return None if row is None else table.record(*row)

    def _get_by_id(self, table: _Table[R], record_id: int) -> R | None:
        row = self._db.execute(f"{table.select} WHERE id = ?", (record_id,)).fetchone()
        return None if row is None else table.record(*row)

    def _latest_of(self, table: _Table[R], request_id: str) -> R | None:
        row = self._db.execute(
            f"{table.select} WHERE request_id = ? ORDER BY id DESC LIMIT 1", (request_id,)
        ).fetchone()
        return None if row is None else table.record(*row)

    def _all_of(self, table: _Table[R], request_id: str) -> list[R]:
        rows = self._db.execute(
            f"{table.select} WHERE request_id = ? ORDER BY id", (request_id,)
        ).fetchall()
        return [table.record(*row) for row in rows]

    def _count(self, table: _Table[R], request_id: str) -> int:
        (count,) = self._db.execute(
            f"SELECT count(*) FROM {table.name} WHERE request_id = ?", (request_id,)
        ).fetchone()
        return int(count)
