"""The console's pages and what each one does: sagas, a saga, dead letters, health, sign-in.

- `GET /sagas`: sagas, newest first, by facade, state and request id prefix,
  with counts by state; live on the first page (`GET /sagas/live`).
- `GET /saga?facade=&id=`: one saga, its request, timeline, steps and the
  operators' actions; live while it runs (`GET /saga/live`).
- `GET /saga/act?action=&facade=&id=`, then `POST /saga/act`: retry,
  compensate or resolve, confirmed, with a note.
- `GET /dead-letters`, `GET /dead-letters/act`, `POST /dead-letters/act`:
  the dead letters joined to their sagas; replay or discard one.
- `GET /health`: broker, store, sagas in flight, step latency.
- `GET /login`, `POST /login`, `POST /logout`: signing in with a bearer token.

Reads and actions go through the SagaService and SagaAdmin servicers
(`Calls`), each admitted by the admin API's rule for its method (`Gate`).
An action's outcome is shown on the page it returns to.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NoReturn

import grpc
from aiohttp import web

from orchestrator._access_policy import ADMIN_SERVICE, STATUS_SERVICE, Refusal
from orchestrator.access import Principal
from orchestrator.config import UiSettings
from orchestrator.console._auth import CSRF_FIELD, Flash, Gate
from orchestrator.console._calls import CallFailed, Calls
from orchestrator.console._health import health_of
from orchestrator.console._live import (
    END_EVENT,
    UPDATE_EVENT,
    ChangeHub,
    LiveStreams,
    SharedRenders,
    opened,
    stream,
    unless_gone,
)
from orchestrator.console._pages import Pages
from orchestrator.console._views import (
    DEAD_LETTER_ACTIONS,
    SAGA_ACTIONS,
    ActionInfo,
    SagaView,
    dead_letter_view,
    payload_text,
    saga_actions,
    saga_row,
    saga_url,
    saga_view,
)
from orchestrator.proto import saga_pb2
from orchestrator.registry import Orchestrator
from orchestrator.store import DeadLetterRecord, SagaState

__all__ = ["Answered", "Console"]

log = logging.getLogger("orchestrator.console")

PAGE_SIZE = 50
"""Sagas and dead letters a page shows."""
_GET_SAGA = f"/{STATUS_SERVICE}/GetSaga"
_LIST_SAGAS = f"/{STATUS_SERVICE}/ListSagas"
_WATCH_SAGA = f"/{STATUS_SERVICE}/WatchSaga"
_LIST_DEAD_LETTERS = f"/{ADMIN_SERVICE}/ListDeadLetters"
_STATES = [state.value for state in SagaState]
_LETTER_STATES = ("WAITING", "REPLAYED", "DISCARDED")


class Console:
    """The console's request handlers, over one Orchestrator."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        settings: UiSettings,
        gate: Gate,
        calls: Calls,
        hub: ChangeHub,
    ) -> None:
        self.orchestrator = orchestrator
        self.settings = settings
        self.gate = gate
        self.calls = calls
        self.hub = hub
        self.streams = LiveStreams()
        self._list_renders = SharedRenders(hub)
        self.facades = sorted(orchestrator.facades)
        self.pages: Pages | None = None

    def routes(self, app: web.Application) -> None:
        """Add the console's routes to `app`."""
        self.pages = Pages(app, self.gate, facades=self.facades)
        app.router.add_get("/", self.home)
        app.router.add_get("/sagas", self.sagas)
        app.router.add_get("/sagas/live", self.sagas_live)
        app.router.add_get("/saga", self.saga)
        app.router.add_get("/saga/live", self.saga_live)
        app.router.add_get("/saga/act", self.saga_act_form)
        app.router.add_post("/saga/act", self.saga_act)
        app.router.add_get("/dead-letters", self.dead_letters)
        app.router.add_get("/dead-letters/act", self.letter_act_form)
        app.router.add_post("/dead-letters/act", self.letter_act)
        app.router.add_get("/health", self.health)
        app.router.add_get("/login", self.login_form)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)

    @property
    def _pages(self) -> Pages:
        assert self.pages is not None, "routes() first"
        return self.pages

    def _admit(self, request: web.Request, method: str) -> Principal:
        """The caller, admitted to `method`; else the refusal's page is raised."""
        decision = self.gate.admit(request, method)
        if isinstance(decision, Refusal):
            raise Answered(self._pages.refused(request, decision))
        return decision

    def _may(self, request: web.Request, method: str) -> Refusal | None:
        decision = self.gate.admit(request, method)
        return decision if isinstance(decision, Refusal) else None

    # --- sagas ---------------------------------------------------------------------------

    async def home(self, request: web.Request) -> web.StreamResponse:
        """The saga list."""
        raise web.HTTPSeeOther("/sagas")

    def _saga_filters(self, request: web.Request) -> dict[str, str]:
        query = request.query
        state = query.get("state", "").upper()
        return {
            "facade": query.get("facade", ""),
            "state": state if state in _STATES else "",
            "q": query.get("q", ""),
            "page": query.get("page", ""),
        }

    async def _saga_list(self, filters: dict[str, str]) -> dict[str, Any]:
        request = saga_pb2.ListSagasRequest(
            facade=filters["facade"],
            state=saga_pb2.SagaState.Value(filters["state"] or "SAGA_STATE_UNSPECIFIED"),
            page_size=PAGE_SIZE,
            page_token=filters["page"],
            request_id_prefix=filters["q"],
        )
        page = await self.calls.list_sagas(request)
        counts = await self.orchestrator.store.count_sagas(
            facade=filters["facade"], request_id_prefix=filters["q"]
        )
        return {
            "filters": filters,
            "rows": [saga_row(saga) for saga in page.sagas],
            "next_page": page.next_page_token,
            "counts": [(state, counts.get(SagaState(state), 0)) for state in _STATES],
            "total": sum(counts.values()),
        }

    async def sagas(self, request: web.Request) -> web.StreamResponse:
        """The saga list page."""
        self._admit(request, _LIST_SAGAS)
        filters = self._saga_filters(request)
        listing = await self._saga_list(filters)
        live_url = ""
        if not filters["page"]:
            live_url = request.rel_url.with_path("/sagas/live").path_qs
        return self._pages.render(
            request,
            "sagas.html",
            {
                **listing,
                "section": "sagas",
                "facades": self.facades,
                "states": _STATES,
                "live_url": live_url,
            },
        )

    async def sagas_live(self, request: web.Request) -> web.StreamResponse:
        """The saga list's live fragment, as events."""
        self._admit(request, _LIST_SAGAS)
        filters = self._saga_filters(request)
        filters["page"] = ""

        async def render() -> str:
            return self._pages.fragment(request, "_sagas_live.html", await self._saga_list(filters))

        async def shared() -> str:
            view = (filters["facade"], filters["state"], filters["q"])
            return await self._list_renders.fragment(view, render)

        with self.streams.open():
            return await stream(
                request, self.hub, shared, min_interval=self.settings.live_update_seconds
            )

    async def saga(self, request: web.Request) -> web.StreamResponse:
        """One saga's page."""
        self._admit(request, _GET_SAGA)
        facade, request_id = request.query.get("facade", ""), request.query.get("id", "")
        saga = await self.calls.get_saga(facade, request_id)
        context = _saga_context(saga)
        view = context["saga"]
        # The request is not in the Saga message: the console reads it from the store.
        record = await self.orchestrator.store.get(saga.facade, saga.request_id)
        payload = payload_text(record.payload) if record is not None else ""
        return self._pages.render(
            request,
            "saga.html",
            {
                **context,
                "section": "sagas",
                "payload": payload,
                "live_url": ""
                if view.finished
                else saga_url(view.facade, view.request_id, "/saga/live"),
            },
        )

    async def saga_live(self, request: web.Request) -> web.StreamResponse:
        """One saga's live fragment, as events, for as long as `WatchSaga` follows it."""
        self._admit(request, _WATCH_SAGA)
        facade, request_id = request.query.get("facade", ""), request.query.get("id", "")
        with self.streams.open():
            async with (
                opened(request) as (events, gone),
                self.calls.watch_saga(facade, request_id) as watch,
            ):
                while True:
                    following = await unless_gone(gone, anext(watch))
                    if following is None:
                        break
                    try:
                        saga = following.result()
                    except StopAsyncIteration:
                        await events.send("ended", event=END_EVENT)
                        break
                    except CallFailed as exc:
                        await events.send(str(exc), event=END_EVENT)
                        break
                    fragment = self._pages.fragment(request, "_saga_live.html", _saga_context(saga))
                    await events.send(fragment, event=UPDATE_EVENT)
                    await asyncio.sleep(self.settings.live_update_seconds)
        return events

    # --- actions on a saga ---------------------------------------------------------------

    def _action(self, request: web.Request, name: str, known: dict[str, ActionInfo]) -> ActionInfo:
        info = known.get(name)
        if info is None:
            message = f"unknown action {name!r}: one of {', '.join(known)}"
            raise Answered(self._pages.error(request, grpc.StatusCode.INVALID_ARGUMENT, message))
        return info

    async def saga_act_form(self, request: web.Request) -> web.StreamResponse:
        """The confirmation of an action on a saga, with its note."""
        self._admit(request, _GET_SAGA)
        info = self._action(request, request.query.get("action", ""), SAGA_ACTIONS)
        facade, request_id = request.query.get("facade", ""), request.query.get("id", "")
        saga = saga_view(await self.calls.get_saga(facade, request_id))
        return self._confirm(request, info, saga=saga, note="")

    def _confirm(
        self,
        request: web.Request,
        info: ActionInfo,
        *,
        note: str,
        saga: SagaView | None = None,
        letter: DeadLetterRecord | None = None,
        problem: str = "",
        status: int = 200,
    ) -> web.Response:
        refusal = self._may(request, info.method)
        if saga is not None:
            applies = info in saga_actions(saga)
        else:
            applies = letter is not None and letter.state == "WAITING"
        return self._pages.render(
            request,
            "act.html",
            {
                "section": "sagas" if saga is not None else "dead-letters",
                "applies": applies,
                "action": info,
                "saga": saga,
                "letter": letter,
                "note": note,
                "problem": problem,
                "refusal": refusal.message if refusal is not None else "",
            },
            status=status,
        )

    async def saga_act(self, request: web.Request) -> web.StreamResponse:
        """Run a confirmed action on a saga; show its outcome on the saga's page."""
        form = await request.post()
        self._check_csrf(request, str(form.get(CSRF_FIELD, "")))
        info = self._action(request, str(form.get("action", "")), SAGA_ACTIONS)
        principal = self._admit(request, info.method)
        facade, request_id = str(form.get("facade", "")), str(form.get("id", ""))
        note = str(form.get("note", ""))
        act = {
            "retry": self.calls.retry,
            "compensate": self.calls.compensate,
            "resolve": self.calls.resolve,
        }[info.name]
        try:
            saga = await act(principal, facade, request_id, note)
        except CallFailed as exc:
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                current = saga_view(await self.calls.get_saga(facade, request_id))
                return self._confirm(
                    request, info, saga=current, note=note, problem=str(exc), status=400
                )
            refused = Flash(f"{info.name} refused: {exc}", error=True)
            self._return_to(request, saga_url(facade, request_id), refused)
        state = saga_pb2.SagaState.Name(saga.state)
        done = Flash(f"{info.name} done by {principal.name}: the saga moved to {state}")
        self._return_to(request, saga_url(saga.facade, saga.request_id), done)

    # --- dead letters --------------------------------------------------------------------

    async def dead_letters(self, request: web.Request) -> web.StreamResponse:
        """The dead-letter list page."""
        self._admit(request, _LIST_DEAD_LETTERS)
        query = request.query
        state = query.get("state", "WAITING").upper()
        filters = {
            "state": state if state in _LETTER_STATES else "WAITING",
            "facade": query.get("facade", ""),
            "topic": query.get("topic", ""),
            "page": query.get("page", ""),
        }
        listed = await self.calls.list_dead_letters(
            saga_pb2.ListDeadLettersRequest(
                state=saga_pb2.DeadLetterState.Value(f"DEAD_LETTER_{filters['state']}"),
                facade=filters["facade"],
                topic=filters["topic"],
                page_size=PAGE_SIZE,
                page_token=filters["page"],
            )
        )
        return self._pages.render(
            request,
            "dead_letters.html",
            {
                "section": "dead-letters",
                "filters": filters,
                "facades": self.facades,
                "states": _LETTER_STATES,
                "letters": [dead_letter_view(letter) for letter in listed.dead_letters],
                "next_page": listed.next_page_token,
            },
        )

    async def _letter(self, letter_id: str) -> DeadLetterRecord:
        letter = await self.orchestrator.store.get_dead_letter(letter_id) if letter_id else None
        if letter is None:
            raise CallFailed(grpc.StatusCode.NOT_FOUND, f"no dead letter {letter_id!r}")
        return letter

    async def letter_act_form(self, request: web.Request) -> web.StreamResponse:
        """The confirmation of a replay or a discard, with its note."""
        self._admit(request, _LIST_DEAD_LETTERS)
        info = self._action(request, request.query.get("action", ""), DEAD_LETTER_ACTIONS)
        letter = await self._letter(request.query.get("id", ""))
        return self._confirm(request, info, letter=letter, note="")

    async def letter_act(self, request: web.Request) -> web.StreamResponse:
        """Replay or discard a dead letter; show the outcome on the list."""
        form = await request.post()
        self._check_csrf(request, str(form.get(CSRF_FIELD, "")))
        info = self._action(request, str(form.get("action", "")), DEAD_LETTER_ACTIONS)
        principal = self._admit(request, info.method)
        letter_id, note = str(form.get("id", "")), str(form.get("note", ""))
        act = self.calls.replay if info.name == "replay" else self.calls.discard
        try:
            letter = await act(principal, letter_id, note)
        except CallFailed as exc:
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT and letter_id:
                current = await self._letter(letter_id)
                return self._confirm(
                    request, info, letter=current, note=note, problem=str(exc), status=400
                )
            refused = Flash(f"{info.name} refused: {exc}", error=True)
            self._return_to(request, "/dead-letters", refused)
        state = saga_pb2.DeadLetterState.Name(letter.state).removeprefix("DEAD_LETTER_")
        done = Flash(f"{info.name} done by {principal.name}: dead letter {letter.id} is {state}")
        self._return_to(request, f"/dead-letters?state={state}", done)

    # --- health --------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.StreamResponse:
        """The health page."""
        self._admit(request, _LIST_SAGAS)
        return self._pages.render(
            request,
            "health.html",
            {
                "section": "health",
                "health": await health_of(self.orchestrator),
                "live_pages": self.hub.pages,
            },
        )

    # --- signing in ----------------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        """The sign-in page (none is needed where access is open)."""
        if self.gate.open:
            raise web.HTTPSeeOther("/sagas")
        return self._pages.render(
            request, "login.html", {"section": "", "next": _local(request.query.get("next", ""))}
        )

    async def login(self, request: web.Request) -> web.StreamResponse:
        """Sign in with a bearer token: a new session holds the principal it proves."""
        form = await request.post()
        self._check_csrf(request, str(form.get(CSRF_FIELD, "")))
        target = _local(str(form.get("next", ""))) or "/sagas"
        decision = self.gate.policy.authenticate_token(str(form.get("token", "")).strip())
        if isinstance(decision, Refusal):
            log.warning("console sign-in refused", extra={"peer": request.remote})
            return self._pages.render(
                request,
                "login.html",
                {
                    "section": "",
                    "next": target,
                    "problem": f"{decision.code.name}: {decision.message}",
                },
                status=401,
            )
        old = self.gate.session(request)
        if old is not None:
            self.gate.sessions.drop(old.id)
        session = self.gate.sessions.new(decision)
        log.info(
            "console sign-in",
            extra={
                "principal": decision.name,
                "role": decision.role.name.lower(),
                "peer": request.remote,
            },
        )
        response = web.HTTPSeeOther(target)
        self.gate.set_cookie(response, session)
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """Sign out: the session ends."""
        form = await request.post()
        self._check_csrf(request, str(form.get(CSRF_FIELD, "")))
        session = self.gate.session(request)
        if session is not None:
            self.gate.sessions.drop(session.id)
        response = web.HTTPSeeOther("/login" if not self.gate.open else "/sagas")
        response.del_cookie("orchestrator_console", path="/")
        raise response

    # --- shared --------------------------------------------------------------------------

    def _check_csrf(self, request: web.Request, token: str) -> None:
        problem = self.gate.csrf_refusal(request, token)
        if problem is not None:
            log.warning("console form refused", extra={"reason": problem, "path": request.path})
            raise Answered(self._pages.error(request, grpc.StatusCode.PERMISSION_DENIED, problem))

    def _return_to(self, request: web.Request, location: str, outcome: Flash) -> NoReturn:
        """Send the browser to `location` (after a POST), which then shows `outcome`."""
        session = self.gate.session(request)
        if session is not None:
            separator = "&" if "?" in location else "?"
            location = f"{location}{separator}outcome={session.remember(outcome)}"
        raise web.HTTPSeeOther(location)


class Answered(Exception):
    """Ends a handler with a page already rendered (a refusal); the server answers with it."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _saga_context(saga: saga_pb2.Saga) -> dict[str, Any]:
    """What a saga's live fragment shows: the saga and the actions that apply to it."""
    view = saga_view(saga)
    return {"saga": view, "actions": saga_actions(view)}


def _local(target: str) -> str:
    """`target` when it is a path of this site, else empty: no redirect leaves the console."""
    if target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return ""
