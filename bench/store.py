"""Saga store benchmark: group commit against one transaction per write.

Synthetic sagas, 64 at once by default, each with a random request id (as
users' are: `common.new_request_id`) and making the store writes of a
2-step sync saga as the sync facade makes them (its begin with step 0 started;
step 0's end with step 1 started; step 1's end with the saga COMPLETED, the
last two compare-and-set `apply`s: three durable writes), run against
`SqlSagaStore` as shipped (group commit, up to 256 writes a transaction, and
on SQLite commits paced to one per 5 ms) and against the baseline: the same
store with ``max_batch=1`` and no pacing, the same writes through the same
writer, one transaction each. So the ratio is what group commit buys, nothing
else. Runs alternate, batched then baseline, with an uncounted warm-up, which
cancels drift. On SQLite (the default) each run gets a fresh file (WAL,
synchronous=NORMAL); ``--url`` runs on another database, PostgreSQL say. About
16 s with the defaults.

    .venv/bin/python bench/store.py [--seconds 3] [--concurrency 64] [--pairs 2] [--url URL]
        [--commit-interval SECONDS] [--no-announce]

On PostgreSQL the store announces each transaction's changed sagas with NOTIFY
and LISTENs for them (the change feed WatchSaga wakes on); ``--no-announce``
runs both stores without it, to measure what it costs.

With SQLite's pacing, 64 callers each waiting for its write cannot make more
than 64 writes per interval: the batched runs' writes/s then tell the pacing,
their CPU per saga what it saves; ``--commit-interval 0`` shows group commit
alone.

Per run: sagas/s, writes/s, the mean saga's latency, the store's CPU per saga
(this process's CPU time, every thread included, over the sagas
finished; a PostgreSQL server's own CPU is not in it), the mean writes per
transaction and the bytes written to storage per saga (Linux's count for this
process: SQLite's WAL and checkpoints; a PostgreSQL server writes its own).
The last line is always ``ratio=X.XX``: the batched runs' mean writes/s over
the baseline's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

from bench.common import new_request_id  # noqa: E402
from orchestrator.store import NewSaga, StepEnded  # noqa: E402
from orchestrator.store.sql import SqlSagaStore  # noqa: E402

WRITES_PER_SAGA = 3
FACADE = "HandleSyncBooking"
DEADLINE = timedelta(minutes=5)
"""A saga's deadline, as the sync facade gives it by default."""


@dataclass
class RunResult:
    """One measured run."""

    label: str
    sagas: int
    seconds: float
    cpu_seconds: float
    latencies: list[float]
    ops: int
    transactions: int
    written: int
    """Bytes this process had written to storage (the kernel's count, /proc/self/io)."""

    @property
    def sagas_per_second(self) -> float:
        return self.sagas / self.seconds

    @property
    def writes_per_second(self) -> float:
        return self.sagas_per_second * WRITES_PER_SAGA

    @property
    def cpu_us_per_saga(self) -> float:
        return self.cpu_seconds / max(self.sagas, 1) * 1e6

    def line(self) -> str:
        mean_ms = statistics.fmean(self.latencies) * 1e3 if self.latencies else 0.0
        batch = self.ops / max(self.transactions, 1)
        return (
            f"{self.label}: {self.sagas_per_second:8.0f} sagas/s {self.writes_per_second:8.0f}"
            f" writes/s  saga latency {mean_ms:6.2f} ms  store cpu {self.cpu_us_per_saga:6.0f}"
            f" us/saga  {batch:5.1f} writes/transaction"
            f"  {self.written / max(self.sagas, 1) / 1024:5.1f} KiB written/saga"
        )


def bytes_written() -> int:
    """What this process has written to storage so far, as Linux counts it (0 elsewhere)."""
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
    except OSError:
        return 0
    counts = dict(line.split(": ") for line in lines)
    return int(counts.get("write_bytes", 0))


async def synthetic_saga(store: SqlSagaStore, request_id: str) -> None:
    """The store writes of a 2-step sync saga."""
    steps = ("create_order", "create_payment")
    existing = await store.begin(
        NewSaga(
            facade=FACADE,
            request_id=request_id,
            kind="sync",
            payload='{"hotel_id": "h-1", "amount_cents": 12500}',
            payload_hash="3f2a9c",
            owner="bench",
            first_step=steps[0],
            deadline_at=datetime.now(UTC) + DEADLINE,
        )
    )
    data = '{"order_id": "o-1"}'
    # A refused write would cost less than an applied one: the bench must not count it.
    if (
        existing is not None
        or not await store.apply(FACADE, request_id, StepEnded(0, data, next_step=steps[1]))
        or not await store.apply(FACADE, request_id, StepEnded(1, data, complete=True))
    ):
        raise RuntimeError(f"the store refused a write of saga {request_id}")


async def run(
    label: str,
    url: str,
    *,
    max_batch: int,
    commit_interval: float | None,
    announce: bool,
    concurrency: int,
    warmup: float,
    seconds: float,
) -> RunResult:
    """Sagas from `concurrency` callers for `warmup` + `seconds`; the last `seconds` count."""
    store = SqlSagaStore(
        url, max_batch=max_batch, commit_interval=commit_interval, announce_changes=announce
    )
    # Request ids unique to the run: a shared database (--url) needs no cleaning.
    run_id = f"{label.replace(' ', '-')}-{time.time_ns()}"
    await store.start()
    loop = asyncio.get_running_loop()
    start = loop.time()
    window_start, window_end = start + warmup, start + warmup + seconds
    latencies: list[float] = []
    marks: dict[str, Any] = {}

    async def caller() -> None:
        while (began := loop.time()) < window_end:
            await synthetic_saga(store, new_request_id(run_id))
            done = loop.time()
            if began >= window_start and done <= window_end:
                latencies.append(done - began)

    async def meter() -> None:
        await asyncio.sleep(window_start - loop.time())
        marks["start"] = (
            time.process_time(),
            store.stats.ops,
            store.stats.transactions,
            bytes_written(),
        )
        await asyncio.sleep(window_end - loop.time())
        marks["end"] = (
            time.process_time(),
            store.stats.ops,
            store.stats.transactions,
            bytes_written(),
        )

    try:
        await asyncio.gather(meter(), *(caller() for _ in range(concurrency)))
    finally:
        await store.close()
    (cpu0, ops0, tx0, written0), (cpu1, ops1, tx1, written1) = marks["start"], marks["end"]
    return RunResult(
        label=label,
        sagas=len(latencies),
        seconds=seconds,
        cpu_seconds=cpu1 - cpu0,
        latencies=latencies,
        ops=ops1 - ops0,
        transactions=tx1 - tx0,
        written=written1 - written0,
    )


async def bench(args: argparse.Namespace) -> int:
    batched: list[RunResult] = []
    baseline: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="orch-store-bench-") as tmp:
        print(f"store={SqlSagaStore(args.url).url if args.url else 'sqlite (fresh files)'}")
        for pair in range(1, args.pairs + 1):
            # The baseline commits each write at once, unpaced.
            for label, max_batch, commit_interval, results in (
                (f"batched run {pair}", 256, args.commit_interval, batched),
                (f"baseline run {pair}", 1, 0.0, baseline),
            ):
                file = Path(tmp) / f"{label.replace(' ', '-')}.db"
                result = await run(
                    label,
                    args.url or f"sqlite+aiosqlite:///{file}",
                    max_batch=max_batch,
                    commit_interval=commit_interval,
                    announce=args.announce,
                    concurrency=args.concurrency,
                    warmup=args.warmup,
                    seconds=args.seconds,
                )
                results.append(result)
                print(result.line(), flush=True)
    for name, results in (("batched", batched), ("baseline", baseline)):
        print(
            f"{name} mean: {statistics.fmean(r.writes_per_second for r in results):.0f} writes/s,"
            f" {statistics.fmean(r.cpu_us_per_saga for r in results):.0f} us store cpu/saga,"
            f" {1e6 / statistics.fmean(r.sagas_per_second for r in results):.0f} us wall/saga,"
            f" {statistics.fmean(r.written / max(r.sagas, 1) for r in results) / 1024:.1f}"
            " KiB written/saga"
        )
    ratio = statistics.fmean(r.writes_per_second for r in batched) / statistics.fmean(
        r.writes_per_second for r in baseline
    )
    # For bench/ab.py --key cpu_per_saga_us: the batched store's CPU, steadier than its rate.
    print(f"cpu_per_saga_us={statistics.fmean(r.cpu_us_per_saga for r in batched):.0f}")
    written = statistics.fmean(r.written / max(r.sagas, 1) for r in batched) / 1024
    print(f"kib_written_per_saga={written:.1f}")
    print(f"ratio={ratio:.2f}")
    return 0


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop  # the orchestrator's loop, where installed
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per run")
    parser.add_argument("--warmup", type=float, default=0.5, help="uncounted time per run")
    parser.add_argument("--concurrency", type=int, default=64, help="sagas in flight")
    parser.add_argument("--pairs", type=int, default=2, help="batched + baseline pairs of runs")
    parser.add_argument("--url", default="", help="store URL (default: a fresh SQLite file)")
    parser.add_argument(
        "--commit-interval",
        type=float,
        default=None,
        help="the batched store's commit pacing in seconds (default: the store's own)",
    )
    parser.add_argument(
        "--no-announce",
        dest="announce",
        action="store_false",
        help="PostgreSQL: no NOTIFY of changed sagas, no LISTEN (the change feed off)",
    )
    return _run(bench(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
