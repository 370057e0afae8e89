"""Who is using the console, what they may do, and forms that only the console's pages send.

The console follows the admin API's access rules (`AccessPolicy`), method by
method: a page that shows sagas needs what `ListSagas` or `GetSaga` needs
(`read`, or nothing with `open_status`), the dead-letter list what
`ListDeadLetters` needs (`read`), an action what its SagaAdmin method needs
(`operate`). Where access is open (no credentials configured) everyone is
`anonymous` with role operate, as on the gRPC port.

Signing in takes one of the configured bearer tokens. The browser then holds
only a random session id in an HttpOnly, SameSite=Strict cookie (Secure over
HTTPS); the session, kept in this process's memory, holds the principal the
token proved, never the token. It ends after `ui.session_minutes` without a
request, on sign-out, or when the process restarts. A script may send
`Authorization: Bearer <token>` instead of a cookie.

Every form carries the session's CSRF token (a synchronizer token, compared
in constant time) and every POST must return it; a POST a browser marks as
cross-site (`Sec-Fetch-Site`) is refused before that. Requests that prove
who they are with an Authorization header carry no ambient credential, so
they need no CSRF token.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from aiohttp import web

from orchestrator._access_policy import AccessPolicy, Refusal
from orchestrator.access import Principal

__all__ = [
    "CSRF_FIELD",
    "SESSION_COOKIE",
    "Flash",
    "Gate",
    "Session",
    "Sessions",
]

SESSION_COOKIE = "orchestrator_console"
CSRF_FIELD = "csrf_token"
MAX_SESSIONS = 10_000
"""Sessions kept at most; past it the least recently used one is dropped (a flood of
anonymous visitors cannot grow the process without bound)."""
MAX_OUTCOMES = 20
"""Action outcomes a session keeps for the pages that show them."""

_NOT_BEARER = Refusal(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
"""An Authorization header that is not a bearer token."""


@dataclass(frozen=True, slots=True)
class Flash:
    """An action's outcome, shown on the page the action returns to (whose address names
    it, so that the page shows it however often it is loaded)."""

    text: str
    error: bool = False


@dataclass(slots=True)
class Session:
    """One browser's session: its CSRF token and, once signed in, its principal."""

    id: str
    csrf: str
    principal: Principal | None = None
    expires: float = 0.0
    outcomes: OrderedDict[str, Flash] = field(default_factory=OrderedDict)

    def remember(self, flash: Flash) -> str:
        """Keep `flash` for the page an action returns to; the token that page's address
        carries (`?outcome=`). The latest `MAX_OUTCOMES` are kept."""
        token = secrets.token_urlsafe(8)
        self.outcomes[token] = flash
        while len(self.outcomes) > MAX_OUTCOMES:
            self.outcomes.popitem(last=False)
        return token


class Sessions:
    """The sessions of this process, each ending `lifetime` seconds after its last use."""

    def __init__(self, lifetime: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._lifetime = lifetime
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session | None:
        """The live session of that id, its lifetime renewed; None when there is none."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if session.expires <= now:
            del self._sessions[session_id]
            return None
        session.expires = now + self._lifetime
        self._sessions.move_to_end(session_id)
        return session

    def new(self, principal: Principal | None = None) -> Session:
        """A new session (a new id: signing in never keeps the id a visitor came with)."""
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            principal=principal,
            expires=self._clock() + self._lifetime,
        )
        self._sessions[session.id] = session
        return session

    def drop(self, session_id: str) -> None:
        """End the session, if it is there."""
        self._sessions.pop(session_id, None)


class Gate:
    """Maps a request onto its session and principal, and checks roles and CSRF tokens."""

    def __init__(self, policy: AccessPolicy, sessions: Sessions, *, secure: bool) -> None:
        self.policy = policy
        self.sessions = sessions
        self._secure = secure

    @property
    def open(self) -> bool:
        """True where access is open: everyone is `anonymous` with role operate."""
        return not self.policy.enforced

    def session(self, request: web.Request) -> Session | None:
        """The request's session, if its cookie names a live one."""
        session_id = request.cookies.get(SESSION_COOKIE)
        return self.sessions.get(session_id) if session_id else None

    def ensure_session(self, request: web.Request, response: web.StreamResponse) -> Session:
        """The request's session, or a new one whose cookie `response` sets."""
        session = self.session(request)
        if session is None:
            session = self.sessions.new()
            self.set_cookie(response, session)
        return session

    def set_cookie(self, response: web.StreamResponse, session: Session) -> None:
        """Make `response` hand the browser `session`'s id."""
        response.set_cookie(
            SESSION_COOKIE,
            session.id,
            httponly=True,
            secure=self._secure,
            samesite="Strict",
            path="/",
        )

    def caller(self, request: web.Request) -> Principal | Refusal | None:
        """Who the request comes from: the bearer token's principal (or its refusal), the
        session's, or None for a caller without credentials."""
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return _NOT_BEARER
            return self.policy.authenticate_token(token.strip())
        session = self.session(request)
        return session.principal if session is not None else None

    def admit(self, request: web.Request, method: str) -> Principal | Refusal:
        """The principal the request may call `method` (`/package.Service/Method`) as, or why
        it may not: the admin API's rules."""
        caller = self.caller(request)
        if isinstance(caller, Refusal):
            return caller
        return self.policy.admit(method, caller)

    def csrf_refusal(self, request: web.Request, form_token: str) -> str | None:
        """Why a POST must be refused as possibly forged, or None when it may go on."""
        if request.headers.get("Authorization"):
            return None
        if request.headers.get("Sec-Fetch-Site", "") == "cross-site":
            return "a form sent from another site"
        session = self.session(request)
        if session is None:
            return "no session: open the page again and resend the form"
        if not form_token or not hmac.compare_digest(
            form_token.encode("utf-8", "replace"), session.csrf.encode()
        ):
            return "the form's CSRF token does not match this session: open the page again"
        return None
