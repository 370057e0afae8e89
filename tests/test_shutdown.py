"""`python main.py` stops gracefully on SIGTERM and SIGINT, and refuses a bad config.

The booking service runs as a real process against two upstream processes;
the order upstream answers after 1.5 s, so a booking is reliably in flight
when the signal arrives.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator import Orchestrator
from orchestrator.broker import InMemoryBroker
from orchestrator.config import GrpcSettings
from orchestrator.server import OrchestratorServer
from pb import booking_pb2, booking_pb2_grpc
from tests.support.processes import (
    ROOT,
    ServiceProcess,
    free_port,
    health_status,
    main_env,
    start_main,
    wait_for_serving,
)

GRACE_SECONDS = 5.0
ORDER_LATENCY_MS = 1500
SIGNAL_AFTER_SECONDS = 0.5
"""How long into the slow booking the signal is sent (the order upstream takes 1.5 s)."""
CALL_TIMEOUT = 10.0
EXIT_TIMEOUT = GRACE_SECONDS + 5


@dataclass(frozen=True)
class UpstreamPorts:
    """Where the order and payment upstream processes listen."""

    order: int
    payment: int


@dataclass
class SigtermOutcome:
    """What was observed around a SIGTERM sent while a slow booking was in flight."""

    signalled_mid_call: bool = False
    response: booking_pb2.BookingSyncResponse | None = None
    error: str | None = None
    watch_before_call_ended: list[str] = field(default_factory=list)
    checks_during_grace: list[str] = field(default_factory=list)
    exit_status: int | None = None
    output: str = ""


UNUSED_UPSTREAMS = UpstreamPorts(order=50051, payment=50052)
"""Upstream addresses for configs that must be refused before anything is called."""


def write_config(path: Path, upstreams: UpstreamPorts, **grpc_overrides: Any) -> Path:
    """app.yaml with a free gRPC port, a 5 s grace, no embedded upstreams, no console, its
    SQLite store beside the config (not in the repository, where main.py runs), and
    `grpc_overrides`."""
    config = yaml.safe_load((ROOT / "app.yaml").read_text(encoding="utf-8"))
    config["store"]["url"] = f"sqlite+aiosqlite:///{path.parent / 'orchestrator.db'}"
    config["grpc"].update(port=free_port(), shutdown_grace_seconds=GRACE_SECONDS)
    config["grpc"].update(grpc_overrides)
    config["embedded_upstreams"] = {}
    config["ui"] = {"enabled": False}
    config["upstreams"]["order"] = {"address": f"127.0.0.1:{upstreams.order}"}
    config["upstreams"]["payment"] = {"address": f"127.0.0.1:{upstreams.payment}"}
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def booking_target(config: Path) -> str:
    """The address the booking service of `config` serves on."""
    return f"127.0.0.1:{yaml.safe_load(config.read_text())['grpc']['port']}"


@pytest.fixture(scope="module")
def upstreams() -> Iterator[UpstreamPorts]:
    """The order (1.5 s latency) and payment upstreams, each its own `main.py upstream`."""
    ports = UpstreamPorts(order=free_port(), payment=free_port())
    order = start_main(
        "upstream", "order", "--port", str(ports.order), "--latency-ms", str(ORDER_LATENCY_MS)
    )
    with order, start_main("upstream", "payment", "--port", str(ports.payment)) as payment:
        wait_for_serving(f"127.0.0.1:{ports.order}", order)
        wait_for_serving(f"127.0.0.1:{ports.payment}", payment)
        yield ports
        order.stop(timeout=EXIT_TIMEOUT)
        payment.stop(timeout=EXIT_TIMEOUT)


@pytest.fixture
def config(tmp_path: Path, upstreams: UpstreamPorts) -> Path:
    """A valid config for a booking service on a free port, using the upstream processes."""
    return write_config(tmp_path / "app.yaml", upstreams)


async def _sigterm_mid_booking(process: ServiceProcess, target: str) -> SigtermOutcome:
    """Start a slow booking, SIGTERM `process` mid-call, record what the client sees."""
    outcome = SigtermOutcome()
    async with grpc.aio.insecure_channel(target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        updates = aiter(watch)
        first = await asyncio.wait_for(anext(updates), CALL_TIMEOUT)
        assert first.status == health_pb2.HealthCheckResponse.SERVING, first
        call = booking_pb2_grpc.BookingServiceStub(channel).HandleSyncBooking(
            booking_pb2.BookingRequest(ProductID=1), timeout=CALL_TIMEOUT
        )
        await asyncio.sleep(SIGNAL_AFTER_SECONDS)
        outcome.signalled_mid_call = not call.done()
        process.send_signal(signal.SIGTERM)

        async def watch_until_call_ends() -> None:
            async for update in updates:
                if call.done():
                    return
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(update.status)
                outcome.watch_before_call_ended.append(name)

        async def check_until_call_ends() -> None:
            while not call.done():
                status = await asyncio.to_thread(health_status, target, timeout=0.5)
                outcome.checks_during_grace.append(status)
                await asyncio.sleep(0.1)

        watching = asyncio.create_task(watch_until_call_ends())
        checking = asyncio.create_task(check_until_call_ends())
        try:
            outcome.response = await call
        except grpc.aio.AioRpcError as exc:
            outcome.error = f"{exc.code().name}: {exc.details()}"
        finally:
            watch.cancel()  # an open Watch would hold the server for the whole grace
            await asyncio.wait_for(checking, CALL_TIMEOUT)
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
    return outcome


@pytest.fixture(scope="module")
def sigterm_mid_booking(
    upstreams: UpstreamPorts, tmp_path_factory: pytest.TempPathFactory
) -> SigtermOutcome:
    """One `main.py` run, SIGTERMed 0.5 s into a 1.5 s booking, as its client saw it."""
    config = write_config(tmp_path_factory.mktemp("sigterm") / "app.yaml", upstreams)
    target = booking_target(config)
    with start_main(config=config) as process:
        wait_for_serving(target, process)
        outcome = asyncio.run(_sigterm_mid_booking(process, target))
        outcome.exit_status = process.wait(EXIT_TIMEOUT)  # one SIGTERM only, sent mid-call
        outcome.output = process.describe()
    assert outcome.signalled_mid_call, "the booking finished before SIGTERM; raise the latency"
    return outcome


def test_sigterm_lets_the_in_flight_booking_complete(sigterm_mid_booking: SigtermOutcome) -> None:
    assert sigterm_mid_booking.error is None, sigterm_mid_booking.output
    assert sigterm_mid_booking.response is not None
    assert sigterm_mid_booking.response.OrderID > 0
    assert sigterm_mid_booking.response.PaymentID > 0


def test_sigterm_with_a_call_in_flight_exits_zero(sigterm_mid_booking: SigtermOutcome) -> None:
    assert sigterm_mid_booking.exit_status == 0, sigterm_mid_booking.output


def test_health_turns_not_serving_while_the_call_is_in_flight(
    sigterm_mid_booking: SigtermOutcome,
) -> None:
    assert "NOT_SERVING" in sigterm_mid_booking.watch_before_call_ended
    assert "SERVING" not in sigterm_mid_booking.watch_before_call_ended


def test_health_checks_after_sigterm_never_report_serving(
    sigterm_mid_booking: SigtermOutcome,
) -> None:
    # A new Check during the grace period gets NOT_SERVING, or is refused: the server has
    # stopped accepting calls. SERVING would send it new traffic it cannot finish.
    checks = sigterm_mid_booking.checks_during_grace
    assert checks, "no health Check was made during the grace period"
    assert set(checks) <= {"NOT_SERVING", "UNAVAILABLE", "CANCELLED"}, checks


def test_sigint_exits_zero(config: Path) -> None:
    with start_main(config=config) as process:
        wait_for_serving(booking_target(config), process)
        status = process.stop(signal.SIGINT, timeout=EXIT_TIMEOUT)
        assert status == 0, process.describe()


def run_main_with(config: Path) -> subprocess.CompletedProcess[str]:
    """`python main.py` with ORCH_CONFIG=`config`, expected to exit at once."""
    try:
        return subprocess.run(
            [sys.executable, "main.py"],
            cwd=ROOT,
            env=main_env(config),
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"main.py kept running with {config.read_text()}\n{exc.stderr!r}")


def test_unknown_config_key_exits_2_naming_the_key(tmp_path: Path) -> None:
    result = run_main_with(write_config(tmp_path / "app.yaml", UNUSED_UPSTREAMS, prot=1))
    assert result.returncode == 2, result.stderr
    assert "grpc.prot" in result.stderr
    assert "unknown key" in result.stderr


def test_bad_config_value_exits_2_naming_the_key(tmp_path: Path) -> None:
    result = run_main_with(write_config(tmp_path / "app.yaml", UNUSED_UPSTREAMS, port=-5))
    assert result.returncode == 2, result.stderr
    assert "grpc.port" in result.stderr


async def test_a_served_process_freezes_its_startup_objects_out_of_the_gc() -> None:
    server = OrchestratorServer(
        Orchestrator(InMemoryBroker()),
        GrpcSettings(host="127.0.0.1", port=0, drain_seconds=0, shutdown_grace_seconds=0),
        [],
    )
    loop = asyncio.get_running_loop()
    gc.unfreeze()
    serving = asyncio.create_task(server.serve_until_signalled())
    try:
        async with asyncio.timeout(5):
            while gc.get_freeze_count() == 0:  # noqa: ASYNC110 (the freeze announces nothing)
                await asyncio.sleep(0.01)
        assert gc.get_freeze_count() > 0
        os.kill(os.getpid(), signal.SIGTERM)  # caught by the server's handler
        async with asyncio.timeout(5):
            await serving
    finally:
        serving.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        gc.unfreeze()
