"""The test kit: test your own facades on an in-memory broker, with faults at saga boundaries.

`SagaKit` builds an Orchestrator on the in-memory broker and an in-memory
(or SQLite) store, registers your facades with the functions production
uses, and runs sagas to their end (`run`), so a test asserts their record
(`assert_saga`). `kit.faults` makes a step fail, loses an upstream answer
after its effect, fails a compensation, or crashes the orchestrator after a
step; `kit.recover()` then starts another on the same store and broker, which
drives the saga to an end.

Installed with the package, the pytest plugin (`orchestrator.testing.plugin`,
registered by a `pytest11` entry point) offers the kit as fixtures:
override `orchestrator_facades` and use `orchestrator_kit`.
"""

from orchestrator.testing._assertions import assert_saga, describe
from orchestrator.testing._faults import Fault, FaultKind, Faults, SimulatedCrash
from orchestrator.testing._kit import Registration, SagaKit
from orchestrator.testing._run import SagaRun

__all__ = [
    "Fault",
    "FaultKind",
    "Faults",
    "Registration",
    "SagaKit",
    "SagaRun",
    "SimulatedCrash",
    "assert_saga",
    "describe",
]
