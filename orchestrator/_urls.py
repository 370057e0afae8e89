"""URLs in the configuration: their passwords masked for logs, their scheme and port checked.

`redact_url` never parses more than it must, so a malformed URL (a port that
is not a number) is masked as well as a good one, and reported by
`checked_url` with its password masked.
"""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import urlsplit, urlunsplit

__all__ = ["BROKER_SCHEMES", "STORE_SCHEMES", "checked_url", "redact_url"]

BROKER_SCHEMES = frozenset({"memory", "amqp", "amqps"})
"""The schemes of `broker.url`."""
STORE_SCHEMES = frozenset(
    {"memory", "sqlite", "sqlite+aiosqlite", "postgresql", "postgresql+asyncpg"}
)
"""The schemes of `store.url` (a bare `sqlite` or `postgresql` gets the driver it names)."""


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`; the rest as it was, malformed or not."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def checked_url(url: str, schemes: Collection[str], example: str) -> None:
    """ValueError naming `url` (password masked) unless it has one of `schemes` and a port,
    if any, that is a number from 1 to 65535."""
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        raise ValueError(
            f"unsupported scheme {parts.scheme!r} in {redact_url(url)!r}: use {example}"
        )
    try:
        port = parts.port
    except ValueError:
        port = None
    else:
        if port is None or port > 0:
            return
    netloc = parts.netloc.rpartition("@")[2]
    raise ValueError(
        f"port {netloc.rpartition(':')[2]!r} of {redact_url(url)!r} is not a number from 1 to 65535"
    )
