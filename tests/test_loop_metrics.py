"""The saga path's metric families kept as plain numbers expose what prometheus_client's would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from orchestrator._loop_metrics import LoopCounter, LoopGauge, LoopHistogram
from orchestrator.metrics import Metrics

BUCKETS = (0.001, 0.01, 0.1, 1, 30)
OBSERVED = (0.0005, 0.001, 0.002, 0.05, 0.05, 2.0, 45.0)


def exposition(registry: CollectorRegistry) -> list[str]:
    """The registry's text exposition, each `_created` sample's time left out (it differs)."""
    lines = generate_latest(registry).decode().splitlines()
    return [line.rsplit(" ", 1)[0] if "_created{" in line else line for line in lines]


def test_a_loop_counter_exposes_what_a_prometheus_counter_does() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    for family in (
        Counter("sagas", "Sagas.", ["facade", "kind"], registry=theirs),
        LoopCounter("sagas", "Sagas.", ["facade", "kind"], registry=ours),
    ):
        family.labels("A", "sync").inc()
        family.labels("A", "sync").inc(2)
        family.labels("B", "async").inc()

    assert exposition(ours) == exposition(theirs)


def test_a_loop_gauge_exposes_what_a_prometheus_gauge_does() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    for family in (
        Gauge("in_flight", "In flight.", ["facade"], registry=theirs),
        LoopGauge("in_flight", "In flight.", ["facade"], registry=ours),
    ):
        family.labels("A").inc()
        family.labels("A").inc()
        family.labels("A").dec()
        family.labels("B").inc()
        family.labels("B").dec()

    assert exposition(ours) == exposition(theirs)


def test_a_loop_histogram_exposes_what_a_prometheus_histogram_does() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    for family in (
        Histogram("step_seconds", "Steps.", ["step"], buckets=BUCKETS, registry=theirs),
        LoopHistogram("step_seconds", "Steps.", ["step"], buckets=BUCKETS, registry=ours),
    ):
        for seconds in OBSERVED:
            family.labels("create_order").observe(seconds)
        family.labels("create_payment").observe(0.01)

    assert exposition(ours) == exposition(theirs)


def test_a_loop_family_refuses_the_wrong_number_of_label_values() -> None:
    family = LoopCounter("sagas", "Sagas.", ["facade", "kind"], registry=CollectorRegistry())

    with pytest.raises(ValueError, match="takes labels"):
        family.labels("A")


def test_a_loop_histogram_refuses_buckets_out_of_order() -> None:
    with pytest.raises(ValueError, match="increasing"):
        LoopHistogram("x", "X.", ["step"], buckets=(0.1, 0.01), registry=CollectorRegistry())


def test_a_loop_family_clashes_with_a_name_already_registered() -> None:
    registry = CollectorRegistry()
    Counter("sagas", "Sagas.", registry=registry)

    with pytest.raises(ValueError, match="Duplicated"):
        LoopCounter("sagas", "Sagas.", [], registry=registry)


def test_the_metrics_every_saga_updates_are_kept_as_plain_numbers_in_one_process() -> None:
    metrics = Metrics()

    assert isinstance(metrics.sagas_started, LoopCounter)
    assert isinstance(metrics.sagas_in_flight, LoopGauge)
    assert isinstance(metrics.step_seconds, LoopHistogram)


def test_under_a_supervisor_they_are_prometheus_clients_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    """A worker's values must reach the files the supervisor reads."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    metrics = Metrics()

    assert isinstance(metrics.sagas_started, Counter)
    assert isinstance(metrics.calls_in_flight, Gauge)
    assert isinstance(metrics.step_seconds, Histogram)
