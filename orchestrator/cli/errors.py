"""Exit codes of the command-line tool and the gRPC status codes they stand for."""

from __future__ import annotations

import enum

import grpc

__all__ = ["EXIT_CODES_HELP", "CallFailed", "ExitCode", "exit_code_of"]


class ExitCode(enum.IntEnum):
    """What the process's exit status means."""

    OK = 0
    """The command did what it was asked."""
    FAILED = 1
    """Anything else: an internal error, an unimplemented method, a cancelled call."""
    USAGE = 2
    """The command line was wrong; nothing was called."""
    NOT_FOUND = 3
    """The saga or dead letter does not exist (NOT_FOUND)."""
    REFUSED = 4
    """The orchestrator refused the request (FAILED_PRECONDITION, INVALID_ARGUMENT,
    ALREADY_EXISTS): the saga is not in a state that allows it, or the input is bad."""
    UNAUTHORIZED = 5
    """No credential, or one without the role (UNAUTHENTICATED, PERMISSION_DENIED)."""
    UNREACHABLE = 6
    """The orchestrator did not answer in time (UNAVAILABLE, DEADLINE_EXCEEDED)."""


_BY_STATUS: dict[grpc.StatusCode, ExitCode] = {
    grpc.StatusCode.OK: ExitCode.OK,
    grpc.StatusCode.NOT_FOUND: ExitCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: ExitCode.REFUSED,
    grpc.StatusCode.INVALID_ARGUMENT: ExitCode.REFUSED,
    grpc.StatusCode.ALREADY_EXISTS: ExitCode.REFUSED,
    grpc.StatusCode.UNAUTHENTICATED: ExitCode.UNAUTHORIZED,
    grpc.StatusCode.PERMISSION_DENIED: ExitCode.UNAUTHORIZED,
    grpc.StatusCode.UNAVAILABLE: ExitCode.UNREACHABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: ExitCode.UNREACHABLE,
}

EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 2 usage error (nothing was called); 3 not found (NOT_FOUND); "
    "4 refused (FAILED_PRECONDITION, INVALID_ARGUMENT, ALREADY_EXISTS); "
    "5 unauthorized (UNAUTHENTICATED, PERMISSION_DENIED); "
    "6 unreachable (UNAVAILABLE, DEADLINE_EXCEEDED); 1 anything else."
)
"""The exit codes, as `--help` tells them."""


def exit_code_of(code: grpc.StatusCode) -> ExitCode:
    """The exit code a call that ended with `code` gives the process."""
    return _BY_STATUS.get(code, ExitCode.FAILED)


class CallFailed(Exception):
    """A call to the orchestrator ended with a status other than OK.

    `message` is one line with the status name first; it never holds the
    credential the call carried.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def exit_code(self) -> ExitCode:
        """The exit code this failure gives the process."""
        return exit_code_of(self.code)
