"""The servers of a booking bench and its main course: start, load in turn, stop, clean up.

Every booking bench starts, as subprocesses on free ports: the demo Order
upstream, the demo Payment upstream (or `payment_probe.py`, which reports each
payment to the bench), the framework (`python main.py` on a temporary config)
and its hand-written baseline; then alternates runs against the two targets;
then, whatever happened (failure, Ctrl+C, SIGTERM), stops the servers and
deletes what they declared on the broker, and prints the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from bench._broker import (
    Topology,
    check_broker_of,
    clean_up,
    find_broker_pid,
    find_database_pid,
    is_nats,
    settle,
)
from bench._journal import journal_summary
from bench._openloop import OpenLoopRun, offer_rpc, summarize_open
from bench._runs import (
    CallRun,
    Load,
    Run,
    alternate,
    call_loop,
    header_line,
    named_pids_of,
    summarize_closed,
)
from bench.common import (
    BENCH_DIR,
    HOST,
    TARGETS,
    Process,
    Target,
    channel_count,
    child_environment,
    framework_config,
    free_ports,
    start_process,
    stop_processes,
    terminate,
    wait_listening,
    wait_serving,
)
from orchestrator.config import redact_url

SERVERS = ("order", "payment", "framework", "baseline", "console")
"""The ports a bench takes (the console's is used with `--console` only)."""

RunOne = Callable[[Target, int], Awaitable[Run]]
Session = Callable[[Mapping[str, Process], Mapping[str, str]], AbstractAsyncContextManager[RunOne]]
"""Given the running servers and their addresses, what makes one run (and what it needs
for the whole invocation, set up and torn down around the runs)."""


@dataclass
class Bench:
    """What one booking bench runs, and how."""

    name: str
    """For the temporary directory's name."""
    broker: Mapping[str, Any]
    """The framework's broker section."""
    url: str | None
    """The broker the targets use (checked first, its CPU counted, cleaned up); None for the
    framework's in-memory broker."""
    topology: Topology
    """What the targets declare on the broker, deleted at the end."""
    baseline: Callable[[Mapping[str, int]], list[str]]
    """The baseline's command line, given the ports."""
    session: Session
    probe: bool = False
    """The Payment upstream is `payment_probe.py`, its stdout a pipe to the bench."""
    unit: str = "bookings"
    """What a closed-loop run counts per second."""
    header: str = ""
    sagas: Mapping[str, Any] | None = None
    """The framework's `sagas` section, when not the defaults."""
    """Appended to the first line."""


def start_servers(
    args: argparse.Namespace,
    bench: Bench,
    processes: dict[str, Process],
    ports: Mapping[str, int],
    log_dir: Path,
) -> None:
    """Start the upstreams, the framework and the baseline into `processes`."""
    python = sys.executable
    latency = ["--latency-ms", str(args.upstream_latency_ms)]
    config_path = log_dir / "app.yaml"
    framework_config(
        config_path,
        ports["framework"],
        ports["order"],
        ports["payment"],
        broker=bench.broker,
        sagas=bench.sagas,
        store=args.store,
        console_port=ports["console"] if args.console else 0,
    )
    framework_argv = [python, "main.py", "--workers", str(args.workers)]
    if args.profile is not None:
        framework_argv = [python, str(BENCH_DIR / "profile_orchestrator.py"), str(args.profile)]
    env = child_environment()
    upstream = [python, "main.py", "upstream"]
    processes["order"] = start_process(
        "order",
        [*upstream, "order", "--port", str(ports["order"]), "--db", ":memory:", *latency],
        log_dir,
        env,
    )
    payment = [python, str(BENCH_DIR / "payment_probe.py")]
    if not bench.probe:
        payment = [*upstream, "payment", "--db", ":memory:"]
    processes["payment"] = start_process(
        "payment",
        [*payment, "--port", str(ports["payment"]), *latency],
        log_dir,
        env,
        stdout_pipe=bench.probe,
    )
    processes["framework"] = start_process(
        "framework", framework_argv, log_dir, child_environment(ORCH_CONFIG=str(config_path))
    )
    baseline = [python, *bench.baseline(ports)]
    if getattr(args, "journaled_baseline", False):
        baseline += ["--journal", str(baseline_journal(log_dir))]
    processes["baseline"] = start_process("baseline", baseline, log_dir, env)


def baseline_journal(log_dir: Path) -> Path:
    """The file of the baseline's journal (`--journaled-baseline`), beside the framework's."""
    return log_dir / "baseline.db"


def upstream_argv(ports: Mapping[str, int]) -> list[str]:
    """A baseline's `--host --port --order --payment` arguments."""
    return [
        "--host",
        HOST,
        "--port",
        str(ports["baseline"]),
        "--order",
        f"{HOST}:{ports['order']}",
        "--payment",
        f"{HOST}:{ports['payment']}",
    ]


async def wait_ready(
    processes: Mapping[str, Process], addresses: Mapping[str, str], workers: int
) -> None:
    """Every server serving, and every worker (or copy) of each target bound to its port."""
    await asyncio.gather(
        *(
            wait_serving(process, addresses[name])
            for name, process in processes.items()
            if name in addresses
        )
    )
    for target in TARGETS:
        port = int(addresses[target].rsplit(":", 1)[1])
        await wait_listening(processes[target], port, workers)


async def load_in_turn(
    args: argparse.Namespace,
    bench: Bench,
    processes: Mapping[str, Process],
    addresses: Mapping[str, str],
    broker_pid: int | None,
    *,
    database_pid: int | None = None,
) -> list[Run]:
    """Wait for every server, then run the targets in turn; SIGTERM cancels it."""
    main_task = asyncio.current_task()
    if main_task is not None:
        # Not the KeyboardInterrupt of `terminate`, which could fire inside a protocol callback.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    await wait_ready(processes, addresses, args.workers)
    broker = None
    if broker_pid is not None and bench.url is not None:
        broker = ("nats" if is_nats(bench.url) else "rabbitmq", broker_pid)
    async with bench.session(processes, addresses) as run_one:
        return await alternate(
            args,
            processes,
            named_pids_of(processes, broker, database_pid),
            run_one,
            broker_pid=broker_pid,
            database_pid=database_pid,
            console_address=addresses["console"] if args.console else None,
        )


def local_servers(args: argparse.Namespace, bench: Bench) -> tuple[int | None, int | None, str]:
    """The broker's and the store's database server's pids, where they run here (their CPU
    is counted), and what the header line says of them."""
    broker_pid = find_broker_pid(bench.url) if bench.url is not None else None
    where = ""
    if bench.url is not None:
        where = f" broker={redact_url(bench.url)} " + (
            f"(pid {broker_pid})" if broker_pid else "(not local: cpu not counted)"
        )
    database_pid = find_database_pid(args.store)
    if database_pid is not None:
        where += f" database=(pid {database_pid})"
    return broker_pid, database_pid, where


def run_bench(args: argparse.Namespace, bench: Bench) -> int:
    """Start the servers, run the bench, always stop the servers and delete what they declared;
    print the summary and return the exit status."""
    signal.signal(signal.SIGTERM, terminate)
    if bench.url is not None:
        try:
            uvloop.run(check_broker_of(bench.url))
        except Exception as exc:
            print(
                f"bench failed: broker {redact_url(bench.url)} unreachable: {exc!r}",
                file=sys.stderr,
            )
            return 2
    ports = dict(zip(SERVERS, free_ports(len(SERVERS)), strict=True))
    addresses = {name: f"{HOST}:{port}" for name, port in ports.items()}
    log_dir = Path(tempfile.mkdtemp(prefix=f"{bench.name}-bench-"))
    processes: dict[str, Process] = {}
    results: list[Run] = []
    leftovers: dict[str, int] | None = {}
    journaled: dict[str, int] = {}
    status = 0
    try:
        start_servers(args, bench, processes, ports, log_dir)
        broker_pid, database_pid, where = local_servers(args, bench)
        print(header_line(args, channel_count(args.workers), bench.header + where), flush=True)
        try:
            results = uvloop.run(
                load_in_turn(
                    args, bench, processes, addresses, broker_pid, database_pid=database_pid
                )
            )
        finally:
            signal.signal(signal.SIGTERM, terminate)  # closing the loop reset it
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        status = 130
    except RuntimeError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        status = 2
    finally:
        # The servers first, so the upstreams see no call after they stop.
        stop_processes([processes[name] for name in TARGETS if name in processes])
        stop_processes([processes[name] for name in ("order", "payment") if name in processes])
        journaled = journal_summary(baseline_journal(log_dir))
        shutil.rmtree(log_dir, ignore_errors=True)
        if bench.url is not None:
            leftovers = clean_up(bench.url, bench.topology)
    if status:
        return status
    if args.profile is not None:
        print(f"orchestrator profile: {args.profile} (summary: {args.profile}.txt)")
    if getattr(args, "journaled_baseline", False):
        print(journal_line(journaled))
    if args.rate:
        status = summarize_open(results, leftovers or {})
    else:
        status = summarize_closed(results, leftovers or {}, unit=bench.unit)
    return 1 if leftovers is None else status


def journal_line(states: Mapping[str, int]) -> str:
    """What the baseline's journal held at the end: its sagas, and how many in each state."""
    held = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
    return f"baseline journal: {sum(states.values())} sagas ({held or 'none'})"


def pairs(mapping: Mapping[str, str]) -> Sequence[str]:
    """`{"--a": "1"}` as `["--a", "1"]`."""
    return [item for pair in mapping.items() for item in pair]


OpenLoop = Callable[[OpenLoopRun, str], Awaitable[None]]
"""`open_loop(run, run_id)`: load `run.target` open-loop, request ids starting with `run_id`."""
ClosedLoop = Callable[[Target, int, str], Awaitable[Run]]
"""`closed_loop(target, pair, run_id)`: a closed-loop run against `target`."""


def runner(
    args: argparse.Namespace,
    invocation: str,
    open_loop: OpenLoop,
    closed_loop: ClosedLoop,
    work: Mapping[Target, list[str]] | None = None,
) -> RunOne:
    """One run against a target: `closed_loop`, or with `--rate` `open_loop`, which then waits
    for the target's queues (`work`) to empty before the next run."""

    async def run_one(target: Target, pair: int) -> Run:
        run_id = f"{invocation}{target[0]}{pair}"  # request ids never repeat
        if not args.rate:
            return await closed_loop(target, pair, run_id)
        run = OpenLoopRun(target, pair, args.seconds, rate=args.rate)
        await open_loop(run, run_id)
        if work is not None:
            run.backlog = await settle(args.url, work[target])
        return run

    return run_one


def rpc_runner(
    args: argparse.Namespace,
    address_of: Mapping[str, str],
    invocation: str,
    method: str,
    *,
    unit: str = "bookings",
    work: Mapping[Target, list[str]] | None = None,
) -> RunOne:
    """`runner` of BookingService's `method`, an RPC that answers at the end of its work."""
    load = Load.of(args)

    async def closed_loop(target: Target, pair: int, run_id: str) -> Run:
        result = CallRun(target, pair, args.seconds, unit=unit)
        await call_loop(result, address_of[target], method, run_id, load)
        return result

    async def open_loop(run: OpenLoopRun, run_id: str) -> None:
        await offer_rpc(run, address_of[run.target], method, run_id, load)

    return runner(args, invocation, open_loop, closed_loop, work)


def plain_session(make: Callable[[Mapping[str, str]], RunOne]) -> Session:
    """A session that needs nothing around its runs: `make(addresses)` is its RunOne."""

    @contextlib.asynccontextmanager
    async def session(
        processes: Mapping[str, Process], addresses: Mapping[str, str]
    ) -> AsyncIterator[RunOne]:
        yield make(addresses)

    return session
