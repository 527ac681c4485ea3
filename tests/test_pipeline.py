"""Base-URL mode end to end: routing, header rules, bodies, every error code of the core."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from proxy.demo import EchoServer, TokenServer, header_values
from proxy.runtime import Runtime
from tests.conftest import CLIENT_SECRET, LogCapture, ProxyFactory, proxy_config, proxy_url
from tests.proxyproc import start_proxy
from tests.redis_fixture import free_port


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(trust_env=False) as session:
        yield session


@pytest.fixture
async def proxy(
    make_proxy: ProxyFactory, token_server: TokenServer, echo_server: EchoServer
) -> Runtime:
    raw = proxy_config(token_server, echo_server)
    raw["routes"].append(
        {
            "name": "special",
            "match": {"prefix": "/echo/special"},
            "upstream": f"{echo_server.url}/other",
            "credential": "demo",
        }
    )
    raw["routes"].append(
        {
            "name": "readonly",
            "match": {"prefix": "/ro"},
            "upstream": f"{echo_server.url}/api",
            "credential": "demo",
            "allow": [{"methods": ["GET"], "paths": ["/accounts/*", "/reports/**"]}],
            "max_body": "1KiB",
            "replay_body": "512B",
        }
    )
    return await make_proxy(raw)


async def get_json(
    client: aiohttp.ClientSession, url: str | URL, **kw: Any
) -> tuple[int, Any, Any]:
    async with client.request(kw.pop("method", "GET"), url, **kw) as resp:
        body = await resp.read()
        return resp.status, resp.headers, json.loads(body) if body else None


async def test_request_is_forwarded_with_token_and_clean_headers(
    proxy: Runtime,
    client: aiohttp.ClientSession,
    token_server: TokenServer,
    echo_server: EchoServer,
) -> None:
    status, headers, body = await get_json(
        client,
        URL(proxy_url(proxy, "/echo/v4/accounts?limit=2&x=%2F"), encoded=True),
        headers={
            "Authorization": "Bearer client-own-token",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "drop me",
            "TE": "trailers",
            "X-Keep": "kept",
            "X-Request-ID": "req-123",
        },
    )
    assert status == 200
    assert body["path"] == "/api/v4/accounts"
    assert body["query"] == "limit=2&x=%2F"
    assert body["token_valid"] is True
    auth = header_values(body, "Authorization")
    assert len(auth) == 1 and auth[0].startswith("Bearer tst-at-")
    assert header_values(body, "Host") == [f"127.0.0.1:{echo_server.url.port}"]
    assert header_values(body, "Proxy-Authorization") == []
    assert header_values(body, "X-Hop") == []
    assert header_values(body, "TE") == []
    assert header_values(body, "X-Keep") == ["kept"]
    assert header_values(body, "X-Request-ID") == ["req-123"]
    assert headers["X-Request-ID"] == "req-123"
    assert token_server.grants["client_credentials"] == 1


async def test_request_id_is_made_when_absent(
    proxy: Runtime, client: aiohttp.ClientSession
) -> None:
    status, headers, body = await get_json(client, proxy_url(proxy, "/echo/x"))
    assert status == 200
    made = headers["X-Request-ID"]
    assert len(made) >= 16
    assert header_values(body, "X-Request-ID") == [made]


async def test_prefix_matches_whole_segments_and_longest_wins(
    proxy: Runtime, client: aiohttp.ClientSession
) -> None:
    status, headers, body = await get_json(client, proxy_url(proxy, "/echoes/x"))
    assert status == 404
    assert headers["X-Authproxy-Error"] == "no_route"
    assert body["error"] == "no_route" and body["request_id"] == headers["X-Request-ID"]
    assert set(body) == {"error", "message", "route", "request_id"}
    _, _, special = await get_json(client, proxy_url(proxy, "/echo/special/y"))
    assert special["path"] == "/other/y"
    _, _, plain = await get_json(client, proxy_url(proxy, "/echo/specialist"))
    assert plain["path"] == "/api/specialist"
    _, _, exact = await get_json(client, proxy_url(proxy, "/echo"))
    assert exact["path"] == "/api"


async def test_dot_segments_are_refused(proxy: Runtime, client: aiohttp.ClientSession) -> None:
    for path in ("/echo/a/%2e%2e/admin", "/echo/a/..%2Fadmin"):
        async with client.get(URL(proxy_url(proxy, path), encoded=True)) as resp:
            assert resp.status == 400, path
            assert resp.headers["X-Authproxy-Error"] == "bad_request"


async def test_allow_list(
    proxy: Runtime, client: aiohttp.ClientSession, echo_server: EchoServer
) -> None:
    before = echo_server.requests
    status, headers, body = await get_json(client, proxy_url(proxy, "/ro/accounts/7"))
    assert status == 200
    status, headers, body = await get_json(client, proxy_url(proxy, "/ro/reports/2026/q1"))
    assert status == 200
    for method, path in (
        ("POST", "/ro/accounts/7"),
        ("GET", "/ro/accounts/7/secrets"),
        ("GET", "/ro/admin"),
    ):
        status, headers, body = await get_json(client, proxy_url(proxy, path), method=method)
        assert status == 403, (method, path)
        assert headers["X-Authproxy-Error"] == "forbidden"
        assert body["route"] == "readonly"
    assert echo_server.requests == before + 2


async def test_redirects_are_passed_back_not_followed(
    proxy: Runtime, client: aiohttp.ClientSession, echo_server: EchoServer
) -> None:
    before = echo_server.requests
    async with client.get(
        proxy_url(proxy, "/echo/_redirect?to=https://elsewhere.example/steal"),
        allow_redirects=False,
    ) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "https://elsewhere.example/steal"
    assert echo_server.requests == before + 1


async def test_small_body_round_trip(proxy: Runtime, client: aiohttp.ClientSession) -> None:
    payload = os.urandom(5000)
    status, _, body = await get_json(
        client, proxy_url(proxy, "/echo/upload"), method="POST", data=payload
    )
    assert status == 200
    assert body["body_length"] == 5000
    assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_body_over_max_body_is_refused(
    proxy: Runtime, client: aiohttp.ClientSession, echo_server: EchoServer
) -> None:
    before = echo_server.requests
    status, headers, body = await get_json(
        client, proxy_url(proxy, "/ro/accounts/1"), method="GET", data=b"x" * 2048
    )
    assert status == 413 and headers["X-Authproxy-Error"] == "payload_too_large"
    assert echo_server.requests == before

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"y" * 512

    status, headers, body = await get_json(
        client, proxy_url(proxy, "/ro/accounts/1"), data=chunks()
    )
    assert status == 413 and body["error"] == "payload_too_large"


async def test_upstream_unreachable_and_timeout(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    client: aiohttp.ClientSession,
) -> None:
    raw = proxy_config(token_server, echo_server)
    raw["routes"] = [
        {
            "name": "dead",
            "match": {"prefix": "/dead"},
            "upstream": f"http://127.0.0.1:{free_port()}",
            "credential": "demo",
        },
        {
            "name": "slow",
            "match": {"prefix": "/slow"},
            "upstream": f"{echo_server.url}/api",
            "credential": "demo",
            "timeouts": {"total": "300ms"},
        },
    ]
    rt = await make_proxy(raw)
    status, headers, body = await get_json(client, proxy_url(rt, "/dead/x"))
    assert status == 502 and body["error"] == "upstream_unreachable" and body["route"] == "dead"
    status, headers, body = await get_json(client, proxy_url(rt, "/slow/_slow?delay=5"))
    assert status == 504 and headers["X-Authproxy-Error"] == "upstream_timeout"


class _DripUpstream:
    """A loopback HTTP/1.1 upstream that announces `length` bytes, sends them in `pieces`
    parts `gap` seconds apart, and stalls for good after `stall_after` parts (None: never)."""

    def __init__(self, length: int, pieces: int, gap: float, stall_after: int | None) -> None:
        self.length, self.pieces, self.gap, self.stall_after = length, pieces, gap, stall_after
        self.stalled = asyncio.Event()
        self._release = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            + f"Content-Length: {self.length}\r\n\r\n".encode()
        )
        part = self.length // self.pieces
        for i in range(self.pieces):
            if i == self.stall_after:
                self.stalled.set()
                await self._release.wait()
                break
            if i:
                await asyncio.sleep(self.gap)  # the upstream's pace, not synchronisation
            writer.write(b"z" * (part if i < self.pieces - 1 else self.length - part * i))
            await writer.drain()
        writer.close()


def _drip_config(
    token_server: TokenServer, echo_server: EchoServer, url: str, total: str = "300ms"
) -> dict[str, Any]:
    """One route to a `_DripUpstream`, with a `total` timeout (300 ms unless told)."""
    raw = proxy_config(token_server, echo_server)
    raw["routes"] = [
        {
            "name": "drip",
            "match": {"prefix": "/drip"},
            "upstream": url,
            "credential": "demo",
            "timeouts": {"total": total},
        }
    ]
    return raw


@pytest.mark.parametrize("length", [100_000, 1_000_000], ids=["small", "streamed"])
async def test_a_body_that_stalls_is_cut_after_the_timeout(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    client: aiohttp.ClientSession,
    length: int,
) -> None:
    """A small body (read whole before answering) that stalls gets a JSON 504; a streamed one
    has sent its headers already, so the client sees the connection end short of the body."""
    async with _DripUpstream(length, pieces=4, gap=0.0, stall_after=2) as url:
        rt = await make_proxy(_drip_config(token_server, echo_server, url))
        if length < 256 * 1024:
            status, headers, body = await get_json(client, proxy_url(rt, "/drip/x"))
            assert status == 504 and headers["X-Authproxy-Error"] == "upstream_timeout"
            assert body["route"] == "drip" and "nothing for 0.3s" in body["message"]
        else:
            async with client.get(proxy_url(rt, "/drip/x")) as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()


async def test_a_slow_but_steady_body_is_not_cut_off(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    client: aiohttp.ClientSession,
) -> None:
    """The route's total timeout bounds each gap of the body, not the whole download: 12 parts
    0.2 s apart (2.2 s of gaps, paced by the upstream) take twice the 1 s timeout and still
    arrive whole. Each gap is a fifth of the timeout: a wide margin on a loaded machine."""
    pieces, gap, timeout = 12, 0.2, 1.0
    assert (pieces - 1) * gap > 2 * timeout  # the upstream's pauses alone outlast the timeout
    async with _DripUpstream(600_000, pieces=pieces, gap=gap, stall_after=None) as url:
        rt = await make_proxy(_drip_config(token_server, echo_server, url, total="1s"))
        async with client.get(proxy_url(rt, "/drip/x")) as resp:
            assert resp.status == 200
            assert await resp.read() == b"z" * 600_000


async def test_token_endpoint_down_is_503_with_retry_after(
    proxy: Runtime,
    client: aiohttp.ClientSession,
    token_server: TokenServer,
    echo_server: EchoServer,
) -> None:
    token_server.outage = True
    status, headers, body = await get_json(client, proxy_url(proxy, "/echo/x"))
    assert status == 503
    assert headers["X-Authproxy-Error"] == "token_unavailable"
    assert int(headers["Retry-After"]) >= 1
    assert body["route"] == "echo"
    assert echo_server.requests == 0


async def test_refresh_chain_errors(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    client: aiohttp.ClientSession,
) -> None:
    raw = proxy_config(token_server, echo_server)
    raw["credentials"]["users"] = {
        "grant": "refresh_token",
        "token_url": str(token_server.token_url),
        "client_id": "demo-client",
        "client_secret": {"env": "TEST_CLIENT_SECRET"},
        "subject_header": "X-User",
    }
    raw["routes"] = [
        {
            "name": "users",
            "match": {"prefix": "/u"},
            "upstream": f"{echo_server.url}/api",
            "credential": "users",
        }
    ]
    rt = await make_proxy(raw)
    status, headers, body = await get_json(client, proxy_url(rt, "/u/me"))
    assert status == 400 and body["error"] == "bad_request" and "X-User" in body["message"]
    status, headers, body = await get_json(
        client, proxy_url(rt, "/u/me"), headers={"X-User": "nobody"}
    )
    assert status == 503 and body["error"] == "reauth_required"
    assert token_server.requests == 0


async def test_one_pooled_session_is_reused(proxy: Runtime, client: aiohttp.ClientSession) -> None:
    results = await asyncio.gather(
        *(get_json(client, proxy_url(proxy, f"/echo/{i}")) for i in range(50))
    )
    assert all(status == 200 for status, _, _ in results)
    assert repr(proxy.sessions) == "<SessionPool identities=1>"


async def test_logs_carry_access_lines_and_no_secrets(
    proxy: Runtime,
    client: aiohttp.ClientSession,
    token_server: TokenServer,
    log_capture: LogCapture,
) -> None:
    await get_json(
        client,
        proxy_url(proxy, "/echo/a?access_token=leaky-value-123&code=abc123&page=2"),
        headers={"Authorization": "Bearer my-own-app-token", "Cookie": "sid=cookie-value-9"},
    )
    await get_json(client, proxy_url(proxy, "/missing"))
    lines = log_capture.lines()
    access = [line for line in lines if line["event"] == "access"]
    assert {a["status"] for a in access} == {200, 404}
    first = next(a for a in access if a["status"] == 200)
    assert first["route"] == "echo" and first["credential"] == "demo" and first["method"] == "GET"
    assert first["path"] == "/echo/a?access_token=[REDACTED]&code=[REDACTED]&page=2"
    assert {"ts", "level", "duration_ms", "request_id"} <= set(first)
    log_capture.assert_clean(
        CLIENT_SECRET,
        "leaky-value-123",
        "abc123",
        "my-own-app-token",
        "cookie-value-9",
        *token_server.issued_tokens(),
    )


# -- streaming: a real proxy process, its peak memory read from /proc -----------------------


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.slow
async def test_large_bodies_stream_without_buffering(
    tmp_path: Path,
    token_server: TokenServer,
    echo_server: EchoServer,
    client: aiohttp.ClientSession,
) -> None:
    raw = proxy_config(token_server, echo_server)
    raw["routes"][0]["max_body"] = "2GiB"
    # Started on free loopback ports; returns once /healthz answers 200, fails loudly if the
    # process exits or stays unhealthy (bounded wait).
    p = await start_proxy(client, tmp_path, raw, "stream")
    proc, port = p.proc, p.port
    try:
        size = 512 * 1024 * 1024
        got = 0
        async with client.get(f"http://127.0.0.1:{port}/echo/_big?size={size}") as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_chunked(1 << 20):
                got += len(chunk)
        assert got == size

        async def upload() -> AsyncIterator[bytes]:
            block = b"z" * (1 << 20)
            for _ in range(256):
                yield block

        async with client.post(f"http://127.0.0.1:{port}/echo/up", data=upload()) as resp:
            body = await resp.json()
        assert body["body_length"] == 256 * (1 << 20)
        peak_mib = _vm_hwm_kib(proc.pid) / 1024
        assert peak_mib < 200, f"the proxy peaked at {peak_mib:.0f} MiB while streaming 768 MiB"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
