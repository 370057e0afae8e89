"""Helpers shared by the benchmarks: subprocesses, free ports, health waits, CPU accounting.

Imported as ``bench.common`` once the repository root is on ``sys.path`` (each
bench script puts it there, as it does for ``pb``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final, Literal

import aio_pika
import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

import topic as booking_topics
from orchestrator.workers import worker_count
from pb import booking_pb2_grpc

ROOT: Final = Path(__file__).resolve().parent.parent
DEFAULT_RABBITMQ_URL: Final = "amqp://guest:guest@127.0.0.1:5672/"
"""The bench's RabbitMQ unless `$RABBITMQ_URL` names another."""
BENCH_DIR: Final = Path(__file__).resolve().parent
HOST: Final = "127.0.0.1"
UPSTREAM_TIMEOUT_SECONDS: Final = 3.0
"""The framework's and the baselines' deadline on each upstream call (app.yaml's value)."""
NOISY_FOREIGN_CPUS: Final = 0.25
"""Other processes busier than this (in CPUs, on average) make a run's figures noisy."""
STARTUP_TIMEOUT_SECONDS: Final = 30.0
STOP_TIMEOUT_SECONDS: Final = 5.0
MEMORY_BROKER: Final[Mapping[str, Any]] = {
    "url": "memory://",
    "topic_prefix": "booking.",
    "default_concurrency": 32,
    "topics": {
        "cancel_sync_booking": {"concurrency": 16},
        "cancel_async_booking": {"concurrency": 16},
    },
}
"""The broker section of the root app.yaml: the in-memory broker."""

Target = Literal["framework", "baseline"]
TARGETS: Final[tuple[Target, Target]] = ("framework", "baseline")


@dataclass
class Process:
    """A subprocess started by the bench, with the file its output goes to."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of its output, to explain a failure."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of `pid`, all threads, from /proc; None where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU time of `pid` and of every process descended from it (a supervisor's workers; the
    ones it reaped count in its own), from /proc; None where `pid` has none."""
    own = process_cpu_seconds(pid)
    if own is None:
        return None
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(parent, []).append(int(entry.name))
    total, pending = own, list(parents.get(pid, []))
    while pending:
        child = pending.pop()
        # A child's reaped children count in its own cutime/cstime, not in utime/stime.
        total += process_cpu_seconds(child) or 0.0
        pending += parents.get(child, [])
    return total + reaped_children_cpu_seconds(pid)


def reaped_children_cpu_seconds(pid: int) -> float:
    """CPU time of the children `pid` waited for (gone workers), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # cutime and cstime are fields 16 and 17.
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float | None:
    """CPU seconds all CPUs spent running processes since boot."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    # user, nice and system: the time of processes (interrupts and steal are left out).
    return sum(int(value) for value in fields[:3]) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU counters at one instant: the whole machine's, and each of the bench's processes'."""

    wall: float
    machine: float | None
    processes: dict[int, float | None]

    @classmethod
    def take(cls, pids: Sequence[int]) -> CpuSnapshot:
        """Read the counters now."""
        return cls(
            time.monotonic(),
            machine_busy_seconds(),
            # The bench's own process alone: its servers are counted as theirs.
            {
                pid: process_cpu_seconds(pid) if pid == os.getpid() else tree_cpu_seconds(pid)
                for pid in pids
            },
        )

    def used(self, later: CpuSnapshot, pid: int) -> float | None:
        """CPU seconds `pid` used between this snapshot and `later`."""
        before, after = self.processes.get(pid), later.processes.get(pid)
        return None if before is None or after is None else after - before

    def foreign_cpus(self, later: CpuSnapshot) -> float | None:
        """CPUs busy on average with other processes than the bench's between the two."""
        if self.machine is None or later.machine is None or later.wall <= self.wall:
            return None
        own = [self.used(later, pid) for pid in self.processes]
        if any(used is None for used in own):
            return None
        foreign = later.machine - self.machine - sum(used or 0.0 for used in own)
        return max(0.0, foreign / (later.wall - self.wall))


def noisy_note(foreign_cpus: float | None) -> str | None:
    """The `note:` line of a run during which other processes were busy, else None."""
    if foreign_cpus is None or foreign_cpus <= NOISY_FOREIGN_CPUS:
        return None
    return (
        f"  note: other processes kept {foreign_cpus:.1f} of"
        f" {os.cpu_count()} CPUs busy during this run: its figures are noisy"
    )


def add_workers_option(parser: argparse.ArgumentParser) -> None:
    """`--workers`: the framework's processes, and as many for the baseline."""
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="orchestrator processes sharing the port (main.py --workers N); the baseline runs "
        "as many copies, and the load spreads over several connections (default: 1)",
    )


def channel_count(workers: int) -> int:
    """Connections the load generator opens: one for one process; several per process
    otherwise, since the kernel spreads connections, not calls, over the processes."""
    return 1 if workers == 1 else 4 * workers


@contextlib.asynccontextmanager
async def booking_stubs(
    address: str, count: int
) -> AsyncIterator[list[booking_pb2_grpc.BookingServiceAsyncStub]]:
    """Stubs of `count` channels to `address`, each on a connection of its own (ready)."""
    # Channels with the same arguments share grpc's global pool of connections.
    options = [("grpc.use_local_subchannel_pool", 1)] if count > 1 else []
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(count)]
    try:
        await asyncio.gather(*(channel.channel_ready() for channel in channels))
        yield [booking_pb2_grpc.BookingServiceStub(channel) for channel in channels]
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def start_copies(count: int, argv: Sequence[str]) -> list[subprocess.Popen[bytes]]:
    """Start `count` more copies of this script with `argv` (its arguments without
    `--processes`) and `--reuse-port`: a baseline run as several processes on one port."""
    script = Path(sys.argv[0]).resolve()
    return [
        subprocess.Popen([sys.executable, str(script), *argv, "--reuse-port"]) for _ in range(count)
    ]


def stop_copies(copies: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM the copies and wait for them (SIGKILL after STOP_TIMEOUT_SECONDS)."""
    for copy in copies:
        if copy.poll() is None:
            copy.send_signal(signal.SIGTERM)
    for copy in copies:
        try:
            copy.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            copy.kill()
            copy.wait()


def as_processes(
    args: argparse.Namespace, argv: Sequence[str] | None, serve: Callable[[], int]
) -> int:
    """Run `serve()` here and in `args.processes - 1` copies of this script, all sharing the
    port (SO_REUSEPORT), as the framework's workers do; stop the copies after."""
    copies = start_copies(args.processes - 1, copies_argv(sys.argv[1:] if argv is None else argv))
    if copies:
        args.reuse_port = True
    try:
        return serve()
    finally:
        stop_copies(copies)


def resolve_workers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check `--workers` against the other options and resolve it (0: one per core); workers
    share one store, so a journal in memory becomes a SQLite file."""
    if args.workers < 0:
        parser.error("--workers must not be negative")
    if args.workers != 1 and (args.profile is not None or args.py_spy is not None):
        parser.error(
            "--profile and --py-spy profile one orchestrator process: use them with --workers 1"
        )
    args.workers = worker_count(args.workers)
    if args.workers > 1 and args.store in ("memory", "none"):
        args.store = "sqlite"


def add_processes_options(parser: argparse.ArgumentParser) -> None:
    """A baseline's `--processes N` (copies of it sharing the port) and `--reuse-port`."""
    parser.add_argument("--processes", type=int, default=1, help="copies sharing the port")
    parser.add_argument("--reuse-port", action="store_true", help="bind with SO_REUSEPORT")


def copies_argv(argv: Sequence[str]) -> list[str]:
    """`argv` without `--processes N`: what each copy is started with."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            kept.append(arg)
    return kept


def framework_topology(prefix: str) -> tuple[list[str], list[str]]:
    """The queues and exchanges the framework declares under `prefix` (broker/rabbitmq.py)."""
    topics = sorted(
        value
        for name, value in vars(booking_topics).items()
        if name.isupper() and isinstance(value, str)
    )
    queues = [f"{prefix}{topic}{suffix}" for topic in topics for suffix in ("", ".dlq")]
    return queues, [f"{prefix}orchestrator", f"{prefix}orchestrator.dlx"]


async def delete_topology(
    url: str, queues: Sequence[str], exchanges: Sequence[str]
) -> dict[str, int]:
    """Delete the queues (missing ones are fine) and exchanges; return queues that held messages."""
    leftovers: dict[str, int] = {}
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            deleted = await channel.queue_delete(queue, timeout=10)
            if deleted.message_count:
                leftovers[queue] = deleted.message_count
        for exchange in exchanges:
            await channel.exchange_delete(exchange, timeout=10)
    return leftovers


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on HOST right now (held together, so never the same)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def child_environment(**extra: str) -> dict[str, str]:
    """This environment without ORCH_* overrides (they would beat the temp config)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ORCH_")}
    env.update(extra)
    return env


def start_process(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    env: dict[str, str],
    *,
    stdout_pipe: bool = False,
) -> Process:
    """Start `argv` from the repository root, its output to a file in `log_dir`.

    With `stdout_pipe`, only stderr goes to the file and stdout is a pipe to read.
    """
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log_file:
        popen = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log_file,
            stderr=log_file if stdout_pipe else subprocess.STDOUT,
            # Its own session: Ctrl+C reaches the bench only, which stops it in order.
            start_new_session=True,
        )
    return Process(name, popen, log_path)


def stop_processes(processes: Sequence[Process]) -> None:
    """SIGTERM every process still running, wait a little, then SIGKILL what is left."""
    for process in processes:
        if process.popen.poll() is None:
            process.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for process in processes:
        try:
            process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{process.name} ignored SIGTERM; killing it", file=sys.stderr)
            process.popen.kill()
            process.popen.wait()
        if process.popen.stdout is not None:
            process.popen.stdout.close()


def framework_config(
    path: Path,
    port: int,
    order_port: int,
    payment_port: int,
    *,
    broker: Mapping[str, Any] = MEMORY_BROKER,
    sagas: Mapping[str, Any] | None = None,
    store: str = "memory",
    console_port: int = 0,
) -> None:
    """Write app.yaml's keys for a run against separate upstreams, logging warnings only.

    `store` is `memory` (the journal in process memory: nothing written to disk;
    `none` is another name for it), `sqlite` (a fresh SQLite file beside the
    config, as in the embedded default), or a store URL; `sagas` the `sagas` section (the
    defaults without it). With `console_port` the saga console is served on it (off
    otherwise).
    """
    config = {
        "grpc": {"host": HOST, "port": port, "shutdown_grace_seconds": 2},
        "broker": dict(broker),
        "upstreams": {
            "order": {"address": f"{HOST}:{order_port}"},
            "payment": {"address": f"{HOST}:{payment_port}"},
            "timeout_seconds": UPSTREAM_TIMEOUT_SECONDS,
        },
        "embedded_upstreams": {},
        "log_level": "WARNING",
        "log_format": "text",
    }
    if sagas is not None:
        config["sagas"] = dict(sagas)
    if console_port:
        config["ui"] = {"enabled": True, "host": HOST, "port": console_port}
    if store == "sqlite":
        config["store"] = {"url": f"sqlite+aiosqlite:///{path.parent / 'sagas.db'}"}
    elif store not in ("none", "memory"):
        config["store"] = {"url": store}
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def add_store_option(parser: argparse.ArgumentParser) -> None:
    """`--store`: the framework's saga store for the run."""
    parser.add_argument(
        "--store",
        default="memory",
        help="saga store of the framework: memory (default: the journal in process memory), "
        "sqlite (a fresh file, as users run it), or a URL",
    )


def add_journaled_baseline_option(parser: argparse.ArgumentParser) -> None:
    """`--journaled-baseline`: the baseline keeps a saga journal by hand (bench/_journal.py)."""
    parser.add_argument(
        "--journaled-baseline",
        action="store_true",
        help="the baseline records each saga and each step's end in a SQLite file of its own "
        "before going on (bench/_journal.py), as hand-written code with the framework's "
        "guarantee would: the framework against hand-written code that keeps a journal too",
    )


def add_console_option(parser: argparse.ArgumentParser) -> None:
    """`--console`: the framework serves its saga console, one live page of it open."""
    parser.add_argument(
        "--console",
        action="store_true",
        help="serve the framework's saga console and keep its live saga list open during the "
        "runs, as an operator's browser tab would (the console's cost on the saga path)",
    )


class ConsoleWatcher:
    """One open live page of the saga console: its saga list's event stream, read as a
    browser reads it (every update is the list rendered again), until stopped."""

    def __init__(self, address: str) -> None:
        self.url = f"http://{address}/sagas/live"
        self.updates = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Open the page."""
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        import aiohttp  # the console extra, installed with the dev extras

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(self.url) as response,
        ):
            response.raise_for_status()
            async for line in response.content:
                if line.startswith(b"event: update"):
                    self.updates += 1
        raise RuntimeError(f"the console closed {self.url}")

    async def stop(self) -> int:
        """Close the page; how many updates it got. A page that failed raises why."""
        assert self._task is not None
        if self._task.done():
            self._task.result()  # raises what ended it
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.updates


async def wait_serving(process: Process, target: str) -> None:
    """Poll `target`'s health service until it answers SERVING; fail if `process` exits."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.popen.poll() is not None:
                raise RuntimeError(
                    f"{process.name} exited with status {process.popen.returncode}"
                    f" before serving:\n{process.log_tail()}"
                )
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{process.name} not SERVING on {target} after"
                    f" {STARTUP_TIMEOUT_SECONDS:.0f}s:\n{process.log_tail()}"
                )
            await asyncio.sleep(0.1)


def listening_sockets(port: int) -> list[str]:
    """The inodes of the sockets listening on TCP `port` (IPv4 and IPv6), from /proc: one per
    process that shares it with SO_REUSEPORT."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # local_address is HEXIP:HEXPORT, st 0A is LISTEN, field 9 the socket's inode.
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                found.append(fields[9])
    return found


def listeners(port: int) -> int:
    """How many sockets listen on TCP `port`."""
    return len(listening_sockets(port))


async def wait_listening(process: Process, port: int, count: int) -> None:
    """Wait until `count` sockets listen on `port` (every worker or copy bound it)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while listeners(port) < count:
        if process.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"{process.name}: {listeners(port)} of {count} processes listen on {port}"
                f":\n{process.log_tail()}"
            )
        await asyncio.sleep(0.1)


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean; 0 for no values."""
    return sum(values) / len(values) if values else 0.0


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which `fraction` of `values` fall (nan for none)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: unwind like Ctrl+C, through the bench's cleanup."""
    raise KeyboardInterrupt


def new_request_id(run_id: str) -> str:
    """A request id of the run `run_id`: that id, then a random UUID's hex, so that the
    journal's writes spread over its indexes as users' random ids do (ids that sort together
    share index pages and cost the journal less: bench/README.md, "Request ids")."""
    return f"{run_id}-{uuid.uuid4().hex}"
