"""HandleThrottlingBooking on RabbitMQ: the framework against a hand-written baseline.

A throttling call runs the async booking saga through the broker, hop by hop
at the pace its topics' concurrency allows, and answers with the saga's
outcome. It starts, as subprocesses on free ports: the demo Order and Payment
upstreams, the framework (``python main.py`` on a temporary config:
deployment/local/app.yaml's broker section, so ``throttling_create_order`` and
``throttling_create_payment`` at concurrency 8 and the first at
``max_length`` 1000, on ``$RABBITMQ_URL`` with a unique topic prefix; its
``sagas`` section, so ``max_in_flight`` 128 and a 180 s wait at most) and
``bench/baseline_throttling.py``: the same flow by hand on aio-pika, with the
same topology, confirms, prefetch, queue length limit and calls in progress at
most (the async baseline's code), its own prefix.

Then it loads the framework and the baseline in turn (F, B, F, B by default)
from this process: N callers on one channel, each in a loop calling
HandleThrottlingBooking (ProductID 1, a unique ``x-request-id``) and waiting
for its answer, which comes at the saga's end; so N sagas are in flight, and
a call's latency is its saga's. After a short uncounted warm-up, the run's
figure is the calls answered OK inside the measured window over its length.
Before anything starts, the framework's admission settings are checked not to
refuse at that concurrency (a refused call would be an error here).

It prints each run (with each process's CPU), the means with server and
broker CPU per saga, and as the very last line ``ratio=<framework mean
sagas/s / baseline mean sagas/s>``. Failed calls, and messages left in a
queue at the end, are flagged and make the exit status 1; the queues and
exchanges of both prefixes are deleted at the end, whatever happens.

``--rate R`` loads each target open-loop instead (bench/_openloop.py): R calls a
second on a fixed schedule, whatever became of the earlier ones. Past the
targets' capacity the first queue fills up to its ``max_length`` and both refuse
the excess with RESOURCE_EXHAUSTED, which keeps the answered calls' latency
bounded (about ``max_length`` over the throughput); bench/README.md, Open loop.

    .venv/bin/python bench/throttling_booking.py [--seconds 8] [--concurrency 64 | --rate R]
        [--upstream-latency-ms 0] [--store sqlite] [--call-timeout 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import yaml

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

from bench._broker import (  # noqa: E402
    LOCAL_CONFIG,
    baseline_options,
    broker_settings,
    concurrency_of,
    is_nats,
    rabbitmq_layout,
)
from bench._runs import add_run_options, check_run_options  # noqa: E402
from bench._stack import (  # noqa: E402
    Bench,
    pairs,
    plain_session,
    rpc_runner,
    run_bench,
    upstream_argv,
)
from bench.baseline_throttling import NAMES as BASELINE_NAMES  # noqa: E402
from bench.common import (  # noqa: E402
    BENCH_DIR,
    DEFAULT_RABBITMQ_URL,
    add_console_option,
    add_journaled_baseline_option,
    add_store_option,
)
from facade import THROTTLING_BOOKING  # noqa: E402
from orchestrator.config import BrokerSettings, SagaSettings  # noqa: E402
from topic import THROTTLING_CREATE_ORDER, THROTTLING_CREATE_PAYMENT  # noqa: E402

METHOD: Final = "HandleThrottlingBooking"
HOPS: Final = (THROTTLING_CREATE_ORDER, THROTTLING_CREATE_PAYMENT)
SAGAS_SECTION: Final[dict[str, Any]] = yaml.safe_load(LOCAL_CONFIG.read_text(encoding="utf-8"))[
    "sagas"
]
SAGAS: Final = SagaSettings.model_validate(SAGAS_SECTION)
"""The framework's `sagas` settings in the bench: deployment/local/app.yaml's (ThrottlingBooking's
`max_in_flight`)."""


def admission(broker: Mapping[str, Any]) -> tuple[int, int | None]:
    """The framework's limits on ThrottlingBooking calls here: (max_in_flight, 0 for none;
    max_length of its first topic, None for none)."""
    settings = BrokerSettings.model_validate(broker)
    return SAGAS.max_in_flight_of(THROTTLING_BOOKING), settings.max_length_of(HOPS[0])


def check_admission(args: argparse.Namespace, broker: Mapping[str, Any]) -> str | None:
    """Why the framework would refuse calls at the closed loop's concurrency, or None.

    N callers keep at most N calls in progress and N messages in the first queue."""
    max_in_flight, max_length = admission(broker)
    if args.rate:
        return None  # refusals past capacity are what an open-loop run shows
    if max_in_flight and args.concurrency > max_in_flight:
        return f"--concurrency {args.concurrency} exceeds max_in_flight {max_in_flight}"
    if max_length is not None and args.concurrency > max_length:
        return f"--concurrency {args.concurrency} exceeds {HOPS[0]}'s max_length {max_length}"
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="HandleThrottlingBooking sagas/s: the framework against a hand-written "
        "baseline, on RabbitMQ."
    )
    add_store_option(parser)
    add_journaled_baseline_option(parser)
    add_console_option(parser)
    add_run_options(parser, seconds=8.0, concurrency_help="callers, so sagas in flight")
    args = parser.parse_args(argv)
    check_run_options(parser, args)
    # One process a side: the baseline's waiting calls and its consumers share one process.
    args.workers = 1
    args.url = os.environ.get("RABBITMQ_URL") or DEFAULT_RABBITMQ_URL
    if is_nats(args.url):
        parser.error("the throttling bench runs on RabbitMQ (amqp://)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Start the servers, run the bench, always stop the servers and delete the queues."""
    args = parse_args(argv)
    invocation = uuid.uuid4().hex[:8]  # in queue names and request ids: never reused
    prefixes = (f"bench.{invocation}.f.", f"bench.{invocation}.b.")  # framework, baseline
    broker = broker_settings(args.url, prefixes[0])
    if refusal := check_admission(args, broker):
        print(f"bench failed: the framework would refuse calls: {refusal}", file=sys.stderr)
        return 2
    assert BASELINE_NAMES == HOPS  # the baseline's queues are named after the topics
    topology, work = rabbitmq_layout(prefixes, HOPS)
    max_in_flight, max_length = admission(broker)

    def baseline(ports: Mapping[str, int]) -> list[str]:
        options = baseline_options(args.url, prefixes[1], broker, HOPS)
        options["--max-wait-seconds"] = str(SAGAS.max_wait_of(THROTTLING_BOOKING))
        options["--max-in-flight"] = str(max_in_flight)
        if max_length is not None:
            options["--max-length"] = str(max_length)
        return [str(BENCH_DIR / "baseline_throttling.py"), *upstream_argv(ports), *pairs(options)]

    return run_bench(
        args,
        Bench(
            name="throttling-booking",
            broker=broker,
            sagas=SAGAS_SECTION,
            url=args.url,
            topology=topology,
            baseline=baseline,
            session=plain_session(
                lambda addresses: rpc_runner(
                    args, addresses, invocation, METHOD, unit="sagas", work=work
                )
            ),
            unit="sagas",
            header=f"admission: max_in_flight={max_in_flight or 'none'}"
            f" {HOPS[0]}.max_length={max_length or 'none'}"
            f" prefetch={'/'.join(str(concurrency_of(broker, hop)) for hop in HOPS)}"
            f" prefixes={','.join(prefixes)}",
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
