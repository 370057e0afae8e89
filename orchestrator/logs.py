"""Log formatting that shows the saga fields (`request_id`, `facade`, `step`, `topic`, ...).

The framework logs through the stdlib with `extra={...}`; this formatter
renders those fields after the message, as `key=value` pairs or as one JSON
object a line.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from orchestrator.workers import current_worker

__all__ = ["configure_logging"]

# Attributes every LogRecord has; anything else came in through `extra`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD}


class KeyValueFormatter(logging.Formatter):
    """`time level logger message key=value ...`, for people."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record and its extra fields on one line."""
        line = super().format(record)
        fields = " ".join(f"{key}={value}" for key, value in _extras(record).items())
        return f"{line} {fields}" if fields else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record and its extra fields as a JSON object."""
        event: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


class _Naming(logging.Filter):
    """Adds `worker` to every record that does not name one."""

    def __init__(self, worker: str) -> None:
        super().__init__()
        self._worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "worker"):
            record.worker = self._worker
        return True


def configure_logging(level: str = "INFO", *, json_lines: bool = False) -> None:
    """Send every log record to stderr in the chosen format; a supervised worker's records
    name it (`worker=INDEX/PID`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else KeyValueFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    worker = current_worker()
    if worker is not None:
        handler.addFilter(_Naming(str(worker)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Alembic narrates every start (plugins, context, "will assume transactional DDL"):
    # its warnings matter, its chatter does not.
    logging.getLogger("alembic").setLevel(max(root.level, logging.WARNING))
