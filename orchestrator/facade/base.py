"""What sync and async facades share: a name, a broker, and the rollback topic."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pydantic

from orchestrator import tracing
from orchestrator.broker.base import Broker, DeadLetter, Delivery
from orchestrator.dto import Rollback
from orchestrator.errors import BrokerUnavailable
from orchestrator.metrics import Metrics

__all__ = ["FacadeBase", "RollbackNode"]

log = logging.getLogger("orchestrator.facade")

RollbackNode = Callable[[Rollback], Awaitable[None]]
"""Undoes a failed saga; raising makes the broker deliver the rollback again later."""


class FacadeBase:
    """A facade before and after it is registered with an Orchestrator."""

    kind: str = ""

    def __init__(self) -> None:
        self._name = ""
        self._broker: Broker | None = None
        self._metrics = Metrics().for_facade("", self.kind)
        self._rollback_topic = ""
        self._rollback_node: RollbackNode | None = None

    @property
    def name(self) -> str:
        """The name it was registered under."""
        return self._name

    @property
    def rollback_topic(self) -> str:
        """The topic its rollback messages go to; empty when it has no rollback."""
        return self._rollback_topic

    @property
    def broker(self) -> Broker:
        """The broker of the Orchestrator it is registered with."""
        if self._broker is None:
            raise RuntimeError(f"{type(self).__name__} is not registered with an Orchestrator")
        return self._broker

    def _set_rollback(self, topic: str, node: RollbackNode) -> None:
        if not topic:
            raise ValueError("the rollback topic must not be empty")
        if self._rollback_node is not None:
            raise ValueError(f"rollback is already consumed from {self._rollback_topic!r}")
        self._rollback_topic = topic
        self._rollback_node = node

    def bind(self, name: str, broker: Broker, metrics: Metrics) -> None:
        """Called by Orchestrator registration; a facade belongs to one orchestrator."""
        if self._broker is not None:
            raise ValueError(f"facade is already registered as {self._name!r}")
        self._name = name
        self._broker = broker
        self._metrics = metrics.for_facade(name, self.kind)

    async def start(self) -> None:
        """Declare the facade's topics and start consuming them (the broker is started)."""
        if self._rollback_node is not None:
            await self.broker.declare(self._rollback_topic)
            await self.broker.subscribe(self._rollback_topic, self._on_rollback)

    async def _publish_rollback(self, rollback: Rollback, *, inline_fallback: bool) -> None:
        """Hand the rollback to the broker.

        With `inline_fallback`, a broker that cannot take it makes the rollback
        node run here instead (a sync caller has nothing to redeliver);
        without, the error propagates so the input message is redelivered.
        """
        if self._rollback_node is None:
            return
        body = rollback.model_dump_json().encode()
        try:
            await self.broker.publish(
                self._rollback_topic,
                body,
                message_id=f"{rollback.request_id}:rollback",
                headers=tracing.inject(),
            )
        except BrokerUnavailable:
            if not inline_fallback:
                raise
            # Losing the rollback would leave the saga half-done: run it here instead.
            log.warning(
                "broker refused the rollback, running it inline",
                extra={"request_id": rollback.request_id, "facade": self._name},
            )
            try:
                await self._rollback_node(rollback)
            except Exception:
                log.exception(
                    "inline rollback failed; the saga is left half-done",
                    extra={"request_id": rollback.request_id, "facade": self._name},
                )
            else:
                self._metrics.compensated.inc()

    async def _on_rollback(self, delivery: Delivery) -> None:
        assert self._rollback_node is not None
        try:
            rollback = Rollback.model_validate_json(delivery.body)
        except pydantic.ValidationError as exc:
            raise DeadLetter(f"not a rollback message: {exc.errors()[0]['msg']}") from None
        log.info(
            "rolling back",
            extra={
                "request_id": rollback.request_id,
                "facade": rollback.facade,
                "step": rollback.failed_step,
                "topic": delivery.topic,
                "attempt": delivery.delivery_count,
            },
        )
        with tracing.span(
            f"rollback {rollback.facade}",
            {"saga.request_id": rollback.request_id, "saga.step": rollback.failed_step},
            parent=delivery.headers,
        ):
            await self._rollback_node(rollback)
        self._metrics.compensated.inc()
        log.info("rolled back", extra={"request_id": rollback.request_id, "facade": self._name})
