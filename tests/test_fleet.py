"""A fleet on one Redis: replicas with workers rotating shared chains, Redis killed under
load, a replica killed while it holds a lease, and fleet-shared client-credentials tokens."""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.demo import EchoServer, TokenServer
from tests.conftest import CLIENT_SECRET
from tests.proxyproc import ProxyProcess, astop_processes, start_proxy
from tests.redis_fixture import RedisServer

pytestmark = pytest.mark.slow

SUBJECTS = [f"user-{i:03d}" for i in range(100)]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        trust_env=False, connector=aiohttp.TCPConnector(limit=64)
    ) as s:
        yield s


@pytest.fixture
def redis(tmp_path: Path) -> Any:
    """A redis-server of this test's own, persisting every write, so it can be killed."""
    executable = shutil.which("redis-server")
    assert executable, "redis-server is missing: run `make system-deps`"
    server = RedisServer(executable, tmp_path, appendonly=True)
    server.start()
    yield server
    server.stop()


def fleet_config(
    idp: TokenServer, echo: EchoServer, redis_url: str, *, workers: int, grace: int
) -> dict[str, Any]:
    secret = {"env": "TEST_CLIENT_SECRET"}
    common = {
        "token_url": str(idp.token_url),
        "client_id": "demo-client",
        "client_secret": secret,
        "rotation_grace": f"{grace}s",
        "timeout": "2s",
    }
    return {
        "workers": workers,
        "store": {"kind": "redis", "url": redis_url},
        "credentials": {
            "po": {"grant": "refresh_token", **common},
            "users": {"grant": "refresh_token", "subject_header": "X-User", **common},
            "cc": {
                "grant": "client_credentials",
                "token_url": str(idp.token_url),
                "client_id": "demo-client",
                "client_secret": secret,
                "share": True,
            },
        },
        "routes": [
            {
                "name": "po",
                "match": {"prefix": "/po"},
                "upstream": f"{echo.url}/api",
                "credential": "po",
            },
            {
                "name": "users",
                "match": {"prefix": "/users"},
                "upstream": f"{echo.url}/api",
                "credential": "users",
            },
            {
                "name": "cc",
                "match": {"prefix": "/cc"},
                "upstream": f"{echo.url}/api",
                "credential": "cc",
            },
        ],
    }


async def seed(
    session: aiohttp.ClientSession,
    p: ProxyProcess,
    cred: str,
    token: str,
    subject: str | None = None,
) -> None:
    body: dict[str, Any] = {"refresh_token": token}
    if subject is not None:
        body["subject"] = subject
    async with session.put(
        p.admin_url(f"/admin/credentials/{cred}/refresh-token"), json=body
    ) as resp:
        assert resp.status == 204


async def test_replicas_with_workers_rotate_each_chain_once_per_expiry(
    tmp_path: Path, redis: RedisServer, session: aiohttp.ClientSession
) -> None:
    async with (
        TokenServer(
            client_secret=CLIENT_SECRET, expires_in=3, reuse_grace=0, token_prefix="fl"
        ) as idp,
        EchoServer(tokens=idp) as echo,
    ):
        raw = fleet_config(idp, echo, redis.url, workers=2, grace=0)
        replicas = [await start_proxy(session, tmp_path, raw, f"replica-{i}") for i in range(2)]
        try:
            await seed(session, replicas[0], "po", idp.seed_refresh_token())
            for s in SUBJECTS:
                await seed(session, replicas[1], "users", idp.seed_refresh_token(s), s)
            statuses: list[int] = []
            rng = random.Random(7)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60

            async def one(i: int) -> None:
                p = replicas[i % 2]
                if i % 3 == 0:
                    url, headers = p.url("/po/x"), {}
                elif i % 3 == 1:
                    url, headers = p.url("/users/me"), {"X-User": rng.choice(SUBJECTS)}
                else:
                    url, headers = p.url("/cc/x"), {}
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    statuses.append(resp.status)

            batch = 0
            while (
                (idp.rotations[None] < 5 or min(idp.rotations[s] for s in SUBJECTS) < 2)
                and loop.time() < deadline
                and batch < 400
            ):
                await asyncio.gather(*(one(batch * 60 + i) for i in range(60)))
                batch += 1
            assert idp.rotations[None] >= 5, "the load did not span several expiries"
            assert set(statuses) == {200}
            assert idp.invalid_grant == 0
            assert idp.revoked_families == 0
            used = {t for t in echo.requests_by_token if t}
            # One rotation per token: every rotated access token but the newest was used.
            total_rotations = sum(idp.rotations.values())
            assert total_rotations <= len(used) + 1 + len(SUBJECTS)
            async with session.get(replicas[0].admin_url("/admin/credentials")) as resp:
                creds = {c["name"]: c for c in (await resp.json())["credentials"]}
            assert creds["po"]["state"] == "ok"
            assert creds["users"]["subjects"] == 100
            # Fleet-shared client-credentials token: 2 replicas x 2 workers, one fetch per expiry.
            assert idp.grants["client_credentials"] <= idp.rotations[None] + 2
            pids = {h["pid"] for h in creds["po"]["history"] if h["event"] == "rotate"}
            assert len(pids) >= 2, "all rotations came from one worker; the storm was not shared"
        finally:
            codes = await astop_processes(replicas)
        assert codes == [0, 0]


async def test_redis_killed_and_restarted_under_load(
    tmp_path: Path, redis: RedisServer, session: aiohttp.ClientSession
) -> None:
    async with (
        TokenServer(
            client_secret=CLIENT_SECRET, expires_in=120, reuse_grace=30, token_prefix="rk"
        ) as idp,
        EchoServer(tokens=idp) as echo,
    ):
        raw = fleet_config(idp, echo, redis.url, workers=1, grace=30)
        p = await start_proxy(session, tmp_path, raw)
        try:
            await seed(session, p, "po", idp.seed_refresh_token())
            await seed(session, p, "users", idp.seed_refresh_token("alice"), "alice")
            async with session.get(p.url("/po/a")) as resp:
                assert resp.status == 200
            calls = idp.requests
            await redis.astop()
            # A valid cached token keeps requests working while the store is away.
            for i in range(20):
                async with session.get(p.url(f"/po/b{i}")) as resp:
                    assert resp.status == 200
            async with session.get(p.admin_url("/readyz")) as resp:
                assert resp.status == 503
            # A rotation is never attempted without a store to write it to.
            async with session.post(p.admin_url("/admin/credentials/po/refresh")) as resp:
                assert resp.status == 202
            async with session.get(p.url("/users/me"), headers={"X-User": "alice"}) as resp:
                assert resp.status == 503
                assert resp.headers["X-Authproxy-Error"] == "token_unavailable"
            assert idp.requests == calls
            await redis.astart()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            ready = False
            while loop.time() < deadline and not ready:
                async with session.get(p.admin_url("/readyz")) as resp:
                    ready = resp.status == 200
                if not ready:
                    await asyncio.sleep(0.1)
            assert ready, "readiness did not come back with the store"
            # Service comes back by itself (after the breaker's cooldown): alice's chain, seeded
            # before the outage, rotates now, and the other chain is intact.
            deadline = loop.time() + 40
            status = 0
            while loop.time() < deadline and status != 200:
                async with session.get(p.url("/users/me"), headers={"X-User": "alice"}) as resp:
                    status = resp.status
                    assert status in (200, 503)
                if status != 200:
                    await asyncio.sleep(0.2)
            assert status == 200
            assert idp.rotations["alice"] == 1
            async with session.get(p.url("/po/c")) as resp:
                assert resp.status == 200
            assert idp.invalid_grant == 0
        finally:
            await astop_processes([p])


async def test_replica_killed_holding_the_lease(
    tmp_path: Path, redis: RedisServer, session: aiohttp.ClientSession
) -> None:
    async with (
        TokenServer(
            client_secret=CLIENT_SECRET, expires_in=120, reuse_grace=30, token_prefix="rl"
        ) as idp,
        EchoServer(tokens=idp) as echo,
    ):
        raw = fleet_config(idp, echo, redis.url, workers=1, grace=30)
        a = await start_proxy(session, tmp_path, raw, "replica-a")
        b = await start_proxy(session, tmp_path, raw, "replica-b")
        try:
            await seed(session, a, "po", idp.seed_refresh_token())
            gate = asyncio.Event()
            idp.gate = gate
            pending = asyncio.ensure_future(session.get(a.url("/po/x")))
            await idp.wait_held(1)
            a.proc.kill()  # SIGKILL while holding the lease, mid-call
            a.proc.wait(timeout=10)
            with pytest.raises(aiohttp.ClientError):
                await pending
            idp.gate = None
            gate.set()  # the provider rotates; the answer is lost with the process
            # The other replica waits out the dead holder's lease, then recovers the chain.
            async with session.get(b.url("/po/y"), timeout=aiohttp.ClientTimeout(total=40)) as resp:
                assert resp.status == 200
            assert idp.invalid_grant == 0
            assert idp.grace_reuses == 1
        finally:
            await astop_processes([a, b])


async def test_share_true_fetches_one_token_per_lifetime_for_the_fleet(
    tmp_path: Path, redis: RedisServer, session: aiohttp.ClientSession
) -> None:
    async with (
        TokenServer(client_secret=CLIENT_SECRET, expires_in=2, token_prefix="sh") as idp,
        EchoServer(tokens=idp) as echo,
    ):
        raw = fleet_config(idp, echo, redis.url, workers=1, grace=0)
        replicas = [await start_proxy(session, tmp_path, raw, f"share-{i}") for i in range(3)]
        try:
            first = await asyncio.gather(
                *(session.get(replicas[i % 3].url("/cc/x")) for i in range(60))
            )
            for resp in first:
                assert resp.status == 200
                resp.release()
            assert idp.grants["client_credentials"] == 1  # 3 replicas, 60 cold requests: one fetch
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            statuses = []
            while idp.grants["client_credentials"] < 5 and loop.time() < deadline:
                for i in range(30):
                    async with session.get(replicas[i % 3].url(f"/cc/{i}")) as resp:
                        statuses.append(resp.status)
            assert set(statuses) == {200}
            fetched = idp.grants["client_credentials"]
            used = {t for t in echo.requests_by_token if t}
            assert fetched >= 5, "the load did not span several token lifetimes"
            # One fetch per lifetime for the whole fleet, not one per replica.
            assert fetched <= len(used) + 1
        finally:
            await astop_processes(replicas)
