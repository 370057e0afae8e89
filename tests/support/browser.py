"""pytest plugin: a real browser for the tests of web pages, and where their screenshots go.

`chromium` (module scope: one browser a module, each test in a context of its
own) is Debian's `/usr/bin/chromium` driven headless by Playwright for Python,
which is told where the browser is and never downloads one of its own. Without
that browser (or without Playwright) the tests skip with the reason, except
under `$CI`, where they fail: `make test` installs the browser first.

`screenshots` is the folder the tests write their screenshots to: the one
given with `--screenshots DIR` (named in the report's header), else a fresh
folder under pytest's temporary directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser

__all__ = ["CHROMIUM", "CHROMIUM_FLAGS", "chromium", "screenshots"]

CHROMIUM = Path("/usr/bin/chromium")
"""Debian's Chromium (`apt-get install chromium`)."""
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # as root, here and in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
"""Flags that keep the browser to itself: no GPU, no sandbox (root), nothing fetched."""
LAUNCH_TIMEOUT_MS = 30_000


def pytest_addoption(parser: pytest.Parser) -> None:
    """`--screenshots DIR`."""
    parser.addoption(
        "--screenshots",
        metavar="DIR",
        default=None,
        help="write the browser tests' screenshots to DIR (default: a temporary folder)",
    )


def _skip_or_fail(reason: str) -> NoReturn:
    message = f"no browser for the browser tests: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """Headless Chromium for this module's tests (the profile is a fresh temporary one)."""
    if not os.access(CHROMIUM, os.X_OK):
        _skip_or_fail(f"{CHROMIUM} is missing: apt-get install chromium (make test does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _skip_or_fail(f"Playwright for Python is not installed ({exc}): pip install -e '.[dev]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=list(CHROMIUM_FLAGS),
            timeout=LAUNCH_TIMEOUT_MS,
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def screenshots(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder screenshots are written to."""
    given = request.config.getoption("--screenshots")
    folder = Path(given) if given else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def pytest_report_header(config: pytest.Config) -> str:
    """Say where screenshots go when a folder was given."""
    given = config.getoption("--screenshots")
    return f"screenshots: {given}" if given else ""
