"""One orchestrator process per core: workers sharing the gRPC port, and their supervisor.

`Supervisor` starts N copies of a command (`python main.py` without
`--workers`), each an orchestrator with its own event loop and broker
connection, all on the one store, all listening on the same gRPC port: the
kernel spreads incoming connections among them (`SO_REUSEPORT`, as grpc's
own Python multiprocessing example does). Note that it spreads connections,
not calls: a client with one channel talks to one worker.

The supervisor restarts a worker that dies (after a pause that grows while
workers keep dying young), and on SIGTERM or SIGINT forwards SIGTERM to every
worker, waits for their graceful shutdown and exits. A worker that exits
with status 2 (a configuration error) stops them all: restarting cannot fix
it. With metrics on, workers write theirs to files in a directory of the
supervisor's (prometheus_client's multiprocess mode) and the supervisor
serves them all, summed, on the one metrics port; a dead worker's gauges
are dropped.

A worker knows it is one by `WORKER_ENV` (its index), which the supervisor
sets: it then binds the port with `SO_REUSEPORT`, serves no metrics of its
own, names itself in its log lines (`worker=INDEX/PID`) and in the
`x-orchestrator-worker` trailer of every application call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CONFIG_ERROR_STATUS",
    "METRICS_DIR_ENV",
    "WORKER_ENV",
    "WORKER_METADATA",
    "Supervisor",
    "Worker",
    "current_worker",
    "metrics_directory",
    "worker_count",
]

log = logging.getLogger("orchestrator.workers")

WORKER_ENV: Final = "ORCH_WORKER_INDEX"
"""Set by the supervisor in each worker's environment: the worker's index (0, 1, ...)."""
METRICS_DIR_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's multiprocess mode: where each worker writes its metrics."""
WORKER_METADATA: Final = "x-orchestrator-worker"
"""Trailer of every application call a worker answers: `INDEX/PID`."""
CONFIG_ERROR_STATUS: Final = 2
"""A worker's exit status for a configuration error: it is not restarted."""
RESTART_PAUSE_SECONDS: Final = 1.0
"""The pause before a dead worker is started again ..."""
MAX_RESTART_PAUSE_SECONDS: Final = 30.0
"""... doubled, up to this, for each worker that died within `YOUNG_SECONDS` of its start."""
YOUNG_SECONDS: Final = 10.0


@dataclass(frozen=True, slots=True)
class Worker:
    """This process as one of a supervisor's workers."""

    index: int
    pid: int

    def __str__(self) -> str:
        return f"{self.index}/{self.pid}"


def current_worker() -> Worker | None:
    """This process as a supervised worker; None when it runs on its own."""
    index = os.environ.get(WORKER_ENV)
    if not index:
        return None
    return Worker(int(index), os.getpid())


def worker_count(configured: int) -> int:
    """How many workers `workers: configured` means: 0 is one per core this process may use."""
    if configured > 0:
        return configured
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


@dataclass
class _Running:
    index: int
    process: asyncio.subprocess.Process
    started: float


class Supervisor:
    """Runs `count` copies of `argv` as workers; see the module docstring."""

    def __init__(
        self,
        argv: Sequence[str],
        count: int,
        *,
        env: Mapping[str, str] | None = None,
        stop_timeout: float = 30.0,
        metrics_dir: str | None = None,
    ) -> None:
        """`env` is every worker's environment (default: this process's), to which each gets
        `WORKER_ENV`; `stop_timeout` is how long workers get to stop after SIGTERM before
        they are killed; with `metrics_dir`, workers write their metrics there."""
        if count < 1:
            raise ValueError("a supervisor needs at least one worker")
        self._argv = list(argv)
        self.count = count
        self._env = dict(os.environ if env is None else env)
        self._stop_timeout = stop_timeout
        self._metrics_dir = metrics_dir
        self._workers: dict[int, _Running] = {}
        self._stopping = asyncio.Event()
        self._pause = RESTART_PAUSE_SECONDS
        self._status = 0
        self.restarts = 0
        """Workers started again after they died."""

    @property
    def pids(self) -> list[int]:
        """The running workers' process ids, by index."""
        return [self._workers[i].process.pid for i in sorted(self._workers)]

    def stop(self, status: int = 0) -> None:
        """Stop every worker (gracefully) and end `run`, which returns `status` unless a
        worker did not stop cleanly."""
        if not self._stopping.is_set():
            self._status = status
            self._stopping.set()

    async def run(self) -> int:
        """Start the workers, keep them running until SIGTERM or SIGINT (or `stop`), then
        stop them all; the exit status: 0 when every worker stopped cleanly."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.stop)
        try:
            log.info("supervising workers", extra={"workers": self.count})
            clean = await asyncio.gather(*(self._keep(index) for index in range(self.count)))
            return self._status if all(clean) else max(self._status, 1)
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    async def _keep(self, index: int) -> bool:
        """Keep worker `index` running, starting it again each time it dies, until the
        supervisor stops; whether it then stopped cleanly."""
        while True:
            running = await self._start(index)
            exited = asyncio.ensure_future(running.process.wait())
            stopping = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if self._stopping.is_set():
                return await self._stop_worker(running, exited)
            status = exited.result()
            del self._workers[index]
            self._forget_metrics(running.process.pid)
            lived = time.monotonic() - running.started
            log.warning(
                "worker died", extra={"worker": f"{index}/{running.process.pid}", "status": status}
            )
            if status == CONFIG_ERROR_STATUS:
                log.error("a worker's configuration is wrong: stopping every worker")
                self.stop(CONFIG_ERROR_STATUS)
                return True
            self._pause = (
                min(self._pause * 2, MAX_RESTART_PAUSE_SECONDS)
                if lived < YOUNG_SECONDS
                else RESTART_PAUSE_SECONDS
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._pause):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return True
            self.restarts += 1

    async def _start(self, index: int) -> _Running:
        env = {**self._env, WORKER_ENV: str(index)}
        if self._metrics_dir is not None:
            env[METRICS_DIR_ENV] = self._metrics_dir
        process = await asyncio.create_subprocess_exec(*self._argv, env=env)
        running = self._workers[index] = _Running(index, process, time.monotonic())
        log.info("worker started", extra={"worker": f"{index}/{process.pid}"})
        return running

    async def _stop_worker(self, worker: _Running, exited: asyncio.Future[int]) -> bool:
        """SIGTERM the worker and wait `stop_timeout` for it, then SIGKILL it; whether it
        stopped cleanly (exited 0, or died of the SIGTERM before it could handle it)."""
        name = f"{worker.index}/{worker.process.pid}"
        if not exited.done():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(self._stop_timeout):
                status = await exited
        except TimeoutError:
            log.error("worker did not stop in time: killed", extra={"worker": name})
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
            status = await worker.process.wait()
        self._workers.pop(worker.index, None)
        self._forget_metrics(worker.process.pid)
        # A worker still starting (no handler for SIGTERM yet) dies of it: it had nothing
        # to drain, so that is a clean stop too.
        clean = status in (0, -signal.SIGTERM)
        if not clean:
            log.warning("worker stopped", extra={"worker": name, "status": status})
        return clean

    def _forget_metrics(self, pid: int) -> None:
        if self._metrics_dir is None:
            return
        from prometheus_client import multiprocess

        # Its counters stay in the sums (they counted what happened); its gauges go.
        multiprocess.mark_process_dead(pid, self._metrics_dir)  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def metrics_directory() -> Iterator[str]:
    """A fresh directory for the workers' metrics files, removed afterwards."""
    path = tempfile.mkdtemp(prefix="orchestrator-metrics-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
