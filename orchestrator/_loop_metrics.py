"""Metrics the saga path updates on every saga, kept as plain numbers and exposed at scrape time.

prometheus_client's children take a lock on every update (its values may be written from any
thread), and a histogram walks its buckets in Python. The engine updates its hot metrics
(sagas started and completed, what is in flight, each step's time) only on the event loop, so
these families keep their children's values as plain numbers and build the metric families
when the registry is collected: a scrape, or `get_sample_value`. Each family has the
`labels(...)` of prometheus_client's and children with the same `inc`, `dec` and `observe`,
so the engine cannot tell them apart.

Under a supervisor (prometheus_client's multiprocess mode) each worker's values must reach
the files the supervisor reads, so `Metrics` keeps prometheus_client's own families there.
"""

from __future__ import annotations

import abc
import bisect
import math
import time
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

__all__ = ["LoopCounter", "LoopGauge", "LoopHistogram"]

ChildT = TypeVar("ChildT")


class _Value:
    """One labelled child's number; updated on the event loop only."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount` (a counter's must not be negative: the engine only counts up)."""
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        """Take `amount` off (gauges)."""
        self.value -= amount


class _Buckets:
    """One labelled histogram child: counts per bucket and the sum, updated on the loop."""

    __slots__ = ("bounds", "counts", "created", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        """Count one observation of `amount` (in its bucket: the first bound not below it)."""
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.total += amount


class _Family(Collector, Generic[ChildT]):
    """A labelled metric family whose children are made on first use and kept."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], ChildT] = {}
        registry.register(self)

    def labels(self, *values: str) -> ChildT:
        """The child of these label values."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, not {values}")
            child = self._children[values] = self._child()
        return child

    def describe(self) -> Iterable[Metric]:
        """The family without samples (what the registry checks names against)."""
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        """The family with every child's samples as they are now."""
        family = self._family()
        for key, child in list(self._children.items()):
            self._add(family, key, child)
        return [family]

    @abc.abstractmethod
    def _child(self) -> ChildT: ...

    @abc.abstractmethod
    def _family(self) -> Metric: ...

    @abc.abstractmethod
    def _add(self, family: Metric, key: tuple[str, ...], child: ChildT) -> None: ...


class _NumberFamily(_Family[_Value]):
    """A family whose children are one number each."""

    def _child(self) -> _Value:
        return _Value()


class LoopCounter(_NumberFamily):
    """A counter (`<name>_total`, `<name>_created`) with prometheus_client's
    `labels(...).inc()`."""

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def _add(self, family: Metric, key: tuple[str, ...], child: _Value) -> None:
        assert isinstance(family, CounterMetricFamily)
        family.add_metric(key, child.value, created=child.created)


class LoopGauge(_NumberFamily):
    """A gauge with prometheus_client's `labels(...).inc()` and `.dec()`."""

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def _add(self, family: Metric, key: tuple[str, ...], child: _Value) -> None:
        assert isinstance(family, GaugeMetricFamily)
        family.add_metric(key, child.value)


class LoopHistogram(_Family[_Buckets]):
    """A histogram (`_bucket`, `_count`, `_sum`, `_created`) with prometheus_client's
    `labels(...).observe()`; `buckets` are the upper bounds, +Inf added."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = tuple(float(bound) for bound in buckets)
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be increasing, not {tuple(buckets)}")
        self._bounds = bounds if bounds and bounds[-1] == math.inf else (*bounds, math.inf)
        super().__init__(name, documentation, labelnames, registry=registry)

    def _child(self) -> _Buckets:
        return _Buckets(self._bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def _add(self, family: Metric, key: tuple[str, ...], child: _Buckets) -> None:
        assert isinstance(family, HistogramMetricFamily)
        cumulative, buckets = 0, []
        for bound, count in zip(self._bounds, list(child.counts), strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), float(cumulative)))  # type: ignore[no-untyped-call]
        family.add_metric(key, buckets, child.total)
        # prometheus_client's own histograms say when each child began; its family type
        # takes no `created`, so the sample is added as the library writes it.
        labels = dict(zip(self._labelnames, key, strict=True))
        family.samples.append(Sample(f"{self._name}_created", labels, child.created))
