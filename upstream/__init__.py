"""The demo upstream services the example saga orchestrates: orders and payments.

Each runs as its own gRPC server (``python main.py upstream order|payment``)
over a small SQLite ledger, can inject latency and transient failures, is
idempotent on the ``x-idempotency-key`` metadata, and refuses (ABORTED) a create
whose request id was already compensated. In tests, start one with
``running = await serve_upstream("order", port=0)`` and ``await running.stop()``.
"""

from upstream.order import OrderServicer
from upstream.payment import PaymentServicer
from upstream.server import RunningUpstream, serve_upstream

__all__ = ["OrderServicer", "PaymentServicer", "RunningUpstream", "serve_upstream"]
