"""Rendering the console's pages: templates, the parts every page shares, and refusals.

Templates are Jinja2 with autoescaping on for every one of them, so whatever a
saga holds (a request id, an error, a note, a message body) is shown as text,
never as markup. Times go out as `<time datetime=...>` in UTC; the page's
script rewrites them in the viewer's time zone and keeps UTC on hover.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
import grpc
import jinja2
from aiohttp import web

from orchestrator._access_policy import Refusal
from orchestrator._saga_text import utc_text
from orchestrator.access import Principal
from orchestrator.console._auth import CSRF_FIELD, Gate

__all__ = ["STATIC", "Pages", "http_status"]

PACKAGE = Path(__file__).resolve().parent
STATIC = PACKAGE / "static"
"""The console's CSS and script, shipped in the package: nothing is fetched elsewhere."""

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status a page answers for a call that ended with `code`."""
    return _HTTP_STATUS.get(code, 500)


def _query(base: str, **params: str) -> str:
    """`base` with the non-empty `params` as its query string."""
    kept = {key: value for key, value in params.items() if value}
    return f"{base}?{urlencode(kept)}" if kept else base


def _versions() -> dict[str, str]:
    """Each static file's content digest, so a new release is never served from a cache."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        for path in STATIC.iterdir()
        if path.is_file()
    }


class Pages:
    """The template environment and the context every page gets."""

    def __init__(self, app: web.Application, gate: Gate, *, facades: list[str]) -> None:
        self.gate = gate
        self.facades = facades
        versions = _versions()
        env = aiohttp_jinja2.setup(
            app,
            loader=jinja2.PackageLoader("orchestrator.console", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        env.globals.update(
            static=lambda name: f"/static/{name}?v={versions.get(name, '0')}",
            query=_query,
            csrf_field=CSRF_FIELD,
        )
        env.filters["utc"] = self._utc
        env.filters["iso"] = lambda when: when.isoformat() if when else ""
        env.filters["seconds"] = lambda value: "" if value is None else f"{value:.3f}s"

    @staticmethod
    def _utc(when: datetime | None, precise: bool = False) -> str:
        """`when` in UTC, to the second (`precise`: to the millisecond)."""
        text = utc_text(when)
        if text and precise and when is not None:
            text += f".{when.microsecond // 1000:03d}"
        return f"{text} UTC" if text else ""

    def _shared(self, request: web.Request, response: web.StreamResponse) -> dict[str, Any]:
        session = self.gate.ensure_session(request, response)
        caller = self.gate.caller(request)
        principal = caller if isinstance(caller, Principal) else None
        return {
            "section": "",
            "principal": principal,
            "open_access": self.gate.open,
            "csrf": session.csrf,
            "flashes": [
                session.outcomes[token]
                for token in request.query.getall("outcome", [])
                if token in session.outcomes
            ],
            "path": request.path_qs,
        }

    def render(
        self,
        request: web.Request,
        template: str,
        context: Mapping[str, Any],
        *,
        status: int = 200,
    ) -> web.Response:
        """The page `template` with `context` and the shared parts."""
        response = web.Response(status=status, content_type="text/html", charset="utf-8")
        full = {**self._shared(request, response), **context}
        response.text = aiohttp_jinja2.render_string(template, request, full)
        return response

    def fragment(self, request: web.Request, template: str, context: Mapping[str, Any]) -> str:
        """A live fragment: `template` rendered with `context` only."""
        return aiohttp_jinja2.render_string(template, request, dict(context))

    def refused(self, request: web.Request, refusal: Refusal) -> web.Response:
        """The answer to a request the access rules refuse: sign in first (a page a browser
        asked for without credentials), or a page that says why."""
        if (
            refusal.code == grpc.StatusCode.UNAUTHENTICATED
            and request.method == "GET"
            and "Authorization" not in request.headers
        ):
            location = _query("/login", next=request.path_qs)
            raise web.HTTPSeeOther(location)
        return self.error(request, refusal.code, refusal.message)

    def error(self, request: web.Request, code: grpc.StatusCode, message: str) -> web.Response:
        """A page that says what went wrong, with its gRPC status name."""
        return self.render(
            request,
            "error.html",
            {"code": code.name, "message": message},
            status=http_status(code),
        )
