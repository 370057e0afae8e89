"""Write the saga store dumps of tests/data with the store as it was before migrations.

Run it with the code of that version first on the path (see README.md here):

    git worktree add --detach /tmp/oldmain 6dead63
    PYTHONPATH=/tmp/oldmain .venv/bin/python tests/data/make_store_dumps.py tests/data

It records a handful of sagas through `FacadeStore`, as the orchestrator did
(so their request ids are stored as `<facade>/<request id>`), on a SQLite file
and on a new PostgreSQL database, and dumps both as plain SQL:
`store_before_migrations.sqlite.sql` (sqlite3's iterdump) and
`store_before_migrations.postgresql.sql` (`pg_dump --no-owner --no-privileges
--inserts`, without the `\\restrict` lines that only psql understands).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

from sqlalchemy.engine import make_url

from orchestrator.store.base import FacadeStore, SagaState, SagaStore, StepState
from orchestrator.store.sql import SqlSagaStore, sagas

SYNC = "SyncBooking"
ASYNC = "AsyncBooking"
SQLITE_DUMP = "store_before_migrations.sqlite.sql"
POSTGRES_DUMP = "store_before_migrations.postgresql.sql"


def _payload(facade: str, **fields: object) -> tuple[str, str]:
    payload = json.dumps(fields, sort_keys=True)
    return payload, hashlib.sha256(f"{facade}\n{payload}".encode()).hexdigest()


async def _begin(store: SagaStore, facade: str, request_id: str, kind: str, owner: str) -> None:
    payload, digest = _payload(facade, request_id=request_id, user="u-1", amount=42)
    begun = await store.begin(
        request_id=request_id,
        facade=facade,
        kind=kind,
        payload=payload,
        payload_hash=digest,
        owner=owner,
        first_step="create_order",
    )
    assert begun.created, request_id


async def record(store: SqlSagaStore) -> None:
    """The sagas of the dumps: each state, both kinds of facade, one request id twice."""
    sync = FacadeStore(store, SYNC)
    async_ = FacadeStore(store, ASYNC)
    order = json.dumps({"order_id": "o-1"})
    paid = json.dumps({"order_id": "o-1", "payment_id": "p-1"})

    # The same request id on both facades: two sagas, both completed.
    await _begin(sync, SYNC, "shared-1", "sync", "replica-a")
    await sync.step_finished(
        "shared-1", 0, state=StepState.DONE, data=order, next_step="create_payment"
    )
    await sync.step_finished(
        "shared-1", 1, state=StepState.DONE, data=paid, saga_state=SagaState.COMPLETED
    )
    await sync.set_state("shared-1", SagaState.COMPLETED, data=paid)
    await _begin(async_, ASYNC, "shared-1", "async", "replica-a")
    await async_.step_finished(
        "shared-1", 0, state=StepState.DONE, data=order, next_step="create_payment"
    )
    await async_.step_finished(
        "shared-1", 1, state=StepState.DONE, data=paid, saga_state=SagaState.COMPLETED
    )

    # Compensated: the payment failed, the order was cancelled.
    await _begin(sync, SYNC, "compensated-1", "sync", "replica-a")
    await sync.step_finished(
        "compensated-1", 0, state=StepState.DONE, data=order, next_step="create_payment"
    )
    await sync.step_finished(
        "compensated-1",
        1,
        state=StepState.FAILED,
        data=order,
        error="payment declined: insufficient funds",
        saga_state=SagaState.COMPENSATING,
        error_code="FAILED_PRECONDITION",
        error_reason="payment declined: insufficient funds",
    )
    await sync.set_state("compensated-1", SagaState.COMPENSATED)

    # Running: its second step is on its second attempt.
    await _begin(sync, SYNC, "running-1", "sync", "replica-b")
    await sync.step_finished(
        "running-1", 0, state=StepState.DONE, data=order, next_step="create_payment"
    )
    await sync.step_started("running-1", 1, "create_payment")

    # A request id holding a slash, and one that looks like another facade's key.
    await _begin(sync, SYNC, "order/42", "sync", "replica-a")
    await sync.step_finished(
        "order/42", 0, state=StepState.DONE, data=order, saga_state=SagaState.COMPLETED
    )
    await _begin(async_, ASYNC, f"{SYNC}/x", "async", "replica-a")

    # Compensating: the payment failed, the rollback is under way.
    await _begin(async_, ASYNC, "compensating-1", "async", "replica-b")
    await async_.step_finished(
        "compensating-1", 0, state=StepState.DONE, data=order, next_step="create_payment"
    )
    await async_.step_started("compensating-1", 1, "create_payment")
    await async_.step_finished(
        "compensating-1",
        1,
        state=StepState.FAILED,
        data=order,
        error="payment service unavailable",
        saga_state=SagaState.COMPENSATING,
        error_code="UNAVAILABLE",
        error_reason="payment service unavailable",
    )

    # Compensation failed: the cancel could not be done.
    await _begin(async_, ASYNC, "compensation-failed-1", "async", "replica-a")
    await async_.step_finished(
        "compensation-failed-1",
        0,
        state=StepState.FAILED,
        data="{}",
        error="order service said no",
        saga_state=SagaState.COMPENSATING,
        error_code="ABORTED",
        error_reason="order service said no",
    )
    await async_.set_state(
        "compensation-failed-1", SagaState.COMPENSATION_FAILED, error_reason="cancel failed"
    )

    # Begun on the shared store itself (not through a facade): its id has no prefix.
    await _begin(store, SYNC, "unscoped-1", "sync", "replica-b")

    await store.heartbeat("replica-a")
    await store.heartbeat("replica-b")


async def _on(url: str) -> None:
    store = SqlSagaStore(url)
    await store.start()
    try:
        await record(store)
    finally:
        await store.close()


def _sqlite(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sagas.db"
        asyncio.run(_on(f"sqlite+aiosqlite:///{path}"))
        conn = sqlite3.connect(path)
        try:
            (out / SQLITE_DUMP).write_text("\n".join(conn.iterdump()) + "\n")
        finally:
            conn.close()


def _postgres(out: Path, admin: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    name = "orch_dump_before_migrations"
    plain = make_url(admin).set(drivername="postgresql")
    dsn = plain.render_as_string(hide_password=False)
    target = plain.set(database=name).render_as_string(hide_password=False)

    async def admin_sql(sql: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin_sql(f'DROP DATABASE IF EXISTS "{name}"'))
    asyncio.run(admin_sql(f'CREATE DATABASE "{name}"'))
    try:
        asyncio.run(_on(target.replace("postgresql://", "postgresql+asyncpg://", 1)))
        dump = subprocess.run(
            ["pg_dump", "--no-owner", "--no-privileges", "--inserts", f"--dbname={target}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        asyncio.run(admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    lines = [
        line for line in dump.splitlines() if not line.startswith(("\\restrict", "\\unrestrict"))
    ]
    (out / POSTGRES_DUMP).write_text("\n".join(lines) + "\n")


def main() -> None:
    """Write both dumps into the folder given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "ORCH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="a PostgreSQL server's maintenance database (a scratch database is made there)",
    )
    args = parser.parse_args()
    if [column.name for column in sagas.primary_key] != ["request_id"]:
        sys.exit("run this with the store as it was before migrations first on PYTHONPATH")
    print(f"recording with the store of {sys.modules[SqlSagaStore.__module__].__file__}")
    _sqlite(args.out)
    _postgres(args.out, args.postgres)


if __name__ == "__main__":
    main()
