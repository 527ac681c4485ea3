"""SPEC section 6 as exposed on a running proxy's /metrics: names, types, help texts, label
sets, values that match what the token server and the upstream saw, bounded cardinality, and
no subject or token in any label. Plus `InstrumentedStore` over real stores."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from proxy.demo import EchoServer, FaultKind, TokenServer
from proxy.errors import StoreUnavailable
from proxy.metrics import Metrics
from proxy.models import ChainKey, HistoryEvent, Secret
from proxy.runtime import Runtime
from proxy.store import ChainStore
from proxy.store_memory import MemoryStore
from proxy.store_metrics import OPERATIONS, InstrumentedStore
from proxy.store_redis import RedisStore
from proxy.store_sqlite import SqliteStore
from proxy.tlsconfig import certificate_not_after
from tests.conftest import CLIENT_SECRET, ProxyFactory, admin_url, proxy_config, proxy_url
from tests.redis_fixture import RedisServer

# SPEC section 6, plus what issue 8 adds: name (as exposed) -> (type, label names).
SPEC_METRICS: dict[str, tuple[str, set[str]]] = {
    "authproxy_requests": ("counter", {"route", "method", "code"}),
    "authproxy_request_duration_seconds": ("histogram", {"route"}),
    "authproxy_token_requests": ("counter", {"credential", "outcome"}),
    "authproxy_token_request_duration_seconds": ("histogram", {"credential"}),
    "authproxy_token_cache": ("counter", {"credential", "result"}),
    "authproxy_token_expiry_timestamp_seconds": ("gauge", {"credential"}),
    "authproxy_credential_state": ("gauge", {"credential", "state"}),
    "authproxy_upstream_retries": ("counter", {"route", "reason"}),
    "authproxy_refresh_token_rotations": ("counter", {"credential"}),
    "authproxy_tls_certificate_expiry_timestamp_seconds": ("gauge", {"kind", "name"}),
    "authproxy_store_operation_duration_seconds": ("histogram", {"operation"}),
    "authproxy_store_errors": ("counter", {"operation"}),
    "authproxy_provider_clock_offset_seconds": ("gauge", {"credential"}),
}
OUTCOMES = {
    "success",
    "invalid_grant",
    "invalid_client",
    "oauth_error",
    "http_error",
    "network_error",
    "timeout",
    "malformed",
}


class Scrape:
    """One parsed /metrics answer."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families: dict[str, Metric] = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample_name: str, **labels: str) -> float:
        """Sum of the samples named `sample_name` whose labels include `labels` (0 if none)."""
        total = 0.0
        for family in self.families.values():
            for s in family.samples:
                if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def label_values(self, sample_name: str, label: str) -> set[str]:
        return {
            s.labels[label]
            for f in self.families.values()
            for s in f.samples
            if s.name == sample_name and label in s.labels
        }


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(trust_env=False) as session:
        yield session


async def scrape(http: aiohttp.ClientSession, rt: Runtime) -> Scrape:
    async with http.get(admin_url(rt, "/metrics")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return Scrape(await resp.text())


async def status_of(http: aiohttp.ClientSession, url: str, method: str = "GET", **kw: Any) -> int:
    async with http.request(method, url, **kw) as resp:
        await resp.read()
        return resp.status


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def chain_config(token_server: TokenServer, **extra: Any) -> dict[str, Any]:
    return {
        "grant": "refresh_token",
        "token_url": str(token_server.token_url),
        "client_id": "demo-client",
        "client_secret": {"env": "TEST_CLIENT_SECRET"},
        **extra,
    }


@pytest.fixture
async def proxy(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    tmp_path: Path,
    ca: trustme.CA,
) -> Runtime:
    """Credentials demo (client credentials), chain (rotating) and users (per-user chains);
    routes echo, chain, users, and mtls (a client certificate, for the expiry gauge)."""
    cert = ca.issue_cert("authproxy-client.example")
    cert_path = tmp_path / "client.crt"
    key_path = tmp_path / "client.key"
    cert.cert_chain_pems[0].write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    raw = proxy_config(
        token_server, echo_server, store={"kind": "sqlite", "path": str(tmp_path / "s.db")}
    )
    raw["credentials"]["chain"] = chain_config(token_server)
    raw["credentials"]["users"] = chain_config(token_server, subject_header="X-User")
    upstream = f"{echo_server.url}/api"
    raw["routes"] += [
        {
            "name": "chain",
            "match": {"prefix": "/chain"},
            "upstream": upstream,
            "credential": "chain",
        },
        {
            "name": "users",
            "match": {"prefix": "/users"},
            "upstream": upstream,
            "credential": "users",
        },
        {
            "name": "mtls",
            "match": {"prefix": "/mtls"},
            "upstream": upstream,
            "credential": "demo",
            "tls": {"cert": str(cert_path), "key": str(key_path)},
        },
    ]
    rt = await make_proxy(raw)
    rt.cert_path = cert_path  # type: ignore[attr-defined]
    return rt


async def seed(
    http: aiohttp.ClientSession, rt: Runtime, name: str, token: str, subject: str | None = None
) -> None:
    body: dict[str, str] = {"refresh_token": token}
    if subject is not None:
        body["subject"] = subject
    async with http.put(admin_url(rt, f"/admin/credentials/{name}/refresh-token"), json=body) as r:
        assert r.status == 204, await r.text()


async def test_every_metric_has_its_type_help_and_labels(
    proxy: Runtime, http: aiohttp.ClientSession, token_server: TokenServer, echo_server: EchoServer
) -> None:
    await seed(http, proxy, "chain", token_server.seed_refresh_token())
    for path in ("/echo/a", "/chain/a", "/mtls/a"):
        assert await status_of(http, proxy_url(proxy, path)) == 200
    echo_server.reject_next(1)
    assert await status_of(http, proxy_url(proxy, "/echo/replay")) == 200
    s = await scrape(http, proxy)
    for name, (kind, labels) in SPEC_METRICS.items():
        family = s.families.get(name)
        assert family is not None, f"{name} is not exposed"
        assert family.type == kind, name
        assert family.documentation, f"{name} has no help text"
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)
    assert "_created" not in s.text
    # Counters are exposed with _total (SPEC names).
    for name in (
        "requests",
        "token_requests",
        "token_cache",
        "upstream_retries",
        "refresh_token_rotations",
    ):
        assert f"# TYPE authproxy_{name}_total counter" in s.text
        assert f"authproxy_{name}_total{{" in s.text
    assert s.label_values("authproxy_token_requests_total", "outcome") == OUTCOMES
    assert s.label_values("authproxy_token_cache_total", "result") == {"hit", "miss", "coalesced"}
    assert s.label_values("authproxy_credential_state", "state") == {
        "ok",
        "degraded",
        "reauth_required",
    }
    assert s.value("authproxy_upstream_retries_total", route="echo", reason="401") == 1


async def test_values_match_what_the_servers_saw(
    proxy: Runtime, http: aiohttp.ClientSession, token_server: TokenServer, echo_server: EchoServer
) -> None:
    await seed(http, proxy, "chain", token_server.seed_refresh_token())
    # The first echo call fetches the demo token: its expiry is fixed between these two times.
    before = time.time()
    assert await status_of(http, proxy_url(proxy, "/echo/n0")) == 200
    after = time.time()
    for i in range(1, 7):
        assert await status_of(http, proxy_url(proxy, f"/echo/n{i}")) == 200
    assert await status_of(http, proxy_url(proxy, "/echo/_status/503")) == 503
    assert await status_of(http, proxy_url(proxy, "/echo/x"), method="POST", data=b"hi") == 200
    for _ in range(3):
        assert await status_of(http, proxy_url(proxy, "/chain/c")) == 200
    s = await scrape(http, proxy)
    # The upstream saw every request the proxy counted as answered by it.
    forwarded = s.value("authproxy_requests_total", route="echo") + s.value(
        "authproxy_requests_total", route="chain"
    )
    assert forwarded == echo_server.requests == 12
    assert s.value("authproxy_requests_total", route="echo", method="GET", code="200") == 7
    assert s.value("authproxy_requests_total", route="echo", method="GET", code="503") == 1
    assert s.value("authproxy_requests_total", route="echo", method="POST", code="200") == 1
    assert s.value("authproxy_request_duration_seconds_count", route="echo") == 9
    assert s.value("authproxy_request_duration_seconds_sum", route="echo") > 0
    # Token calls: one per credential, each a grant the token server issued.
    assert (
        s.value("authproxy_token_requests_total", outcome="success") == token_server.requests == 2
    )
    assert s.value("authproxy_token_requests_total", credential="chain", outcome="success") == 1
    assert s.value("authproxy_token_request_duration_seconds_count", credential="demo") == 1
    assert s.value("authproxy_token_cache_total", credential="demo", result="miss") == 1
    assert s.value("authproxy_token_cache_total", credential="demo", result="hit") == 8
    assert s.value("authproxy_token_cache_total", credential="chain", result="hit") == 2
    # One rotation, as the token server counts them.
    assert (
        s.value("authproxy_refresh_token_rotations_total", credential="chain")
        == sum(token_server.rotations.values())
        == 1
    )
    expiry = s.value("authproxy_token_expiry_timestamp_seconds", credential="demo")
    # expires_in 300 from the receive time, which lies between `before` and `after`.
    assert before + 300 <= expiry <= after + 300
    assert s.value("authproxy_credential_state", credential="demo", state="ok") == 1
    assert s.value("authproxy_provider_clock_offset_seconds", credential="demo") == 0


async def test_coalesced_fetches_are_counted(
    proxy: Runtime, http: aiohttp.ClientSession, token_server: TokenServer
) -> None:
    gate = asyncio.Event()
    token_server.gate = gate
    calls = [
        asyncio.ensure_future(status_of(http, proxy_url(proxy, f"/echo/{i}"))) for i in range(5)
    ]

    async def all_waiting() -> bool:
        s = await scrape(http, proxy)
        return (
            token_server.held == 1
            and s.value("authproxy_token_cache_total", credential="demo") == 5
        )

    await eventually(all_waiting, "five requests waiting on one token call")
    gate.set()
    assert await asyncio.gather(*calls) == [200] * 5
    s = await scrape(http, proxy)
    assert s.value("authproxy_token_cache_total", credential="demo", result="miss") == 1
    assert s.value("authproxy_token_cache_total", credential="demo", result="coalesced") == 4
    assert (
        s.value("authproxy_token_requests_total", credential="demo") == token_server.requests == 1
    )


async def test_failures_and_state_changes(
    proxy: Runtime, http: aiohttp.ClientSession, token_server: TokenServer, echo_server: EchoServer
) -> None:
    # invalid_client is permanent (never retried): one call, one outcome.
    token_server.fail_next(1, FaultKind.OAUTH_ERROR, error="invalid_client")
    assert await status_of(http, proxy_url(proxy, "/echo/a")) == 503
    s = await scrape(http, proxy)
    assert (
        s.value("authproxy_token_requests_total", credential="demo", outcome="invalid_client") == 1
    )
    assert s.value("authproxy_credential_state", credential="demo", state="degraded") == 1
    assert s.value("authproxy_credential_state", credential="demo", state="ok") == 0
    assert s.value("authproxy_requests_total", route="echo", code="503") == 1

    # Recovery: the next call succeeds and the state is ok again.
    proxy.refresh_now(ChainKey("demo"))

    async def recovered() -> bool:
        s = await scrape(http, proxy)
        return s.value("authproxy_credential_state", credential="demo", state="ok") == 1

    await eventually(recovered, "demo back to ok")
    assert await status_of(http, proxy_url(proxy, "/echo/b")) == 200

    # An outage with a token held: stale-if-error keeps serving, the state is degraded.
    token_server.outage = True
    before = token_server.requests
    proxy.refresh_now(ChainKey("demo"))

    async def degraded() -> bool:
        s = await scrape(http, proxy)
        return s.value("authproxy_credential_state", credential="demo", state="degraded") == 1

    await eventually(degraded, "demo degraded during the outage")
    assert await status_of(http, proxy_url(proxy, "/echo/c")) == 200
    token_server.outage = False
    s = await scrape(http, proxy)
    errors = s.value("authproxy_token_requests_total", credential="demo", outcome="http_error")
    assert 1 <= errors <= token_server.requests - before  # per call or per attempt
    assert s.value("authproxy_token_requests_total", credential="demo") <= token_server.requests

    # A chain whose refresh token is revoked: reauth_required.
    first = token_server.seed_refresh_token()
    await seed(http, proxy, "chain", first)
    assert await status_of(http, proxy_url(proxy, "/chain/a")) == 200
    token_server.revoke(first)
    echo_server.reject_next(1)
    assert await status_of(http, proxy_url(proxy, "/chain/b")) == 503
    s = await scrape(http, proxy)
    assert s.value("authproxy_credential_state", credential="chain", state="reauth_required") == 1
    assert s.value("authproxy_credential_state", credential="chain", state="ok") == 0
    assert (
        s.value("authproxy_token_requests_total", credential="chain", outcome="invalid_grant") == 1
    )
    assert s.value("authproxy_upstream_retries_total", route="chain", reason="401") == 1
    # Seeding again brings it back.
    await seed(http, proxy, "chain", token_server.seed_refresh_token())
    s = await scrape(http, proxy)
    assert s.value("authproxy_credential_state", credential="chain", state="ok") == 1
    assert s.value("authproxy_credential_state", credential="chain", state="reauth_required") == 0


async def test_tls_certificate_expiry_gauge(proxy: Runtime, http: aiohttp.ClientSession) -> None:
    s = await scrape(http, proxy)
    expected = certificate_not_after(proxy.cert_path)  # type: ignore[attr-defined]
    assert (
        s.value("authproxy_tls_certificate_expiry_timestamp_seconds", kind="route", name="mtls")
        == expected
    )
    assert s.label_values("authproxy_tls_certificate_expiry_timestamp_seconds", "name") == {"mtls"}


async def test_labels_are_bounded_and_never_hold_a_subject_or_token(
    proxy: Runtime, http: aiohttp.ClientSession, token_server: TokenServer, tmp_path: Path
) -> None:
    subject = "alice.subject@example.com"
    await seed(http, proxy, "users", token_server.seed_refresh_token(subject), subject=subject)
    assert await status_of(http, proxy_url(proxy, "/users/me"), headers={"X-User": subject}) == 200
    assert (
        await status_of(http, proxy_url(proxy, "/users/me"), headers={"X-User": "nobody-seeded"})
        == 503
    )
    for i in range(25):
        assert await status_of(http, proxy_url(proxy, f"/unknown-{i}/x?q={i}")) == 404
    # Methods the proxy does not know become "other", not new series.
    for method in ("PROPFIND", "MKCOL", "PURGE", "LOCK"):
        assert await status_of(http, proxy_url(proxy, f"/echo/{method}"), method=method) == 200
    s = await scrape(http, proxy)
    assert s.label_values("authproxy_requests_total", "route") == {"users", "none", "echo"}
    assert s.value("authproxy_requests_total", route="none", code="404") == 25
    assert s.label_values("authproxy_requests_total", "method") == {"GET", "other"}
    assert s.value("authproxy_requests_total", route="echo", method="other") == 4
    assert s.label_values("authproxy_token_requests_total", "credential") == {
        "demo",
        "chain",
        "users",
    }
    # Every secret the proxy held: tokens issued (access and refresh, the seeded ones too),
    # the client secret, and the mtls route's private key (each base64 line of its body).
    key_lines = [
        ln
        for ln in (tmp_path / "client.key").read_text().splitlines()
        if not ln.startswith("-----")
    ]
    assert key_lines and len(token_server.issued_tokens()) >= 4  # the scan has work to do
    for forbidden in [
        subject,
        "nobody-seeded",
        "unknown-",
        CLIENT_SECRET,
        *token_server.issued_tokens(),
        *key_lines,
    ]:
        assert forbidden not in s.text


async def test_readyz_metrics_and_healthz_need_no_admin_token(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prometheus scrapes without a token; only /admin is guarded; /metrics shows neither
    the admin token nor the client secret."""
    admin_token = "adm-token-for-metrics-test"
    monkeypatch.setenv("ADMIN_TOKEN", admin_token)
    rt = await make_proxy(
        proxy_config(token_server, echo_server, admin_token={"env": "ADMIN_TOKEN"})
    )
    for path in ("/metrics", "/healthz", "/readyz"):
        assert await status_of(http, admin_url(rt, path)) == 200
    assert await status_of(http, admin_url(rt, "/admin/credentials")) == 401
    headers = {"Authorization": f"Bearer {admin_token}"}
    assert await status_of(http, admin_url(rt, "/admin/credentials"), headers=headers) == 200
    text = (await scrape(http, rt)).text
    for secret in (admin_token, CLIENT_SECRET):
        assert secret not in text


# -- InstrumentedStore over real stores ------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
async def inner_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ChainStore]:
    store: ChainStore = (
        MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "c.db")
    )
    yield store
    await store.aclose()


def _registry_value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_instrumented_store_times_every_operation(inner_store: ChainStore) -> None:
    metrics = Metrics(CollectorRegistry())
    store = InstrumentedStore(inner_store, metrics)
    assert store.kind == inner_store.kind
    key = ChainKey("c")
    rec = await store.seed(key, Secret("rt-1"))
    assert (await store.get(key)) == rec
    assert await store.acquire_lease(key, "me", 5.0)
    from dataclasses import replace

    assert await store.compare_and_set(
        replace(rec, version=rec.version + 1), expected_version=rec.version
    )
    await store.release_lease(key, "me")
    assert await store.wait_for_change(key, 0, 0.1) is not None
    await store.add_history(
        key, HistoryEvent(at=time.time(), event="seed", outcome="success", pid=1)
    )
    assert len(await store.history(key)) == 1
    assert await store.subjects("c") == []
    assert await store.get_shared_token("c") is None
    from proxy.models import AccessToken

    now = time.time()
    await store.put_shared_token("c", AccessToken(Secret("at-1"), now, now + 60))
    assert (await store.get_shared_token("c")) is not None
    await store.ping()
    r = metrics.registry
    for op in OPERATIONS:
        expected = 2 if op == "get_shared_token" else 1
        assert (
            _registry_value(r, "authproxy_store_operation_duration_seconds_count", operation=op)
            == expected
        ), op
        assert _registry_value(r, "authproxy_store_errors_total", operation=op) == 0
    assert _registry_value(r, "authproxy_store_operation_duration_seconds_sum", operation="get") > 0


async def test_instrumented_store_counts_errors(redis_server: RedisServer) -> None:
    metrics = Metrics(CollectorRegistry())
    redis_server.start()
    store = InstrumentedStore(RedisStore(redis_server.url), metrics)
    try:
        await store.ping()
        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            await store.get(ChainKey("c"))
        with pytest.raises(StoreUnavailable):
            await store.ping()
    finally:
        redis_server.start()
        await store.aclose()
    r = metrics.registry
    assert _registry_value(r, "authproxy_store_errors_total", operation="get") == 1
    assert _registry_value(r, "authproxy_store_errors_total", operation="ping") == 1
    assert (
        _registry_value(r, "authproxy_store_operation_duration_seconds_count", operation="ping")
        == 2
    )


async def test_running_proxy_reports_store_latency(
    proxy: Runtime, http: aiohttp.ClientSession, token_server: TokenServer
) -> None:
    assert isinstance(proxy.store, InstrumentedStore)
    await seed(http, proxy, "chain", token_server.seed_refresh_token())
    assert await status_of(http, proxy_url(proxy, "/chain/a")) == 200
    s = await scrape(http, proxy)
    assert s.value("authproxy_store_operation_duration_seconds_count", operation="seed") == 1
    assert (
        s.value("authproxy_store_operation_duration_seconds_count", operation="compare_and_set")
        >= 1
    )
    assert s.value("authproxy_store_errors_total") == 0


# -- wiring across modules (runtime, oauth, tokens), held in place by these tests.


async def test_token_endpoint_attempts_match_the_token_server(
    proxy: Runtime, http: aiohttp.ClientSession, token_server: TokenServer
) -> None:
    token_server.fail_next(2, FaultKind.HTTP_503, retry_after=0)
    assert await status_of(http, proxy_url(proxy, "/echo/a")) == 200
    s = await scrape(http, proxy)
    attempts = s.value("authproxy_token_endpoint_attempts_total", credential="demo")
    assert attempts > 0
    assert attempts == token_server.requests == 3
    # One logical request, one outcome.
    assert s.value("authproxy_token_requests_total", credential="demo") == 1
    assert s.value("authproxy_token_requests_total", credential="demo", outcome="success") == 1


async def test_unseeded_chain_is_reauth_required_from_the_start(
    proxy: Runtime, http: aiohttp.ClientSession, token_server: TokenServer
) -> None:
    s = await scrape(http, proxy)
    assert s.value("authproxy_credential_state", credential="chain", state="ok") == 0
    assert s.value("authproxy_credential_state", credential="chain", state="reauth_required") == 1
    assert s.value("authproxy_credential_state", credential="users", state="ok") == 1  # per-user
    await seed(http, proxy, "chain", token_server.seed_refresh_token())
    s = await scrape(http, proxy)
    assert s.value("authproxy_credential_state", credential="chain", state="ok") == 1


async def test_admin_refresh_rotates_a_chain(
    proxy: Runtime, http: aiohttp.ClientSession, token_server: TokenServer
) -> None:
    await seed(http, proxy, "chain", token_server.seed_refresh_token())
    assert await status_of(http, proxy_url(proxy, "/chain/a")) == 200
    assert sum(token_server.rotations.values()) == 1
    async with http.post(admin_url(proxy, "/admin/credentials/chain/refresh")) as resp:
        assert resp.status == 202
    deadline = time.monotonic() + 5
    while sum(token_server.rotations.values()) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert sum(token_server.rotations.values()) >= 2
    s = await scrape(http, proxy)
    assert s.value("authproxy_refresh_token_rotations_total", credential="chain") == 2
