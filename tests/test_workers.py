"""`workers: N`: one port, N supervised processes, one metrics picture, signals reach all."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.demo import EchoServer, TokenServer
from tests.conftest import proxy_config
from tests.proxyproc import ProxyProcess, astop_processes, start_proxy

pytestmark = pytest.mark.slow


def children(pid: int) -> set[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(x) for x in text.split()}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # force_close: every request opens a new connection, so the kernel spreads them across workers
    async with aiohttp.ClientSession(
        trust_env=False, connector=aiohttp.TCPConnector(force_close=True)
    ) as s:
        yield s


@pytest.fixture
async def workers(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    token_server: TokenServer,
    echo_server: EchoServer,
) -> AsyncIterator[tuple[ProxyProcess, dict[str, Any]]]:
    raw = proxy_config(token_server, echo_server, workers=2)
    raw["store"] = {"kind": "sqlite", "path": str(tmp_path / "w.db")}
    p = await start_proxy(session, tmp_path, raw, "workers")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while p.log.read_text().count("authproxy is serving") < 2 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    assert p.log.read_text().count("authproxy is serving") == 2
    assert len(children(p.proc.pid)) == 2
    yield p, raw
    await astop_processes([p])


async def requests_total(session: aiohttp.ClientSession, p: ProxyProcess) -> float:
    async with session.get(p.admin_url("/metrics")) as resp:
        text = await resp.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "authproxy_requests":
            total += sum(s.value for s in family.samples if s.name == "authproxy_requests_total")
    return total


async def test_workers_share_the_port_and_report_one_picture(
    workers: tuple[ProxyProcess, dict[str, Any]],
    session: aiohttp.ClientSession,
    token_server: TokenServer,
) -> None:
    p, _ = workers
    for i in range(40):
        async with session.get(p.url(f"/echo/{i}")) as resp:
            assert resp.status == 200
    # Any worker's scrape reports the whole group.
    for _ in range(6):
        assert await requests_total(session, p) == 40
    assert token_server.grants["client_credentials"] <= 2  # at most one fetch per worker


async def test_a_dead_worker_is_restarted_and_logged(
    workers: tuple[ProxyProcess, dict[str, Any]], session: aiohttp.ClientSession
) -> None:
    p, _ = workers
    before = children(p.proc.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while loop.time() < deadline:
        now = children(p.proc.pid)
        if len(now) == 2 and victim not in now:
            break
        await asyncio.sleep(0.05)
    now = children(p.proc.pid)
    assert len(now) == 2
    assert victim not in now
    for i in range(20):
        async with session.get(p.url(f"/echo/after-{i}")) as resp:
            assert resp.status == 200
    assert "worker exited; restarting" in p.log.read_text()


async def test_sighup_reaches_every_worker_and_sigterm_exits_0(
    workers: tuple[ProxyProcess, dict[str, Any]],
    session: aiohttp.ClientSession,
    echo_server: EchoServer,
) -> None:
    p, raw = workers
    raw = dict(raw)
    raw["routes"] = [
        *raw["routes"],
        {
            "name": "added",
            "match": {"prefix": "/added"},
            "upstream": f"{echo_server.url}/new",
            "credential": "demo",
        },
    ]
    raw["listen"] = yaml.safe_load(p.config.read_text())["listen"]
    p.config.write_text(yaml.safe_dump(raw))
    p.proc.send_signal(signal.SIGHUP)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    ok_in_a_row = 0
    while loop.time() < deadline and ok_in_a_row < 20:  # 20 answers in a row: both workers reloaded
        async with session.get(p.url("/added/x")) as resp:
            ok_in_a_row = ok_in_a_row + 1 if resp.status == 200 else 0
        if ok_in_a_row == 0:
            await asyncio.sleep(0.05)
    assert ok_in_a_row == 20
    kids = children(p.proc.pid)
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(timeout=30) == 0
    for kid in kids:
        assert (
            not Path(f"/proc/{kid}").exists() or "zombie" in Path(f"/proc/{kid}/status").read_text()
        )


async def test_sighup_during_worker_start_does_not_kill_it(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    token_server: TokenServer,
    echo_server: EchoServer,
) -> None:
    raw = proxy_config(token_server, echo_server, workers=2)
    raw["store"] = {"kind": "sqlite", "path": str(tmp_path / "w.db")}
    p = await start_proxy(session, tmp_path, raw, "early-hup")
    try:
        p.proc.send_signal(signal.SIGHUP)  # one worker may still be importing
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while p.log.read_text().count("authproxy is serving") < 2 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert p.log.read_text().count("authproxy is serving") == 2
        assert "worker exited" not in p.log.read_text()
    finally:
        codes = await astop_processes([p])
    assert codes == [0]


def test_the_supervisor_waits_as_long_as_a_worker_may_take_to_stop() -> None:
    """A worker drains its requests, then lets a rotation in flight finish (up to the chain's
    lease): the supervisor's SIGKILL must not come sooner, or that rotation's new refresh
    token is lost."""
    from proxy.chains import lease_ttl, longest_fetch
    from proxy.config import parse_config
    from proxy.tokens import DRAIN_SECONDS
    from proxy.workers import shutdown_bound

    def config(**cred: Any) -> Any:
        raw = {
            "store": {"kind": "sqlite", "path": "/nonexistent/chains.db"},
            "shutdown_grace": "20s",
            "credentials": {
                "po": {
                    "grant": "refresh_token",
                    "token_url": "http://127.0.0.1:9/token",
                    "client_id": "c",
                    "client_secret": {"env": "TEST_CLIENT_SECRET"},
                    **cred,
                }
            },
        }
        return parse_config(raw)

    default = config()
    assert shutdown_bound(default) >= 20 + DRAIN_SECONDS
    assert shutdown_bound(default) >= 20 + longest_fetch(default.credentials["po"])
    slow = config(timeout="60s", rotation_grace="300s")  # a slow provider: a 65 s lease
    assert lease_ttl(slow.credentials["po"]) == 65
    # Waiting out another holder's lease, a 60 s provider call, then the store write's retries.
    assert shutdown_bound(slow) >= 20 + 65 + 60 + 65
