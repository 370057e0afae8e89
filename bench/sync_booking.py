"""Throughput of HandleSyncBooking: the framework against a hand-written baseline.

It starts the demo Order and Payment upstreams, ``python main.py`` (the
framework, on a temporary config that points at them) and
``bench/baseline_sync.py`` (the same two upstream calls in a bare grpc.aio
servicer), each as a subprocess on free ports. Then it loads the framework and
the baseline in turn (F, B, F, B by default) from this process: N concurrent
callers on one channel, each booking in a loop with a unique ``x-request-id``,
for a fixed time after a short warm-up whose calls are not counted.

It prints each run, the means, and as the very last line
``ratio=<framework mean throughput / baseline mean throughput>``. Taking the
means over alternated runs cancels the drift of a shared machine. A run with
failed calls says so loudly and the exit status is 1.

    .venv/bin/python bench/sync_booking.py [--seconds 10] [--concurrency 64]
        [--upstream-latency-ms 0] [--profile FILE]

``--profile FILE`` runs the orchestrator under cProfile (bench/profile_orchestrator.py)
and writes its stats to FILE (and a readable summary to FILE.txt); profiling
slows the framework, so the ratio of such a run is not a figure to report.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Final, Literal

import grpc
import uvloop
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

from pb import booking_pb2, booking_pb2_grpc  # noqa: E402

BENCH_DIR: Final = Path(__file__).resolve().parent
HOST: Final = "127.0.0.1"
UPSTREAM_TIMEOUT_SECONDS: Final = 3.0
"""The framework's and the baseline's deadline on each upstream call (app.yaml's value)."""
CALL_TIMEOUT_SECONDS: Final = 10.0
"""The load generator's deadline on each booking: a slow call is a latency, not an error."""
NOISY_FOREIGN_CPUS: Final = 0.25
"""Other processes busier than this (in CPUs, on average) make a run's figures noisy."""
STARTUP_TIMEOUT_SECONDS: Final = 30.0
STOP_TIMEOUT_SECONDS: Final = 5.0

Target = Literal["framework", "baseline"]


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


@dataclass
class RunResult:
    """The measured window of one run against one target."""

    target: Target
    number: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    """Seconds per successful call completed inside the window."""
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    """Failed calls completed inside the window, by status code."""
    warmup_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    calls_ok: int = 0
    """Successful calls over the whole run, warm-up and tail included."""
    server_cpu: float | None = None
    """CPU seconds the target's process used over the whole run (None off Linux)."""
    foreign_cpus: float | None = None
    """CPUs busy with processes other than the bench's own over the run, on average."""

    @property
    def cpu_per_booking(self) -> float | None:
        """Server CPU seconds per successful booking, over the whole run."""
        if self.server_cpu is None or not self.calls_ok:
            return None
        return self.server_cpu / self.calls_ok

    @property
    def throughput(self) -> float:
        """Successful bookings per second."""
        return len(self.latencies) / self.seconds

    def percentile(self, fraction: float) -> float:
        """The latency (seconds) below which `fraction` of successful calls fall."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def line(self) -> str:
        """`framework run 1: 1234 bookings/s p50=12.3ms p99=45.6ms errors=0`."""
        errors = sum(self.errors.values())
        detail = f" ({', '.join(f'{k}={v}' for k, v in sorted(self.errors.items()))})"
        return (
            f"{self.target} run {self.number}: {self.throughput:.0f} bookings/s"
            f" p50={self.percentile(0.50) * 1000:.1f}ms"
            f" p99={self.percentile(0.99) * 1000:.1f}ms"
            f" errors={errors}{detail + '  <<< !!! FAILED CALLS !!!' if errors else ''}"
        )


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


def start_process(name: str, argv: Sequence[str], log_dir: Path, env: dict[str, str]) -> Process:
    """Start `argv` from the repository root, its output to a file in `log_dir`."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log_file:
        popen = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
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


def framework_config(path: Path, port: int, order_port: int, payment_port: int) -> None:
    """Write app.yaml's keys for a run against separate upstreams, logging warnings only."""
    config = {
        "grpc": {"host": HOST, "port": port, "shutdown_grace_seconds": 2},
        "broker": {
            "url": "memory://",
            "topic_prefix": "booking.",
            "default_concurrency": 32,
            "topics": {
                "cancel_sync_booking": {"concurrency": 16},
                "cancel_async_booking": {"concurrency": 16},
            },
        },
        "upstreams": {
            "order": {"address": f"{HOST}:{order_port}"},
            "payment": {"address": f"{HOST}:{payment_port}"},
            "timeout_seconds": UPSTREAM_TIMEOUT_SECONDS,
        },
        "embedded_upstreams": {},
        "log_level": "WARNING",
        "log_format": "text",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


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


async def load(
    target_name: Target,
    number: int,
    address: str,
    *,
    run_id: str,
    concurrency: int,
    warmup: float,
    seconds: float,
) -> RunResult:
    """Book from `concurrency` callers on one channel for `warmup` + `seconds` seconds."""
    result = RunResult(target_name, number, seconds)
    request = booking_pb2.BookingRequest(ProductID=1)
    clock = time.perf_counter
    async with grpc.aio.insecure_channel(address) as channel:
        stub = booking_pb2_grpc.BookingServiceStub(channel)
        await channel.channel_ready()
        window_start = clock() + warmup
        window_end = window_start + seconds

        async def caller(worker: int) -> None:
            call = 0
            while (started := clock()) < window_end:
                metadata = (("x-request-id", f"{run_id}-{worker}-{call}"),)
                call += 1
                try:
                    await stub.HandleSyncBooking(
                        request, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS
                    )
                except grpc.aio.AioRpcError as exc:
                    done = clock()
                    if window_start <= done <= window_end:
                        result.errors[exc.code().name] += 1
                    elif done < window_start:
                        result.warmup_errors[exc.code().name] += 1
                    continue
                done = clock()
                result.calls_ok += 1
                if window_start <= done <= window_end:
                    result.latencies.append(done - started)

        await asyncio.gather(*(caller(worker) for worker in range(concurrency)))
    return result


async def bench(
    args: argparse.Namespace, processes: dict[str, Process], addresses: dict[str, str]
) -> list[RunResult]:
    """Wait for every server, then run the targets in turn."""
    await asyncio.gather(
        *(wait_serving(process, addresses[name]) for name, process in processes.items())
    )
    pids = [os.getpid(), *(process.popen.pid for process in processes.values())]
    invocation = uuid.uuid4().hex[:8]  # request ids never repeat across invocations either
    results: list[RunResult] = []
    for pair in range(1, args.pairs + 1):
        target: Target
        for target in ("framework", "baseline"):
            before = CpuSnapshot.take(pids)
            result = await load(
                target,
                pair,
                addresses[target],
                run_id=f"{invocation}{target[0]}{pair}",
                concurrency=args.concurrency,
                warmup=args.warmup,
                seconds=args.seconds,
            )
            after = CpuSnapshot.take(pids)
            result.server_cpu = before.used(after, processes[target].popen.pid)
            result.foreign_cpus = before.foreign_cpus(after)
            print(result.line(), flush=True)
            if result.foreign_cpus is not None and result.foreign_cpus > NOISY_FOREIGN_CPUS:
                print(
                    f"  note: other processes kept {result.foreign_cpus:.1f} of"
                    f" {os.cpu_count()} CPUs busy during this run: its figures are noisy",
                    flush=True,
                )
            if result.warmup_errors:
                print(
                    f"  !!! {sum(result.warmup_errors.values())} failed calls during the"
                    f" warm-up: {dict(result.warmup_errors)}",
                    flush=True,
                )
            results.append(result)
    return results


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(results: Sequence[RunResult]) -> int:
    """Print the means, any error warning, and `ratio=` last; return the exit status."""
    means: dict[Target, float] = {}
    cpu_means: dict[Target, float] = {}
    target: Target
    for target in ("framework", "baseline"):
        runs = [result for result in results if result.target == target]
        means[target] = _mean([result.throughput for result in runs])
        cpu = [c for result in runs if (c := result.cpu_per_booking) is not None]
        cpu_means[target] = _mean(cpu)
        p99s = ", ".join(f"{result.percentile(0.99) * 1000:.1f}" for result in runs)
        cpu_text = f", server cpu {cpu_means[target] * 1e6:.0f}us/booking" if cpu else ""
        print(f"{target} mean: {means[target]:.0f} bookings/s (p99 per run: {p99s} ms{cpu_text})")
    if cpu_means["framework"] and cpu_means["baseline"]:
        print(
            "server cpu per booking, framework/baseline:"
            f" {cpu_means['framework'] / cpu_means['baseline']:.2f}"
            " (steadier than throughput on a shared machine)"
        )
    failed = sum(sum(result.errors.values()) for result in results)
    status = 0
    if failed:
        print(f"!!! {failed} CALLS FAILED: the throughputs above are not comparable !!!")
        status = 1
    ratio = means["framework"] / means["baseline"] if means["baseline"] else 0.0
    print(f"ratio={ratio:.2f}")
    return status


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="HandleSyncBooking throughput: the framework against a hand-written baseline."
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per run")
    parser.add_argument("--warmup", type=float, default=1.5, help="uncounted time before each run")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent callers")
    parser.add_argument("--pairs", type=int, default=2, help="framework+baseline pairs of runs")
    parser.add_argument(
        "--upstream-latency-ms", type=float, default=0.0, help="delay added by each upstream call"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="run the orchestrator under cProfile and write its stats to FILE",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.concurrency < 1 or args.pairs < 1:
        parser.error("--seconds and --concurrency and --pairs must be positive")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl+C, through the cleanup


def main(argv: Sequence[str] | None = None) -> int:
    """Start the servers, run the bench, always stop the servers."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    order_port, payment_port, framework_port, baseline_port = free_ports(4)
    addresses = {
        "order": f"{HOST}:{order_port}",
        "payment": f"{HOST}:{payment_port}",
        "framework": f"{HOST}:{framework_port}",
        "baseline": f"{HOST}:{baseline_port}",
    }
    python = sys.executable
    latency = ["--latency-ms", str(args.upstream_latency_ms)]
    log_dir = Path(tempfile.mkdtemp(prefix="sync-booking-bench-"))
    config_path = log_dir / "app.yaml"
    framework_config(config_path, framework_port, order_port, payment_port)
    framework_argv = [python, "main.py"]
    if args.profile is not None:
        profile_path = args.profile.resolve()
        framework_argv = [python, str(BENCH_DIR / "profile_orchestrator.py"), str(profile_path)]
    env = child_environment()
    processes: dict[str, Process] = {}
    try:
        for service, port in (("order", order_port), ("payment", payment_port)):
            processes[service] = start_process(
                service,
                [
                    python,
                    "main.py",
                    "upstream",
                    service,
                    "--port",
                    str(port),
                    "--db",
                    ":memory:",
                    *latency,
                ],
                log_dir,
                env,
            )
        processes["framework"] = start_process(
            "framework", framework_argv, log_dir, child_environment(ORCH_CONFIG=str(config_path))
        )
        processes["baseline"] = start_process(
            "baseline",
            [
                python,
                str(BENCH_DIR / "baseline_sync.py"),
                "--host",
                HOST,
                "--port",
                str(baseline_port),
                "--order",
                addresses["order"],
                "--payment",
                addresses["payment"],
                "--timeout-seconds",
                str(UPSTREAM_TIMEOUT_SECONDS),
            ],
            log_dir,
            env,
        )
        print(
            f"concurrency={args.concurrency} seconds={args.seconds:g} warmup={args.warmup:g}"
            f" upstream_latency_ms={args.upstream_latency_ms:g} cpus={os.cpu_count()}",
            flush=True,
        )
        results = uvloop.run(bench(args, processes, addresses))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    finally:
        # The servers first, so the upstreams see no call after they stop.
        stop_processes([processes[name] for name in ("framework", "baseline") if name in processes])
        stop_processes([processes[name] for name in ("order", "payment") if name in processes])
        shutil.rmtree(log_dir, ignore_errors=True)
    if args.profile is not None:
        print(f"orchestrator profile: {args.profile} (summary: {args.profile}.txt)")
    return summarize(results)


if __name__ == "__main__":
    sys.exit(main())
