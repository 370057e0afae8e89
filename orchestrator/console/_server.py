"""The console's HTTP server, run on the orchestrator's own event loop.

Why aiohttp: its `AppRunner`/`TCPSite` pair is made to be started and
stopped inside a running loop (uvloop here) as one more server of the
process, beside grpc.aio's: no thread, no signal handlers of its own (the
orchestrator keeps SIGTERM), no lifespan protocol to drive, and the bound
port is known once `start` returns (port 0 in tests). aiohttp-jinja2 plugs
Jinja2 templates into it and aiohttp-sse speaks Server-Sent Events; all of it
is aio-libs' own, on multidict and yarl, which aio-pika already brings.
Starlette with uvicorn would do the same pages, but embedding uvicorn's
server means working around its signal capture and private startup steps.

The console answers on its own port, so its requests never queue behind
gRPC calls (or the reverse) in a server; they share the loop, where a page
costs a store read or two and a template render. The saga path pays only
for `ChangeHub`'s notification (see `orchestrator.console._live`).
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web

from orchestrator._access_policy import AccessPolicy
from orchestrator.admin import SagaAdminService
from orchestrator.config import UiSettings
from orchestrator.console._auth import Gate, Sessions
from orchestrator.console._calls import CallFailed, Calls
from orchestrator.console._console import Answered, Console
from orchestrator.console._live import ChangeHub
from orchestrator.console._pages import STATIC
from orchestrator.errors import StartupError
from orchestrator.registry import Orchestrator
from orchestrator.status import SagaStatusService

__all__ = ["ConsoleServer"]

log = logging.getLogger("orchestrator.console")

SHUTDOWN_SECONDS = 2.0
"""How long requests under way get when the console closes (live streams end at once)."""

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ConsoleServer:
    """Serves the saga console of `orchestrator` on `settings.host:settings.port`.

    Reads and actions go through `status` and `admin`, the servicers the
    gRPC port serves; `access` decides who may do what, as it does there.
    """

    def __init__(
        self,
        orchestrator: Orchestrator,
        settings: UiSettings,
        access: AccessPolicy,
        status: SagaStatusService,
        admin: SagaAdminService,
    ) -> None:
        self.settings = settings
        self._hub = ChangeHub(orchestrator)
        gate = Gate(
            access, Sessions(settings.session_minutes * 60), secure=settings.tls is not None
        )
        self._console = Console(orchestrator, settings, gate, Calls(status, admin), self._hub)
        self._runner: web.AppRunner | None = None
        self.port = 0
        """The bound port, once started."""

    @property
    def url(self) -> str:
        """Where a browser finds the console (the bound port; every interface's address
        shown as 127.0.0.1)."""
        scheme = "https" if self.settings.tls is not None else "http"
        host = self.settings.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}/"

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[_headers, self._errors])
        self._console.routes(app)
        app.router.add_static("/static", STATIC, name="static")
        app.on_shutdown.append(self._end_streams)
        return app

    async def start(self) -> int:
        """Listen; returns the bound port."""
        runner = web.AppRunner(
            self._app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_SECONDS,
        )
        await runner.setup()
        ssl_context = None
        if self.settings.tls is not None:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(self.settings.tls.cert_file, self.settings.tls.key_file)
        site = web.TCPSite(runner, self.settings.host, self.settings.port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise StartupError(
                f"ui.port: cannot listen on {self.settings.host}:{self.settings.port}: "
                f"{os.strerror(exc.errno) if exc.errno else exc}"
            ) from None
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        address = runner.addresses[0]
        self.port = int(address[1])
        log.info("saga console served", extra={"url": self.url})
        return self.port

    async def close(self) -> None:
        """End the live streams, let other requests finish briefly, stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._hub.close()

    async def _end_streams(self, app: web.Application) -> None:
        self._console.streams.cancel_all()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Answered as answer:
            return answer.response
        except CallFailed as exc:
            pages = self._console.pages
            assert pages is not None
            return pages.error(request, exc.code, exc.message)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("console page failed", extra={"path": request.path})
            pages = self._console.pages
            assert pages is not None
            return pages.error(
                request, grpc.StatusCode.INTERNAL, "the page failed: the log says why"
            )


@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers on every answer; pages are never cached (they show live state)."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(_HEADERS)
        raise
    if not response.prepared:
        response.headers.update(_HEADERS)
        if not request.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
    return response
