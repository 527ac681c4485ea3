"""Rotating refresh-token chains: one rotation per expiry, recovery from every failure the
issue lists, nothing ever deleted. The engine runs in-process against the real token server;
expiries are driven by an injected clock (a plain callable), so no test sleeps."""

from __future__ import annotations

import asyncio
import gc
import logging
import sqlite3
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.chains import RefreshChainSource
from proxy.config import parse_config
from proxy.demo import FaultKind, TokenServer
from proxy.errors import ReauthRequired, TokenUnavailable
from proxy.metrics import Metrics
from proxy.models import ChainKey, CredentialState, Secret
from proxy.oauth import TokenEndpoint
from proxy.store import ChainStore
from proxy.store_memory import MemoryStore
from proxy.store_redis import _SET_IF_VERSION, RedisStore
from proxy.store_sqlite import SqliteStore
from proxy.tokens import TokenCache
from tests.conftest import CLIENT_SECRET, poll
from tests.redis_fixture import ReplyLosingRelay, redis_url

__all__ = ["redis_url"]  # a fixture used here, imported for pytest


class Clock:
    """Time the engine sees; tests move it instead of sleeping."""

    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Engine:
    cache: TokenCache
    chain: RefreshChainSource
    store: ChainStore
    clock: Clock
    metrics: Metrics


def credential(token_server: TokenServer, **extra: Any) -> Any:
    raw = {
        "store": {"kind": "memory"},
        "credentials": {
            "po": {
                "grant": "refresh_token",
                "token_url": str(token_server.token_url),
                "client_id": "demo-client",
                "client_secret": {"env": "TEST_CLIENT_SECRET"},
                "subject_header": "X-User",
                **extra,
            }
        },
    }
    return parse_config(raw).credentials["po"]


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ChainStore]:
    s: ChainStore = (
        MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "chains.db")
    )
    yield s
    await s.aclose()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(trust_env=False) as s:
        yield s


def build(
    token_server: TokenServer, store: ChainStore, session: aiohttp.ClientSession, **extra: Any
) -> Engine:
    clock = Clock()
    metrics = Metrics()
    endpoint = TokenEndpoint(
        credential(token_server, **extra), lambda: session, metrics, clock=clock
    )
    chain = RefreshChainSource(endpoint, store, metrics, clock=clock)
    cache = TokenCache({"po": chain}, metrics, clock=clock)
    return Engine(cache, chain, store, clock, metrics)


@pytest.fixture
async def rotating_server() -> AsyncIterator[TokenServer]:
    server = TokenServer(
        client_secret=CLIENT_SECRET, expires_in=300, reuse_grace=30, token_prefix="rot"
    )
    await server.start()
    yield server
    await server.aclose()


KEY = ChainKey("po", "alice")


async def test_1000_concurrent_requests_across_50_expiries_rotate_once_each(
    rotating_server: TokenServer, store: ChainStore, session: aiohttp.ClientSession
) -> None:
    engine = build(rotating_server, store, session)
    await engine.chain.seed(KEY, Secret(rotating_server.seed_refresh_token("alice")))
    seen: set[str] = set()
    for _expiry in range(50):
        tokens = await asyncio.gather(*(engine.cache.get(KEY) for _ in range(1000)))
        values = {t.value.reveal() for t in tokens}
        assert len(values) == 1  # all 1000 got the same, freshly rotated token
        seen |= values
        engine.clock.now += 301  # past expiry: the next burst needs a new token
    assert rotating_server.rotations["alice"] == 50
    assert rotating_server.invalid_grant == 0
    assert rotating_server.revoked_families == 0
    assert len(seen) == 50
    rec = await store.get(KEY)
    assert rec is not None
    assert rec.state is CredentialState.OK
    assert rec.version >= 50
    misses = engine.metrics.registry.get_sample_value(
        "authproxy_token_cache_total", {"credential": "po", "result": "miss"}
    )
    assert misses == 50
    history = await store.history(KEY, 5)
    assert [e.event for e in history] == ["rotate"] * 5
    assert all(e.token_fingerprint and e.token_fingerprint.startswith("sha256:") for e in history)


@pytest.mark.parametrize("fault", [FaultKind.HTTP_500_AFTER_COMMIT, FaultKind.DROP_AFTER_COMMIT])
async def test_lost_answer_is_recovered_within_the_grace_window(
    rotating_server: TokenServer,
    store: ChainStore,
    session: aiohttp.ClientSession,
    fault: FaultKind,
) -> None:
    engine = build(rotating_server, store, session, rotation_grace="30s")
    await engine.chain.seed(KEY, Secret(rotating_server.seed_refresh_token("alice")))
    rotating_server.fail_next(1, fault)
    token = await engine.cache.get(KEY)
    assert rotating_server.is_valid(token.value)
    assert rotating_server.faults_served[fault] == 1
    assert rotating_server.grace_reuses == 1  # the retry used the same token and got the same pair
    assert rotating_server.invalid_grant == 0
    engine.clock.now += 301
    again = await engine.cache.get(KEY)  # the chain goes on from the recovered token
    assert again.value != token.value
    assert rotating_server.invalid_grant == 0
    assert rotating_server.revoked_families == 0


async def test_transient_failure_without_answer_keeps_the_chain(
    rotating_server: TokenServer, store: ChainStore, session: aiohttp.ClientSession
) -> None:
    engine = build(rotating_server, store, session, rotation_grace="30s", timeout="2s")
    seed = rotating_server.seed_refresh_token("alice")
    await engine.chain.seed(KEY, Secret(seed))
    rotating_server.outage = True
    with pytest.raises(TokenUnavailable):
        await engine.cache.get(KEY)
    rec = await store.get(KEY)
    assert rec is not None
    assert rec.refresh_token == Secret(seed)  # kept, not wiped
    assert rec.state is CredentialState.OK
    assert rec.rotating_since is None
    assert rec.last_error is not None
    rotating_server.outage = False
    engine.clock.now += 60  # past the breaker's cooldown
    token = await engine.cache.get(KEY)
    assert rotating_server.is_valid(token.value)
    assert rotating_server.invalid_grant == 0


async def test_invalid_grant_marks_reauth_required_and_keeps_the_token(
    rotating_server: TokenServer, store: ChainStore, session: aiohttp.ClientSession
) -> None:
    engine = build(rotating_server, store, session)
    seed = rotating_server.seed_refresh_token("alice")
    rotating_server.revoke(seed)
    await engine.chain.seed(KEY, Secret(seed))
    with pytest.raises(ReauthRequired, match="authproxy seed po --subject alice"):
        await engine.cache.get(KEY)
    calls = rotating_server.requests
    rec = await store.get(KEY)
    assert rec is not None
    assert rec.state is CredentialState.REAUTH_REQUIRED
    assert rec.refresh_token == Secret(seed)  # kept for diagnosis
    history = await store.history(KEY, 5)
    assert history[0].event == "reauth_required"
    assert history[0].token_fingerprint == Secret(seed).fingerprint()
    # Until it is seeded anew: answered at once, without calling the provider.
    for _ in range(5):
        with pytest.raises(ReauthRequired):
            await engine.cache.get(KEY)
    assert rotating_server.requests == calls
    await engine.chain.seed(KEY, Secret(rotating_server.seed_refresh_token("alice")))
    engine.cache.forget(KEY)
    token = await engine.cache.get(KEY)
    assert rotating_server.is_valid(token.value)


async def test_invalid_grant_after_another_writer_moved_the_chain_uses_the_new_one(
    rotating_server: TokenServer, store: ChainStore, session: aiohttp.ClientSession
) -> None:
    engine = build(rotating_server, store, session)
    old = rotating_server.seed_refresh_token("alice")
    await engine.chain.seed(KEY, Secret(old))
    gate = asyncio.Event()
    rotating_server.gate = gate
    pending = asyncio.ensure_future(engine.cache.get(KEY))
    await rotating_server.wait_held(1)  # our refresh call is now parked at the provider
    # Meanwhile someone seeds a fresh chain and the old token is revoked at the provider.
    await store.seed(KEY, Secret(rotating_server.seed_refresh_token("alice")))
    rotating_server.revoke(old)
    gate.set()
    rotating_server.gate = None
    token = await pending  # the refused call is followed at once by one with the newer token
    assert rotating_server.is_valid(token.value)
    assert rotating_server.invalid_grant == 1
    rec = await store.get(KEY)
    assert rec is not None
    assert rec.state is CredentialState.OK  # not marked reauth_required
    events = [e.event for e in await store.history(KEY, 5)]
    assert events[:2] == ["rotate", "failure"]


async def test_cancelled_requests_do_not_cancel_the_rotation(
    rotating_server: TokenServer, store: ChainStore, session: aiohttp.ClientSession
) -> None:
    engine = build(rotating_server, store, session)
    await engine.chain.seed(KEY, Secret(rotating_server.seed_refresh_token("alice")))
    gate = asyncio.Event()
    rotating_server.gate = gate
    waiters = [asyncio.ensure_future(engine.cache.get(KEY)) for _ in range(20)]
    await rotating_server.wait_held(1)
    for w in waiters[:10]:
        w.cancel()
    gate.set()
    rotating_server.gate = None
    results = await asyncio.gather(*waiters, return_exceptions=True)
    tokens = {r.value for r in results if not isinstance(r, BaseException)}  # Secrets
    assert len(tokens) == 1
    assert sum(isinstance(r, asyncio.CancelledError) for r in results) == 10
    assert rotating_server.rotations["alice"] == 1
    rec = await store.get(KEY)
    assert rec is not None
    assert rec.access_token is not None
    assert rec.access_token.value in tokens


async def test_closing_the_cache_lets_a_background_rotation_finish(
    store: ChainStore, session: aiohttp.ClientSession
) -> None:
    """A reload or shutdown while a refresh-ahead rotation waits on the provider: the provider
    commits it, so the new refresh token must reach the store; with no grace window the old
    one is dead, and a rotation cancelled there would lose the chain."""
    server = TokenServer(client_secret=CLIENT_SECRET, expires_in=300, reuse_grace=0)
    await server.start()
    try:
        engine = build(server, store, session, rotation_grace="0s")
        seed = server.seed_refresh_token("alice")
        await engine.chain.seed(KEY, Secret(seed))
        first = await engine.cache.get(KEY)
        engine.clock.now += 250  # past the refresh time (240 s of 300), still usable
        server.gate = asyncio.Event()
        assert engine.cache.get_cached(KEY) is first  # starts the rotation; nobody waits on it
        await server.wait_held(1)
        closing = asyncio.ensure_future(engine.cache.aclose())  # its first step runs first
        server.gate.set()
        server.gate = None
        await closing
        rec = await store.get(KEY)
        assert rec is not None
        assert rec.rotating_since is None
        assert server.rotations["alice"] == 2
        # The next process carries on with the stored chain.
        successor = build(server, store, session, rotation_grace="0s")
        successor.clock.now = engine.clock.now + 100  # the held token has expired
        token = await successor.cache.get(KEY)
        assert server.is_valid(token.value)
        assert server.invalid_grant == 0 and server.revoked_families == 0
        await successor.cache.aclose()
    finally:
        await server.aclose()


async def test_closing_the_cache_also_waits_for_rotations_started_while_it_drains(
    store: ChainStore, session: aiohttp.ClientSession
) -> None:
    """While the old cache drains after a reload, a request still running on it asks for
    another user's token and starts a rotation. The drain waits for that one too: cancelled
    mid-call, the provider would commit it and the chain would be lost."""
    server = TokenServer(client_secret=CLIENT_SECRET, expires_in=300, reuse_grace=0)
    await server.start()
    try:
        engine = build(server, store, session, rotation_grace="0s")
        bob = ChainKey("po", "bob")
        await engine.chain.seed(KEY, Secret(server.seed_refresh_token("alice")))
        await engine.chain.seed(bob, Secret(server.seed_refresh_token("bob")))
        server.gate = asyncio.Event()
        alice = asyncio.ensure_future(engine.cache.get(KEY))
        await server.wait_held(1)
        closing = asyncio.ensure_future(engine.cache.aclose())
        await poll(lambda: engine.cache._closed, "the drain to begin")
        server.fail_next(1, FaultKind.SLOW, delay=0.5)  # bob's call outlasts alice's
        late = asyncio.ensure_future(engine.cache.get(bob))
        await server.wait_held(2)
        server.gate.set()
        server.gate = None
        await closing
        assert server.is_valid((await alice).value)
        token = await late
        assert server.is_valid(token.value)
        rec = await store.get(bob)
        assert rec is not None and rec.rotating_since is None
        assert rec.access_token is not None and rec.access_token.value == token.value
        assert server.rotations["bob"] == 1 and server.invalid_grant == 0
    finally:
        await server.aclose()


async def test_a_reload_while_the_breaker_probes_leaves_it_usable(
    rotating_server: TokenServer, store: ChainStore, session: aiohttp.ClientSession
) -> None:
    """The breaker opened on an outage; a request on the old engine starts the probe just as a
    reload closes that engine. The probe must not stay taken: the new engine gets tokens once
    the provider is back."""
    old = build(rotating_server, store, session, timeout="1s")
    await old.chain.seed(KEY, Secret(rotating_server.seed_refresh_token("alice")))
    await old.cache.get(KEY)
    rotating_server.outage = True
    old.clock.now += 250  # due: the refresh ahead of expiry fails and opens the breaker
    assert old.cache.get_cached(KEY) is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while old.cache.health["po"].state is not CredentialState.DEGRADED:
        assert loop.time() < deadline, "the failed refresh never degraded the credential"
        await asyncio.sleep(0.02)
    rotating_server.outage = False
    old.clock.now += 5  # the breaker's cooldown is over
    new = build(rotating_server, store, session, timeout="1s")
    new.clock.now = old.clock.now
    new.cache.adopt(old.cache, {"po"})
    closing = asyncio.ensure_future(old.cache.aclose())
    old.cache.get_cached(KEY)  # a request on the old pipeline: it becomes the probe
    await closing
    new.clock.now += 100  # the held token has expired
    token = await new.cache.get(KEY)
    assert rotating_server.is_valid(token.value)
    await new.cache.aclose()


async def test_a_live_holder_keeps_its_lease_through_a_slow_provider(
    rotating_server: TokenServer, store: ChainStore, session: aiohttp.ClientSession
) -> None:
    """The lease is short (half the grace window, so a dead holder's chain is recovered in
    time) and renewed while its holder lives: a provider slower than the lease does not let
    a second process rotate the same chain."""
    a = build(rotating_server, store, session, rotation_grace="8s")
    b = build(rotating_server, store, session, rotation_grace="8s")
    assert a.chain.lease_ttl == 4.0
    await a.chain.seed(KEY, Secret(rotating_server.seed_refresh_token("alice")))
    rotating_server.gate = asyncio.Event()
    first = asyncio.ensure_future(a.cache.get(KEY))
    await rotating_server.wait_held(1)
    second = asyncio.ensure_future(b.cache.get(KEY))
    await asyncio.sleep(a.chain.lease_ttl * 1.25)  # the provider is slower than the lease
    assert rotating_server.held == 1  # b did not take the lease and call the provider too
    rotating_server.gate.set()
    rotating_server.gate = None
    token_a, token_b = await first, await second
    assert token_a.value == token_b.value
    assert rotating_server.rotations["alice"] == 1
    assert rotating_server.grace_reuses == 0 and rotating_server.invalid_grant == 0


@pytest.mark.parametrize("outage", ["short", "past_the_lease"])
async def test_a_store_locked_at_the_final_write_does_not_lose_the_rotation(
    outage: str, rotating_server: TokenServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The provider has rotated (the old refresh token is dead); the store is locked by
    another writer just then, for a moment or for longer than the rotation's lease (a store
    failover). The write is retried, not dropped: the new refresh token exists nowhere else."""
    path = tmp_path / "locked.db"
    store = SqliteStore(path, busy_timeout=0.2)
    try:
        engine = build(rotating_server, store, session, rotation_grace="4s")  # a 2 s lease
        hold = 0.5 if outage == "short" else engine.chain.lease_ttl + 1.0
        await engine.chain.seed(KEY, Secret(rotating_server.seed_refresh_token("alice")))
        rotating_server.gate = asyncio.Event()
        fetch = asyncio.ensure_future(engine.cache.get(KEY))
        await rotating_server.wait_held(1)  # the intent is written; the provider holds the call
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process's write transaction
        rotating_server.gate.set()
        rotating_server.gate = None
        await asyncio.sleep(hold)  # the outage's length: past the busy timeout, or the lease
        other.execute("COMMIT")
        other.close()
        token = await fetch
        rec = await store.get(KEY)
        assert rec is not None and rec.rotating_since is None
        assert rec.access_token is not None and rec.access_token.value == token.value
        assert rotating_server.is_valid(token.value)
        history = [(h.event, h.outcome) for h in await store.history(KEY, 5)]
        assert history[0] == ("rotate", "success")
    finally:
        await store.aclose()


@pytest.mark.parametrize("write", ["intent", "result"])
async def test_a_write_that_ran_but_lost_its_answer_is_not_a_race_or_an_interruption(
    write: str,
    rotating_server: TokenServer,
    session: aiohttp.ClientSession,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis runs one of the rotation's writes (the intent before the provider call, or the
    result after it), then the connection drops before the answer arrives. redis-py sends the
    write again, which now finds the chain at the new version and refuses. That is our own
    write: not another process winning a race, nor a rotation left unfinished."""
    relay = ReplyLosingRelay(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    await relay.start()
    store = RedisStore(relay.url, key_prefix=f"lost-answer-{uuid.uuid4().hex[:8]}")
    try:
        engine = build(rotating_server, store, session)
        seed = rotating_server.seed_refresh_token("alice")
        await engine.chain.seed(KEY, Secret(seed))
        relay.lose_reply(_SET_IF_VERSION, nth=1 if write == "intent" else 2)
        token = await engine.cache.get(KEY)
        assert relay.lost.is_set()
        rec = await store.get(KEY)
        assert rec is not None and rec.state is CredentialState.OK and rec.rotating_since is None
        assert rec.access_token is not None and rec.access_token.value == token.value
        assert rec.refresh_token != Secret(seed)
        assert rotating_server.is_valid(token.value)
        history = [(h.event, h.outcome) for h in await store.history(KEY, 5)]
        assert history[0] == ("rotate", "success")
        assert ("conflict", "lost_race") not in history
        assert ("interrupted", "unknown") not in history
        assert rotating_server.rotations["alice"] == 1
        rotations = engine.metrics.registry.get_sample_value(
            "authproxy_refresh_token_rotations_total", {"credential": "po"}
        )
        assert rotations == 1
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        await engine.cache.aclose()
        await store.aclose()
        await relay.aclose()


async def test_a_chain_seeded_anew_during_a_rotation_is_the_one_served(
    rotating_server: TokenServer, store: ChainStore, session: aiohttp.ClientSession
) -> None:
    """Someone seeds alice's chain anew (a re-authorisation) while a rotation of the old chain
    waits on the provider. The old chain's result loses the store write, and the caller gets
    a token of the newly seeded chain, not one of the chain that was replaced."""
    engine = build(rotating_server, store, session)
    await engine.chain.seed(KEY, Secret(rotating_server.seed_refresh_token("alice")))
    rotating_server.gate = asyncio.Event()
    fetch = asyncio.ensure_future(engine.cache.get(KEY))
    await rotating_server.wait_held(1)
    reseed = rotating_server.seed_refresh_token("alice")
    await engine.chain.seed(KEY, Secret(reseed))
    engine.cache.forget(KEY)  # as the admin API does after a seed
    rotating_server.gate.set()
    rotating_server.gate = None
    token = await fetch
    rec = await store.get(KEY)
    assert rec is not None and rec.refresh_token != Secret(reseed)  # the new chain rotated
    assert rec.access_token is not None and rec.access_token.value == token.value
    assert rotating_server.is_valid(token.value)
    history = [(h.event, h.outcome) for h in await store.history(KEY, 5)]
    assert ("conflict", "lost_race") in history
    assert engine.cache.get_cached(KEY) is not None
    assert engine.cache.get_cached(KEY) == token
    await engine.cache.aclose()


async def test_one_users_failure_does_not_show_their_id_to_other_users(
    rotating_server: TokenServer, store: ChainStore, session: aiohttp.ClientSession
) -> None:
    """Another process holds alice's lease and never finishes: her fetch fails naming her
    chain. The credential's last error (in every user's 503 and in /admin) must not."""
    engine = build(rotating_server, store, session, rotation_grace="4s")
    await engine.chain.seed(KEY, Secret(rotating_server.seed_refresh_token("alice")))
    bob = ChainKey("po", "bob")
    await engine.chain.seed(bob, Secret(rotating_server.seed_refresh_token("bob")))
    assert await store.acquire_lease(KEY, "another-process", 60.0)
    with pytest.raises(TokenUnavailable) as own:
        await engine.cache.get(KEY)
    assert "po[alice]" in str(own.value)  # her own answer may name her chain
    with pytest.raises(TokenUnavailable) as other:
        await engine.cache.get(bob)  # the breaker is open: the credential's last error
    last_error = engine.cache.health["po"].last_error
    assert last_error is not None and "refreshing po[one user's chain]" in last_error
    assert "alice" not in str(other.value) and "alice" not in last_error


async def test_a_users_lost_rotation_is_recovered_without_the_user(
    rotating_server: TokenServer, store: ChainStore, session: aiohttp.ClientSession
) -> None:
    """The provider rotates alice's chain and every answer is lost; alice does not come back.
    A background retry inside the grace window gets the same new pair before the old token's
    reuse would revoke the family."""
    engine = build(rotating_server, store, session, timeout="2s")
    seed = rotating_server.seed_refresh_token("alice")
    await engine.chain.seed(KEY, Secret(seed))
    rotating_server.fail_next(None, FaultKind.DROP_AFTER_COMMIT)
    with pytest.raises(TokenUnavailable):
        await engine.cache.get(KEY)
    assert rotating_server.rotations["alice"] == 1  # committed at the provider, answer lost
    reuses = rotating_server.grace_reuses
    rotating_server.clear_faults()
    engine.clock.now += 60  # past the breaker's cooldown; no request from alice
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while (rec := await store.get(KEY)) is not None and rec.refresh_token.reveal() == seed:
        assert loop.time() < deadline, "the lost rotation was not recovered in the background"
        await asyncio.sleep(0.05)
    assert rec is not None and rec.state is CredentialState.OK and rec.rotating_since is None
    assert rotating_server.grace_reuses > reuses  # the same new pair, from the grace window
    assert rotating_server.rotations["alice"] == 1 and rotating_server.invalid_grant == 0
    await engine.cache.aclose()


@pytest.mark.slow
async def test_10000_subjects_have_their_own_chains_within_budget(
    rotating_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    store = MemoryStore()
    cache = [build(rotating_server, store, session).cache]  # a box: emptied to drop it
    subjects = [f"user-{i}" for i in range(10_000)]
    for s in subjects:
        await store.seed(ChainKey("po", s), Secret(rotating_server.seed_refresh_token(s)))
    sem = asyncio.Semaphore(64)

    async def one(s: str) -> str:
        async with sem:
            return (await cache[0].get(ChainKey("po", s))).value.reveal()

    # What the engine and store hold for 10,000 rotated chains, measured as what dropping them
    # frees: the fake IdP in this process (the other side of every chain) is not counted, as
    # it is by RSS. `make bench` measures the whole proxy process (about 2.7 KB per chain).
    tracemalloc.start()
    try:
        tokens = await asyncio.gather(*(one(s) for s in subjects))
        assert len(set(tokens)) == 10_000
        assert rotating_server.invalid_grant == 0
        assert sum(rotating_server.rotations[s] for s in subjects) == 10_000
        record = await store.get(ChainKey("po", subjects[-1]))
        assert record is not None and record.access_token is not None
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        await store.aclose()
        cache.clear()
        del tokens, record, store
        gc.collect()
        freed = held - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    per_chain = freed / 10_000
    # Budget stated in the README: a cached per-user chain costs the engine under 4 KiB.
    assert 256 < per_chain < 4096, f"{per_chain:.0f} bytes per chain"
