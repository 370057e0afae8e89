"""A gRPC health probe: `python -m orchestrator.healthcheck [HOST:PORT] [--service NAME]`.

It asks `grpc.health.v1.Health/Check` once, prints the answer and exits 0 when
it is SERVING, 1 otherwise (another status, an error, no answer in time). The
container image's HEALTHCHECK runs it in place of grpc_health_probe.

Against a TLS server add `--ca-file` (and, for mutual TLS, `--cert-file` and
`--key-file`; `--server-name` when the certificate names another host).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.tls import channel_credentials

__all__ = ["DEFAULT_TARGET", "DEFAULT_TIMEOUT", "check", "main"]

DEFAULT_TARGET: Final = "127.0.0.1:10000"
DEFAULT_TIMEOUT: Final = 3.0
SERVING: Final = "SERVING"


def check(
    target: str,
    *,
    service: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
) -> str:
    """The status `target` reports for `service` (`SERVING`, ...), or the gRPC error's code.

    With `credentials` the channel speaks TLS; `server_name` overrides the host name
    the server's certificate is checked against.
    """
    if credentials is None:
        channel = grpc.insecure_channel(target)
    else:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(target, credentials, options=options)
    with channel:
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
    parser.add_argument("--ca-file", type=Path, help="speak TLS, trusting this CA bundle (PEM)")
    parser.add_argument("--cert-file", type=Path, help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--key-file", type=Path, help="the client certificate's key (PEM)")
    parser.add_argument("--server-name", help="host name the server certificate must name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Check once, print `TARGET[/SERVICE]: STATUS`, return the exit status."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if (args.cert_file is None) != (args.key_file is None):
        parser.error("--cert-file and --key-file go together")
    credentials = None
    if args.ca_file or args.cert_file:
        try:
            credentials = channel_credentials(args.ca_file, args.cert_file, args.key_file)
        except OSError as exc:
            parser.error(f"cannot read {exc.filename}: {exc.strerror}")
    status = check(
        args.target,
        service=args.service,
        timeout=args.timeout,
        credentials=credentials,
        server_name=args.server_name,
    )
    where = f"{args.target}/{args.service}" if args.service else args.target
    print(f"{where}: {status}", flush=True)
    return 0 if status == SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
