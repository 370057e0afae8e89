"""The demo PaymentService, reporting each payment it records: bench/async_booking.py's probe.

It serves exactly what ``main.py upstream payment --db :memory:`` serves
(``upstream.server.serve_upstream``), with the ledger's ``create_payment``
wrapped: every successful CreatePayment writes ``<RequestID> <time.monotonic()>``
as a line on stdout. CLOCK_MONOTONIC is the machine's, so the bench compares
these times with its own. The lines of one event-loop iteration go out in one
non-blocking write, scheduled with ``call_soon``: the report costs the
upstream a few microseconds per payment and delays nobody.

    python bench/payment_probe.py --port 50052 [--latency-ms 0] | ...
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

from upstream.ledger import MEMORY, Ledger, PaymentRecord  # noqa: E402
from upstream.server import serve_upstream  # noqa: E402

log = logging.getLogger("payment_probe")


class CompletionReporter:
    """Writes `<request id> <monotonic time>` lines to a pipe, batched per loop iteration."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self._pending: list[str] = []
        self._loop = asyncio.get_running_loop()

    def record(self, request_id: str) -> None:
        """Stamp `request_id` now; the line goes out at the end of this loop iteration."""
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(f"{request_id} {time.monotonic():.6f}\n")

    def _flush(self) -> None:
        lines, self._pending = self._pending, []
        if not self._transport.is_closing():
            self._transport.write("".join(lines).encode())


def observe(ledger: Ledger, reporter: CompletionReporter) -> None:
    """Wrap `ledger.create_payment` so each payment it returns is reported."""
    create_payment = ledger.create_payment

    def recording(
        request_id: str, order_id: int, amount: int, *, idempotency_key: str | None = None
    ) -> PaymentRecord:
        record = create_payment(request_id, order_id, amount, idempotency_key=idempotency_key)
        reporter.record(record.request_id)
        return record

    ledger.create_payment = recording  # type: ignore[method-assign]


async def serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, sys.stdout.buffer)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    running = await serve_upstream(
        "payment", host=args.host, port=args.port, db_path=MEMORY, latency_ms=args.latency_ms
    )
    observe(running.ledger, CompletionReporter(transport))
    log.info("payment probe serving on %s", running.target)
    try:
        await stop.wait()
    finally:
        await running.stop()
        transport.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and serve on uvloop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return uvloop.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
