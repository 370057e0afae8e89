"""Optional dependencies: whether an extra of the distribution is installed."""

from __future__ import annotations

import importlib

__all__ = ["CONSOLE_MODULES", "require_extra"]

CONSOLE_MODULES = ("aiohttp", "aiohttp_jinja2", "aiohttp_sse", "jinja2")
"""What `orchestrator.console` imports beyond the base install (the `console` extra)."""


def require_extra(extra: str, modules: tuple[str, ...], needed_by: str) -> None:
    """ValueError naming `extra` and how to install it unless every one of `modules` imports."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise ValueError(
                f"{needed_by} needs the '{extra}' extra ({module} cannot be imported): "
                f"pip install 'saga-orchestrator[{extra}]'"
            ) from None
