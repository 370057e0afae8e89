"""The saga console in a real browser, against a real `python main.py`.

One `python main.py` serves the module as the quick start runs it, but on
RabbitMQ (a topic prefix of this run's own, its queues and exchanges deleted
afterwards), with a SQLite journal in a fresh directory, access enforced by an
operate token (`oncall`) and a read token (`dashboard`), and its Order and
Payment services as processes of their own: the Order service takes 1.2 s a
call and the Payment service 0.6 s, so that an async saga is still running
when its page opens, and the Order service keeps its ledger in a file, so that
it can be stopped and started again. Bookings are made with the real
`grpcurl`, as the README makes them.

Headless Chromium (`tests/support/browser.py`, one browser profile for the
module, each test signed out at its start) opens the console as a person
would, in the Asia/Tokyo time zone (UTC+9, so local and UTC times differ),
and each test is judged from what the page shows and from what the journal
and the upstream ledgers say. Every page must load without a script
error or a blocked resource (the Content-Security-Policy allows only the
console's own files). Screenshots go to the `screenshots` folder; the two the
README shows are `console-sagas.png` and `console-saga.png`
(`pytest tests/test_console_browser.py --screenshots docs` writes them).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import grpc
import pytest
import yaml

from orchestrator.config import BrokerSettings
from orchestrator.proto import saga_pb2, saga_pb2_grpc
from pb import order_pb2, order_pb2_grpc, payment_pb2, payment_pb2_grpc
from tests.support.app_fixtures import BOOKING_TOPICS
from tests.support.broker_fixtures import delete_topology, make_settings
from tests.support.processes import (
    ROOT,
    ServiceProcess,
    free_port,
    grpcurl_binary,
    run_grpcurl,
    start_main,
    wait_for_serving,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page

pytestmark = [pytest.mark.broker, pytest.mark.browser, pytest.mark.timeout(180)]

OPERATE_TOKEN = f"operate-{secrets.token_hex(16)}"
READ_TOKEN = f"read-{secrets.token_hex(16)}"
OPERATOR, READER = "oncall", "dashboard"
ORDER_LATENCY_MS = 1200
PAYMENT_LATENCY_MS = 600
TIME_ZONE = "Asia/Tokyo"
HOSTILE = "<img src=x onerror=alert(1)>"
_REFUSAL_PAGE = re.compile(r"Failed to load resource: the server responded with a status of 4")
WAIT_MS = 15_000
"""The longest a page may take to show what a test waits for."""


@dataclass
class Service:
    """The running booking service, its upstream processes and the console's address."""

    directory: Path
    target: str
    console: str
    order_port: int
    payment_port: int
    main: ServiceProcess
    order: ServiceProcess
    payment: ServiceProcess

    def start_order(self, *extra: str) -> None:
        """(Re)start the Order service on its port and ledger file, with `extra` options."""
        self.order = start_main(
            "upstream",
            "order",
            "--port",
            str(self.order_port),
            "--db",
            str(self.directory / "order.db"),
            *extra,
        )
        wait_for_serving(f"127.0.0.1:{self.order_port}", self.order)

    def stop_order(self) -> None:
        """Stop the Order service gracefully (its clients' connections are told to go)."""
        assert self.order.stop(signal.SIGTERM, timeout=15) == 0, self.order.describe()
        self.order.close()

    def _grpcurl(self, method: str, request_id: str, fault: bool) -> list[str]:
        body = json.dumps({"ProductID": "1", "FaultInject": "true" if fault else "false"})
        return [
            "-rpc-header",
            f"x-request-id:{request_id}",
            "-plaintext",
            "-d",
            body,
            self.target,
            f"pb.BookingService/{method}",
        ]

    def book(self, method: str, request_id: str, *, fault: bool = False) -> str:
        """Book with grpcurl; what it printed (a response, or the error)."""
        result = run_grpcurl(self._grpcurl(method, request_id, fault), timeout=30)
        return result.stdout + result.stderr

    def book_at_once(self, bookings: dict[str, tuple[str, bool]]) -> dict[str, str]:
        """Make `bookings` (request id: method, fault) with a grpcurl each, all at once;
        what each printed."""
        started = {
            request_id: subprocess.Popen(
                [str(grpcurl_binary()), *self._grpcurl(method, request_id, fault)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for request_id, (method, fault) in bookings.items()
        }
        printed = {}
        for request_id, process in started.items():
            try:
                printed[request_id] = process.communicate(timeout=30)[0]
            finally:
                process.kill()
        return printed

    def saga(self, request_id: str, facade: str) -> saga_pb2.Saga:
        """The saga's record, read over gRPC with the read token."""
        with grpc.insecure_channel(self.target) as channel:
            return saga_pb2_grpc.SagaServiceStub(channel).GetSaga(
                saga_pb2.GetSagaRequest(request_id=request_id, facade=facade),
                metadata=(("authorization", f"Bearer {READ_TOKEN}"),),
                timeout=5,
            )

    def payment_ledger(self, request_id: str) -> grpc.StatusCode:
        """Whether the Payment service holds a payment of `request_id`."""
        with grpc.insecure_channel(f"127.0.0.1:{self.payment_port}") as channel:
            try:
                payment_pb2_grpc.PaymentServiceStub(channel).GetPayment(
                    payment_pb2.GetPaymentRequest(RequestID=request_id), timeout=10
                )
            except grpc.RpcError as exc:
                assert isinstance(exc, grpc.Call)
                return exc.code()
        return grpc.StatusCode.OK


def write_config(directory: Path, service_ports: dict[str, int], broker: BrokerSettings) -> Path:
    """app.yaml as shipped, but on RabbitMQ, with external upstreams, a journal in
    `directory`, access by tokens, and the console on its own free port."""
    config = yaml.safe_load((ROOT / "app.yaml").read_text(encoding="utf-8"))
    config["grpc"].update(host="127.0.0.1", port=service_ports["grpc"], shutdown_grace_seconds=1)
    config["broker"].update(
        url=broker.url.get_secret_value(),
        topic_prefix=broker.topic_prefix,
        redelivery_delay_seconds=broker.redelivery_delay_seconds,
    )
    config["embedded_upstreams"] = {}
    config["upstreams"]["order"] = {"address": f"127.0.0.1:{service_ports['order']}"}
    config["upstreams"]["payment"] = {"address": f"127.0.0.1:{service_ports['payment']}"}
    config["store"] = {"url": f"sqlite+aiosqlite:///{directory / 'sagas.db'}"}
    config["metrics"] = {"enabled": False}
    config["dead_letters"] = {"interval_seconds": 0.2}
    config["access"] = {
        "tokens": [
            {"name": OPERATOR, "role": "operate", "token": OPERATE_TOKEN},
            {"name": READER, "role": "read", "token": READ_TOKEN},
        ]
    }
    config["ui"].update(host="127.0.0.1", port=service_ports["ui"], live_update_seconds=0.2)
    path = directory / "app.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, rabbitmq_url: str) -> Iterator[Service]:
    """`python main.py` with the console, on free ports and RabbitMQ; its queues and
    exchanges are deleted once it has stopped."""
    directory = tmp_path_factory.mktemp("console")
    broker = make_settings(rabbitmq_url)
    ports = {name: free_port() for name in ("grpc", "ui", "order", "payment")}
    order = start_main(
        "upstream", "order", "--port", str(ports["order"]), "--db", str(directory / "order.db"),
        "--latency-ms", str(ORDER_LATENCY_MS),
    )  # fmt: skip
    payment = start_main(
        "upstream", "payment", "--port", str(ports["payment"]),
        "--latency-ms", str(PAYMENT_LATENCY_MS),
    )  # fmt: skip
    running: Service | None = None
    try:
        wait_for_serving(f"127.0.0.1:{ports['order']}", order)
        wait_for_serving(f"127.0.0.1:{ports['payment']}", payment)
        config = write_config(directory, ports, broker)
        with start_main(config=config, cwd=directory) as main:
            target = f"127.0.0.1:{ports['grpc']}"
            wait_for_serving(target, main)
            running = Service(
                directory,
                target,
                f"http://127.0.0.1:{ports['ui']}",
                ports["order"],
                ports["payment"],
                main,
                order,
                payment,
            )
            yield running
    finally:
        for process in (running.order if running else order, payment):
            process.close()
        asyncio.run(delete_topology(broker, frozenset(BOOKING_TOPICS)))


@pytest.fixture(scope="module")
def context(service: Service, chromium: Browser) -> Iterator[BrowserContext]:
    """One browser profile for the module (each test starts without its cookies), in the
    Asia/Tokyo time zone. The service starts first and stops last: its clean-up runs an
    event loop, which it cannot while Playwright's runs."""
    context = chromium.new_context(
        viewport={"width": 1280, "height": 860}, timezone_id=TIME_ZONE, locale="en-GB"
    )
    context.set_default_timeout(WAIT_MS)
    yield context
    context.close()


@dataclass
class Tab:
    """A page, and every script error or failed request it met."""

    page: Page
    problems: list[str]

    def goto(self, url: str) -> None:
        """Open `url` and check it loaded cleanly."""
        response = self.page.goto(url)
        assert response is not None
        self.page.wait_for_load_state("load")

    def mark(self) -> None:
        """Mark this document: `unmarked()` tells whether it was reloaded since."""
        self.page.evaluate("window.__notReloaded = true")

    def console(self, message: ConsoleMessage) -> None:
        """Note a console error, except the status of a refusal page a test asked for."""
        if message.type == "error" and not _REFUSAL_PAGE.match(message.text):
            self.problems.append(f"console error: {message.text}")

    def reloaded(self) -> bool:
        """True if the document was replaced since `mark()`."""
        return not self.page.evaluate("window.__notReloaded === true")


@pytest.fixture
def tab(context: BrowserContext) -> Iterator[Tab]:
    """A new page, signed out; after the test, it met no script error, no console error
    (a resource the Content-Security-Policy blocked is one) and no dialog."""
    context.clear_cookies()
    page = context.new_page()
    tab = Tab(page, [])
    page.on("pageerror", lambda error: tab.problems.append(f"script error: {error}"))
    page.on("console", tab.console)
    page.on("dialog", lambda dialog: tab.problems.append(f"dialog: {dialog.message}"))
    yield tab
    page.close()
    assert tab.problems == [], tab.problems


def sign_in(tab: Tab, service: Service, token: str) -> None:
    """Sign in through the sign-in form."""
    tab.goto(f"{service.console}/login")
    tab.page.fill("#token", token)
    tab.page.click("form.login button[type=submit]")
    tab.page.wait_for_url(re.compile(r".*/sagas$"))


def row(tab: Tab, request_id: str) -> str:
    """The CSS selector of a saga's row in the list."""
    return f'tr[data-request-id="{request_id}"]'


def open_saga(tab: Tab, service: Service, request_id: str, facade: str) -> None:
    """Open a saga's page from its row in the list, as a person would."""
    tab.goto(f"{service.console}/sagas?q={request_id}")
    with tab.page.expect_navigation():
        tab.page.locator(f'{row(tab, request_id)}[data-facade="{facade}"] a.id').click()


def wait_until_ended(
    service: Service, request_id: str, facade: str, *, within: float = 30
) -> saga_pb2.Saga:
    """The saga once it reached a final state (its rollback runs after the call returned)."""
    deadline = time.monotonic() + within
    while True:
        saga = service.saga(request_id, facade)
        if saga.state not in (saga_pb2.RUNNING, saga_pb2.COMPENSATING):
            return saga
        if time.monotonic() > deadline:
            pytest.fail(f"saga {facade}/{request_id} did not end within {within}s: {saga}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stuck_saga(service: Service) -> str:
    """A sync booking whose Order service failed every call, its rollback included: it
    ended COMPENSATION_FAILED. The Order service is healthy again afterwards (the same
    port and ledger), with a fresh connection from the orchestrator."""
    request_id = f"stuck-{uuid.uuid4().hex[:6]}"
    service.stop_order()
    try:
        service.start_order("--fail-rate", "1")  # every call UNAVAILABLE, before any effect
        printed = service.book("HandleSyncBooking", request_id)
        assert "Unavailable" in printed, printed
        ended = wait_until_ended(service, request_id, "SyncBooking")
        assert ended.state == saga_pb2.COMPENSATION_FAILED, ended
    finally:
        service.stop_order()
        service.start_order("--latency-ms", str(ORDER_LATENCY_MS))
    return request_id


@pytest.fixture(scope="module")
def booked(service: Service) -> dict[str, str]:
    """Sync bookings made at once for the tests that only read them: `plain` completed,
    `fault` compensated (its payment declined), `hostile` compensated too, under a request
    id of HTML; by name, each booking's request id."""
    suffix = uuid.uuid4().hex[:6]
    names = {"plain": f"plain-{suffix}", "fault": f"fault-{suffix}", "hostile": HOSTILE}
    printed = service.book_at_once(
        {
            names["plain"]: ("HandleSyncBooking", False),
            names["fault"]: ("HandleSyncBooking", True),
            names["hostile"]: ("HandleSyncBooking", True),
        }
    )
    assert f'"RequestID": "{names["plain"]}"' in printed[names["plain"]], printed
    for name in ("fault", "hostile"):
        assert "FailedPrecondition" in printed[names[name]], printed
    for request_id in names.values():
        wait_until_ended(service, request_id, "SyncBooking")
    return names


def order_status(service: Service, request_id: str) -> str:
    """The status of the Order service's latest order of `request_id`, or NOT_FOUND."""
    with grpc.insecure_channel(f"127.0.0.1:{service.order_port}") as channel:
        try:
            order = order_pb2_grpc.OrderServiceStub(channel).GetOrder(
                order_pb2.GetOrderRequest(RequestID=request_id), timeout=10
            )
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            return str(exc.code().name)
    return str(order_pb2.OrderStatus.Name(order.Status))


def fits_the_width(tab: Tab) -> bool:
    """True when nothing on the page is wider than the window (no sideways scrolling)."""
    return bool(tab.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


# --- the list ------------------------------------------------------------------------------


def test_the_console_address_is_printed_at_startup(service: Service) -> None:
    assert f"saga console served url={service.console}/" in service.main.output()


def test_a_booking_made_with_grpcurl_appears_in_the_list_without_a_reload(
    tab: Tab, service: Service
) -> None:
    sign_in(tab, service, READ_TOKEN)
    tab.page.wait_for_selector("#sagas[data-live=open]")
    before = int(tab.page.text_content("[data-count=ALL]") or "0")
    tab.mark()
    request_id = f"booking-{uuid.uuid4().hex[:6]}"

    printed = service.book("HandleAsyncBooking", request_id)

    assert f'"RequestID": "{request_id}"' in printed, printed
    tab.page.wait_for_selector(f"{row(tab, request_id)} .state-completed", timeout=WAIT_MS)
    assert not tab.reloaded()
    assert int(tab.page.text_content("[data-count=ALL]") or "0") == before + 1
    assert tab.page.text_content(f"{row(tab, request_id)} [data-label='Latest step']") == (
        "create_payment (2)"
    )


def test_the_page_of_a_running_saga_follows_it_to_its_end(tab: Tab, service: Service) -> None:
    sign_in(tab, service, READ_TOKEN)
    request_id = f"followed-{uuid.uuid4().hex[:6]}"
    service.book("HandleAsyncBooking", request_id)

    tab.goto(f"{service.console}/saga?facade=AsyncBooking&id={request_id}")
    assert tab.page.get_attribute("[data-saga-state]", "data-saga-state") == "RUNNING"
    tab.mark()

    tab.page.wait_for_selector("[data-saga-state=COMPLETED]")
    tab.page.wait_for_selector("#saga[data-live=ended]")
    assert not tab.reloaded()
    steps = tab.page.locator("ol.timeline li[data-kind=step]").all_inner_texts()
    assert [text.split("\n")[-1].split(" in ")[0].removeprefix("STEP ") for text in steps] == [
        "create_order started",
        "create_order done",
        "create_payment started",
        "create_payment done",
    ]


def test_a_fault_injected_booking_shows_its_compensation_on_the_timeline(
    tab: Tab, service: Service, booked: dict[str, str]
) -> None:
    request_id = booked["fault"]
    sign_in(tab, service, READ_TOKEN)

    open_saga(tab, service, request_id, "SyncBooking")

    tab.page.wait_for_selector("[data-saga-state=COMPENSATED]")
    failed = tab.page.locator("ol.timeline li[data-kind=step][data-state=FAILED]")
    assert "create_payment failed" in failed.inner_text()
    assert "payment declined (fault injected)" in failed.inner_text()
    undone = tab.page.locator("ol.timeline li[data-kind=compensation][data-state=DONE]")
    assert "create_order undone" in undone.inner_text()
    assert (
        tab.page.get_attribute(
            "tr[data-step=create_order] [data-compensation]", "data-compensation"
        )
        == "DONE"
    )
    assert order_status(service, request_id) == "CANCELLED"
    assert service.payment_ledger(request_id) == grpc.StatusCode.NOT_FOUND


def test_html_in_a_request_id_and_its_error_shows_as_text(
    tab: Tab, service: Service, booked: dict[str, str]
) -> None:
    assert booked["hostile"] == HOSTILE
    sign_in(tab, service, READ_TOKEN)

    tab.goto(f"{service.console}/sagas?q=%3Cimg")
    link = tab.page.locator(f"{row(tab, HOSTILE)} a.id")
    assert link.inner_text() == HOSTILE
    with tab.page.expect_navigation():
        link.click()

    tab.page.wait_for_selector("[data-saga-state=COMPENSATED]")
    assert tab.page.inner_text("h1 .id") == HOSTILE
    assert f"for request '{HOSTILE}'" in tab.page.inner_text("[data-saga-error]")
    assert tab.page.locator("img").count() == 0  # nothing in it became an element


def test_times_show_in_the_viewers_time_zone_with_utc_on_hover(
    tab: Tab, service: Service, booked: dict[str, str]
) -> None:
    request_id = booked["plain"]
    sign_in(tab, service, READ_TOKEN)

    tab.goto(f"{service.console}/sagas?q={request_id}")

    shown = tab.page.locator(f"{row(tab, request_id)} time")
    moment = datetime.fromisoformat(shown.get_attribute("datetime") or "")
    assert shown.inner_text() == moment.astimezone(ZoneInfo(TIME_ZONE)).strftime(
        "%Y-%m-%d %H:%M:%S"
    )
    assert shown.get_attribute("title") == moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert TIME_ZONE in tab.page.inner_text("footer")


# --- acting --------------------------------------------------------------------------------


def test_an_action_without_the_operate_role_is_refused(
    tab: Tab, service: Service, stuck_saga: str
) -> None:
    sign_in(tab, service, READ_TOKEN)
    open_saga(tab, service, stuck_saga, "SyncBooking")
    with tab.page.expect_navigation():
        tab.page.click("a[data-action=resolve]")
    assert "'dashboard' has role read" in tab.page.inner_text("[role=alert]")

    tab.page.fill("#note", "settled by phone")
    with tab.page.expect_navigation():
        tab.page.click("form.confirm button[type=submit]")

    assert tab.page.inner_text("h1") == "PERMISSION_DENIED"
    assert (
        "PERMISSION_DENIED: 'dashboard' has role read; "
        "/orchestrator.v1.SagaAdmin/ResolveSaga needs operate"
    ) in tab.page.inner_text("[data-error]")
    saga = service.saga(stuck_saga, "SyncBooking")
    assert saga.state != saga_pb2.RESOLVED
    assert "resolve" not in [action.action for action in saga.actions]


def test_a_form_posted_without_its_csrf_token_is_refused(
    tab: Tab, service: Service, stuck_saga: str
) -> None:
    sign_in(tab, service, OPERATE_TOKEN)

    answer = tab.page.request.post(
        f"{service.console}/saga/act",
        form={"action": "resolve", "facade": "SyncBooking", "id": stuck_saga, "note": "x"},
        max_redirects=0,
    )

    assert answer.status == 403
    assert "CSRF token does not match this session" in answer.text()
    assert "resolve" not in [a.action for a in service.saga(stuck_saga, "SyncBooking").actions]


def test_a_stuck_saga_is_retried_from_the_page_once_its_upstream_is_back(
    tab: Tab, service: Service, stuck_saga: str, screenshots: Path
) -> None:
    sign_in(tab, service, OPERATE_TOKEN)
    letter = tab.page.locator(f"tr[data-letter]:has(a.id:text-is('{stuck_saga}'))")
    for _ in range(50):  # the dead letter is collected within 0.2 s of its dead-lettering
        tab.goto(f"{service.console}/dead-letters")
        if letter.count():
            break
        time.sleep(0.2)
    assert letter.locator("[data-label='Saga state']").inner_text() == "COMPENSATION_FAILED"
    assert "COMPENSATION_FAILED: rollback node failed" in letter.inner_text()
    assert int(letter.locator("[data-label=Deliveries]").inner_text()) >= 1

    open_saga(tab, service, stuck_saga, "SyncBooking")
    assert tab.page.get_attribute("[data-saga-state]", "data-saga-state") == "COMPENSATION_FAILED"
    with tab.page.expect_navigation():
        tab.page.click("a[data-action=retry]")
    tab.page.fill("#note", "the order service is back")
    with tab.page.expect_navigation():
        tab.page.click("form.confirm button[type=submit]")

    assert "retry done by oncall" in tab.page.inner_text("[role=status]")
    tab.page.wait_for_selector("[data-saga-state=COMPENSATED]")
    action = tab.page.locator("ol.timeline li[data-kind=action]")
    assert "retry by oncall" in action.inner_text()
    assert "the order service is back" in action.inner_text()
    tab.page.screenshot(path=screenshots / "console-saga.png", full_page=True)
    saga = service.saga(stuck_saga, "SyncBooking")
    assert saga.state == saga_pb2.COMPENSATED
    assert [(a.action, a.actor, a.note) for a in saga.actions] == [
        ("retry", OPERATOR, "the order service is back")
    ]
    # Never created (every call failed before any effect), and the undo by its key is kept.
    assert order_status(service, stuck_saga) == "NOT_FOUND"
    assert service.payment_ledger(stuck_saga) == grpc.StatusCode.NOT_FOUND


# --- keyboard and phone --------------------------------------------------------------------


def test_the_console_is_usable_with_the_keyboard_alone(
    tab: Tab, service: Service, booked: dict[str, str]
) -> None:
    request_id = booked["plain"]
    keys = tab.page.keyboard
    tab.goto(f"{service.console}/login")
    # The token field takes the focus by itself (autofocus), once the page is in place.
    tab.page.wait_for_function("document.activeElement && document.activeElement.id === 'token'")
    keys.type(READ_TOKEN)
    with tab.page.expect_navigation():
        keys.press("Enter")
    tab.page.wait_for_load_state("load")
    assert not tab.page.url.endswith("/login"), "signed in"

    keys.press("Tab")
    assert tab.page.evaluate("document.activeElement.textContent") == "Skip to content"
    keys.press("Enter")
    assert tab.page.evaluate("document.activeElement.id") == "main"
    for _ in range(10):
        keys.press("Tab")
        if tab.page.evaluate("document.activeElement.name") == "q":
            break
    keys.type(request_id)
    with tab.page.expect_navigation():
        keys.press("Enter")
    assert f"q={request_id}" in tab.page.url
    for _ in range(40):
        keys.press("Tab")
        if tab.page.evaluate("document.activeElement.textContent") == request_id:
            break
    with tab.page.expect_navigation():
        keys.press("Enter")

    assert tab.page.inner_text("h1 .id") == request_id


def test_the_pages_fit_a_phone_width_window(
    service: Service, chromium: Browser, booked: dict[str, str], screenshots: Path
) -> None:
    from playwright.sync_api import expect  # with the browser tests, as the rest of playwright

    phone = chromium.new_context(
        viewport={"width": 390, "height": 844}, timezone_id=TIME_ZONE, is_mobile=True
    )
    phone.set_default_timeout(WAIT_MS)
    try:
        tab = Tab(phone.new_page(), [])
        tab.page.on("console", tab.console)
        request_id = booked["fault"]
        sign_in(tab, service, READ_TOKEN)
        assert fits_the_width(tab)
        cells = tab.page.locator(f"{row(tab, request_id)} td")
        # Each row is a stack of blocks. Asked through `expect`, which retries: the list is
        # rendered again as its sagas change, and a cell read while it is being replaced has
        # no computed style at all.
        expect(cells.first).to_have_css("display", "block")
        tab.page.screenshot(path=screenshots / "console-sagas-phone.png", full_page=True)

        open_saga(tab, service, request_id, "SyncBooking")
        tab.page.wait_for_selector("[data-saga-state=COMPENSATED]")
        assert fits_the_width(tab)
        tab.page.screenshot(path=screenshots / "console-saga-phone.png", full_page=True)
        assert tab.problems == []
    finally:
        phone.close()


# --- the whole list, last ------------------------------------------------------------------


def test_the_lists_counts_by_state_are_the_journals(
    tab: Tab, service: Service, screenshots: Path
) -> None:
    sign_in(tab, service, OPERATE_TOKEN)
    with grpc.insecure_channel(service.target) as channel:
        listed = saga_pb2_grpc.SagaServiceStub(channel).ListSagas(
            saga_pb2.ListSagasRequest(page_size=500),
            metadata=(("authorization", f"Bearer {READ_TOKEN}"),),
            timeout=5,
        )
    journal: dict[str, int] = {}
    for saga in listed.sagas:
        name = saga_pb2.SagaState.Name(saga.state)
        journal[name] = journal.get(name, 0) + 1

    tab.goto(f"{service.console}/sagas")

    for state in ("RUNNING", "COMPLETED", "COMPENSATED", "COMPENSATION_FAILED"):
        assert int(tab.page.text_content(f"[data-count={state}]") or "0") == journal.get(state, 0)
    assert int(tab.page.text_content("[data-count=ALL]") or "0") == len(listed.sagas)
    tab.page.screenshot(path=screenshots / "console-sagas.png", full_page=True)
