"""SPEC section 5: the admin port. Admin token from a secret (env and file), seeding, refresh,
readiness (config, store, first tokens), and a credential listing that never holds a token."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from proxy.demo import EchoServer, TokenServer
from proxy.runtime import Runtime
from tests.conftest import ProxyFactory, admin_url, proxy_config, proxy_url
from tests.redis_fixture import RedisServer

ADMIN_TOKEN = "adm-admin-test-4f2a9c"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(trust_env=False) as session:
        yield session


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    async with http.request(method, url, **kw) as resp:
        body: Any = await resp.read()
        if resp.content_type == "application/json":
            body = await resp.json()
        return resp.status, body, resp.headers


def chain(token_server: TokenServer, **extra: Any) -> dict[str, Any]:
    return {
        "grant": "refresh_token",
        "token_url": str(token_server.token_url),
        "client_id": "demo-client",
        "client_secret": {"env": "TEST_CLIENT_SECRET"},
        **extra,
    }


def full_config(
    token_server: TokenServer, echo_server: EchoServer, tmp_path: Path, **extra: Any
) -> dict[str, Any]:
    raw = proxy_config(
        token_server, echo_server, store={"kind": "sqlite", "path": str(tmp_path / "a.db")}, **extra
    )
    raw["credentials"]["chain"] = chain(token_server)
    raw["credentials"]["users"] = chain(token_server, subject_header="X-User")
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
    ]
    return raw


@pytest.fixture
async def proxy(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Runtime:
    monkeypatch.setenv("ADMIN_TOKEN", ADMIN_TOKEN)
    return await make_proxy(
        full_config(token_server, echo_server, tmp_path, admin_token={"env": "ADMIN_TOKEN"})
    )


async def test_admin_token_from_env(proxy: Runtime, http: aiohttp.ClientSession) -> None:
    url = admin_url(proxy, "/admin/credentials")
    for headers in (
        {},
        bearer("wrong"),
        bearer(ADMIN_TOKEN + "x"),
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": ADMIN_TOKEN},
    ):
        status, body, resp_headers = await call(http, "GET", url, headers=headers)
        assert status == 401, headers
        assert body["error"] == "unauthorized"
        assert resp_headers["WWW-Authenticate"].startswith("Bearer")
        assert ADMIN_TOKEN not in str(body)
    for method, path in (
        ("PUT", "/admin/credentials/chain/refresh-token"),
        ("POST", "/admin/credentials/demo/refresh"),
    ):
        status, _, _ = await call(http, method, admin_url(proxy, path), json={"refresh_token": "x"})
        assert status == 401, path
    status, body, _ = await call(http, "GET", url, headers=bearer(ADMIN_TOKEN))
    assert status == 200
    assert {c["name"] for c in body["credentials"]} == {"demo", "chain", "users"}


async def test_unknown_paths_and_wrong_methods_are_json_errors(
    proxy: Runtime, http: aiohttp.ClientSession
) -> None:
    for path in ("/nope", "/admin/nope", "/admin/credentials/chain/nope"):
        status, body, _ = await call(
            http, "GET", admin_url(proxy, path), headers=bearer(ADMIN_TOKEN)
        )
        assert (status, body["error"]) == (404, "not_found"), path
        assert path in body["message"]
    status, body, headers = await call(http, "DELETE", admin_url(proxy, "/healthz"))
    assert (status, body["error"]) == (405, "method_not_allowed")
    assert "GET" in headers["Allow"]


async def test_admin_token_from_file_follows_rotation(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    secret_file = tmp_path / "admin_token"
    secret_file.write_text("adm-file-token-one\n")
    rt = await make_proxy(
        proxy_config(token_server, echo_server, admin_token={"file": str(secret_file)})
    )
    url = admin_url(rt, "/admin/credentials")
    assert (await call(http, "GET", url))[0] == 401
    assert (await call(http, "GET", url, headers=bearer("adm-file-token-one")))[0] == 200
    # Rotate the file (a new size, so the change is seen whatever the mtime granularity).
    secret_file.write_text("adm-file-token-number-two\n")
    assert (await call(http, "GET", url, headers=bearer("adm-file-token-number-two")))[0] == 200
    assert (await call(http, "GET", url, headers=bearer("adm-file-token-one")))[0] == 401
    # An unreadable token file closes the admin API rather than opening it.
    secret_file.unlink()
    assert (await call(http, "GET", url, headers=bearer("adm-file-token-number-two")))[0] == 401
    assert (await call(http, "GET", url))[0] == 401


async def test_without_admin_token_the_api_is_open(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    http: aiohttp.ClientSession,
) -> None:
    rt = await make_proxy(proxy_config(token_server, echo_server))
    assert (await call(http, "GET", admin_url(rt, "/admin/credentials")))[0] == 200


async def test_health_and_metrics_are_not_guarded(
    proxy: Runtime, http: aiohttp.ClientSession
) -> None:
    status, body, _ = await call(http, "GET", admin_url(proxy, "/healthz"))
    assert (status, body) == (200, {"status": "alive"})
    status, body, _ = await call(http, "GET", admin_url(proxy, "/readyz"))
    assert (status, body) == (200, {"ready": True, "checks": {"config": True, "store": True}})
    assert (await call(http, "GET", admin_url(proxy, "/metrics")))[0] == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/admin/credentials/nope/refresh-token", {"refresh_token": "x"}, 404, "no credential"),
        ("/admin/credentials/chain/refresh-token", b"{not json", 400, "must be JSON"),
        ("/admin/credentials/chain/refresh-token", b"\xff\xfe", 400, "must be JSON"),
        ("/admin/credentials/chain/refresh-token", [1, 2], 400, "JSON object"),
        ("/admin/credentials/chain/refresh-token", {}, 400, "refresh_token"),
        ("/admin/credentials/chain/refresh-token", {"refresh_token": " "}, 400, "refresh_token"),
        ("/admin/credentials/chain/refresh-token", {"refresh_token": 5}, 400, "refresh_token"),
        (
            "/admin/credentials/chain/refresh-token",
            {"refresh_token": "x", "extra": 1},
            400,
            "unknown fields",
        ),
        (
            "/admin/credentials/chain/refresh-token",
            {"refresh_token": "x", "subject": "a"},
            400,
            "no subject_header",
        ),
        ("/admin/credentials/users/refresh-token", {"refresh_token": "x"}, 400, "give the subject"),
        (
            "/admin/credentials/users/refresh-token",
            {"refresh_token": "x", "subject": ""},
            400,
            "subject",
        ),
        (
            "/admin/credentials/users/refresh-token",
            {"refresh_token": "x", "subject": "s" * 257},
            400,
            "subject",
        ),
        (
            "/admin/credentials/users/refresh-token",
            {"refresh_token": "x", "subject": "a b"},  # no header could carry it
            400,
            "subject must be 1-256 visible ASCII characters",
        ),
        (
            "/admin/credentials/demo/refresh-token",
            {"refresh_token": "x"},
            400,
            "only refresh_token",
        ),
    ],
)
async def test_seed_rejects_bad_requests(
    proxy: Runtime,
    http: aiohttp.ClientSession,
    path: str,
    body: Any,
    status: int,
    message: str,
) -> None:
    kw: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    got, answer, _ = await call(
        http, "PUT", admin_url(proxy, path), headers=bearer(ADMIN_TOKEN), **kw
    )
    assert got == status
    assert message in answer["message"]
    assert answer["error"] in ("bad_request", "not_found")


async def test_seed_then_requests_work(
    proxy: Runtime, http: aiohttp.ClientSession, token_server: TokenServer
) -> None:
    url = proxy_url(proxy, "/chain/v1/x")
    status, body, _ = await call(http, "GET", url)
    assert (status, body["error"]) == (503, "reauth_required")
    seed = token_server.seed_refresh_token()
    status, body, _ = await call(
        http,
        "PUT",
        admin_url(proxy, "/admin/credentials/chain/refresh-token"),
        json={"refresh_token": seed},
        headers=bearer(ADMIN_TOKEN),
    )
    assert (status, body) == (204, b"")
    assert (await call(http, "GET", url))[0] == 200
    assert sum(token_server.rotations.values()) == 1
    # Per-user chain: seeded with its subject, used through the subject header.
    subject = "user-7"
    status, _, _ = await call(
        http,
        "PUT",
        admin_url(proxy, "/admin/credentials/users/refresh-token"),
        json={"refresh_token": token_server.seed_refresh_token(subject), "subject": subject},
        headers=bearer(ADMIN_TOKEN),
    )
    assert status == 204
    assert (await call(http, "GET", proxy_url(proxy, "/users/me"), headers={"X-User": subject}))[
        0
    ] == 200


async def test_refresh_starts_a_token_call(
    proxy: Runtime, http: aiohttp.ClientSession, token_server: TokenServer
) -> None:
    assert (await call(http, "GET", proxy_url(proxy, "/echo/a")))[0] == 200
    assert token_server.grants["client_credentials"] == 1
    status, body, _ = await call(
        http,
        "POST",
        admin_url(proxy, "/admin/credentials/demo/refresh"),
        headers=bearer(ADMIN_TOKEN),
    )
    assert (status, body) == (202, {"credential": "demo", "started": True})
    await token_server.wait_requests(2)
    deadline = time.monotonic() + 10
    while token_server.grants["client_credentials"] < 2:
        assert time.monotonic() < deadline, "the refresh never reached the token server"
        await asyncio.sleep(0.02)
    for path, expected in (
        ("/admin/credentials/nope/refresh", 404),
        ("/admin/credentials/users/refresh", 400),  # per-user: which user?
        ("/admin/credentials/demo/refresh?subject=x", 400),
    ):
        status, body, _ = await call(
            http, "POST", admin_url(proxy, path), headers=bearer(ADMIN_TOKEN)
        )
        assert status == expected, path
    # A refused refresh request never changed the per-user credential's state.
    _, listing, _ = await call(
        http, "GET", admin_url(proxy, "/admin/credentials"), headers=bearer(ADMIN_TOKEN)
    )
    users = next(c for c in listing["credentials"] if c["name"] == "users")
    assert users["state"] == "ok"


async def test_credential_listing_shape_and_no_token(
    proxy: Runtime, http: aiohttp.ClientSession, token_server: TokenServer, echo_server: EchoServer
) -> None:
    seed = token_server.seed_refresh_token()
    await call(
        http,
        "PUT",
        admin_url(proxy, "/admin/credentials/chain/refresh-token"),
        json={"refresh_token": seed},
        headers=bearer(ADMIN_TOKEN),
    )
    for subject in ("u1", "u2"):
        await call(
            http,
            "PUT",
            admin_url(proxy, "/admin/credentials/users/refresh-token"),
            json={"refresh_token": token_server.seed_refresh_token(subject), "subject": subject},
            headers=bearer(ADMIN_TOKEN),
        )
    for path in ("/echo/a", "/chain/a"):
        assert (await call(http, "GET", proxy_url(proxy, path)))[0] == 200
    echo_server.reject_next(1)
    assert (await call(http, "GET", proxy_url(proxy, "/chain/b")))[0] == 200  # a second rotation
    async with http.get(
        admin_url(proxy, "/admin/credentials"), headers=bearer(ADMIN_TOKEN)
    ) as resp:
        assert resp.status == 200
        text = await resp.text()
        listing = await resp.json()
    for token in [*token_server.issued_tokens(), seed]:
        assert token not in text
    by_name = {c["name"]: c for c in listing["credentials"]}
    for item in by_name.values():
        assert {
            "name",
            "grant",
            "state",
            "expires_at",
            "last_refresh_at",
            "last_error",
            "subjects",
            "history",
        } <= set(item)
    demo, chained, users = by_name["demo"], by_name["chain"], by_name["users"]
    assert demo["grant"] == "client_credentials" and demo["state"] == "ok"
    assert RFC3339.match(demo["expires_at"]) and RFC3339.match(demo["last_refresh_at"])
    assert chained["grant"] == "refresh_token" and chained["state"] == "ok"
    assert [e["event"] for e in chained["history"]] == ["rotate", "rotate", "seed"]
    assert all(e["token"].startswith("sha256:") for e in chained["history"])
    assert all(RFC3339.match(e["at"]) for e in chained["history"])
    assert users["subjects"] == 2


async def test_readyz_reports_an_unreachable_store(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    redis_server.start()
    rt = await make_proxy(
        proxy_config(token_server, echo_server, store={"kind": "redis", "url": redis_server.url})
    )
    url = admin_url(rt, "/readyz")
    assert (await call(http, "GET", url))[0] == 200
    redis_server.stop()
    try:
        status, body, _ = await call(http, "GET", url)
        assert status == 503
        assert body["ready"] is False
        assert body["checks"]["config"] is True
        assert body["checks"]["store"].startswith("unreachable")
        assert (await call(http, "GET", admin_url(rt, "/healthz")))[0] == 200  # alive, not ready
    finally:
        redis_server.start()
    deadline = time.monotonic() + 10
    while (await call(http, "GET", url))[0] != 200:
        assert time.monotonic() < deadline, "readyz did not recover with the store"
        await asyncio.sleep(0.05)


async def test_readyz_waits_for_first_tokens_when_asked(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    raw = full_config(token_server, echo_server, tmp_path, ready_requires_tokens=True)
    rt = await make_proxy(raw)
    url = admin_url(rt, "/readyz")
    status, body, _ = await call(http, "GET", url)
    assert status == 503
    assert (
        body["checks"]["tokens"] == "no token yet for chain, demo"
    )  # users: per-user, not counted
    assert (await call(http, "GET", proxy_url(rt, "/echo/a")))[0] == 200
    status, body, _ = await call(http, "GET", url)
    assert (status, body["checks"]["tokens"]) == (503, "no token yet for chain")
    await call(
        http,
        "PUT",
        admin_url(rt, "/admin/credentials/chain/refresh-token"),
        json={"refresh_token": token_server.seed_refresh_token()},
    )
    assert (await call(http, "GET", proxy_url(rt, "/chain/a")))[0] == 200
    status, body, _ = await call(http, "GET", url)
    assert (status, body["checks"]) == (200, {"config": True, "store": True, "tokens": True})


async def test_routes_without_verification_are_listed(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    http: aiohttp.ClientSession,
    log_capture: Any,
) -> None:
    raw = proxy_config(token_server, echo_server)
    raw["routes"].append(
        {
            "name": "lax",
            "match": {"prefix": "/lax"},
            "upstream": f"{echo_server.url}/api",
            "credential": "demo",
            "tls": {"insecure_skip_verify": True},
        }
    )
    runtime = await make_proxy(raw)
    async with http.get(admin_url(runtime, "/admin/credentials")) as resp:
        body = await resp.json()
    assert body["insecure_routes"] == ["lax"]
    warnings = [line for line in log_capture.lines() if line["event"] == "config"]
    assert any("routes[1].tls.insecure_skip_verify" in w.get("message", "") for w in warnings)
