"""A gRPC health probe: `python -m orchestrator.healthcheck [HOST:PORT] [--service NAME]`.

It asks `grpc.health.v1.Health/Check` once, prints the answer and exits 0 when
it is SERVING, 1 otherwise (another status, an error, no answer in time). The
container image's HEALTHCHECK runs it in place of grpc_health_probe.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["DEFAULT_TARGET", "DEFAULT_TIMEOUT", "check", "main"]

DEFAULT_TARGET: Final = "127.0.0.1:10000"
DEFAULT_TIMEOUT: Final = 3.0
SERVING: Final = "SERVING"


def check(target: str, *, service: str = "", timeout: float = DEFAULT_TIMEOUT) -> str:
    """The status `target` reports for `service` (`SERVING`, ...), or the gRPC error's code."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            return f"{code.name}: {details}" if details else str(code.name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def _timeout(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_arg_parser() -> argparse.ArgumentParser:
    """The command line of `python -m orchestrator.healthcheck`."""
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.healthcheck",
        description="Exit 0 when the gRPC health service at TARGET answers SERVING, else 1.",
    )
    parser.add_argument(
        "target", nargs="?", default=DEFAULT_TARGET, help="HOST:PORT (default: %(default)s)"
    )
    parser.add_argument(
        "--service", default="", help="service name to check (default: the whole server)"
    )
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for the answer (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Check once, print `TARGET[/SERVICE]: STATUS`, return the exit status."""
    args = build_arg_parser().parse_args(argv)
    status = check(args.target, service=args.service, timeout=args.timeout)
    where = f"{args.target}/{args.service}" if args.service else args.target
    print(f"{where}: {status}", flush=True)
    return 0 if status == SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
