"""What the health page shows: the broker, the store, what is in flight and how long steps take.

Everything comes from what the process already keeps: the broker's health
flag (the one the gRPC health service follows), a timed read of the store,
the store's counts of unfinished sagas, and the Prometheus metrics of this
replica (`orchestrator_sagas_in_flight`, `orchestrator_step_duration_seconds`).
Step latency quantiles are estimated from the histogram's buckets the way
PromQL's `histogram_quantile` does, over everything since the process
started.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from prometheus_client.registry import Collector

from orchestrator.registry import Orchestrator
from orchestrator.store import SagaState

__all__ = ["Health", "InFlight", "StepLatency", "health_of", "quantile"]

QUANTILES = (0.5, 0.95, 0.99)


@dataclass(frozen=True, slots=True)
class StepLatency:
    """How long one facade's step has taken on this replica."""

    facade: str
    step: str
    count: int
    mean: float
    p50: float
    p95: float
    p99: float


@dataclass(frozen=True, slots=True)
class InFlight:
    """Sync runs and async hops of one facade in progress on this replica."""

    facade: str
    kind: str
    now: int


@dataclass(frozen=True, slots=True)
class Health:
    """The health page."""

    broker: str
    broker_healthy: bool
    store: str
    store_error: str
    store_read_ms: float
    store_announces: bool
    running: int
    compensating: int
    in_flight: Sequence[InFlight]
    steps: Sequence[StepLatency]


async def health_of(orchestrator: Orchestrator) -> Health:
    """The health of `orchestrator` now."""
    store = orchestrator.store
    started = time.perf_counter()
    error = ""
    counts: dict[SagaState, int] = {}
    try:
        counts = await store.count_sagas()
    except Exception as exc:  # the page says so; the store's own errors are for its logs
        error = f"{type(exc).__name__}: {exc}"
    elapsed_ms = (time.perf_counter() - started) * 1000
    metrics = orchestrator.metrics
    return Health(
        broker=type(orchestrator.broker).__name__,
        broker_healthy=orchestrator.broker.healthy,
        store=type(store).__name__,
        store_error=error,
        store_read_ms=elapsed_ms,
        store_announces=store.announces_changes,
        running=counts.get(SagaState.RUNNING, 0),
        compensating=counts.get(SagaState.COMPENSATING, 0),
        in_flight=_in_flight(metrics.sagas_in_flight),
        steps=step_latencies(metrics.step_seconds),
    )


def _in_flight(gauge: Collector) -> list[InFlight]:
    found = []
    for metric in gauge.collect():
        for sample in metric.samples:
            found.append(
                InFlight(sample.labels["facade"], sample.labels["kind"], int(sample.value))
            )
    return sorted(found, key=lambda row: (row.facade, row.kind))


def step_latencies(histogram: Collector) -> list[StepLatency]:
    """Count, mean and quantiles of each (facade, step) of the step duration histogram."""
    buckets: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    counts: dict[tuple[str, str], float] = {}
    sums: dict[tuple[str, str], float] = {}
    for metric in histogram.collect():
        for sample in metric.samples:
            key = (sample.labels["facade"], sample.labels["step"])
            if sample.name.endswith("_bucket"):
                buckets[key].append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_count"):
                counts[key] = sample.value
            elif sample.name.endswith("_sum"):
                sums[key] = sample.value
    rows = []
    for key, count in counts.items():
        if not count:
            continue
        cumulative = sorted(buckets[key])
        p50, p95, p99 = (quantile(q, cumulative) for q in QUANTILES)
        rows.append(StepLatency(*key, int(count), sums.get(key, 0.0) / count, p50, p95, p99))
    return sorted(rows, key=lambda row: (row.facade, row.step))


def quantile(q: float, cumulative: Iterable[tuple[float, float]]) -> float:
    """The `q` quantile of a histogram given as (upper bound, cumulative count) pairs, by
    linear interpolation within the bucket it falls in, as `histogram_quantile` does (the
    `+Inf` bucket answers its lower bound)."""
    pairs = list(cumulative)
    if not pairs or pairs[-1][1] == 0:
        return math.nan
    rank = q * pairs[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in pairs:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound
