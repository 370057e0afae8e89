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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final, Literal

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT: Final = Path(__file__).resolve().parent.parent
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
            {pid: process_cpu_seconds(pid) for pid in pids},
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
    store: str = "memory",
    console_port: int = 0,
) -> None:
    """Write app.yaml's keys for a run against separate upstreams, logging warnings only.

    `store` is `memory` (the journal in process memory: nothing written to disk;
    `none` is another name for it), `sqlite` (a fresh SQLite file beside the
    config, as in the embedded default), or a store URL. With `console_port`
    the saga console is served on it (off otherwise).
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
