"""The Orchestrator: the registry of facades and the owner of their broker."""

from __future__ import annotations

import logging
from typing import Any

from orchestrator.broker.base import Broker
from orchestrator.facade.async_ import AsyncFacade
from orchestrator.facade.base import FacadeBase
from orchestrator.facade.sync import SyncFacade
from orchestrator.metrics import Metrics

__all__ = ["Orchestrator", "UnknownFacadeError"]

log = logging.getLogger("orchestrator")


class UnknownFacadeError(LookupError):
    """No facade is registered under that name."""


class Orchestrator:
    """Registers facades by name and starts their consumers on one broker.

    There is no global instance: build one, hand it to each registration
    function, then `await orchestrator.start()`.
    """

    def __init__(self, broker: Broker, metrics: Metrics | None = None) -> None:
        self.broker = broker
        self.metrics = metrics or Metrics()
        broker.attach_metrics(self.metrics)
        self._sync: dict[str, SyncFacade[Any, Any]] = {}
        self._async: dict[str, AsyncFacade[Any]] = {}
        self._started = False

    def register_sync_facade(self, name: str, facade: SyncFacade[Any, Any]) -> None:
        """Register `facade` under `name`; a name can be registered once."""
        self._register(name, facade)
        self._sync[name] = facade

    def register_async_facade(self, name: str, facade: AsyncFacade[Any]) -> None:
        """Register `facade` under `name`; a name can be registered once."""
        self._register(name, facade)
        self._async[name] = facade

    def get_sync_facade(self, name: str) -> SyncFacade[Any, Any]:
        """The sync facade registered under `name`."""
        try:
            return self._sync[name]
        except KeyError:
            raise UnknownFacadeError(self._unknown("sync", name, self._sync)) from None

    def get_async_facade(self, name: str) -> AsyncFacade[Any]:
        """The async facade registered under `name`."""
        try:
            return self._async[name]
        except KeyError:
            raise UnknownFacadeError(self._unknown("async", name, self._async)) from None

    @property
    def facades(self) -> dict[str, FacadeBase]:
        """Every registered facade by name."""
        return {**self._sync, **self._async}

    async def start(self) -> None:
        """Start the broker, then every facade's consumers."""
        if self._started:
            return
        await self.broker.start()
        for facade in self.facades.values():
            await facade.start()
        self._started = True
        log.info("orchestrator started", extra={"facades": sorted(self.facades)})

    async def close(self) -> None:
        """Stop consuming and close the broker; unfinished deliveries return to their topics."""
        await self.broker.close()
        self._started = False

    def _register(self, name: str, facade: FacadeBase) -> None:
        if not name:
            raise ValueError("a facade needs a name")
        if name in self._sync or name in self._async:
            raise ValueError(f"a facade named {name!r} is already registered")
        if self._started:
            raise RuntimeError("register facades before Orchestrator.start()")
        facade.bind(name, self.broker, self.metrics)

    @staticmethod
    def _unknown(kind: str, name: str, known: dict[str, Any]) -> str:
        names = ", ".join(sorted(known)) or "none"
        return f"no {kind} facade named {name!r} (registered: {names})"
