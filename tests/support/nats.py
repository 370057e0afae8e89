"""A private NATS server with JetStream for tests that stop, kill or restart the broker.

It runs the machine's `nats-server` on a free port of 127.0.0.1, with its
own JetStream store directory (so a restart brings the streams, consumers and
messages back) and no monitoring port, from a config file of its own: users
added with `add_user` are loaded with a SIGHUP, without a restart.

The methods are blocking; from async tests use the `a*` variants, which run
them in a thread so the event loop keeps serving the client under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["NatsServer"]

BINARY = "nats-server"
_STARTUP_TIMEOUT = 15.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """One private nats-server with JetStream in a temporary directory; `cleanup()` removes it.

    With `auth`, clients must log in: `url` carries the first user's password.
    """

    def __init__(self, *, auth: bool = False, max_file_store: int | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="orch-nats-"))
        self.port = _free_port()
        self._users: dict[str, str] = {}
        if auth:
            self._users["orchestrator"] = secrets.token_hex(16)
        self._max_file_store = max_file_store
        self._config = self.root / "nats.conf"
        self._log = self.root / "nats.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._write_config()

    @staticmethod
    def available() -> bool:
        """True when this machine has a nats-server binary."""
        return shutil.which(BINARY) is not None

    @property
    def url(self) -> str:
        """The server's URL (with the first user's credentials when it requires a login)."""
        if self._users:
            user, password = next(iter(self._users.items()))
            return f"nats://{user}:{password}@127.0.0.1:{self.port}"
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """True between a successful start and a stop or kill."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and return once it accepts connections."""
        if self.running:
            return
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                [BINARY, "-c", str(self._config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while not self._accepts():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"private nats-server did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server cleanly (SIGTERM, waiting for it to exit)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the server, a crash without any clean shutdown."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        """Stop then start with the same store: streams, consumers and messages survive."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Kill the server and delete its directory."""
        try:
            self.kill()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def add_user(self, user: str, password: str) -> str:
        """Let `user` log in with `password` (the running server reloads its config); returns
        the user's URL."""
        self._users[user] = password
        self._write_config()
        if self.running and self._process is not None:
            self._process.send_signal(signal.SIGHUP)
            time.sleep(0.5)  # the reload is quick and announces nothing to clients
        return f"nats://{user}:{password}@127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, for failure messages."""
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

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

    def __enter__(self) -> NatsServer:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def _write_config(self) -> None:
        store: dict[str, object] = {"store_dir": str(self.root / "jetstream")}
        if self._max_file_store:
            store["max_file_store"] = self._max_file_store
        lines = [
            f"listen: 127.0.0.1:{self.port}",
            f"jetstream: {json.dumps(store)}",
        ]
        if self._users:
            users = [{"user": u, "password": p} for u, p in self._users.items()]
            lines.append(f"authorization: {json.dumps({'users': users})}")
        self._config.write_text("\n".join(lines) + "\n")

    def _accepts(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
            return True
        return False

    def _end(self, signum: signal.Signals) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
