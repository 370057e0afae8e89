"""SQLite's change feed: the processes sharing one database file tell each other what they wrote.

SQLite has no LISTEN/NOTIFY, but every process writing a database file runs on
the host that holds it. Each store on that file binds a Unix datagram socket in
a directory beside it (`<file>-feed`, as SQLite keeps `<file>-wal`; where that
path is too long for a socket's, one in the temporary directory named after the
file's device and inode), and after each committed batch sends the keys of the
sagas it changed to every other socket there: a JSON array of
`[facade, request_id]` pairs (as PostgreSQL's payloads, split alike), after the
sender's sequence number. Its own subscribers hear of its writes directly.

Datagrams are never waited for: a receiver whose queue is full (the kernel
keeps a few datagrams per socket) loses one, and its sender goes on. The
receiver sees the sequence number jump and tells its subscribers of a gap, as
PostgreSQL's feed does when its connection drops; they read again what
matters. A socket whose process is gone refuses datagrams: its file is removed
by the next sender, and the directory by the last store to close. A store that
cannot bind its socket there runs without the feed (its waits read the store).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Final

from orchestrator.store._subscribers import Subscribers
from orchestrator.store.base import ChangeListener, GapListener
from orchestrator.store.sql._listen import notification_payloads, parse_payload
from orchestrator.store.sql._ops import ActOp, ApplyOp, BeginOp, ClaimOp, Op

__all__ = ["HostChangeFeed", "changed_sagas", "feed_directory"]

log = logging.getLogger("orchestrator.store.sql")

_DIRECTORY_PREFIX: Final = "orchestrator-feed-"
_DIRECTORY_SUFFIX: Final = "-feed"
_SUFFIX: Final = ".sock"
_NAME_LENGTH: Final = 19
"""The longest socket name: `<pid, at most 7 digits>.<6 hex digits>.sock`."""
_RECEIVE_BYTES: Final = 65536
_UNIX_PATH_MAX: Final = 107


def feed_directory(database: str) -> Path:
    """The directory of the sockets of every store on the SQLite file `database`: beside it,
    unless a socket's path there would be too long (then in the temporary directory)."""
    real = os.path.realpath(database)
    beside = Path(f"{real}{_DIRECTORY_SUFFIX}")
    if len(str(beside)) + 1 + _NAME_LENGTH <= _UNIX_PATH_MAX:
        return beside
    found = os.stat(real)
    digest = hashlib.sha256(f"{found.st_dev}:{found.st_ino}".encode()).hexdigest()[:16]
    base = Path(tempfile.gettempdir())
    if len(str(base)) > _UNIX_PATH_MAX - 60:
        base = Path("/tmp")  # a socket's path must stay short
    return base / f"{_DIRECTORY_PREFIX}{digest}"


class HostChangeFeed:
    """Announces this process's saga writes to the other stores on one SQLite file, and
    hears theirs."""

    def __init__(self, database: str) -> None:
        """`database`: the SQLite file's path (it must exist: the store created it)."""
        self._database = database
        self._directory: Path | None = None
        self._path: Path | None = None
        self._socket: socket.socket | None = None
        self._subscribers = Subscribers()
        self._sequence = 0
        self._heard: dict[str, int] = {}  # each sender's last sequence number
        self.live = False
        """True while this store's socket is bound: every process's writes are heard."""
        self.lost = 0
        """Announcements another process missed (its queue full): it saw a gap."""

    @property
    def address(self) -> str:
        """This store's socket, once started."""
        return str(self._path or "")

    def subscribe(
        self, changed: ChangeListener, gap: GapListener | None, *, others_only: bool = False
    ) -> Callable[[], None]:
        """Call `changed(facade, request_id)` for every saga written on the file (this
        store's writes included, unless `others_only`) and `gap()` when announcements may
        have been missed; returns a function that unsubscribes."""
        return self._subscribers.subscribe(changed, gap, others_only=others_only)

    def start(self) -> None:
        """Bind this store's socket and hear the others' on the running event loop."""
        if self._socket is not None:
            return
        directory = feed_directory(self._database)
        path = directory / f"{os.getpid()}.{uuid.uuid4().hex[:6]}{_SUFFIX}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for attempt in range(3):
                directory.mkdir(mode=0o700, exist_ok=True)
                try:
                    sock.bind(str(path))
                    break
                except FileNotFoundError:
                    # The last store on the file removed the directory meanwhile.
                    if attempt == 2:
                        raise
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                path.unlink()
            log.warning(
                "SQLite change feed off: cannot bind a socket in %s (%s); waits and watches "
                "read the store instead",
                directory,
                exc.strerror or exc,
            )
            return
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self._directory, self._path, self._socket = directory, path, sock
        self.live = True
        self._gapped()  # what was written before this socket was bound went unheard

    async def close(self) -> None:
        """Stop hearing and remove this store's socket."""
        sock, self._socket = self._socket, None
        self.live = False
        if sock is None:
            return
        with contextlib.suppress(RuntimeError, ValueError):
            asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()
        if self._directory is not None:
            with contextlib.suppress(OSError):
                self._directory.rmdir()  # only once it is empty: the last store leaves

    def announce(self, keys: Iterable[tuple[str, str]]) -> None:
        """Tell this process's subscribers, then every other store on the file, that the
        sagas `keys` were written (a committed batch's)."""
        keys = sorted(set(keys))
        if not keys:
            return
        for facade, request_id in keys:
            self._subscribers.changed(facade, request_id, own=True)
        sock, directory = self._socket, self._directory
        if sock is None or directory is None:
            return
        own = str(self._path)
        try:
            peers = [
                entry.path
                for entry in os.scandir(directory)
                if entry.name.endswith(_SUFFIX) and entry.path != own
            ]
        except OSError:
            return
        if not peers:
            return  # alone on the file (one process): nobody to tell, nothing to encode
        datagrams = []
        for payload in notification_payloads(keys):
            self._sequence += 1
            datagrams.append(f"{self._sequence}\n{payload}".encode())
        for peer in peers:
            self._send(sock, peer, datagrams)

    def _send(self, sock: socket.socket, peer: str, datagrams: list[bytes]) -> None:
        for datagram in datagrams:
            try:
                sock.sendto(datagram, peer)
            except (BlockingIOError, InterruptedError):
                continue  # its queue is full: the sequence numbers tell it of the gap
            except ConnectionRefusedError:
                # Nobody is bound there: a process gone without removing its socket.
                with contextlib.suppress(OSError):
                    os.unlink(peer)
                return
            except OSError:
                return  # gone meanwhile, or unwritable: nothing to tell

    def _readable(self) -> None:
        sock = self._socket
        while sock is not None:
            try:
                data, sender = sock.recvfrom(_RECEIVE_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self._received(data, str(sender or ""))

    def _received(self, data: bytes, sender: str) -> None:
        try:
            head, _, payload = data.decode().partition("\n")
            sequence = int(head)
            keys = parse_payload(payload)
        except (UnicodeDecodeError, ValueError, json.JSONDecodeError):
            log.warning("saga change feed: unreadable announcement from %s", sender or "?")
            self._gapped()
            return
        last = self._heard.get(sender)
        self._heard[sender] = sequence
        # Every sender counts from 1: a first datagram numbered otherwise comes from a
        # store that wrote before this one heard it (or whose first ones were lost).
        expected = 1 if last is None else last + 1
        if sequence != expected:
            self.lost += max(sequence - expected, 0)
            self._gapped()
        for facade, request_id in keys:
            self._subscribers.changed(facade, request_id)

    def _gapped(self) -> None:
        self._subscribers.gapped()


def changed_sagas(outcomes: Iterable[tuple[Op, object]]) -> Iterator[tuple[str, str]]:
    """The sagas a committed batch changed: begun, moved, acted on, or claimed."""
    for op, outcome in outcomes:
        if isinstance(op, BeginOp) and outcome is True:
            yield op.saga.facade, op.saga.request_id
        elif isinstance(op, ApplyOp | ActOp) and outcome is True:
            yield op.facade, op.request_id
        elif isinstance(op, ClaimOp) and isinstance(outcome, list):
            yield from (key for key, _expired in outcome)
