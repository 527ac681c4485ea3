"""A real `authproxy run` process and its signals: SIGTERM drains in-flight requests, refuses
new connections, flushes the store and exits 0; SIGHUP reloads the configuration without
dropping a request in flight, and an invalid new configuration is logged and the old kept."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.demo import EchoServer, TokenServer
from tests.conftest import proxy_config
from tests.proxyproc import ProxyProcess, astop_processes, start_proxy, stop_processes


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(trust_env=False) as s:
        yield s


@pytest.fixture
def procs() -> Iterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    stop_processes(started)


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as r:
        await r.read()
        return r.status


async def poll(predicate: Any, what: str, within: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)  # polling a bounded condition


def log_events(p: ProxyProcess) -> list[dict[str, Any]]:
    out = []
    for line in p.log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


async def test_sigterm_drains_in_flight_requests_and_exits_0(
    http: aiohttp.ClientSession,
    procs: list[ProxyProcess],
    token_server: TokenServer,
    echo_server: EchoServer,
    tmp_path: Path,
) -> None:
    db = tmp_path / "chains.db"
    raw = proxy_config(token_server, echo_server, store={"kind": "sqlite", "path": str(db)})
    p = await start_proxy(http, tmp_path, raw)
    procs.append(p)
    assert await status_of(http, p.url("/echo/warm")) == 200
    loop = asyncio.get_running_loop()
    slow = loop.create_task(status_of(http, p.url("/echo/_slow?delay=2")))
    await echo_server.wait_requests(2)  # the slow request is upstream now
    p.proc.send_signal(signal.SIGTERM)

    async def refused() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", p.port)
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:
            # Our SYN reached the backlog of the socket as it closed: ask again.
            return False
        writer.close()
        await writer.wait_closed()
        return False

    await poll(refused, "the listening socket to close")
    assert not slow.done()  # still in flight while new connections are refused
    assert await slow == 200
    code = await asyncio.to_thread(p.proc.wait, 30)
    assert code == 0
    events = [e.get("event") for e in log_events(p)]
    assert "stop" in events
    wal = db.with_name(db.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # the store was closed cleanly


async def test_sighup_reloads_without_dropping_and_keeps_the_old_config_when_invalid(
    http: aiohttp.ClientSession,
    procs: list[ProxyProcess],
    token_server: TokenServer,
    echo_server: EchoServer,
    tmp_path: Path,
) -> None:
    p = await start_proxy(http, tmp_path, proxy_config(token_server, echo_server))
    procs.append(p)
    assert await status_of(http, p.url("/echo/x")) == 200
    assert await status_of(http, p.url("/echo2/x")) == 404
    loop = asyncio.get_running_loop()

    # A valid new config with a second route, while a slow request is in flight.
    slow = loop.create_task(status_of(http, p.url("/echo/_slow?delay=2")))
    await echo_server.wait_requests(2)
    raw = yaml.safe_load(p.config.read_text())
    raw["routes"].append({**raw["routes"][0], "name": "echo2", "match": {"prefix": "/echo2"}})
    p.config.write_text(yaml.safe_dump(raw))
    p.proc.send_signal(signal.SIGHUP)

    async def new_route() -> bool:
        return await status_of(http, p.url("/echo2/x")) == 200

    await poll(new_route, "the reloaded route")
    assert await slow == 200
    assert p.proc.poll() is None

    # An invalid one: logged (event "config"), the running configuration kept.
    p.config.write_text("routes: [{name: broken, upstream: nowhere}]\nbogus_key: 1\n")
    p.proc.send_signal(signal.SIGHUP)

    async def rejected() -> bool:
        return any(
            e.get("event") == "config" and "invalid" in str(e.get("message", ""))
            for e in log_events(p)
        )

    await poll(rejected, "the invalid configuration to be logged")
    assert await status_of(http, p.url("/echo2/x")) == 200
    assert await status_of(http, p.url("/echo/x")) == 200
    assert p.proc.poll() is None
    assert await astop_processes([p]) == [0]
