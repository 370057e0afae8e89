"""Logs: one event a line, carrying the saga's fields, as text or JSON."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import grpc
import pytest

from main import BookingApp
from orchestrator.logs import JsonFormatter, KeyValueFormatter
from pb import booking_pb2, booking_pb2_grpc


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Everything logged during the test, through the JSON formatter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def record(message: str, **extra: object) -> logging.LogRecord:
    entry = logging.LogRecord("orchestrator.test", logging.INFO, __file__, 1, message, None, None)
    entry.__dict__.update(extra)
    return entry


def test_a_json_line_carries_the_extra_fields() -> None:
    line = JsonFormatter().format(record("step failed", request_id="r1", facade="F", step="s"))

    event = json.loads(line)
    assert event["message"] == "step failed"
    assert (event["request_id"], event["facade"], event["step"]) == ("r1", "F", "s")
    assert event["level"] == "INFO" and event["logger"] == "orchestrator.test"


def test_a_json_line_holds_its_exception_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        entry = record("failed")
        entry.exc_info = sys.exc_info()
    line = JsonFormatter().format(entry)

    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exception"]


def test_a_text_line_appends_the_fields_as_key_value_pairs() -> None:
    line = KeyValueFormatter("%(levelname)s %(message)s").format(
        record("rolling back", request_id="r2", topic="cancel")
    )

    assert line == "INFO rolling back request_id=r2 topic=cancel"


async def test_a_failed_saga_logs_request_id_facade_and_step_on_each_line(
    booking_app: BookingApp, json_lines: io.StringIO
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{booking_app.server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await booking_pb2_grpc.BookingServiceStub(channel).HandleSyncBooking(
                booking_pb2.BookingRequest(ProductID=1, FaultInject=True),
                metadata=(("x-request-id", "log-1"),),
                timeout=10,
            )
        await booking_app.orchestrator.broker.join()  # type: ignore[attr-defined]

    events = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    saga_events = [event for event in events if event.get("request_id") == "log-1"]
    messages = [event["message"] for event in saga_events]
    assert "step failed" in messages and "rolling back" in messages
    for event in saga_events:
        assert event["facade"] == "SyncBooking"
    failed = next(event for event in saga_events if event["message"] == "step failed")
    assert failed["step"] == "create_payment" and failed["code"] == "FAILED_PRECONDITION"
    rolling = next(event for event in saga_events if event["message"] == "rolling back")
    assert rolling["topic"] == "cancel_sync_booking"
