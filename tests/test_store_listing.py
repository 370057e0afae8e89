"""Listing sagas by the start of their request id, and counting them by state, on every store.

The console's saga list searches by request id prefix and shows how many
sagas are in each state; both run on the store, so each is checked on the
three backends (in memory, SQLite, PostgreSQL) with the same expectations.
"""

from __future__ import annotations

import pytest

from orchestrator.store import SagaState, SagaStore
from tests.support.store_backends import FACADE, Backend, at_step, finished, new_saga

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(backend: Backend) -> SagaStore:
    """The backend's first store."""
    return backend.store


async def listed(store: SagaStore, **filters: object) -> list[str]:
    page = await store.list_sagas(page_size=100, **filters)  # type: ignore[arg-type]
    return [saga.request_id for saga in page.sagas]


async def test_a_prefix_lists_only_the_sagas_whose_request_id_starts_with_it(
    store: SagaStore,
) -> None:
    for request_id in ("order-1", "order-2", "refund-1", "xorder-3"):
        assert await store.begin(new_saga(request_id)) is None

    assert await listed(store, request_id_prefix="order-") == ["order-2", "order-1"]
    assert await listed(store, request_id_prefix="order-2") == ["order-2"]
    assert await listed(store, request_id_prefix="nothing") == []


async def test_a_prefix_is_case_sensitive_and_takes_like_wildcards_literally(
    store: SagaStore,
) -> None:
    for request_id in ("Abc", "abc", "a%c", "a_c", "abd"):
        assert await store.begin(new_saga(request_id)) is None

    assert await listed(store, request_id_prefix="a") == ["abd", "a_c", "a%c", "abc"]
    assert await listed(store, request_id_prefix="A") == ["Abc"]
    assert await listed(store, request_id_prefix="a%") == ["a%c"]
    assert await listed(store, request_id_prefix="a_") == ["a_c"]


async def test_a_prefix_combines_with_the_facade_and_state_filters(store: SagaStore) -> None:
    await finished(store, "b-done", SagaState.COMPLETED)
    await at_step(store, "b-running", 0)
    assert await store.begin(new_saga("b-other", facade="refund")) is None

    assert await listed(store, request_id_prefix="b-", facade=FACADE) == ["b-running", "b-done"]
    assert await listed(store, request_id_prefix="b-", state=SagaState.COMPLETED) == ["b-done"]
    assert await listed(store, request_id_prefix="b-", facade="refund") == ["b-other"]


async def test_a_prefix_pages_like_any_listing(store: SagaStore) -> None:
    for index in range(5):
        assert await store.begin(new_saga(f"p-{index}")) is None
    assert await store.begin(new_saga("q-0")) is None

    first = await store.list_sagas(page_size=3, request_id_prefix="p-")
    second = await store.list_sagas(
        page_size=3, request_id_prefix="p-", page_token=first.next_page_token
    )

    assert [saga.request_id for saga in first.sagas] == ["p-4", "p-3", "p-2"]
    assert [saga.request_id for saga in second.sagas] == ["p-1", "p-0"]
    assert second.next_page_token == ""


async def test_counts_by_state_name_every_state_some_saga_is_in(store: SagaStore) -> None:
    await finished(store, "done-1", SagaState.COMPLETED)
    await finished(store, "done-2", SagaState.COMPLETED)
    await finished(store, "undone", SagaState.COMPENSATED)
    await finished(store, "stuck", SagaState.COMPENSATION_FAILED)
    await at_step(store, "running", 1)

    assert await store.count_sagas() == {
        SagaState.COMPLETED: 2,
        SagaState.COMPENSATED: 1,
        SagaState.COMPENSATION_FAILED: 1,
        SagaState.RUNNING: 1,
    }


async def test_counts_follow_the_facade_and_prefix_filters(store: SagaStore) -> None:
    await finished(store, "a-1", SagaState.COMPLETED)
    await at_step(store, "a-2", 0)
    await finished(store, "b-1", SagaState.COMPLETED)
    assert await store.begin(new_saga("a-3", facade="refund")) is None

    assert await store.count_sagas(request_id_prefix="a-", facade=FACADE) == {
        SagaState.COMPLETED: 1,
        SagaState.RUNNING: 1,
    }
    assert await store.count_sagas(facade="refund") == {SagaState.RUNNING: 1}
    assert await store.count_sagas(request_id_prefix="zzz") == {}
