"""A private RabbitMQ node for tests that stop, kill or restart the broker.

The node runs the real scripts under /usr/lib/rabbitmq/bin (Debian's
/usr/sbin wrapper switches to the `rabbitmq` user, which cannot write to our
temporary directory) with everything that makes it private in its
environment: its own HOME (and so its own Erlang cookie), node name, AMQP and
distribution ports, and mnesia/log/pid/plugins/config paths. It shares only
epmd with the other nodes on the machine, which is harmless.

The methods are blocking subprocess calls; from async tests use the `a*`
variants, which run them in a thread so the event loop keeps serving the
client under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

from tests.support.processes import alive

__all__ = ["RabbitMQNode"]

BIN_DIR = Path("/usr/lib/rabbitmq/bin")
# rabbitmqctl listens on these for its own Erlang distribution: never hand them out.
_CLI_DIST_PORTS = range(35672, 35683)
_DEFAULT_CONFIG = ("loopback_users = none", "consumer_timeout = 60000")


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken and port not in _CLI_DIST_PORTS:
            taken.add(port)
            return port


class RabbitMQNode:
    """One private RabbitMQ node in a temporary directory; `cleanup()` removes it."""

    def __init__(
        self,
        *,
        bin_dir: Path = BIN_DIR,
        config: tuple[str, ...] = _DEFAULT_CONFIG,
        startup_timeout: int = 60,
    ) -> None:
        self._bin_dir = bin_dir
        self._startup_timeout = startup_timeout
        self.root = Path(tempfile.mkdtemp(prefix="orch-rabbitmq-"))
        self.nodename = f"orch-test-{uuid.uuid4().hex[:12]}@localhost"
        taken: set[int] = set()
        self.port = _free_port(taken)
        self.dist_port = _free_port(taken)
        home = self.root / "home"
        for sub in ("home", "mnesia", "log", "config"):
            (self.root / sub).mkdir()
        (self.root / "config" / "rabbitmq.conf").write_text("\n".join(config) + "\n")
        plugins = self.root / "config" / "enabled_plugins"
        plugins.write_text("[].\n")
        self.pid_file = self.root / "rabbitmq.pid"
        self._env = {
            **os.environ,
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_CONFIG_FILE": str(self.root / "config" / "rabbitmq"),
        }
        self._started = False

    @classmethod
    def available(cls, bin_dir: Path = BIN_DIR) -> bool:
        """True when this machine has the RabbitMQ scripts a private node needs."""
        return all(
            os.access(bin_dir / name, os.X_OK) for name in ("rabbitmq-server", "rabbitmqctl")
        )

    @property
    def url(self) -> str:
        """The node's AMQP URL (guest may log in remotely: `loopback_users = none`)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def running(self) -> bool:
        """True between a successful start and a stop or kill."""
        return self._started

    def start(self) -> None:
        """Start the node and return once it accepts connections."""
        # -detached returns before the node is up; await_startup is what waits.
        subprocess.run(
            [str(self._bin_dir / "rabbitmq-server"), "-detached"],
            env=self._env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=30,
        )
        # await_startup fails at once while the node is not yet registered with
        # epmd, so retry it until the deadline rather than trusting one call.
        deadline = time.monotonic() + self._startup_timeout
        while True:
            remaining = max(1, int(deadline - time.monotonic()))
            result = self._ctl("await_startup", "--timeout", str(remaining), timeout=remaining + 15)
            if result.returncode == 0:
                break
            pid = self._pid()
            crashed = pid is not None and not alive(pid)
            if crashed or time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(
                    f"private RabbitMQ node {self.nodename} did not start: "
                    f"{result.stderr.strip() or result.stdout.strip()}\n{self.log_tail()}"
                )
            time.sleep(0.2)
        self._started = True

    def stop(self) -> None:
        """Stop the node cleanly (`rabbitmqctl stop`, which waits for the VM to exit)."""
        if not self._started:
            return
        result = self._ctl("stop", str(self.pid_file), timeout=60)
        self._started = False
        if result.returncode != 0:
            # The VM must not outlive a failed stop: the next start would clash with it.
            self.kill()

    def kill(self) -> None:
        """SIGKILL the node's beam.smp, a crash without any clean shutdown."""
        self._started = False
        pid = self._pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.05)
        # A stale pid file would let `rabbitmqctl stop <pidfile>` wait on a reused pid.
        self.pid_file.unlink(missing_ok=True)

    def restart(self) -> None:
        """Stop then start with the same data: durable queues and messages survive."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Kill the node (its data is being discarded, a clean stop buys nothing) and delete it."""
        try:
            self.kill()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def add_user(self, user: str, password: str) -> str:
        """Create a user with full rights on `/`; returns its AMQP URL."""
        self._ctl_checked("add_user", user, password)
        self._ctl_checked("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/"

    def set_memory_alarm(self) -> None:
        """Raise the node's memory alarm, as when it runs low on memory.

        It lowers the memory high watermark below what the node uses, the
        path a real alarm takes. RabbitMQ then blocks each connection that
        publishes (`connection.blocked`, reason "low on memory").
        """
        self._ctl_checked("set_vm_memory_high_watermark", "0.000001")
        self._await_memory_alarm(raised=True)

    def clear_memory_alarm(self) -> None:
        """Clear the memory alarm: RabbitMQ's default watermark (0.4) again, connections unblocked.

        0.4 is the node's own watermark unless its config sets another.
        """
        self._ctl_checked("set_vm_memory_high_watermark", "0.4")
        self._await_memory_alarm(raised=False)

    def _await_memory_alarm(self, *, raised: bool, timeout: float = 15.0) -> None:
        """Return once the node's alarms show the memory alarm `raised` (or cleared): the
        watermark takes effect at the node's next memory check, not with the command."""
        deadline = time.monotonic() + timeout
        while True:
            alarms = self._ctl("eval", "rabbit_alarm:get_alarms().", timeout=30).stdout
            if ("memory" in alarms) == raised:
                return
            if time.monotonic() >= deadline:
                state = "raised" if raised else "cleared"
                raise RuntimeError(f"the memory alarm was not {state} in {timeout}s: {alarms}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the node's logs, for failure messages."""
        tails = []
        for path in sorted((self.root / "log").glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(tails)

    async def astart(self) -> None:
        """`start()` in a thread."""
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        """`stop()` in a thread."""
        await asyncio.to_thread(self.stop)

    async def akill(self) -> None:
        """`kill()` in a thread."""
        await asyncio.to_thread(self.kill)

    async def arestart(self) -> None:
        """`restart()` in a thread."""
        await asyncio.to_thread(self.restart)

    async def aset_memory_alarm(self) -> None:
        """`set_memory_alarm()` in a thread."""
        await asyncio.to_thread(self.set_memory_alarm)

    async def aclear_memory_alarm(self) -> None:
        """`clear_memory_alarm()` in a thread."""
        await asyncio.to_thread(self.clear_memory_alarm)

    def __enter__(self) -> RabbitMQNode:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def _ctl(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [str(self._bin_dir / "rabbitmqctl"), "-n", self.nodename, *args],
                env=self._env,
                check=False,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(exc.cmd, 1, "", f"timed out after {timeout}s")

    def _ctl_checked(self, *args: str) -> None:
        result = self._ctl(*args, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {args[0]} failed: {result.stderr.strip()}")

    def _pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
