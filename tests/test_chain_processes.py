"""Real `authproxy` processes sharing one SQLite store: rotation storms across processes, and
SIGKILL in the middle of a rotation. The token server revokes a used refresh token at once
and treats reuse outside its grace window as theft (the whole family is revoked)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.demo import EchoServer, TokenServer
from tests.conftest import CLIENT_SECRET
from tests.proxyproc import ProxyProcess, run_cli, start_proxy, stop_processes, write_config

pytestmark = pytest.mark.slow


class Fleet:
    """Proxy processes started by one test; each is stopped by its PID at the end."""

    def __init__(
        self, tmp_path: Path, token_server: TokenServer, echo: EchoServer, store: dict[str, Any]
    ) -> None:
        self.tmp_path = tmp_path
        self.token_server = token_server
        self.echo = echo
        self.store = store
        self.procs: list[ProxyProcess] = []

    def raw(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "credentials": {
                "po": {
                    "grant": "refresh_token",
                    "token_url": str(self.token_server.token_url),
                    "client_id": "demo-client",
                    "client_secret": {"env": "TEST_CLIENT_SECRET"},
                    "rotation_grace": f"{self.token_server.reuse_grace}s",
                    "timeout": "3s",
                }
            },
            "routes": [
                {
                    "name": "po",
                    "match": {"prefix": "/po"},
                    "upstream": f"{self.echo.url}/api",
                    "credential": "po",
                }
            ],
        }

    async def start(self, session: aiohttp.ClientSession) -> ProxyProcess:
        p = await start_proxy(session, self.tmp_path, self.raw())
        self.procs.append(p)
        return p

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        path = write_config(self.tmp_path, self.raw(), "cli")
        return run_cli(*args, "-c", str(path))

    def seed(self, token: str) -> None:
        f = self.tmp_path / "rt.txt"
        f.write_text(token)
        result = self.cli("seed", "po", "--refresh-token-file", str(f))
        assert result.returncode == 0, result.stderr
        assert token not in result.stdout + result.stderr

    def logs(self) -> str:
        return "".join(p.log.read_text() for p in self.procs)

    def stop_all(self) -> None:
        stop_processes(self.procs)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(trust_env=False) as s:
        yield s


@pytest.fixture
def fleet_factory(tmp_path: Path) -> Iterator[Any]:
    fleets: list[Fleet] = []

    def make(
        token_server: TokenServer, echo: EchoServer, store: dict[str, Any] | None = None
    ) -> Fleet:
        f = Fleet(
            tmp_path,
            token_server,
            echo,
            store or {"kind": "sqlite", "path": str(tmp_path / "chains.db")},
        )
        fleets.append(f)
        return f

    yield make
    for f in fleets:
        f.stop_all()


async def drive(
    session: aiohttp.ClientSession, procs: list[ProxyProcess], total: int, concurrency: int
) -> list[int]:
    """A bounded load: `total` requests spread over the processes, `concurrency` at a time."""
    statuses: list[int] = []
    counter = iter(range(total))

    async def worker(n: int) -> None:
        for i in counter:
            p = procs[(i + n) % len(procs)]
            async with session.get(
                p.url(f"/po/accounts/{i}"), timeout=aiohttp.ClientTimeout(total=20)
            ) as resp:
                await resp.read()
                statuses.append(resp.status)

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return statuses


async def test_processes_sharing_sqlite_rotate_without_invalid_grant(
    fleet_factory: Any, session: aiohttp.ClientSession
) -> None:
    async with (
        TokenServer(
            client_secret=CLIENT_SECRET, expires_in=2, reuse_grace=0, token_prefix="mp"
        ) as idp,
        EchoServer(tokens=idp) as echo,
    ):
        fleet = fleet_factory(idp, echo)
        fleet.seed(idp.seed_refresh_token())
        procs = [await fleet.start(session) for _ in range(3)]
        # Bounded load that spans several access-token lifetimes (2 s each).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 45  # bounded in time and in count
        statuses: list[int] = []
        while idp.rotations[None] < 6 and loop.time() < deadline and len(statuses) < 200_000:
            statuses += await drive(session, procs, total=150, concurrency=12)
        assert idp.rotations[None] >= 6, "the load did not span several token lifetimes"
        assert set(statuses) == {200}
        assert idp.invalid_grant == 0
        assert idp.revoked_families == 0
        # Exactly one rotation per access token the API saw: no process rotated twice per expiry.
        used = {t for t in echo.requests_by_token if t}
        assert idp.rotations[None] in (len(used), len(used) + 1)  # +1: a rotation not yet used
        status = fleet.cli("status", "--json")
        assert status.returncode == 0, status.stdout
        cred = json.loads(status.stdout)["credentials"][0]
        assert cred["state"] == "ok"
        assert {h["event"] for h in cred["history"]} <= {"rotate", "seed"}
        pids = {h["pid"] for h in cred["history"] if h["event"] == "rotate"}
        assert len(pids) >= 2, "rotations came from one process only; the storm was not shared"
        logs = fleet.logs()
        for token in idp.issued_tokens():
            assert token not in logs


async def start_refresh_and_kill(
    fleet: Fleet, idp: TokenServer, session: aiohttp.ClientSession
) -> None:
    """Start a proxy, hold its first refresh call at the provider, SIGKILL it there, release."""
    p = await fleet.start(session)
    gate = asyncio.Event()
    idp.gate = gate
    request = asyncio.ensure_future(session.get(p.url("/po/accounts")))
    await idp.wait_held(1)
    p.proc.send_signal(signal.SIGKILL)
    p.proc.wait(timeout=10)
    with pytest.raises(aiohttp.ClientError):
        await request
    idp.gate = None
    gate.set()  # the provider now processes the abandoned call: it rotates, nobody hears it
    await idp.wait_requests(1)
    for _ in range(200):
        if idp.rotations[None] == 1:
            break
        await asyncio.sleep(0.01)
    assert idp.rotations[None] == 1


async def test_killed_mid_rotation_recovers_within_the_grace_window(
    fleet_factory: Any, session: aiohttp.ClientSession
) -> None:
    async with (
        TokenServer(
            client_secret=CLIENT_SECRET, expires_in=60, reuse_grace=30, token_prefix="kg"
        ) as idp,
        EchoServer(tokens=idp) as echo,
    ):
        fleet = fleet_factory(idp, echo)
        fleet.seed(idp.seed_refresh_token())
        await start_refresh_and_kill(fleet, idp, session)
        survivor = await fleet.start(session)
        async with session.get(survivor.url("/po/accounts")) as resp:
            assert resp.status == 200
            assert (await resp.json())["token_valid"] is True
        assert idp.grace_reuses == 1
        assert idp.invalid_grant == 0
        async with session.get(f"http://127.0.0.1:{survivor.admin}/admin/credentials") as resp:
            cred = (await resp.json())["credentials"][0]
        events = [h["event"] for h in cred["history"]]
        assert events[:2] == ["rotate", "interrupted"]
        assert cred["state"] == "ok"


async def test_killed_mid_rotation_after_the_grace_window_says_so_clearly(
    fleet_factory: Any, session: aiohttp.ClientSession
) -> None:
    async with (
        TokenServer(
            client_secret=CLIENT_SECRET, expires_in=60, reuse_grace=0, token_prefix="kx"
        ) as idp,
        EchoServer(tokens=idp) as echo,
    ):
        fleet = fleet_factory(idp, echo)
        fleet.seed(idp.seed_refresh_token())
        await start_refresh_and_kill(fleet, idp, session)
        survivor = await fleet.start(session)
        async with session.get(survivor.url("/po/accounts")) as resp:
            assert resp.status == 503
            body = await resp.json()
        assert body["error"] == "reauth_required"
        assert "interrupted rotation" in body["message"]
        status = fleet.cli("status")
        assert status.returncode == 3
        assert "reauth_required" in status.stdout
        assert "interrupted" in status.stdout
        # Seeding anew brings the chain back.
        fleet.seed(idp.seed_refresh_token())
        async with session.get(survivor.url("/po/accounts")) as resp:
            assert resp.status == 200


async def test_killed_after_a_rotation_the_next_process_continues(
    fleet_factory: Any, session: aiohttp.ClientSession
) -> None:
    async with (
        TokenServer(
            client_secret=CLIENT_SECRET, expires_in=60, reuse_grace=0, token_prefix="ka"
        ) as idp,
        EchoServer(tokens=idp) as echo,
    ):
        fleet = fleet_factory(idp, echo)
        fleet.seed(idp.seed_refresh_token())
        first = await fleet.start(session)
        async with session.get(first.url("/po/accounts")) as resp:
            assert resp.status == 200
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
        second = await fleet.start(session)
        for _ in range(5):
            async with session.get(second.url("/po/accounts")) as resp:
                assert resp.status == 200
        # The stored access token was still fresh: no second rotation was needed.
        assert idp.rotations[None] == 1
        assert idp.invalid_grant == 0
