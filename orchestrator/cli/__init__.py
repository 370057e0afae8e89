"""`orchestrator`, the operators' command-line tool: sagas and dead letters over gRPC.

Installed as the `orchestrator` console script and runnable as
`python -m orchestrator`. See `orchestrator --help` and README.md, "Operating sagas".
"""

from __future__ import annotations

import sys

from orchestrator.cli.app import app
from orchestrator.cli.errors import CallFailed, ExitCode

__all__ = ["ExitCode", "app", "main"]


def main() -> None:
    """Run the command line: exit with the code that tells how it went."""
    try:
        app(prog_name="orchestrator")
    except CallFailed as failure:
        sys.stderr.write(f"error: {failure.message}\n")
        sys.exit(failure.exit_code)
