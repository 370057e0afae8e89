"""Fixtures shared by every test module."""

pytest_plugins = [
    "tests.support.broker_fixtures",
    "tests.support.app_fixtures",
    "tests.support.databases",
    "tests.support.store_backends",
    "tests.support.browser",
]
