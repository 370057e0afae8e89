"""The saga console over HTTP: access, forms, escaping, live streams and health.

Each test serves the booking service in process (the in-memory broker and
its real Order and Payment upstreams over gRPC) with the console on a free
port, and talks to the console as a browser would, with aiohttp's client:
cookies, forms and their CSRF tokens, redirects, event streams. What an
action did is judged from the saga's record over gRPC (its state and its
operator actions), never from the page alone. The browser's side (scripts,
live updates on screen, phone width, keyboard) is `test_console_browser.py`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import grpc
import pytest
import yaml

from main import BookingApp
from main import running_app as run_booking_app
from orchestrator.broker import InMemoryBroker
from orchestrator.config import AccessSettings, UiSettings
from orchestrator.console._auth import MAX_SESSIONS, Sessions
from orchestrator.console._health import quantile
from orchestrator.console._live import ChangeHub, SharedRenders
from orchestrator.proto import saga_pb2, saga_pb2_grpc
from orchestrator.registry import Orchestrator
from orchestrator.store import SagaState
from pb import booking_pb2, booking_pb2_grpc
from tests.support.app_fixtures import Upstreams, app_settings
from tests.support.processes import ROOT, main_env
from tests.support.sagas import kept_dead_letters
from tests.test_admin import compensation_failed
from tests.test_journal_governs import ASYNC_BOOKING, book, finished
from topic import CANCEL_ASYNC_BOOKING

pytestmark = pytest.mark.timeout(60)

OPERATE_TOKEN = f"operate-{secrets.token_hex(16)}"
READ_TOKEN = f"read-{secrets.token_hex(16)}"
OPERATOR, READER = "oncall", "dashboard"
SYNC_BOOKING = "SyncBooking"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def console_settings(upstreams: Upstreams, **access: Any) -> Any:
    """The booking service with the console on a free port; `access` as given."""
    settings = app_settings(upstreams)
    return settings.model_copy(
        update={
            "ui": UiSettings(enabled=True, host="127.0.0.1", port=0, live_update_seconds=0.05),
            "access": AccessSettings.model_validate(access),
        }
    )


ENFORCED = {
    "tokens": [
        {"name": OPERATOR, "role": "operate", "token": OPERATE_TOKEN},
        {"name": READER, "role": "read", "token": READ_TOKEN},
    ]
}


@dataclass
class Site:
    """The running service, a client of its gRPC port, and its console's address."""

    app: BookingApp
    upstreams: Upstreams
    booking: booking_pb2_grpc.BookingServiceAsyncStub
    sagas: saga_pb2_grpc.SagaServiceAsyncStub
    base: str

    async def saga(self, request_id: str, facade: str = SYNC_BOOKING) -> saga_pb2.Saga:
        """The saga's record over gRPC (the operate token reads everything)."""
        return await self.sagas.GetSaga(
            saga_pb2.GetSagaRequest(facade=facade, request_id=request_id),
            metadata=(("authorization", f"Bearer {OPERATE_TOKEN}"),),
        )

    async def book_sync(self, request_id: str, *, fault: bool = False) -> None:
        """A sync booking; a failing one (the fault injected) is not an error here."""
        request = booking_pb2.BookingRequest(ProductID=1, FaultInject=fault)
        try:
            await self.booking.HandleSyncBooking(
                request, metadata=(("x-request-id", request_id),), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            if not fault:
                raise
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture
async def site(upstreams: Upstreams, request: pytest.FixtureRequest) -> AsyncIterator[Site]:
    """The service with access enforced (`oncall` operates, `dashboard` reads), unless the
    test is marked `access(...)` with settings of its own."""
    marker = request.node.get_closest_marker("access")
    access = marker.kwargs if marker is not None else ENFORCED
    async with run_booking_app(console_settings(upstreams, **access)) as app:
        assert app.server.console is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            yield Site(
                app,
                upstreams,
                booking_pb2_grpc.BookingServiceStub(channel),
                saga_pb2_grpc.SagaServiceStub(channel),
                f"http://127.0.0.1:{app.server.console.port}",
            )


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client that keeps cookies (of an IP address too) and does not follow
    redirects, so each answer is seen as it is."""
    jar = aiohttp.CookieJar(unsafe=True)
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=timeout) as session:
        yield session


async def page(
    browser: aiohttp.ClientSession, url: str, *, status: int = 200
) -> tuple[str, aiohttp.ClientResponse]:
    """GET `url`; its text, once its status is checked."""
    async with browser.get(url, allow_redirects=False) as response:
        text = await response.text()
        assert response.status == status, f"{url}: {response.status}\n{text[:2000]}"
        return text, response


def csrf_of(html: str) -> str:
    """The CSRF token a page's forms carry."""
    found = _CSRF.search(html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


async def sign_in(browser: aiohttp.ClientSession, site: Site, token: str) -> None:
    """Sign in through the sign-in form, as a person does."""
    form, _ = await page(browser, f"{site.base}/login")
    async with browser.post(
        f"{site.base}/login",
        data={"csrf_token": csrf_of(form), "token": token, "next": "/sagas"},
        allow_redirects=False,
    ) as response:
        assert response.status == 303, await response.text()
        assert response.headers["Location"] == "/sagas"


async def post_form(
    browser: aiohttp.ClientSession, url: str, fields: dict[str, str], **headers: str
) -> tuple[int, str, str]:
    """POST a form; its status, text and Location."""
    async with browser.post(url, data=fields, headers=headers, allow_redirects=False) as response:
        return response.status, await response.text(), response.headers.get("Location", "")


async def act_on_saga(
    browser: aiohttp.ClientSession, site: Site, action: str, request_id: str, note: str
) -> tuple[int, str, str]:
    """Open an action's confirmation page, then confirm it with `note`."""
    confirm, _ = await page(
        browser,
        f"{site.base}/saga/act?action={action}&facade={SYNC_BOOKING}&id={request_id}",
    )
    return await post_form(
        browser,
        f"{site.base}/saga/act",
        {
            "csrf_token": csrf_of(confirm),
            "action": action,
            "facade": SYNC_BOOKING,
            "id": request_id,
            "note": note,
        },
    )


# --- access ------------------------------------------------------------------------------


async def test_a_page_asks_to_sign_in_where_access_is_enforced(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    _, response = await page(browser, f"{site.base}/sagas?state=RUNNING", status=303)

    location = urlsplit(response.headers["Location"])
    assert location.path == "/login"
    assert parse_qs(location.query) == {"next": ["/sagas?state=RUNNING"]}


async def test_signing_in_keeps_a_session_id_in_an_http_only_strict_cookie_never_the_token(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    await sign_in(browser, site, READ_TOKEN)
    listing, _ = await page(browser, f"{site.base}/sagas")

    [cookie] = list(browser.cookie_jar)
    assert cookie.key == "orchestrator_console"
    assert cookie.value not in (READ_TOKEN, OPERATE_TOKEN)
    assert READ_TOKEN not in cookie.value
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"
    assert READER in listing
    assert READ_TOKEN not in listing


async def test_a_wrong_token_is_refused_and_no_token_is_ever_logged(
    site: Site, browser: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = f"wrong-{secrets.token_hex(16)}"
    await sign_in(browser, site, OPERATE_TOKEN)
    form, _ = await page(browser, f"{site.base}/login")

    status, text, _ = await post_form(
        browser, f"{site.base}/login", {"csrf_token": csrf_of(form), "token": wrong}
    )

    assert status == 401
    assert "UNAUTHENTICATED: invalid bearer token" in text
    assert wrong not in text
    assert wrong not in caplog.text
    assert OPERATE_TOKEN not in caplog.text
    assert "console sign-in refused" in caplog.text
    assert "console sign-in" in caplog.text


async def test_a_reader_sees_sagas_and_dead_letters_but_an_action_is_permission_denied(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    await site.book_sync("read-only-1")
    await sign_in(browser, site, READ_TOKEN)
    await page(browser, f"{site.base}/sagas")
    await page(browser, f"{site.base}/dead-letters")
    confirm, _ = await page(
        browser, f"{site.base}/saga/act?action=resolve&facade={SYNC_BOOKING}&id=read-only-1"
    )
    assert "has role read" in confirm  # the page says so before anything is sent

    status, text, _ = await act_on_saga(browser, site, "resolve", "read-only-1", "by a reader")

    assert status == 403
    assert (
        "PERMISSION_DENIED: &#39;dashboard&#39; has role read; "
        "/orchestrator.v1.SagaAdmin/ResolveSaga needs operate" in text
    )
    saga = await site.saga("read-only-1")
    assert saga.state == saga_pb2.COMPLETED
    assert list(saga.actions) == []


async def test_a_form_without_the_sessions_csrf_token_changes_nothing(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    await site.book_sync("forged-1", fault=True)
    await sign_in(browser, site, OPERATE_TOKEN)
    fields = {"action": "resolve", "facade": SYNC_BOOKING, "id": "forged-1", "note": "x"}

    missing = await post_form(browser, f"{site.base}/saga/act", fields)
    wrong = await post_form(browser, f"{site.base}/saga/act", {**fields, "csrf_token": "nope"})

    for status, text, _ in (missing, wrong):
        assert status == 403
        assert "CSRF token does not match this session" in text
    assert list((await site.saga("forged-1")).actions) == []


async def test_a_post_the_browser_marks_cross_site_is_refused_even_with_the_token(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    await sign_in(browser, site, OPERATE_TOKEN)
    listing, _ = await page(browser, f"{site.base}/sagas")

    status, text, _ = await post_form(
        browser,
        f"{site.base}/logout",
        {"csrf_token": csrf_of(listing)},
        **{"Sec-Fetch-Site": "cross-site"},
    )

    assert status == 403
    assert "a form sent from another site" in text
    await page(browser, f"{site.base}/sagas")  # still signed in


@pytest.mark.access(tokens=ENFORCED["tokens"], open_status=True)
async def test_open_status_lets_anyone_read_sagas_but_not_dead_letters(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    await site.book_sync("open-status-1")

    listing, _ = await page(browser, f"{site.base}/sagas")
    _, letters = await page(browser, f"{site.base}/dead-letters", status=303)

    assert "open-status-1" in listing
    assert letters.headers["Location"].startswith("/login")


@pytest.mark.access()
async def test_where_access_is_open_an_action_runs_as_anonymous_without_signing_in(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    await site.book_sync("anonymous-1")
    listing, _ = await page(browser, f"{site.base}/sagas")
    assert "open access" in listing

    status, _, location = await act_on_saga(browser, site, "retry", "anonymous-1", "try")

    assert status == 303
    assert location.startswith(f"/saga?facade={SYNC_BOOKING}&id=anonymous-1&outcome=")
    shown, _ = await page(browser, f"{site.base}{location}")
    assert "retry refused: FAILED_PRECONDITION" in shown  # by its state, not by access


async def test_an_actions_outcome_shows_on_the_page_it_returns_to_however_often_it_loads(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    await site.book_sync("outcome-1")
    await sign_in(browser, site, OPERATE_TOKEN)
    _, _, location = await act_on_saga(browser, site, "resolve", "outcome-1", "n")

    first, _ = await page(browser, f"{site.base}{location}")
    again, _ = await page(browser, f"{site.base}{location}")
    plain, _ = await page(browser, f"{site.base}/saga?facade={SYNC_BOOKING}&id=outcome-1")

    for shown in (first, again):
        assert "resolve refused: FAILED_PRECONDITION" in shown
    assert "resolve refused" not in plain


async def test_signing_out_ends_the_session(site: Site, browser: aiohttp.ClientSession) -> None:
    await sign_in(browser, site, READ_TOKEN)
    listing, _ = await page(browser, f"{site.base}/sagas")

    status, _, location = await post_form(
        browser, f"{site.base}/logout", {"csrf_token": csrf_of(listing)}
    )

    assert (status, location) == (303, "/login")
    await page(browser, f"{site.base}/sagas", status=303)


async def test_signing_in_never_redirects_off_the_site(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    form, _ = await page(browser, f"{site.base}/login?next=//elsewhere.example/x")
    fields = {"csrf_token": csrf_of(form), "token": READ_TOKEN, "next": "//elsewhere.example/x"}

    status, _, location = await post_form(browser, f"{site.base}/login", fields)

    assert (status, location) == (303, "/sagas")


async def test_a_bearer_header_reads_without_a_session_or_csrf_token(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    headers = {"Authorization": f"Bearer {READ_TOKEN}"}
    async with browser.get(f"{site.base}/sagas", headers=headers) as response:
        assert response.status == 200
    async with browser.get(
        f"{site.base}/sagas", headers={"Authorization": "Bearer not-a-token-at-all"}
    ) as response:
        assert response.status == 401


# --- actions -----------------------------------------------------------------------------


async def test_an_operator_resolves_a_stuck_saga_and_its_record_names_them_with_the_note(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    outage = await compensation_failed(site.app, site.booking, site.upstreams, "stuck-1")
    try:
        await sign_in(browser, site, OPERATE_TOKEN)
        confirm, _ = await page(
            browser, f"{site.base}/saga/act?action=resolve&facade={ASYNC_BOOKING}&id=stuck-1"
        )
        status, _, location = await post_form(
            browser,
            f"{site.base}/saga/act",
            {
                "csrf_token": csrf_of(confirm),
                "action": "resolve",
                "facade": ASYNC_BOOKING,
                "id": "stuck-1",
                "note": "refunded by hand <b>twice</b>",
            },
        )
    finally:
        outage.undo()

    assert status == 303
    shown, _ = await page(browser, f"{site.base}{location}")
    assert "resolve done by oncall: the saga moved to RESOLVED" in shown
    assert "refunded by hand &lt;b&gt;twice&lt;/b&gt;" in shown
    saga = await site.saga("stuck-1", ASYNC_BOOKING)
    assert saga.state == saga_pb2.RESOLVED
    assert [(a.action, a.actor, a.note) for a in saga.actions] == [
        ("resolve", OPERATOR, "refunded by hand <b>twice</b>")
    ]


async def test_an_action_the_saga_state_refuses_shows_the_admin_apis_reason(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    await site.book_sync("done-1")
    await sign_in(browser, site, OPERATE_TOKEN)

    status, _, location = await act_on_saga(browser, site, "compensate", "done-1", "")

    assert status == 303
    shown, _ = await page(browser, f"{site.base}{location}")
    assert (
        "compensate refused: FAILED_PRECONDITION: saga SyncBooking/done-1 is COMPLETED: "
        "only a RUNNING saga can be compensated" in shown
    )
    assert list((await site.saga("done-1")).actions) == []


async def test_a_resolve_without_a_note_returns_to_its_confirmation_with_the_reason(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    await site.book_sync("no-note-1")
    await sign_in(browser, site, OPERATE_TOKEN)

    status, text, _ = await act_on_saga(browser, site, "resolve", "no-note-1", "   ")

    assert status == 400
    assert "INVALID_ARGUMENT: note is required" in text
    assert 'name="note"' in text


async def test_a_dead_letter_is_listed_with_its_saga_and_discarded_once_with_a_note(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    outage = await compensation_failed(site.app, site.booking, site.upstreams, "lettered-1")
    outage.undo()
    [letter] = (await kept_dead_letters(site.app.orchestrator, [CANCEL_ASYNC_BOOKING], 1)).values()
    await sign_in(browser, site, OPERATE_TOKEN)

    listing, _ = await page(browser, f"{site.base}/dead-letters")
    assert f'data-letter="{letter.id}"' in listing
    row = listing.split(f'data-letter="{letter.id}"', 1)[1].split("</tr>", 1)[0]
    assert "lettered-1" in row
    assert "COMPENSATION_FAILED" in row
    assert f'data-label="Deliveries" class="num">{letter.delivery_count}<' in row
    assert "rollback node failed" in row

    confirm, _ = await page(browser, f"{site.base}/dead-letters/act?action=discard&id={letter.id}")
    fields = {"csrf_token": csrf_of(confirm), "action": "discard", "id": letter.id, "note": "dup"}
    first = await post_form(browser, f"{site.base}/dead-letters/act", fields)
    second = await post_form(browser, f"{site.base}/dead-letters/act", fields)
    shown, _ = await page(browser, f"{site.base}{first[2]}")
    refusal, _ = await page(browser, f"{site.base}{second[2]}")

    assert first[0] == second[0] == 303
    assert first[2].startswith("/dead-letters?state=DISCARDED&outcome=")
    assert f"discard done by oncall: dead letter {letter.id} is DISCARDED" in shown
    assert "dup" in shown
    assert "discard refused: FAILED_PRECONDITION" in refusal
    assert f"was already DISCARDED by {OPERATOR}" in refusal


# --- what pages show ---------------------------------------------------------------------

HOSTILE = "<img src=x onerror=alert(1)>"


async def test_html_in_a_request_id_and_an_error_is_shown_as_text_on_every_page(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    await site.book_sync(HOSTILE, fault=True)
    await sign_in(browser, site, OPERATE_TOKEN)
    escaped = "&lt;img src=x onerror=alert(1)&gt;"

    for url in (
        "/sagas",
        "/sagas?q=%3Cimg",
        "/saga?facade=SyncBooking&id=%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E",
        "/saga/act?action=resolve&facade=SyncBooking&id=%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E",
    ):
        text, _ = await page(browser, f"{site.base}{url}")
        assert HOSTILE not in text, url
        assert escaped in text, url


async def test_the_list_filters_by_request_id_prefix_and_counts_by_state(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    await site.book_sync("alpha-1")
    await site.book_sync("alpha-2", fault=True)
    await site.book_sync("beta-1")
    await sign_in(browser, site, READ_TOKEN)

    listing, _ = await page(browser, f"{site.base}/sagas?q=alpha-")

    assert "alpha-1" in listing and "alpha-2" in listing
    assert "beta-1" not in listing
    assert '<span class="n" data-count="ALL">2</span>' in listing
    assert '<span class="n" data-count="COMPLETED">1</span>' in listing
    assert '<span class="n" data-count="COMPENSATED">1</span>' in listing


async def test_a_page_token_the_store_did_not_issue_is_invalid_argument(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    await sign_in(browser, site, READ_TOKEN)

    text, _ = await page(browser, f"{site.base}/sagas?page=forged", status=400)

    assert "INVALID_ARGUMENT: invalid page_token" in text


async def test_a_saga_that_is_not_there_is_not_found(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    await sign_in(browser, site, READ_TOKEN)

    text, _ = await page(browser, f"{site.base}/saga?id=nobody", status=404)

    assert "NOT_FOUND: no saga with request_id &#39;nobody&#39;" in text


async def test_the_saga_page_shows_its_request_payload(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    await site.book_sync("payload-1")
    await sign_in(browser, site, READ_TOKEN)

    text, _ = await page(browser, f"{site.base}/saga?facade=SyncBooking&id=payload-1")

    assert "&#34;ProductID&#34;: &#34;1&#34;" in text or '"ProductID": "1"' in text


async def test_health_shows_the_broker_the_store_and_each_steps_latency(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    await site.book_sync("healthy-1")
    await sign_in(browser, site, READ_TOKEN)

    text, _ = await page(browser, f"{site.base}/health")

    assert 'InMemoryBroker: <span class="ok">connected</span>' in text
    assert 'InMemorySagaStore: <span class="ok">answered</span>' in text
    for step in ("create_order", "create_payment"):
        row = text.split(f'data-step="{step}"', 1)[1].split("</tr>", 1)[0]
        assert '<td data-label="Runs" class="num">1</td>' in row


async def test_every_answer_carries_the_security_headers_and_pages_are_not_cached(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    _, login = await page(browser, f"{site.base}/login")
    _, script = await page(browser, f"{site.base}/static/console.js")

    for response in (login, script):
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert login.headers["Cache-Control"] == "no-store"
    assert script.content_type in ("application/javascript", "text/javascript")


# --- live streams ------------------------------------------------------------------------


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, str]]:
    """The (event, data) pairs of an event stream, as they come."""
    name, data = "message", []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data.append(line.removeprefix("data: "))


async def test_the_list_stream_sends_a_saga_that_starts_after_the_page_opened(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    await sign_in(browser, site, READ_TOKEN)
    async with browser.get(f"{site.base}/sagas/live") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        stream = events(response)
        first = await anext(stream)
        assert first[0] == "update"
        assert "streamed-1" not in first[1]

        await site.book_sync("streamed-1")

        async with asyncio.timeout(5):
            name, data = await anext(stream)
            while "streamed-1" not in data:
                name, data = await anext(stream)
        assert name == "update"
        assert '<span class="n" data-count="COMPLETED">1</span>' in data


async def test_the_saga_stream_sends_the_saga_then_says_it_ended(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    await site.book_sync("ended-1")
    await sign_in(browser, site, READ_TOKEN)

    async with browser.get(f"{site.base}/saga/live?facade=SyncBooking&id=ended-1") as response:
        got = [event async for event in events(response)]

    assert [name for name, _ in got] == ["update", "end"]
    assert 'data-saga-state="COMPLETED"' in got[0][1]


async def test_a_stream_needs_the_same_access_as_its_page(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    async with browser.get(f"{site.base}/sagas/live", allow_redirects=False) as response:
        assert response.status == 303


async def test_a_closed_browser_leaves_no_live_page_behind(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    console = site.app.server.console
    assert console is not None
    await sign_in(browser, site, READ_TOKEN)
    async with browser.get(f"{site.base}/sagas/live") as response:
        await anext(events(response))
        assert console._hub.pages == 1
    await site.book_sync("after-close-1")  # a write finds the stream gone

    async with asyncio.timeout(15):
        while console._hub.pages:  # noqa: ASYNC110 (the server notices at its next write)
            await asyncio.sleep(0.05)


# --- parts -------------------------------------------------------------------------------


def test_quantiles_interpolate_within_the_bucket_as_histogram_quantile_does() -> None:
    buckets = [(0.01, 10.0), (0.1, 90.0), (1.0, 100.0), (float("inf"), 100.0)]

    assert quantile(0.05, buckets) == pytest.approx(0.005)
    assert quantile(0.5, buckets) == pytest.approx(0.01 + 0.09 * 40 / 80)
    assert quantile(0.99, buckets) == pytest.approx(0.1 + 0.9 * 9 / 10)


async def test_live_pages_of_one_view_share_its_render_until_the_next_change() -> None:
    orchestrator = Orchestrator(InMemoryBroker())
    hub = ChangeHub(orchestrator)
    renders = SharedRenders(hub)
    made: list[str] = []

    async def render() -> str:
        made.append(f"fragment {len(made) + 1}")
        return made[-1]

    try:
        assert await renders.fragment("all", render) == "fragment 1"
        assert await renders.fragment("all", render) == "fragment 1"  # a second page, no change
        assert await renders.fragment("failed", render) == "fragment 2"
        orchestrator.saga_changed("SyncBooking", "r-1")
        assert await renders.fragment("all", render) == "fragment 3"
        assert await renders.fragment("all", render) == "fragment 3"
    finally:
        hub.close()


def test_sessions_end_after_their_lifetime_without_use_and_are_bounded_in_number() -> None:
    now = [0.0]
    sessions = Sessions(60, clock=lambda: now[0])
    kept = sessions.new()
    now[0] = 50
    assert sessions.get(kept.id) is kept  # used: 60 s more from now
    now[0] = 109
    assert sessions.get(kept.id) is kept
    now[0] = 170
    assert sessions.get(kept.id) is None

    first = sessions.new()
    for _ in range(MAX_SESSIONS):
        sessions.new()
    assert len(sessions) == MAX_SESSIONS
    assert sessions.get(first.id) is None


def test_ui_enabled_without_the_console_extra_stops_startup_naming_the_setting(
    tmp_path: Path,
) -> None:
    config = yaml.safe_load((ROOT / "app.yaml").read_text(encoding="utf-8"))
    config["ui"] = {"enabled": True, "port": 0}
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    # As if aiohttp were not installed: importing it fails.
    script = (
        f"import runpy, sys; sys.path.insert(0, {str(ROOT)!r}); sys.modules['aiohttp'] = None; "
        f"sys.argv = ['main.py']; runpy.run_path({str(ROOT / 'main.py')!r}, run_name='__main__')"
    )

    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env=main_env(path),
        check=False,
    )

    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"configuration error: {path}: ui.enabled: ")
    assert "the console needs the 'console' extra (aiohttp cannot be imported)" in line
    assert "pip install 'saga-orchestrator[console]'" in line


async def test_a_compensation_failed_saga_is_what_the_state_filter_finds(
    site: Site, browser: aiohttp.ClientSession
) -> None:
    outage = await compensation_failed(site.app, site.booking, site.upstreams, "filtered-1")
    outage.undo()
    await book(site.booking, "filtered-2")
    await finished(site.app, ["filtered-2"])
    await sign_in(browser, site, READ_TOKEN)

    listing, _ = await page(browser, f"{site.base}/sagas?state=COMPENSATION_FAILED")

    assert "filtered-1" in listing
    assert "filtered-2" not in listing
    assert str(SagaState.COMPENSATION_FAILED) in listing


def test_a_console_port_in_use_stops_startup_with_one_line_naming_the_setting(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = {
            "grpc": {"host": "127.0.0.1", "port": 0},
            "embedded_upstreams": {"order": {"port": 0}, "payment": {"port": 0}},
            "ui": {"enabled": True, "host": "127.0.0.1", "port": port},
        }
        path = tmp_path / "app.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")

        result = subprocess.run(
            [sys.executable, str(ROOT / "main.py")],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
            env=main_env(path),
            check=False,
        )

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "ui.port" in line]
    assert errors == [
        f"cannot start: ui.port: cannot listen on 127.0.0.1:{port}: Address already in use"
    ], result.stderr
