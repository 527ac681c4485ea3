"""One contract for every ChainStore: memory, sqlite (a real file) and redis (a real server).

`store` is the store under test; `other` is a second client of the same data (a second
connection to the same file or server; the same object for memory), standing in for a
second process wherever a change must be seen across clients.
"""

from __future__ import annotations

import asyncio
import dataclasses
import stat
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from blockbuster import blockbuster_ctx

from proxy.config import StoreConfig
from proxy.errors import ConfigError, StoreUnavailable
from proxy.models import AccessToken, ChainKey, ChainRecord, CredentialState, HistoryEvent, Secret
from proxy.store import HISTORY_LIMIT, ChainStore
from proxy.store_memory import MemoryStore
from proxy.store_redis import RedisStore, redact_url
from proxy.store_sqlite import SqliteStore
from proxy.stores import open_store
from tests.redis_fixture import RedisServer, free_port, redis_server, redis_url

__all__ = ["redis_server", "redis_url"]  # fixtures used here, imported for pytest

KINDS = ["memory", "sqlite", "redis"]
KEY = ChainKey("payoneer", "alice")
BOUND = 10.0  # hang guard for waits that must end long before it


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[None]:
    """Blocking calls on the event loop fail the test (same name as conftest's, if any)."""
    with blockbuster_ctx():
        yield


StoreFactory = Callable[[], ChainStore]


@pytest.fixture(params=KINDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Makes clients of one shared store (resolved outside the event loop)."""
    kind: str = request.param
    if kind == "memory":
        shared = MemoryStore()
        return lambda: shared
    if kind == "sqlite":
        path = tmp_path / "state" / "chains.db"
        return lambda: SqliteStore(path)
    url = request.getfixturevalue("redis_url")
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    return lambda: RedisStore(url, key_prefix=prefix)


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[ChainStore]:
    s = make_store()
    yield s
    await s.aclose()


@pytest.fixture
async def other(make_store: StoreFactory, store: ChainStore) -> AsyncIterator[ChainStore]:
    s = make_store()
    yield s
    if s is not store:
        await s.aclose()


def token(value: str, lifetime: float = 300.0) -> AccessToken:
    now = time.time()
    return AccessToken(Secret(value), issued_at=now, expires_at=now + lifetime, scope="a b")


def rotated(record: ChainRecord, refresh: str, **changes: Any) -> ChainRecord:
    return dataclasses.replace(
        record, refresh_token=Secret(refresh), version=record.version + 1, **changes
    )


async def eventually(check: Callable[[], Awaitable[bool]], what: str, bound: float = BOUND) -> None:
    """Poll an async condition with a bounded deadline (for expiries, not for ordering)."""
    deadline = time.monotonic() + bound
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# -- records -------------------------------------------------------------------------------


async def test_seed_then_get_round_trips_every_field(store: ChainStore) -> None:
    assert await store.get(KEY) is None
    seeded = await store.seed(KEY, Secret("rt-one"))
    assert (seeded.version, seeded.state) == (1, CredentialState.OK)
    assert await store.get(KEY) == seeded

    full = rotated(
        seeded,
        "rt-two",
        state=CredentialState.DEGRADED,
        access_token=token("at-one"),
        last_refresh_at=time.time(),
        last_error="timeout",
        rotating_since=time.time(),
        rotating_pid=4242,
    )
    assert await store.compare_and_set(full, expected_version=1)
    got = await store.get(KEY)
    assert got == full
    assert got.refresh_token == Secret("rt-two")
    assert got.access_token is not None
    assert got.access_token.value == Secret("at-one")


async def test_seed_replaces_and_resets_but_keeps_history(store: ChainStore) -> None:
    first = await store.seed(KEY, Secret("rt-one"))
    event = HistoryEvent(at=1.0, event="seed", outcome="ok", pid=1)
    await store.add_history(KEY, event)
    broken = rotated(
        first,
        "rt-two",
        state=CredentialState.REAUTH_REQUIRED,
        access_token=token("at-one"),
        last_refresh_at=123.0,
        last_error="invalid_grant",
        rotating_since=99.0,
        rotating_pid=7,
    )
    assert await store.compare_and_set(broken, expected_version=1)

    again = await store.seed(KEY, Secret("rt-three"))
    assert again.version == 3
    assert again.state is CredentialState.OK
    assert again.refresh_token == Secret("rt-three")
    assert (again.access_token, again.last_error, again.rotating_since) == (None, None, None)
    assert again.rotating_pid is None
    assert again.last_refresh_at == 123.0
    assert await store.get(KEY) == again
    assert await store.history(KEY) == [event]


async def test_compare_and_set_writes_only_over_the_expected_version(
    store: ChainStore, other: ChainStore
) -> None:
    seeded = await store.seed(KEY, Secret("rt-one"))
    mine = rotated(seeded, "rt-mine")
    theirs = rotated(seeded, "rt-theirs")
    assert await store.compare_and_set(mine, expected_version=1)
    assert not await other.compare_and_set(theirs, expected_version=1)
    current = await other.get(KEY)
    assert current is not None
    assert (current.version, current.refresh_token) == (2, Secret("rt-mine"))
    assert await other.compare_and_set(rotated(current, "rt-3"), expected_version=2)
    assert (await store.get(KEY)) == rotated(current, "rt-3")


async def test_compare_and_set_on_an_unseeded_chain_writes_nothing(store: ChainStore) -> None:
    ghost = ChainRecord(key=KEY, refresh_token=Secret("rt-ghost"), version=1)
    assert not await store.compare_and_set(ghost, expected_version=0)
    assert await store.get(KEY) is None
    assert await store.subjects(KEY.credential) == []


async def test_compare_and_set_refuses_a_record_that_is_not_the_next_version(
    store: ChainStore,
) -> None:
    seeded = await store.seed(KEY, Secret("rt-one"))
    with pytest.raises(ValueError, match="expected_version"):
        await store.compare_and_set(dataclasses.replace(seeded, version=5), expected_version=1)
    assert await store.get(KEY) == seeded


async def test_chains_are_separate_per_credential_and_subject(store: ChainStore) -> None:
    keys = [
        ChainKey("payoneer"),
        ChainKey("payoneer", "alice"),
        ChainKey("payoneer", "a:b/c d%ü"),  # separators and escapes stay inside the subject
        ChainKey("payoneer:alice"),
        ChainKey("other", "alice"),
    ]
    for n, key in enumerate(keys):
        await store.seed(key, Secret(f"rt-{n}"))
    for n, key in enumerate(keys):
        got = await store.get(key)
        assert got is not None
        assert (got.key, got.refresh_token) == (key, Secret(f"rt-{n}"))
    assert await store.subjects("payoneer") == sorted(["alice", "a:b/c d%ü"])
    assert await store.subjects("other") == ["alice"]
    assert await store.subjects("payoneer:alice") == []
    assert await store.subjects("nobody") == []


# -- leases --------------------------------------------------------------------------------


async def test_lease_is_exclusive_and_only_its_owner_releases_it(
    store: ChainStore, other: ChainStore
) -> None:
    assert await store.acquire_lease(KEY, "pid1:task1", ttl=30)
    assert not await other.acquire_lease(KEY, "pid2:task1", ttl=30)
    assert await store.acquire_lease(KEY, "pid1:task1", ttl=30)  # re-acquire extends
    await other.release_lease(KEY, "pid2:task1")  # not the owner: no effect
    assert not await other.acquire_lease(KEY, "pid2:task1", ttl=30)
    assert await other.acquire_lease(ChainKey("payoneer", "bob"), "pid2:task1", ttl=30)
    await store.release_lease(KEY, "pid1:task1")
    assert await other.acquire_lease(KEY, "pid2:task1", ttl=30)
    await store.release_lease(KEY, "pid1:task1")  # a stale release cannot free it
    assert not await store.acquire_lease(KEY, "pid1:task1", ttl=30)


async def test_an_expired_lease_can_be_taken_by_anyone(
    store: ChainStore, other: ChainStore
) -> None:
    assert await store.acquire_lease(KEY, "crashed", ttl=0.05)

    async def taken() -> bool:
        return await other.acquire_lease(KEY, "survivor", ttl=30)

    await eventually(taken, "the expired lease to be free")
    await store.release_lease(KEY, "crashed")  # the late original owner cannot free it
    assert not await store.acquire_lease(KEY, "third", ttl=30)


async def test_extending_a_lease_keeps_it_past_its_first_ttl(
    store: ChainStore, other: ChainStore
) -> None:
    assert await store.acquire_lease(KEY, "holder", ttl=0.3)
    assert await store.acquire_lease(KEY, "holder", ttl=60)
    probe = ChainKey("payoneer", "probe")
    assert await store.acquire_lease(probe, "holder", ttl=0.3)

    async def probe_expired() -> bool:
        return await other.acquire_lease(probe, "other", ttl=30)

    # Once a lease taken with the same first ttl has expired, the extended one still holds.
    await eventually(probe_expired, "the probe lease to expire")
    assert not await other.acquire_lease(KEY, "other", ttl=30)


async def test_leases_work_on_internal_subjects(store: ChainStore) -> None:
    shared = ChainKey("payments", "\x00shared")  # what proxy.chains uses for shared tokens
    assert await store.acquire_lease(shared, "a", ttl=30)
    assert not await store.acquire_lease(shared, "b", ttl=30)
    assert await store.acquire_lease(ChainKey("payments"), "b", ttl=30)
    await store.release_lease(shared, "a")
    assert await store.acquire_lease(shared, "b", ttl=30)
    assert await store.subjects("payments") == []


async def test_lease_ttl_must_be_positive(store: ChainStore) -> None:
    with pytest.raises(ValueError, match="ttl"):
        await store.acquire_lease(KEY, "me", ttl=0)


# -- waiting -------------------------------------------------------------------------------


async def test_wait_for_change_wakes_on_a_compare_and_set(
    store: ChainStore, other: ChainStore
) -> None:
    seeded = await store.seed(KEY, Secret("rt-one"))
    assert await other.acquire_lease(KEY, "rotator", ttl=60)
    waiting = asyncio.Event()

    async def waiter() -> ChainRecord | None:
        waiting.set()
        return await store.wait_for_change(KEY, seeded.version, timeout=60)

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(waiter())
        await waiting.wait()
        assert await other.compare_and_set(rotated(seeded, "rt-two"), expected_version=1)
        result = await asyncio.wait_for(task, BOUND)
    assert result is not None
    assert (result.version, result.refresh_token) == (2, Secret("rt-two"))


async def test_wait_for_change_wakes_when_the_lease_is_released(
    store: ChainStore, other: ChainStore
) -> None:
    seeded = await store.seed(KEY, Secret("rt-one"))
    assert await other.acquire_lease(KEY, "rotator", ttl=60)
    waiting = asyncio.Event()

    async def waiter() -> ChainRecord | None:
        waiting.set()
        return await store.wait_for_change(KEY, seeded.version, timeout=60)

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(waiter())
        await waiting.wait()
        await other.release_lease(KEY, "rotator")
        result = await asyncio.wait_for(task, BOUND)
    assert result == seeded


async def test_wait_for_change_wakes_when_the_lease_expires(store: ChainStore) -> None:
    seeded = await store.seed(KEY, Secret("rt-one"))
    assert await store.acquire_lease(KEY, "crashed", ttl=0.2)
    result = await asyncio.wait_for(store.wait_for_change(KEY, seeded.version, timeout=60), BOUND)
    assert result == seeded
    assert await store.acquire_lease(KEY, "next", ttl=30)


async def test_wait_for_change_returns_the_unchanged_record_at_timeout(store: ChainStore) -> None:
    seeded = await store.seed(KEY, Secret("rt-one"))
    assert await store.acquire_lease(KEY, "rotator", ttl=60)
    assert await store.wait_for_change(KEY, seeded.version, timeout=0.05) == seeded
    assert not await store.acquire_lease(KEY, "waiter", ttl=60)  # still held


async def test_wait_for_change_returns_at_once_when_nothing_holds_the_lease(
    store: ChainStore,
) -> None:
    seeded = await store.seed(KEY, Secret("rt-one"))
    got = await asyncio.wait_for(store.wait_for_change(KEY, seeded.version, timeout=60), BOUND)
    assert got == seeded
    assert await store.wait_for_change(ChainKey("never", "seeded"), 0, timeout=60) is None


async def test_wait_for_change_returns_a_newer_record_at_once(store: ChainStore) -> None:
    seeded = await store.seed(KEY, Secret("rt-one"))
    assert await store.acquire_lease(KEY, "rotator", ttl=60)
    assert await store.compare_and_set(rotated(seeded, "rt-two"), expected_version=1)
    got = await asyncio.wait_for(store.wait_for_change(KEY, 1, timeout=60), BOUND)
    assert got is not None
    assert got.version == 2


# -- history, subjects, shared tokens ------------------------------------------------------


async def test_history_keeps_the_latest_events_newest_first(store: ChainStore) -> None:
    total = HISTORY_LIMIT + 7
    for n in range(total):
        await store.add_history(KEY, HistoryEvent(at=float(n), event="rotate", outcome="ok", pid=n))
    await store.add_history(ChainKey("payoneer"), HistoryEvent(1.0, "seed", "ok", 1, "sha256:x"))

    everything = await store.history(KEY, limit=1000)
    assert [e.at for e in everything] == [float(n) for n in range(total - 1, 6, -1)]
    assert len(everything) == HISTORY_LIMIT
    assert [e.pid for e in await store.history(KEY, limit=3)] == [total - 1, total - 2, total - 3]
    assert len(await store.history(KEY)) == 20
    assert await store.history(KEY, limit=0) == []
    assert await store.history(ChainKey("payoneer")) == [
        HistoryEvent(1.0, "seed", "ok", 1, "sha256:x")
    ]
    assert await store.history(ChainKey("payoneer", "nobody")) == []


async def test_shared_tokens_are_stored_and_expire_with_the_token(
    store: ChainStore, other: ChainStore
) -> None:
    assert await store.get_shared_token("payments") is None
    long = token("at-shared", lifetime=300)
    await store.put_shared_token("payments", long)
    assert await other.get_shared_token("payments") == long
    assert await other.get_shared_token("payoneer") is None

    await store.put_shared_token("expired", token("at-old", lifetime=-1))
    assert await other.get_shared_token("expired") is None

    await store.put_shared_token("short", token("at-short", lifetime=0.2))

    async def gone() -> bool:
        return await other.get_shared_token("short") is None

    await eventually(gone, "the short token to expire")
    assert await other.get_shared_token("payments") == long


# -- concurrency ---------------------------------------------------------------------------


async def test_concurrent_get_and_cas_loses_no_update(store: ChainStore, other: ChainStore) -> None:
    tasks, increments = 16, 10
    await store.seed(KEY, Secret("rt-0"))
    conflicts = 0

    async def worker(n: int, client: ChainStore) -> None:
        nonlocal conflicts
        for i in range(increments):
            for _attempt in range(10_000):
                current = await client.get(KEY)
                assert current is not None
                new = rotated(current, f"rt-{n}-{i}")
                if await client.compare_and_set(new, expected_version=current.version):
                    break
                conflicts += 1
            else:
                pytest.fail("an increment kept conflicting")

    async with asyncio.TaskGroup() as tg:
        for n in range(tasks):
            tg.create_task(worker(n, store if n % 2 else other))
    final = await store.get(KEY)
    assert final is not None
    assert final.version == 1 + tasks * increments


async def test_only_one_of_many_concurrent_lease_takers_wins(
    store: ChainStore, other: ChainStore
) -> None:
    results = await asyncio.gather(
        *((store if n % 2 else other).acquire_lease(KEY, f"owner-{n}", ttl=60) for n in range(20))
    )
    assert results.count(True) == 1


# -- what a store shows --------------------------------------------------------------------


async def test_repr_shows_state_and_never_a_token(store: ChainStore) -> None:
    seeded = await store.seed(KEY, Secret("rt-very-secret"))
    record = rotated(seeded, "rt-even-more-secret", access_token=token("at-secret-value"))
    assert await store.compare_and_set(record, expected_version=1)
    await store.put_shared_token("payments", token("at-shared-secret"))
    text = repr(store)
    assert store.kind in text.lower()
    assert "open" in text
    for secret in ("rt-very-secret", "rt-even-more-secret", "at-secret-value", "at-shared-secret"):
        assert secret not in text
    assert "refresh_token" not in text
    if isinstance(store, MemoryStore):
        assert "chains=1" in text
    await store.aclose()
    assert "closed" in repr(store)


async def test_a_closed_store_refuses_work(store: ChainStore) -> None:
    await store.aclose()
    await store.aclose()  # idempotent
    if isinstance(store, MemoryStore):
        return  # nothing to lose: it keeps answering from its dicts
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.get(KEY)


async def test_ping_succeeds_on_a_reachable_store_and_fails_once_closed(
    store: ChainStore,
) -> None:
    await store.ping()
    await store.aclose()
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.ping()


# -- sqlite specifics ----------------------------------------------------------------------


async def test_sqlite_creates_its_directory_and_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "authproxy.db"
    store = SqliteStore(path)
    try:
        assert "unopened" in repr(store)
        await store.ping()
        mode = (await asyncio.to_thread(path.stat)).st_mode
        assert stat.S_IMODE(mode) == 0o600
        assert "open" in repr(store)
        assert str(path) in repr(store)
    finally:
        await store.aclose()


async def test_sqlite_keeps_chains_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "authproxy.db"
    first = SqliteStore(path)
    seeded = await first.seed(KEY, Secret("rt-one"))
    await first.add_history(KEY, HistoryEvent(1.0, "seed", "ok", 1))
    await first.aclose()
    second = SqliteStore(path)
    try:
        assert await second.get(KEY) == seeded
        assert len(await second.history(KEY)) == 1
    finally:
        await second.aclose()


async def test_sqlite_many_stores_opening_a_new_file_at_once_all_open(tmp_path: Path) -> None:
    """Workers starting together on a fresh file: SQLite refuses the WAL switch of all but one
    with "database is locked" (no busy handler there); every store must still open."""
    for attempt in range(5):
        path = tmp_path / f"fresh-{attempt}.db"
        stores = [SqliteStore(path) for _ in range(12)]
        try:
            results = await asyncio.gather(
                *(s.acquire_lease(KEY, f"owner-{n}", ttl=60) for n, s in enumerate(stores)),
                return_exceptions=True,
            )
        finally:
            for s in stores:
                await s.aclose()
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert results.count(True) == 1


@pytest.mark.parametrize("case", ["parent_is_a_file", "not_a_database"])
async def test_sqlite_file_that_cannot_be_opened_is_unavailable(tmp_path: Path, case: str) -> None:
    blocker = tmp_path / "blocker"
    await asyncio.to_thread(blocker.write_bytes, b"this is not a database" * 100)
    path = blocker / "authproxy.db" if case == "parent_is_a_file" else blocker
    store = SqliteStore(path)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.ping()
        assert str(path) in str(info.value)
        with pytest.raises(StoreUnavailable):
            await store.get(KEY)
    finally:
        await store.aclose()


# -- redis specifics -----------------------------------------------------------------------


async def test_redis_down_is_unavailable_fast_and_hides_the_password() -> None:
    url = f"redis://user:hunter2-password@127.0.0.1:{free_port()}/0"
    store = RedisStore(url, key_prefix="down")
    try:
        assert "hunter2" not in repr(store)
        for call in (store.ping(), store.get(KEY), store.acquire_lease(KEY, "me", 5)):
            with pytest.raises(StoreUnavailable) as info:
                async with asyncio.timeout(BOUND):
                    await call
            assert "hunter2" not in str(info.value)
            assert "127.0.0.1" in str(info.value)
            assert isinstance(info.value.__cause__, Exception)
    finally:
        await store.aclose()


async def test_redis_store_recovers_after_the_server_restarts(redis_server: RedisServer) -> None:
    await redis_server.astart()
    store = RedisStore(redis_server.url, key_prefix=f"restart-{uuid.uuid4().hex[:8]}")
    try:
        await store.seed(KEY, Secret("rt-one"))
        await redis_server.astop()
        with pytest.raises(StoreUnavailable):
            async with asyncio.timeout(BOUND):
                await store.get(KEY)
        await redis_server.astart()
        # The server kept nothing (--save ''), and the same client works again.
        assert await store.get(KEY) is None
        assert (await store.seed(KEY, Secret("rt-two"))).version == 1
    finally:
        await redis_server.astart()
        await store.aclose()


async def test_redis_key_layout_is_the_documented_one(redis_url: str) -> None:
    import redis.asyncio as redis
    from redis.driver_info import DriverInfo

    prefix = f"layout-{uuid.uuid4().hex[:8]}"
    store = RedisStore(redis_url, key_prefix=prefix)
    # An explicit DriverInfo keeps redis-py from reading package metadata on the loop.
    raw = redis.from_url(redis_url, decode_responses=True, driver_info=DriverInfo(lib_version="t"))
    try:
        await store.seed(ChainKey("pay:oneer", "al/ice"), Secret("rt-one"))
        await store.add_history(ChainKey("pay:oneer", "al/ice"), HistoryEvent(1.0, "seed", "ok", 1))
        assert await store.acquire_lease(ChainKey("pay:oneer", "al/ice"), "me", ttl=30)
        await store.put_shared_token("payments", token("at-shared"))
        chain = f"{prefix}:chain:pay%3Aoneer:al%2Fice"
        assert sorted(await raw.keys(f"{prefix}:*")) == sorted(
            [
                chain,
                f"{prefix}:history:pay%3Aoneer:al%2Fice",
                f"{prefix}:lease:pay%3Aoneer:al%2Fice",
                f"{prefix}:subjects:pay%3Aoneer",
                f"{prefix}:shared:payments",
            ]
        )
        assert await raw.hget(chain, "version") == "1"
        assert 0 < await raw.pttl(f"{prefix}:lease:pay%3Aoneer:al%2Fice") <= 30_000
        assert 0 < await raw.pttl(f"{prefix}:shared:payments") <= 300_000
    finally:
        await raw.aclose()
        await store.aclose()


def test_redact_url_drops_the_password_and_query() -> None:
    assert (
        redact_url("rediss://me:s3cret@cache:6380/2?password=x") == "rediss://me:***@cache:6380/2"
    )
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("redis://:s3cret@h/0") == "redis://:***@h/0"


# -- open_store ----------------------------------------------------------------------------


async def test_open_store_builds_each_kind_lazily(tmp_path: Path) -> None:
    memory = open_store(StoreConfig(kind="memory"))
    sqlite = open_store(StoreConfig(kind="sqlite", path=tmp_path / "x" / "a.db"))
    redis = open_store(StoreConfig(kind="redis", url="redis://127.0.0.1:1/0", key_prefix="p"))
    try:
        assert isinstance(memory, MemoryStore)
        assert isinstance(sqlite, SqliteStore)
        assert sqlite.path == tmp_path / "x" / "a.db"
        assert isinstance(redis, RedisStore)
        assert redis.prefix == "p"
        assert not await asyncio.to_thread((tmp_path / "x").exists)  # nothing opened yet
    finally:
        for s in (memory, sqlite, redis):
            await s.aclose()


def test_open_store_refuses_unknown_kinds_and_a_redis_without_url() -> None:
    with pytest.raises(ConfigError, match=r"store\.kind"):
        open_store(StoreConfig(kind="etcd"))
    with pytest.raises(ConfigError, match=r"store\.url"):
        open_store(StoreConfig(kind="redis", url=None))
