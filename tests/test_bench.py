"""Smoke tests of the booking benches: each script, closed loop and open loop, end to end.

Every case runs a bench as users do (`python bench/<script>.py`, a subprocess
with a hard timeout) for one tiny pair of runs, so the whole file takes about a
minute: its figures are never judged, only that the bench ran both targets,
printed its summary and ended with status 0 (no failed call, no lost saga, no
message left, a load generator that kept its schedule), and that the broker
benches deleted their queues. The broker is the benches' own (`$RABBITMQ_URL`,
else the local RabbitMQ), not a fixture's.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aio_pika
import aiormq
import pytest

from bench._broker import rabbitmq_layout
from bench._journal import Journal, journal_summary
from bench._runs import Run, summarize_closed
from bench.common import DEFAULT_RABBITMQ_URL
from topic import CREATE_ORDER, CREATE_PAYMENT, THROTTLING_CREATE_ORDER, THROTTLING_CREATE_PAYMENT

pytestmark = [pytest.mark.broker, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parent.parent
BROKER_URL = os.environ.get("RABBITMQ_URL") or DEFAULT_RABBITMQ_URL
HARD_TIMEOUT_SECONDS = 100.0
"""A bench still running then is stopped (SIGTERM: it stops its servers, deletes its queues)."""
TINY = ["--seconds", "1", "--warmup", "0.2", "--pairs", "1"]
RATE = 40
SPY_ATTEMPTS = 3
"""Runs of the py-spy case: py-spy itself may die of a signal now and then (it reads the
process without stopping it); the bench then says so, and the case runs it again."""
HOPS = {
    "async": (CREATE_ORDER, CREATE_PAYMENT),
    "throttling": (THROTTLING_CREATE_ORDER, THROTTLING_CREATE_PAYMENT),
}
"""The saga's queues of each broker bench (both targets name them after the topics)."""


def run_bench(script: str, *args: str) -> str:
    """Run `bench/<script>.py` with `args`; its output, once it exited with status 0."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / f"{script}.py"), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=HARD_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        pytest.fail(f"{script} {args} still ran after {HARD_TIMEOUT_SECONDS:g}s:\n{output}")
    assert process.returncode == 0, f"{script} {args} exited {process.returncode}:\n{output}"
    return output


def usage_error(script: str, *args: str) -> str:
    """What `bench/<script>.py` with `args` says on stderr, once it refused them (status 2)."""
    refused = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{script}.py"), *args],
        cwd=ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2, refused
    return refused.stderr


async def queues_left(prefixes: tuple[str, str], hops: tuple[str, str]) -> list[str]:
    """The queues of both targets' topologies that still exist."""
    topology, _ = rabbitmq_layout(prefixes, hops)
    return await existing(topology.queues)


async def existing(queues: list[str]) -> list[str]:
    """Those of `queues` that exist on the benches' RabbitMQ."""
    left = []
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        for queue in queues:
            channel = await connection.channel()
            try:
                await channel.declare_queue(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                continue  # the failed declare closed the channel
            left.append(queue)
            await channel.close()
    return left


def check_cleaned_up(script: str, output: str) -> None:
    """A broker bench deleted the queues of both its prefixes (named in its first line)."""
    if script not in HOPS:
        return
    found = re.search(r" prefixes=(\S+),(\S+)", output.splitlines()[0])
    assert found, output
    prefixes = (found.group(1), found.group(2))
    assert asyncio.run(queues_left(prefixes, HOPS[script])) == []


@pytest.mark.parametrize("script", ["sync_booking", "async_booking", "throttling_booking"])
def test_closed_loop(script: str) -> None:
    """Both targets ran and the summary ends with the ratio of their throughputs."""
    output = run_bench(script, *TINY, "--concurrency", "8")
    lines = output.splitlines()
    unit = "bookings" if script == "sync_booking" else "sagas"
    for target in ("framework", "baseline"):
        run = next(line for line in lines if line.startswith(f"{target} run 1: "))
        assert re.match(rf"{target} run 1: \d+ {unit}/s p50=[\d.]+ms p99=[\d.]+ms", run), run
        assert any(line.startswith(f"{target} mean: ") for line in lines), output
    assert any(line.startswith("  cpus: bench ") for line in lines), output
    ratio = re.fullmatch(r"ratio=(\d+\.\d\d)", lines[-1])
    assert ratio and float(ratio.group(1)) > 0, output
    check_cleaned_up(script.removesuffix("_booking"), output)


@pytest.mark.parametrize("script", ["sync_booking", "async_booking", "throttling_booking"])
def test_open_loop(script: str) -> None:
    """At a rate well under capacity both targets answer what they are offered, on schedule,
    and the summary compares what they answered, not an invented ratio."""
    output = run_bench(script, *TINY, "--rate", str(RATE))
    lines = output.splitlines()
    assert lines[0].startswith(f"rate={RATE}/s call_timeout=10 "), output
    for target in ("framework", "baseline"):
        run = next(line for line in lines if line.startswith(f"{target} run 1: "))
        figures = re.match(
            rf"{target} run 1: offered (\d+)/s answered (\d+)/s refused 0/s errors=0"
            r" latency p50=[\d.]+ms p90=[\d.]+ms p99=[\d.]+ms max=[\d.]+ms$",
            run,
        )
        assert figures, run
        assert RATE * 0.8 <= int(figures.group(1)) <= RATE * 1.2, run
        assert int(figures.group(2)) >= RATE / 2, run
    assert sum(line.startswith(f"  schedule: asked {RATE}/s") for line in lines) == 2, output
    what = "completed" if script == "async_booking" else "answered"
    if what == "completed":
        completed = [line for line in lines if re.match(r"  sagas: completed \d+/s, ", line)]
        assert len(completed) == 2, output
    assert any(line.startswith(f"{what}/s framework/baseline: ") for line in lines), output
    ratio = re.fullmatch(rf"{what}_ratio=(\d+\.\d\d)", lines[-1])
    assert ratio and float(ratio.group(1)) > 0, output
    check_cleaned_up(script.removesuffix("_booking"), output)


def test_py_spy_samples_the_framework_and_the_baseline_during_their_first_measured_runs(
    tmp_path: Path,
) -> None:
    """`--py-spy FILE` leaves py-spy's collapsed stacks of the orchestrator's event loop in
    FILE and its busiest functions in FILE.txt, and the baseline's in FILE.baseline(.txt)."""
    profile = tmp_path / "sync.spy"
    for _ in range(SPY_ATTEMPTS):
        output = run_bench("sync_booking", *TINY, "--concurrency", "8", "--py-spy", str(profile))
        if f"py-spy failed on {profile} (killed by " not in output:
            break
    assert f"py-spy: {profile} (summary: {profile}.txt)" in output, output
    stacks = profile.read_text().splitlines()
    assert stacks and all(re.fullmatch(r".* \d+", line) for line in stacks), stacks[:5]
    summary = (tmp_path / "sync.spy.txt").read_text()
    assert re.match(r"\d+ samples of the thread holding the GIL", summary)
    assert "SyncFacade.run (orchestrator/facade/sync.py)" in summary
    # The baseline is sampled as well, in the same run; should py-spy fail on it (above), the
    # bench says so and goes on.
    baseline = tmp_path / "sync.spy.baseline"
    if f"py-spy failed on {baseline} " not in output:
        assert f"py-spy: {baseline} (summary: {baseline}.txt)" in output, output
        assert "baseline_sync.py" in (tmp_path / "sync.spy.baseline.txt").read_text()


def test_the_engine_bench_compares_the_facade_with_its_nodes_awaited_by_hand() -> None:
    """`engine.py` (in-memory broker, SQLite store) prints each run's two figures and ends
    with the framework's median, the line `ab.py` reads."""
    output = run_bench("engine", "--facade", "throttling", "--sagas", "200", "--runs", "1")
    assert re.search(r"^run 1: framework \d+ us/saga, baseline \d+ us/saga$", output, re.M)
    assert re.search(r"\ncpu_per_saga_us=\d+\n$", output), output


def test_the_engine_bench_on_sqlite_says_how_much_of_the_framework_s_cpu_the_store_took() -> None:
    """On SQLite, whose statements run on the loop, each run says how much of the
    framework's CPU per saga went into the store's statements and commits (some, never all
    of it), and their median is a figure of its own for `ab.py --also`."""
    output = run_bench("engine", "--facade", "sync", "--sagas", "300", "--runs", "1")
    framework = re.search(r"^run 1: framework (\d+) us/saga", output, re.M)
    store = re.search(
        r"^  of the framework's, the store's statements and commits on the loop: (\d+) us/saga$",
        output,
        re.M,
    )
    assert framework and store, output
    assert 0 < int(store[1]) < int(framework[1]), output
    assert re.search(r"\nstore_cpu_per_saga_us=\d+\n(.+\n)+cpu_per_saga_us=\d+\n$", output), output


def test_the_engine_bench_on_postgresql_gives_the_database_s_cpu_per_saga(
    postgres_url: str,
) -> None:
    """With a local PostgreSQL store, `engine.py` gives the database server's CPU per saga too
    (its processes', over the framework's measured sagas): in each run's line, and as a
    figure of its own before the last line, so `ab.py --also` can compare it."""
    output = run_bench("engine", "--store", postgres_url, "--sagas", "200", "--runs", "1")
    run = re.search(
        r"^run 1: framework \d+ us/saga, baseline \d+ us/saga, database (\d+) us/saga$",
        output,
        re.M,
    )
    assert run, output
    assert int(run[1]) > 0, output
    assert re.search(r"\ndatabase_cpu_per_saga_us=\d+\n(.+\n)?cpu_per_saga_us=\d+\n$", output), (
        output
    )


def test_the_engine_bench_through_rabbitmq_deletes_both_sides_queues() -> None:
    """`engine.py --broker` runs the throttling saga on RabbitMQ against the same hops written
    by hand, then deletes the queues of both (named by their prefixes in the run's line)."""
    output = run_bench(
        "engine", "--facade", "throttling", "--broker", BROKER_URL, "--sagas", "200", "--runs", "1"
    )
    assert re.search(r"^run 1: framework \d+ us/saga, baseline \d+ us/saga$", output, re.M)
    found = re.search(r"^run 1 prefixes=(\S+),(\S+)$", output, re.M)
    assert found, output
    queues = [
        f"{prefix}{hop}{suffix}"
        for prefix in found.groups()
        for hop in ("engine_order", "engine_payment")
        for suffix in ("", ".dlq")
    ]
    assert asyncio.run(existing(queues)) == []


@pytest.mark.parametrize(
    "args",
    [["--broker", BROKER_URL], ["--facade", "throttling", "--broker", "nats://127.0.0.1:4222"]],
    ids=["sync facade", "nats"],
)
def test_the_engine_bench_refuses_a_broker_it_cannot_run_on(args: list[str]) -> None:
    """`--broker` is RabbitMQ's, for the throttling facade: anything else is a usage error."""
    assert "--broker takes an amqp:// URL, with --facade throttling" in usage_error("engine", *args)


def test_the_engine_bench_samples_both_sides_and_compares_them_per_saga(tmp_path: Path) -> None:
    """`engine.py --py-spy FILE` samples the framework's and the baseline's first measured
    runs (here both through RabbitMQ, long enough to be sampled) and prints the comparison by
    library, per saga."""
    profile = tmp_path / "engine.spy"
    args = ["--facade", "throttling", "--broker", BROKER_URL, "--sagas", "4000", "--runs", "1"]
    for _ in range(SPY_ATTEMPTS):
        output = run_bench("engine", *args, "--py-spy", str(profile), "--spy-seconds", "1")
        if "(killed by " not in output:
            break
    for side in (profile, tmp_path / "engine.spy.baseline"):
        assert f"py-spy: {side} (summary: {side}.txt)" in output, output
        assert float((tmp_path / f"{side.name}.units").read_text()) > 0
    assert re.search(r"^ +orchestrator/facade +\d+ +0 +\+\d+$", output, re.M), output
    assert re.search(r"^ +all +\d+ +\d+ +[+-]\d+$", output, re.M), output


def test_ab_compares_every_figure_asked_for_pair_by_pair(tmp_path: Path) -> None:
    """`ab.py --key K --also L` reads both figures of each run and summarizes each: both
    sides' means and runs, the mean difference and how many pairs agree on its sign."""
    counter = tmp_path / "runs"
    bench = tmp_path / "figures.py"
    bench.write_text(
        "from pathlib import Path\n"
        f"counter = Path({str(counter)!r})\n"
        "n = int(counter.read_text()) if counter.exists() else 0\n"
        "counter.write_text(str(n + 1))\n"
        "print(f'cost={10 + n}')\n"  # A runs 0 and 2, B runs 1 and 3: B costs 1 more
        "print(f'size={100 - n % 2}')\n"  # B is 1 smaller
        "print('last=0')\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "ab.py"),
            "HEAD",
            "WORKTREE",
            "--pairs",
            "2",
            "--key",
            "cost",
            "--also",
            "size",
            "--",
            str(bench),
        ],
        capture_output=True,
        check=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert "pair 1 HEAD: cost=10 size=100\npair 1 WORKTREE: cost=11 size=99\n" in done.stdout
    assert "cost: B-A mean +1 (+9.1%), 2 of 2 pairs agree" in done.stdout, done.stdout
    assert "size: B-A mean -1 (-1.0%), 2 of 2 pairs agree" in done.stdout, done.stdout


def test_a_booking_bench_ends_with_each_side_s_cpu_per_call_and_the_database_s(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before `cpu_ratio=` and `ratio=` (last), a closed-loop summary gives each side's server
    CPU per call and the framework's database's as figures of their own (`ab.py --also`)."""
    runs = [
        Run(
            target=target,
            number=1,
            seconds=1.0,
            latencies=[0.1] * 10,
            completed=10,
            server_cpu=cpu,
            database_cpu=database,
        )
        for target, cpu, database in (("framework", 0.012, 0.004), ("baseline", 0.010, None))
    ]

    assert summarize_closed(runs, {}) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[-5:] == [
        "framework_cpu_per_booking_us=1200",
        "baseline_cpu_per_booking_us=1000",
        "database_cpu_per_booking_us=400",
        "cpu_ratio=1.200",
        "ratio=1.00",
    ]


@pytest.mark.parametrize("script", ["sync_booking", "async_booking"])
def test_a_journaled_baseline_records_every_saga_it_ran_before_its_effects_go_on(
    script: str,
) -> None:
    """With `--journaled-baseline` the baseline keeps its own SQLite journal, and every saga it
    ran is in it, COMPLETED, when the bench ends."""
    output = run_bench(script, *TINY, "--concurrency", "8", "--journaled-baseline")
    lines = output.splitlines()
    assert " baseline=journaled" in lines[0], output
    held = next(line for line in lines if line.startswith("baseline journal: "))
    counted = re.fullmatch(r"baseline journal: (\d+) sagas \((\d+) COMPLETED\)", held)
    assert counted and counted.group(1) == counted.group(2) and int(counted.group(1)) > 0, held
    check_cleaned_up(script.removesuffix("_booking"), output)


def test_only_the_rabbitmq_baseline_keeps_a_journal() -> None:
    """The NATS baseline has none: asking for it is refused before anything starts."""
    refusal = usage_error(
        "async_booking", "--broker", "nats://127.0.0.1:4222", "--journaled-baseline"
    )
    assert "only the RabbitMQ baseline keeps a journal" in refusal


def test_the_hand_written_journal_records_a_saga_once(tmp_path: Path) -> None:
    """A request id begins one saga; beginning it again is refused."""

    async def scenario() -> tuple[bool, bool]:
        journal = Journal(tmp_path / "journal.db")
        try:
            return journal.begin("r-1", "{}"), journal.begin("r-1", "{}")
        finally:
            await journal.close()

    assert asyncio.run(scenario()) == (True, False)


def test_the_hand_written_journal_moves_a_saga_one_step_at_a_time(tmp_path: Path) -> None:
    """A step's end is recorded only at the step the saga is at; the last one completes it."""

    async def scenario() -> list[object]:
        journal = Journal(tmp_path / "journal.db")
        try:
            journal.begin("r-1", "{}")
            return [
                journal.step_done("r-1", 1, "{}", last=True),
                journal.at("r-1"),
                journal.step_done("r-1", 0, "{}", last=False),
                journal.step_done("r-1", 0, "{}", last=False),
                journal.at("r-1"),
                journal.step_done("r-1", 1, "{}", last=True),
                journal.at("r-1"),
            ]
        finally:
            await journal.close()

    assert asyncio.run(scenario()) == [False, 0, True, False, 1, True, None]
    assert journal_summary(tmp_path / "journal.db") == {"COMPLETED": 1}


def test_the_hand_written_journal_knows_no_saga_it_never_began(tmp_path: Path) -> None:
    """A hop for a request id never begun finds nothing, and recording its step changes nothing."""

    async def scenario() -> tuple[object, bool]:
        journal = Journal(tmp_path / "journal.db")
        try:
            return journal.at("r-9"), journal.step_done("r-9", 0, "{}", last=False)
        finally:
            await journal.close()

    assert asyncio.run(scenario()) == (None, False)
    assert journal_summary(tmp_path / "journal.db") == {}
