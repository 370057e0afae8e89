"""Optional OpenTelemetry tracing: one trace per saga, across gRPC calls and broker hops.

Off unless `tracing.enabled` is set (and the `tracing` extra installed). Then
a sync saga is a span with a child per step; an async saga's first publish,
each hop and its rollback are spans of one trace, its context carried in the
messages' `traceparent` header; upstream calls carry it in their metadata,
so an instrumented upstream joins the same trace.

While off, every function here returns at once: no import of OpenTelemetry,
no span, no header.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Final

from orchestrator.config import TracingSettings
from orchestrator.errors import ConfigError

__all__ = ["configure_tracing", "inject", "span"]

_tracer: Any = None
_propagate: Any = None


def configure_tracing(settings: TracingSettings, *, span_processor: Any = None) -> None:
    """Install a tracer provider per `settings`; a no-op while tracing is off.

    `span_processor` replaces the exporter's (tests pass one with an
    in-memory exporter). The SDK's batch processor exports from a thread of
    its own: that is how OpenTelemetry works, and only while tracing is on.
    """
    global _tracer, _propagate  # noqa: PLW0603 (the process-wide tracer, like OpenTelemetry's own)
    if not settings.enabled:
        _tracer = _propagate = None
        return
    try:
        from opentelemetry import propagate, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:
        raise ConfigError(
            "tracing.enabled needs OpenTelemetry: pip install 'orchestrator[tracing]'"
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
