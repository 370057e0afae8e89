"""Optional OpenTelemetry tracing: one trace per saga, across gRPC calls and broker hops.

Off unless `tracing.enabled` is set (and the `tracing` extra installed). Then
a sync saga is a span with a child per step; an async saga's first publish,
each hop and its rollback are spans of one trace, its context carried in the
messages' `traceparent` header; upstream calls carry it in their metadata,
so an instrumented upstream joins the same trace. A caller that sends a W3C
`traceparent` in its gRPC metadata makes the saga a part of its own trace:
`@endpoint` makes that context the current one (`incoming`), so the saga's
root span is a child of the caller's span.

While off, every function here returns at once: no import of OpenTelemetry,
no span, no header.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

from orchestrator.config import TracingSettings
from orchestrator.errors import ConfigError

__all__ = ["configure_tracing", "incoming", "inject", "span"]

_tracer: Any = None
_propagate: Any = None
_context: Any = None


def configure_tracing(settings: TracingSettings, *, span_processor: Any = None) -> None:
    """Install a tracer provider per `settings`; a no-op while tracing is off.

    `span_processor` replaces the exporter's (tests pass one with an
    in-memory exporter). The SDK's batch processor exports from a thread of
    its own: that is how OpenTelemetry works, and only while tracing is on.
    """
    global _tracer, _propagate, _context  # noqa: PLW0603 (process-wide, like OpenTelemetry's own)
    if not settings.enabled:
        _tracer = _propagate = _context = None
        return
    try:
        from opentelemetry import context, propagate, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:
        raise ConfigError(
            "tracing.enabled needs OpenTelemetry: pip install 'saga-orchestrator[tracing]'"
        ) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    if span_processor is None:
        # The process-wide provider, so other OpenTelemetry instrumentation joins our traces.
        trace.set_tracer_provider(provider)
        if settings.exporter == "console":
            exporter: Any = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=settings.endpoint)
        span_processor = BatchSpanProcessor(exporter)
    provider.add_span_processor(span_processor)
    _tracer = provider.get_tracer("orchestrator")
    _propagate = propagate
    _context = context


_NO_SPAN: Final = contextlib.nullcontext()
"""What `span` returns while tracing is off: one shared, reusable no-op."""


def span(
    name: str,
    attributes: Mapping[str, str | int],
    *,
    parent: Mapping[str, str] | None = None,
) -> contextlib.AbstractContextManager[object]:
    """A span around the block, child of the current one or of the context in `parent` headers.

    While tracing is off it costs a global lookup: it sits on every saga's and step's path.
    """
    if _tracer is None:
        return _NO_SPAN
    context = _propagate.extract(dict(parent)) if parent is not None else None
    started: contextlib.AbstractContextManager[object] = _tracer.start_as_current_span(
        name, context=context, attributes=dict(attributes)
    )
    return started


def inject(carrier: dict[str, str] | None = None) -> dict[str, str]:
    """`carrier` (or a new dict) with the current trace context added, when tracing is on."""
    carrier = {} if carrier is None else carrier
    if _propagate is not None:
        _propagate.inject(carrier)
    return carrier


def incoming(
    metadata: Iterable[tuple[str, str | bytes]] | None,
) -> contextlib.AbstractContextManager[object]:
    """Within the block, the trace context of incoming gRPC `metadata` is the current one.

    A caller's W3C `traceparent` (and `tracestate`) so becomes the parent of
    the spans started in the block: the saga's root span joins the caller's
    trace. Without a `traceparent`, or while tracing is off, nothing changes
    (and it costs a global lookup).
    """
    if _tracer is None or metadata is None:
        return _NO_SPAN
    carrier = {key.lower(): value for key, value in metadata if isinstance(value, str)}
    if "traceparent" not in carrier:
        return _NO_SPAN
    return _attached(_propagate.extract(carrier))


@contextlib.contextmanager
def _attached(context: Any) -> Iterator[None]:
    token = _context.attach(context)
    try:
        yield
    finally:
        _context.detach(token)
