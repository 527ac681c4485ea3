"""The token cache: single-flight (1000 requests, one fetch), refresh ahead of expiry with no
request waiting, stale-if-error, the breaker, invalidation only of the current token, and
owned background tasks (also `proxy.tasks`). Unit tests drive a real TokenEndpoint against the
demo token server, with an injected clock (a plain callable, not a patch)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from proxy.chains import ClientCredentialsSource
from proxy.demo import EchoServer, TokenServer
from proxy.errors import TokenUnavailable
from proxy.metrics import Metrics
from proxy.models import AccessToken, ChainKey, CredentialState, Secret
from proxy.oauth import TokenEndpoint
from proxy.runtime import Runtime
from proxy.store_redis import RedisStore
from proxy.tasks import TaskOwner
from proxy.tokens import TokenCache
from tests.conftest import ProxyFactory, poll, proxy_config, proxy_url
from tests.redis_fixture import free_port
from tests.test_oauth import credential

KEY = ChainKey("demo")


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(trust_env=False) as s:
        yield s


def build(
    token_server: TokenServer,
    session: aiohttp.ClientSession,
    clock: Callable[[], float],
    **extra: Any,
) -> tuple[TokenCache, Metrics]:
    metrics = Metrics(CollectorRegistry())
    ep = TokenEndpoint(credential(token_server, **extra), lambda: session, metrics, clock=clock)
    return TokenCache({"demo": ClientCredentialsSource(ep)}, metrics, clock=clock), metrics


def cache_count(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "authproxy_token_cache_total", {"credential": "demo", "result": result}
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("lifetime", "skew", "refresh_after", "usable_for"),
    [
        (300, 5, 240, 295),  # 80% of the lifetime
        (3600, 5, 2880, 3595),  # 80% comes before 60 s ahead of expiry
        (200, 5, 140, 195),  # 60 s before expiry comes first
        (100, 5, 50, 95),  # never before half the lifetime
        (1000, 300, 675, 750),  # skew capped at a quarter; then 90% of the usable time
        (600, 130, 423, 470),  # a large skew: refreshed while still usable
    ],
)
def test_refresh_timing_rules(
    lifetime: float, skew: float, refresh_after: float, usable_for: float
) -> None:
    token = AccessToken(
        value=Secret("t" * 20), issued_at=1000.0, expires_at=1000.0 + lifetime, skew=skew
    )
    assert token.refresh_at == pytest.approx(1000.0 + refresh_after)
    assert token.usable_until == pytest.approx(1000.0 + usable_for)
    assert token.refresh_at < token.usable_until


async def test_refresh_ahead_of_expiry_without_a_waiting_request(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    clock = Clock()
    cache, metrics = build(token_server, session, clock)
    try:
        first = await cache.get(KEY)
        assert cache_count(metrics, "miss") == 1
        clock.now = first.refresh_at + 0.1  # due, still usable
        assert (await cache.get(KEY)) is first  # served at once; the refresh runs behind it
        await token_server.wait_requests(2)
        await poll(lambda: cache._held(KEY) is not first, "the refreshed token")
        second = await cache.get(KEY)
        assert second.value != first.value and token_server.is_valid(second.value)
        assert cache_count(metrics, "miss") == 1 and cache_count(metrics, "hit") == 2
    finally:
        await cache.aclose()


async def test_stale_if_error_then_breaker_then_recovery(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    clock = Clock()
    cache, _ = build(token_server, session, clock)
    try:
        first = await cache.get(KEY)
        token_server.outage = True
        clock.now = first.usable_until - 0.5  # due, and half a second of use left
        assert (await cache.get(KEY)) is first
        await poll(lambda: cache.health["demo"].state is CredentialState.DEGRADED, "degraded")
        calls = token_server.requests
        assert calls == 1 + 4  # the background refresh retried, then gave up
        # Still usable: served stale, and the breaker keeps the provider in peace.
        for _ in range(50):
            assert (await cache.get(KEY)) is first
        assert token_server.requests == calls
        assert "temporarily_unavailable" in (cache.health["demo"].last_error or "")
        # Expired (minus skew), breaker still open: token_unavailable at once, Retry-After.
        clock.now = first.usable_until + 0.01
        with pytest.raises(TokenUnavailable) as info:
            await cache.get(KEY)
        assert info.value.retry_after is not None and info.value.retry_after >= 1
        assert token_server.requests == calls
        # The provider is back; once the cooldown is over one probe restores service.
        token_server.outage = False
        clock.now += 60
        fresh = await cache.get(KEY)
        assert fresh.value != first.value
        assert token_server.requests == calls + 1
        assert cache.health["demo"].state is CredentialState.OK
        assert cache.health["demo"].breaker.closed
    finally:
        await cache.aclose()


async def test_a_request_in_the_step_a_failed_fetch_ends_gets_no_expired_token(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    """A background refresh fails and answers with the stale token (stale-if-error). A
    request that reaches the cache in the same loop step, before the fetch's cleanup has run
    and after the token expired, must not be handed that finished fetch's stale answer."""
    clock = Clock()
    cache, _ = build(token_server, session, clock)
    late: list[asyncio.Task[AccessToken]] = []

    class ArriveAsTheFetchFails(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            # Runs inside the fetch's last step: the token expires and a request comes in.
            if not late and record.levelno >= logging.WARNING and "unavailable" in record.msg:
                clock.now = first.usable_until + 0.01
                late.append(asyncio.ensure_future(cache.get(KEY)))

    handler = ArriveAsTheFetchFails()
    tokens_log = logging.getLogger("authproxy.tokens")
    tokens_log.addHandler(handler)
    try:
        first = await cache.get(KEY)
        token_server.outage = True
        clock.now = first.refresh_at + 0.1  # due: the refresh runs behind this request
        assert (await cache.get(KEY)) is first
        await poll(lambda: bool(late), "the failed refresh")
        with pytest.raises(TokenUnavailable) as info:
            await late[0]
        assert info.value.retry_after is not None and info.value.retry_after >= 1
    finally:
        tokens_log.removeHandler(handler)
        await cache.aclose()


async def test_background_retry_recovers_without_traffic(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    """With no token and no requests, the cache keeps probing (one call per cooldown) and
    holds a token again once the provider answers."""
    cache, _ = build(token_server, session, time.time)  # real time, for the timer
    try:
        token_server.outage = True
        with pytest.raises(TokenUnavailable):
            await cache.get(KEY)
        assert token_server.requests == 4
        token_server.outage = False
        await token_server.wait_requests(5)  # the timer's probe, about a second later
        await poll(lambda: cache._held(KEY) is not None, "a token from the background probe")
        assert cache.health["demo"].state is CredentialState.OK
        assert token_server.requests == 5
    finally:
        await cache.aclose()


async def test_a_reload_during_a_background_retry_keeps_retrying_in_the_new_cache(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    """The provider is down and the timer's retry is in flight when a reload replaces the
    cache. That retry fails in the old cache, which schedules nothing once closed: the new
    cache must take up the retrying, without waiting for traffic."""
    old, metrics = build(token_server, session, time.time)  # real time, for the timers
    new = TokenCache(old._sources, metrics)
    try:
        token_server.outage = True
        with pytest.raises(TokenUnavailable):
            await old.get(KEY)
        token_server.gate = asyncio.Event()
        await token_server.wait_held(1)  # the background retry, about a second later
        new.adopt(old, {"demo"})
        closing = asyncio.ensure_future(old.aclose())  # waits for the retry in flight
        token_server.gate.set()
        token_server.gate = None
        await closing  # the old retry failed (outage) after its cache closed
        assert old._held(KEY) is None
        token_server.outage = False
        await poll(lambda: new._held(KEY) is not None, "a token from the new cache's retry")
        assert new.health["demo"].state is CredentialState.OK
    finally:
        await old.aclose()
        await new.aclose()


async def test_a_closed_cache_serves_its_last_requests_a_token_due_for_refresh(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    """After a reload the old cache is closed while requests on the old pipeline finish. A
    token past its refresh time but still usable is served; no new fetch is started."""
    clock = Clock()
    cache, _ = build(token_server, session, clock)
    first = await cache.get(KEY)
    await cache.aclose()
    clock.now = first.refresh_at + 0.1  # due, still usable
    assert cache.get_cached(KEY) is first
    assert (await cache.get(KEY)) is first
    assert cache.invalidate(KEY, first)  # a 401: dropped, and nothing started
    assert token_server.requests == 1


async def test_a_shared_token_is_fetched_directly_while_the_store_is_down(
    token_server: TokenServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """`share: true` only saves token requests across a fleet: with the store unreachable,
    each process fetches its own token rather than failing its requests."""
    metrics = Metrics(CollectorRegistry())
    ep = TokenEndpoint(credential(token_server, share=True), lambda: session, metrics)
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    cache = TokenCache({"demo": ClientCredentialsSource(ep, store)}, metrics)
    try:
        token = await cache.get(KEY)
        assert token_server.is_valid(token.value)
        assert token_server.grants["client_credentials"] == 1
        assert cache.health["demo"].state is CredentialState.OK
        assert any("without sharing" in r.getMessage() for r in caplog.records)
    finally:
        await cache.aclose()
        await store.aclose()


async def test_invalidate_drops_only_the_current_token(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    cache, _ = build(token_server, session, Clock())
    try:
        first = await cache.get(KEY)
        results = [cache.invalidate(KEY, first) for _ in range(20)]  # a burst of 401s
        assert results.count(True) == 1
        second = await cache.get(KEY)
        assert second.value != first.value
        assert token_server.requests == 2  # one refresh for the whole burst
        assert not cache.invalidate(KEY, first)  # a late 401 for the old token: no-op
        assert (await cache.get(KEY)) is second and token_server.requests == 2
    finally:
        await cache.aclose()


async def test_a_slow_provider_times_the_request_out_not_the_fetch(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    gate = token_server.gate = asyncio.Event()
    cache, _ = build(token_server, session, Clock())
    try:
        with pytest.raises(TokenUnavailable):
            await cache.get(KEY, timeout=0.2)
        gate.set()
        await poll(lambda: cache._held(KEY) is not None, "the fetch, finished behind")
        assert token_server.requests == 1
    finally:
        await cache.aclose()


async def test_aclose_lets_waited_fetches_finish(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    """After a reload the old cache closes; a request waiting on its fetch still gets a
    token (the fetch is not cancelled under it)."""
    gate = token_server.gate = asyncio.Event()
    cache, _ = build(token_server, session, Clock())
    waiter = asyncio.get_running_loop().create_task(cache.get(KEY))
    await poll(lambda: token_server.held == 1, "the fetch at the gate")
    closing = asyncio.get_running_loop().create_task(cache.aclose())
    await poll(lambda: cache._closed, "aclose started")
    gate.set()
    token = await waiter
    await closing
    assert token_server.is_valid(token.value)


async def test_task_owner_cancels_what_is_left() -> None:
    owner = TaskOwner("t")
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = owner.spawn(forever())
    await started.wait()
    assert len(owner) == 1
    await owner.aclose()
    assert task.cancelled() and len(owner) == 0
    with pytest.raises(RuntimeError):
        _ = owner.spawn(forever())


# -- through the proxy ------------------------------------------------------------------------


def miss_count(rt: Runtime, result: str = "miss") -> float:
    value = rt.metrics.registry.get_sample_value(
        "authproxy_token_cache_total", {"credential": "demo", "result": result}
    )
    return value or 0.0


async def test_1000_concurrent_requests_on_a_cold_cache_make_one_fetch(
    make_proxy: ProxyFactory, token_server: TokenServer, echo_server: EchoServer
) -> None:
    rt = await make_proxy(proxy_config(token_server, echo_server))
    gate = token_server.gate = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(trust_env=False, connector=connector) as http:

        async def one(i: int) -> int:
            async with http.get(proxy_url(rt, f"/echo/r{i}")) as r:
                await r.read()
                return r.status

        tasks = [asyncio.get_running_loop().create_task(one(i)) for i in range(1000)]
        await poll(
            lambda: miss_count(rt) + miss_count(rt, "coalesced") >= 1000,
            "1000 requests waiting on the cache",
            within=60,
        )
        await poll(lambda: token_server.held == 1, "the one fetch at the gate")
        gate.set()
        statuses = await asyncio.gather(*tasks)
    assert statuses == [200] * 1000
    assert token_server.requests == 1
    assert miss_count(rt) == 1 and miss_count(rt, "coalesced") == 999


async def test_short_tokens_are_refreshed_by_the_timer(
    make_proxy: ProxyFactory, token_server: TokenServer, echo_server: EchoServer
) -> None:
    """expires_in=2: the timer refreshes at half the lifetime; requests never wait again."""
    token_server.expires_in = 2
    rt = await make_proxy(proxy_config(token_server, echo_server))
    async with aiohttp.ClientSession(trust_env=False) as http:
        async with http.get(proxy_url(rt, "/echo/first")) as r:
            assert r.status == 200
        await token_server.wait_requests(3)  # two timer refreshes, no request involved
        for i in range(20):
            async with http.get(proxy_url(rt, f"/echo/{i}")) as r:
                assert r.status == 200
    assert miss_count(rt) == 1
    assert echo_server.unauthorized == 0
