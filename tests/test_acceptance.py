"""README.md as a specification: its grpcurl commands, run verbatim against `python main.py`.

One `python main.py` with the default app.yaml serves the whole module (the
booking service on :10000, the embedded upstreams on :50051 and :50052). Its
first call is the README's sync booking, so the ids the README shows ("1")
are the ones a fresh process gives, whichever tests run and in whatever order.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import yaml

from tests.support.processes import (
    ROOT,
    grpcurl_argv,
    require_free_ports,
    run_grpcurl,
    start_main,
    wait_for_serving,
)

pytestmark = pytest.mark.acceptance

BOOKING = "localhost:10000"
ORDERS = "localhost:50051"
PAYMENTS = "localhost:50052"
DEFAULT_PORTS = (10000, 50051, 50052, 8080)
"""gRPC, the embedded Order and Payment services, and the saga console of the root app.yaml."""
EVENTUALLY_SECONDS = 5.0

T = TypeVar("T")

_FENCE = re.compile(r"^```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
_INLINE_GRPCURL = re.compile(r"(?<!`)`(grpcurl [^`\n]+)`(?!`)")


@dataclass(frozen=True)
class Block:
    """A fenced block of README.md: its language tag and its text."""

    lang: str
    body: str


@dataclass(frozen=True)
class Readme:
    """The fenced blocks and inline grpcurl commands of README.md, in document order."""

    blocks: tuple[Block, ...]
    inline_commands: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Readme:
        """Split `text` into fenced blocks, and collect the inline grpcurl commands outside them."""
        blocks = tuple(Block(m["lang"], m["body"]) for m in _FENCE.finditer(text))
        prose = _FENCE.sub("", text)
        return cls(blocks, tuple(_INLINE_GRPCURL.findall(prose)))

    def commands(self) -> list[tuple[int, str]]:
        """(block index, line) of every line starting `grpcurl ` in a shell block."""
        return [
            (index, line.strip())
            for index, block in enumerate(self.blocks)
            if block.lang == "shell"
            for line in block.body.splitlines()
            if line.startswith("grpcurl ")
        ]

    def command(self, *needles: str) -> tuple[int, str]:
        """The one shell command that contains every needle."""
        found = [(i, c) for i, c in self.commands() if all(n in c for n in needles)]
        assert len(found) == 1, f"README.md: expected one grpcurl command with {needles}: {found}"
        return found[0]

    def json_after(self, block_index: int) -> Any:
        """The JSON of the block that directly follows block `block_index`."""
        following = self.blocks[block_index + 1 : block_index + 2]
        assert following, f"README.md: no block after block {block_index}"
        assert following[0].lang == "json", f"README.md: no JSON after block {block_index}"
        return json.loads(following[0].body)

    def error_mentioning(self, text: str) -> str:
        """The `text` block that starts with `ERROR:` and mentions `text`."""
        found = [
            b.body
            for b in self.blocks
            if b.lang == "text" and b.body.startswith("ERROR:") and text in b.body
        ]
        assert len(found) == 1, f"README.md: expected one ERROR block mentioning {text!r}"
        return found[0]

    def inline(self, *needles: str) -> str:
        """The one inline `grpcurl ...` command that contains every needle."""
        found = [c for c in self.inline_commands if all(n in c for n in needles)]
        assert len(found) == 1, f"README.md: expected one inline command with {needles}: {found}"
        return found[0]


def request_id_of(command: str) -> str:
    """The x-request-id a grpcurl command line sends."""
    match = re.search(r"x-request-id:(\S+)", command)
    assert match, f"no x-request-id in {command!r}"
    return match[1]


def normalized(text: str) -> str:
    """`text` without trailing blanks on its lines or at its end."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def run_readme(command: str) -> subprocess.CompletedProcess[str]:
    """Run one README grpcurl line verbatim (shlex-split, no shell) with the venv's grpcurl."""
    argv = grpcurl_argv(command)
    return run_grpcurl(argv[1:])


def stdout_json(result: subprocess.CompletedProcess[str]) -> Any:
    """grpcurl's stdout as JSON; fails with stderr when the call did not succeed."""
    assert result.returncode == 0, f"grpcurl exited {result.returncode}: {result.stderr}"
    return json.loads(result.stdout)


def eventually(
    action: Callable[[], T], done: Callable[[T], bool], *, timeout: float = EVENTUALLY_SECONDS
) -> T:
    """Repeat `action` until `done(result)`; the last result, which fails `done` on timeout."""
    deadline = time.monotonic() + timeout
    result = action()
    while not done(result) and time.monotonic() < deadline:
        time.sleep(0.05)
        result = action()
    return result


def grpcurl_call(
    method: str, body: dict[str, Any], *, target: str = BOOKING, request_id: str | None = None
) -> subprocess.CompletedProcess[str]:
    """grpcurl -plaintext [-rpc-header x-request-id:ID] -d BODY TARGET METHOD."""
    header = [] if request_id is None else ["-rpc-header", f"x-request-id:{request_id}"]
    return run_grpcurl([*header, "-plaintext", "-d", json.dumps(body), target, method])


def fresh_id() -> str:
    """A request id no other test uses."""
    return f"acceptance-{uuid.uuid4()}"


@pytest.fixture(scope="module")
def readme() -> Readme:
    """README.md, parsed."""
    return Readme.parse((ROOT / "README.md").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def booking_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`python main.py` with the default app.yaml; stopped with SIGTERM, which must exit 0.

    It runs in a fresh directory, so the SQLite files the default config names
    start empty, as on a newcomer's first `make run`.
    """
    require_free_ports(
        DEFAULT_PORTS, "the acceptance tests run `python main.py` with the default app.yaml"
    )
    grace = float(yaml.safe_load((ROOT / "app.yaml").read_text())["grpc"]["shutdown_grace_seconds"])
    with start_main(cwd=tmp_path_factory.mktemp("acceptance")) as process:
        wait_for_serving(BOOKING, process)
        yield
        status = process.stop(signal.SIGTERM, timeout=grace + 5)
        assert status == 0, f"main.py did not exit 0 on SIGTERM\n{process.describe()}"


@pytest.fixture(scope="module", autouse=True)
def readme_sync_booking(booking_service: None, readme: Readme) -> subprocess.CompletedProcess[str]:
    """The README's sync booking, the first call the fresh process gets."""
    return run_readme(readme.command("HandleSyncBooking", '"FaultInject": "false"')[1])


@pytest.fixture(scope="module")
def readme_fault_booking(readme: Readme) -> subprocess.CompletedProcess[str]:
    """The README's booking with FaultInject=true, run once."""
    return run_readme(readme.command("HandleSyncBooking", '"FaultInject": "true"')[1])


def test_readme_sync_booking_prints_the_readme_response(
    readme: Readme, readme_sync_booking: subprocess.CompletedProcess[str]
) -> None:
    index, _ = readme.command("HandleSyncBooking", '"FaultInject": "false"')
    assert stdout_json(readme_sync_booking) == readme.json_after(index)


def test_readme_fault_injected_booking_fails_with_the_readme_error(
    readme: Readme, readme_fault_booking: subprocess.CompletedProcess[str]
) -> None:
    _, command = readme.command("HandleSyncBooking", '"FaultInject": "true"')
    expected = readme.error_mentioning(request_id_of(command))
    assert readme_fault_booking.returncode != 0, readme_fault_booking.stdout
    assert normalized(readme_fault_booking.stderr) == normalized(expected)


def test_readme_get_order_shows_the_fault_injected_order_cancelled(
    readme: Readme, readme_fault_booking: subprocess.CompletedProcess[str]
) -> None:
    _, command = readme.command("pb.OrderService/GetOrder", ORDERS)
    result = eventually(
        lambda: run_readme(command),
        lambda r: r.returncode == 0 and json.loads(r.stdout).get("Status") == "CANCELLED",
    )
    assert stdout_json(result)["Status"] == "CANCELLED"


def test_readme_async_booking_prints_the_readme_response(readme: Readme) -> None:
    index, command = readme.command("HandleAsyncBooking")
    assert stdout_json(run_readme(command)) == readme.json_after(index)


def test_readme_list_names_booking_health_and_reflection_services(readme: Readme) -> None:
    result = run_readme(readme.inline(BOOKING, " list"))
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert {"pb.BookingService", "grpc.health.v1.Health"} <= services
    assert services & {
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }, services


def test_readme_health_check_reports_serving(readme: Readme) -> None:
    result = run_readme(readme.inline(BOOKING, "grpc.health.v1.Health/Check"))
    assert stdout_json(result) == {"status": "SERVING"}


def test_request_id_is_a_generated_uuid_when_the_caller_sends_none() -> None:
    response = stdout_json(grpcurl_call("pb.BookingService/HandleSyncBooking", {"ProductID": 1}))
    assert str(uuid.UUID(response["RequestID"])) == response["RequestID"]


def test_generated_request_id_is_echoed_as_x_request_id_response_header() -> None:
    body = json.dumps({"ProductID": 1})
    result = run_grpcurl(
        ["-v", "-plaintext", "-d", body, BOOKING, "pb.BookingService/HandleSyncBooking"]
    )
    assert result.returncode == 0, result.stderr
    headers, _, rest = result.stdout.partition("Response contents:")
    header = re.search(r"^x-request-id: (\S+)$", headers, re.M)
    assert header, f"no x-request-id response header in:\n{headers}"
    contents = rest.partition("Response trailers received:")[0]
    assert json.loads(contents)["RequestID"] == header[1]


def test_request_id_longer_than_128_characters_is_invalid_argument() -> None:
    result = grpcurl_call(
        "pb.BookingService/HandleSyncBooking", {"ProductID": 1}, request_id="x" * 129
    )
    assert result.returncode != 0, result.stdout
    assert "Code: InvalidArgument" in result.stderr
    assert "128" in result.stderr, result.stderr


def test_product_id_zero_is_invalid_argument() -> None:
    result = grpcurl_call(
        "pb.BookingService/HandleSyncBooking", {"ProductID": 0}, request_id=fresh_id()
    )
    assert result.returncode != 0, result.stdout
    assert "Code: InvalidArgument" in result.stderr
    assert "ProductID" in result.stderr, result.stderr


def test_negative_count_is_invalid_argument() -> None:
    result = grpcurl_call(
        "pb.BookingService/HandleSyncBooking", {"ProductID": 1, "Count": -1}, request_id=fresh_id()
    )
    assert result.returncode != 0, result.stdout
    assert "Code: InvalidArgument" in result.stderr
    assert "Count" in result.stderr, result.stderr


@pytest.fixture(scope="module")
def async_booking_id() -> str:
    """The request id of an async booking queued once, with a fresh id."""
    request_id = fresh_id()
    result = grpcurl_call(
        "pb.BookingService/HandleAsyncBooking", {"ProductID": 1}, request_id=request_id
    )
    assert stdout_json(result) == {"RequestID": request_id}
    return request_id


def _status_of(method: str, target: str, request_id: str) -> str | None:
    """The Status of the record `method` finds for `request_id`, or None when it fails."""
    result = grpcurl_call(method, {"RequestID": request_id}, target=target)
    return json.loads(result.stdout).get("Status") if result.returncode == 0 else None


def test_async_booking_payment_is_eventually_paid(async_booking_id: str) -> None:
    status = eventually(
        lambda: _status_of("pb.PaymentService/GetPayment", PAYMENTS, async_booking_id),
        lambda s: s == "PAID",
    )
    assert status == "PAID"


def test_async_booking_order_is_created_and_not_cancelled(async_booking_id: str) -> None:
    # Once the payment is taken the saga is done, so the order's status is final.
    eventually(
        lambda: _status_of("pb.PaymentService/GetPayment", PAYMENTS, async_booking_id),
        lambda s: s == "PAID",
    )
    assert _status_of("pb.OrderService/GetOrder", ORDERS, async_booking_id) == "CREATED"


def test_readme_throttling_booking_answers_with_the_ids_the_upstreams_gave(readme: Readme) -> None:
    index, command = readme.command("HandleThrottlingBooking", '"FaultInject": "false"')
    shown = readme.json_after(index)
    request_id = request_id_of(command)

    answer = stdout_json(run_readme(command))

    # The ids depend on the bookings made before it; the README shows a fresh run's.
    assert answer.keys() == shown.keys()
    assert answer["RequestID"] == shown["RequestID"] == request_id
    order = stdout_json(
        grpcurl_call("pb.OrderService/GetOrder", {"RequestID": request_id}, target=ORDERS)
    )
    payment = stdout_json(
        grpcurl_call("pb.PaymentService/GetPayment", {"RequestID": request_id}, target=PAYMENTS)
    )
    assert (order["Status"], payment["Status"]) == ("CREATED", "PAID")
    assert (answer["OrderID"], answer["PaymentID"]) == (order["OrderID"], payment["PaymentID"])


def test_readme_fault_injected_throttling_booking_fails_once_its_order_is_cancelled(
    readme: Readme,
) -> None:
    _, command = readme.command("HandleThrottlingBooking", '"FaultInject": "true"')
    request_id = request_id_of(command)

    result = run_readme(command)
    # Read at once, not eventually: the compensation ran before the answer.
    order = stdout_json(
        grpcurl_call("pb.OrderService/GetOrder", {"RequestID": request_id}, target=ORDERS)
    )

    assert result.returncode != 0, result.stdout
    assert normalized(result.stderr) == normalized(readme.error_mentioning(request_id))
    assert order["Status"] == "CANCELLED"


def test_readme_commands_are_all_covered(readme: Readme) -> None:
    covered = {
        readme.command("HandleSyncBooking", '"FaultInject": "false"')[1],
        readme.command("HandleSyncBooking", '"FaultInject": "true"')[1],
        readme.command("pb.OrderService/GetOrder", ORDERS)[1],
        readme.command("HandleAsyncBooking")[1],
        readme.command("HandleThrottlingBooking", '"FaultInject": "false"')[1],
        readme.command("HandleThrottlingBooking", '"FaultInject": "true"')[1],
        readme.command("SagaService/GetSaga")[1],
        readme.command("SagaService/ListSagas")[1],
        readme.command("SagaService/WatchSaga")[1],
    }
    assert {command for _, command in readme.commands()} == covered


def test_readme_get_saga_shows_the_fault_injected_saga_compensated(readme: Readme) -> None:
    index, command = readme.command("SagaService/GetSaga")
    expected = readme.json_after(index)

    saga = eventually(
        lambda: stdout_json(run_readme(command)), lambda found: found["state"] == "COMPENSATED"
    )

    for key in ("request_id", "facade", "kind", "state", "error_code", "error_reason"):
        assert saga[key] == expected[key], key

    def shown(step: dict[str, Any]) -> tuple[str, str, str]:
        return step["name"], step["state"], step.get("compensation", "")

    assert [shown(s) for s in saga["steps"]] == [shown(s) for s in expected["steps"]]


def test_readme_list_sagas_pages_newest_first(readme: Readme) -> None:
    listed = stdout_json(run_readme(readme.command("SagaService/ListSagas")[1]))

    sagas = listed["sagas"]
    assert 1 <= len(sagas) <= 2  # the README's own sync booking ran first
    assert all(saga["facade"] == "SyncBooking" for saga in sagas)
    created = [saga["created_at"] for saga in sagas]
    assert created == sorted(created, reverse=True)


def test_readme_watch_saga_streams_until_the_saga_ends(readme: Readme) -> None:
    result = run_readme(readme.command("SagaService/WatchSaga")[1])

    assert result.returncode == 0, result.stderr
    decoder, text, updates = json.JSONDecoder(), result.stdout.strip(), []
    while text:
        update, end = decoder.raw_decode(text)
        updates.append(update)
        text = text[end:].strip()
    assert updates and updates[-1]["request_id"] == "example-request-id"
    assert updates[-1]["state"] == "COMPLETED"
