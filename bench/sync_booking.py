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

``--rate R`` loads each target open-loop instead: R calls a second on a fixed
schedule, whatever became of the earlier ones (bench/_openloop.py; bench/README.md,
Open loop).

    .venv/bin/python bench/sync_booking.py [--seconds 10] [--concurrency 64 | --rate R]
        [--upstream-latency-ms 0] [--workers 1] [--profile FILE]

``--workers N`` runs the framework as ``main.py --workers N`` and the baseline as
N copies on its port, and spreads the load over several connections (see
bench/README.md, Workers).

``--profile FILE`` runs the orchestrator under cProfile (bench/profile_orchestrator.py)
and writes its stats to FILE (and a readable summary to FILE.txt); profiling
slows the framework, so the ratio of such a run is not a figure to report.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

from bench._broker import Topology  # noqa: E402
from bench._runs import add_run_options, check_run_options  # noqa: E402
from bench._stack import Bench, plain_session, rpc_runner, run_bench, upstream_argv  # noqa: E402
from bench.common import (  # noqa: E402
    BENCH_DIR,
    DEFAULT_RABBITMQ_URL,
    MEMORY_BROKER,
    UPSTREAM_TIMEOUT_SECONDS,
    add_console_option,
    add_journaled_baseline_option,
    add_store_option,
    add_workers_option,
    framework_topology,
    resolve_workers,
)

METHOD: Final = "HandleSyncBooking"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="HandleSyncBooking throughput: the framework against a hand-written baseline."
    )
    add_store_option(parser)
    add_journaled_baseline_option(parser)
    add_console_option(parser)
    add_workers_option(parser)
    add_run_options(parser, seconds=10.0, concurrency_help="concurrent callers")
    args = parser.parse_args(argv)
    check_run_options(parser, args)
    resolve_workers(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Start the servers, run the bench, always stop the servers."""
    args = parse_args(argv)
    invocation = uuid.uuid4().hex[:8]  # request ids never repeat across invocations either
    # Workers share a broker too (a sync booking publishes only its rollback): RabbitMQ.
    url = os.environ.get("RABBITMQ_URL") or DEFAULT_RABBITMQ_URL
    prefix = f"bench.{invocation}.s."
    shared = args.workers > 1
    broker = {**MEMORY_BROKER, "url": url, "topic_prefix": prefix}
    queues, exchanges = framework_topology(prefix)

    return run_bench(
        args,
        Bench(
            name="sync-booking",
            broker=broker if shared else MEMORY_BROKER,
            url=url if shared else None,
            topology=Topology(queues, exchanges),
            baseline=lambda ports: [
                str(BENCH_DIR / "baseline_sync.py"),
                *upstream_argv(ports),
                "--timeout-seconds",
                str(UPSTREAM_TIMEOUT_SECONDS),
                "--processes",
                str(args.workers),
            ],
            session=plain_session(
                lambda addresses: rpc_runner(args, addresses, invocation, METHOD)
            ),
            header=f"prefix={prefix}" if shared else "",
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
