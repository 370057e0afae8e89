"""Saga throughput of HandleAsyncBooking on a broker: the framework against a hand-written baseline.

It starts, as subprocesses on free ports: the demo Order upstream
(``main.py upstream order --db :memory:``), the demo Payment upstream wrapped
by ``bench/payment_probe.py`` (the same server, reporting each recorded
payment's request id and CLOCK_MONOTONIC time on a pipe to this process), the
framework (``python main.py`` on a temporary config: the broker of
``--broker`` (default ``$RABBITMQ_URL``), a unique topic prefix,
deployment/local/app.yaml's broker settings, the two upstreams) and the same
saga by hand with the broker's own client, its own unique prefix, same prefetch
and topology: ``bench/baseline_async.py`` on aio-pika for an ``amqp://``
broker, ``bench/baseline_async_nats.py`` on nats-py for a ``nats://`` one.

Then it loads the framework and the baseline in turn (F, B, F, B by default)
from this process: N callers on one channel, each in a loop submitting a saga
(HandleAsyncBooking, ProductID 1, a unique ``x-request-id``) and waiting until
the probe reports its payment, so N sagas are in flight. A saga's latency runs
from the start of its submit to its payment being recorded; its completion time
is the probe's timestamp. After a short uncounted warm-up, the run's figure is
the number of sagas completed inside the measured window over the window's
length. At the end of the window callers submit no more and wait for their
sagas (the drain): one that fails to complete within ``--completion-timeout``
counts as never completed.

It prints each run, the means, and as the very last line
``ratio=<framework mean sagas/s / baseline mean sagas/s>``. Failed submits and
sagas that never completed are flagged loudly and make the exit status 1. The
queues and exchanges (or streams) of both prefixes are deleted at the end, whatever happens.

    .venv/bin/python bench/async_booking.py [--seconds 8] [--concurrency 64 | --rate R]
        [--upstream-latency-ms 0] [--workers 1] [--profile FILE]
        [--broker nats://127.0.0.1:4222]

``--workers N``: as for sync_booking.py (bench/README.md, Workers).

``--rate R`` loads each target open-loop instead: R submits a second on a fixed
schedule, each saga then awaited from the probe as above (bench/_openloop.py;
bench/README.md, Open loop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

import topic as booking_topics  # noqa: E402
from bench._broker import (  # noqa: E402
    Topology,
    baseline_options,
    broker_settings,
    framework_stream,
    is_nats,
    rabbitmq_layout,
)
from bench._openloop import (  # noqa: E402
    OpenLoopRun,
    offer,
    timed_call,
)
from bench._runs import Load, Run, add_run_options, check_run_options  # noqa: E402
from bench._stack import Bench, RunOne, pairs, run_bench, runner, upstream_argv  # noqa: E402
from bench.baseline_async_nats import stream_name as baseline_stream_name  # noqa: E402
from bench.common import (  # noqa: E402
    BENCH_DIR,
    DEFAULT_RABBITMQ_URL,
    Process,
    Target,
    add_console_option,
    add_journaled_baseline_option,
    add_store_option,
    add_workers_option,
    booking_stubs,
    new_request_id,
    percentile,
    resolve_workers,
)
from pb import booking_pb2  # noqa: E402


@dataclass
class RunResult(Run):
    """One closed-loop run against one target."""

    submit_latencies: list[float] = field(default_factory=list)
    """HandleAsyncBooking call durations of the sagas completed inside the window."""
    unexpected: int = 0
    """Payments the probe reported that no caller was waiting for (duplicates, late ones)."""

    @property
    def throughput(self) -> float:
        """Sagas completed inside the window per second."""
        return len(self.latencies) / self.seconds

    def line(self) -> str:
        """`framework run 1: 812 sagas/s p50=70.1ms p99=120.3ms submit_p50=9.0ms errors=0`."""
        text = (
            f"{self.target} run {self.number}: {self.throughput:.0f} sagas/s"
            f" p50={percentile(self.latencies, 0.50) * 1000:.1f}ms"
            f" p99={percentile(self.latencies, 0.99) * 1000:.1f}ms"
            f" submit_p50={percentile(self.submit_latencies, 0.50) * 1000:.1f}ms"
            f" errors={sum(self.errors.values())} never_completed={self.never_completed}"
        )
        if self.failed:
            detail = ", ".join(f"{code}={count}" for code, count in sorted(self.errors.items()))
            text += (
                f" ({detail})  <<< !!! FAILED SAGAS !!!" if detail else "  <<< !!! LOST SAGAS !!!"
            )
        return text

    def notes(self) -> list[str]:
        """A note on payments nobody waited for."""
        if not self.unexpected:
            return []
        return [
            f"  note: {self.unexpected} payments nobody waited for"
            " (a redelivered hop, or a saga completed after its timeout)"
        ]


class CompletionFeed(asyncio.Protocol):
    """Reads the probe's `<request id> <monotonic time>` lines and wakes the sagas' callers."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[float]] = {}
        self._buffer = b""
        self._lost: Exception | None = None
        self.closing = False
        """Set before closing the pipe on purpose: waiting callers are then cancelled quietly."""
        self.unexpected = 0
        """Reports nobody waited for: a second payment of a saga, or one after its timeout."""

    def expect(self, request_id: str) -> asyncio.Future[float]:
        """A future of `request_id`'s completion time; register it before submitting."""
        if self._lost is not None:
            raise self._lost
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        return future

    def forget(self, request_id: str) -> None:
        """Stop waiting for `request_id` (its submit failed or it timed out)."""
        self._waiting.pop(request_id, None)

    def data_received(self, data: bytes) -> None:
        """Resolve the futures of every complete line."""
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            request_id, _, stamp = line.decode().rpartition(" ")
            future = self._waiting.pop(request_id, None)
            if future is None or future.done():
                self.unexpected += 1
            else:
                future.set_result(float(stamp))

    def connection_lost(self, exc: Exception | None) -> None:
        """The pipe closed: unless on purpose, the probe died, so fail every waiting caller."""
        self._lost = RuntimeError(f"the payment probe's pipe closed ({exc!r})")
        for future in self._waiting.values():
            if self.closing:
                future.cancel()
            elif not future.done():
                future.set_exception(self._lost)
                future.exception()  # the first caller to see it fails the bench; no GC warnings
        self._waiting.clear()


async def load_sagas(
    result: RunResult, address: str, feed: CompletionFeed, run_id: str, load: Load
) -> None:
    """Run `load.concurrency` submit-and-wait loops over `load.channels` channels
    (connections) for the warm-up + the window."""
    request = booking_pb2.BookingRequest(ProductID=1)
    clock = time.monotonic  # CLOCK_MONOTONIC, the probe's clock
    unexpected_before = feed.unexpected
    async with booking_stubs(address, load.channels) as stubs:
        window_start = clock() + load.warmup
        window_end = window_start + result.seconds

        async def caller(worker: int) -> None:
            stub = stubs[worker % len(stubs)]
            while (started := clock()) < window_end:
                request_id = new_request_id(run_id)
                completion = feed.expect(request_id)  # before submitting: it may finish first
                try:
                    await stub.HandleAsyncBooking(
                        request,
                        metadata=(("x-request-id", request_id),),
                        timeout=load.call_timeout,
                    )
                    submitted = clock()
                    finished = await asyncio.wait_for(completion, load.completion_timeout)
                except grpc.aio.AioRpcError as exc:
                    result.errors[exc.code().name] += 1
                    continue
                except TimeoutError:
                    result.never_completed += 1
                    continue
                finally:
                    feed.forget(request_id)  # a no-op once completed
                result.completed += 1
                if window_start <= finished <= window_end:
                    result.latencies.append(finished - started)
                    result.submit_latencies.append(submitted - started)

        await asyncio.gather(*(caller(worker) for worker in range(load.concurrency)))
    result.unexpected = feed.unexpected - unexpected_before


async def offer_sagas(
    run: OpenLoopRun, address: str, feed: CompletionFeed, run_id: str, load: Load
) -> None:
    """An open-loop run: submit sagas on schedule, each then awaited from the probe."""
    completions: list[float] = []
    run.completions = completions
    async with booking_stubs(address, load.channels) as stubs:

        async def call(k: int, due: float, counted: bool) -> None:
            request_id = new_request_id(run_id)
            completion = feed.expect(request_id)  # before submitting: it may finish first
            try:
                if not await timed_call(
                    run,
                    stubs[k % len(stubs)].HandleAsyncBooking,
                    request_id,
                    due,
                    counted=counted,
                    call_timeout=load.call_timeout,
                ):
                    return
                finished = await asyncio.wait_for(completion, load.completion_timeout)
            except TimeoutError:
                run.never_completed += counted
                return
            finally:
                feed.forget(request_id)  # a no-op once completed
            run.completed += 1
            run.completed_in_window += run.in_window(finished)
            if counted:
                completions.append(finished - due)

        await offer(run, call, load)


def saga_runner(
    args: argparse.Namespace,
    address_of: Mapping[str, str],
    feed: CompletionFeed,
    invocation: str,
    work: Mapping[Target, list[str]],
) -> RunOne:
    """`runner` of sagas submitted with HandleAsyncBooking and awaited from the probe."""
    load = Load.of(args)

    async def closed_loop(target: Target, pair: int, run_id: str) -> Run:
        result = RunResult(target, pair, args.seconds)
        await load_sagas(result, address_of[target], feed, run_id, load)
        return result

    async def open_loop(run: OpenLoopRun, run_id: str) -> None:
        await offer_sagas(run, address_of[run.target], feed, run_id, load)

    return runner(args, invocation, open_loop, closed_loop, work)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="HandleAsyncBooking sagas/s: the framework against a hand-written baseline."
    )
    add_store_option(parser)
    add_journaled_baseline_option(parser)
    add_console_option(parser)
    add_workers_option(parser)
    add_run_options(parser, seconds=8.0, concurrency_help="sagas in flight (callers)")
    parser.add_argument(
        "--completion-timeout",
        type=float,
        default=10.0,
        help="seconds after its submit before a saga counts as never completed",
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="amqp://... (default: $RABBITMQ_URL, else local RabbitMQ) or nats://... (JetStream)",
    )
    args = parser.parse_args(argv)
    check_run_options(parser, args)
    if args.completion_timeout <= 0:
        parser.error("--completion-timeout must be positive")
    resolve_workers(parser, args)
    args.url = args.broker or os.environ.get("RABBITMQ_URL") or DEFAULT_RABBITMQ_URL
    if args.journaled_baseline and is_nats(args.url):
        parser.error("--journaled-baseline: only the RabbitMQ baseline keeps a journal")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Start the servers, run the bench, always stop the servers and delete the queues."""
    args = parse_args(argv)
    url = args.url
    invocation = uuid.uuid4().hex[:8]  # in queue names and request ids: never reused
    prefixes = (f"bench.{invocation}.f.", f"bench.{invocation}.b.")  # framework, baseline
    broker = broker_settings(url, prefixes[0])
    hops = (booking_topics.CREATE_ORDER, booking_topics.CREATE_PAYMENT)
    if is_nats(url):
        streams = [framework_stream(url, prefixes[0]), baseline_stream_name(prefixes[1])]
        topology = Topology(streams=streams)
        work: dict[Target, list[str]] = {"framework": streams[:1], "baseline": streams[1:]}
    else:
        topology, work = rabbitmq_layout(prefixes, hops)

    @contextlib.asynccontextmanager
    async def session(
        processes: Mapping[str, Process], addresses: Mapping[str, str]
    ) -> AsyncIterator[RunOne]:
        probe_stdout = processes["payment"].popen.stdout
        if probe_stdout is None:
            raise RuntimeError("the payment probe has no stdout pipe")
        transport, feed = await asyncio.get_running_loop().connect_read_pipe(
            CompletionFeed, probe_stdout
        )
        try:
            yield saga_runner(args, addresses, feed, invocation, work)
        finally:
            feed.closing = True
            transport.close()

    def baseline(ports: Mapping[str, int]) -> list[str]:
        script = "baseline_async_nats.py" if is_nats(url) else "baseline_async.py"
        options = baseline_options(url, prefixes[1], broker, hops)
        options["--processes"] = str(args.workers)
        return [str(BENCH_DIR / script), *upstream_argv(ports), *pairs(options)]

    return run_bench(
        args,
        Bench(
            "async-booking",
            broker,
            url,
            topology,
            baseline,
            session,
            probe=True,
            unit="sagas",
            header=f"prefixes={','.join(prefixes)}",
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
