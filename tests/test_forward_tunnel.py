"""CONNECT (what HTTPS_PROXY sends): refused with `tunnel_refused` and a message pointing to
http:// URLs, unless the target is on `tunnel_allow`, where the bytes are spliced untouched (no
token, nothing parsed), bounded by an idle timeout, both sides closed when one ends."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import requests
import yaml

from proxy.config import load_config
from proxy.demo import EchoServer, TokenServer, header_values
from proxy.runtime import Runtime
from tests import test_forward
from tests.conftest import LogCapture, ProxyFactory, proxy_url
from tests.redis_fixture import free_port
from tests.test_forward import (
    API_HOST,
    PROXY_PASSWORD,
    PROXY_USER,
    Upstream,
    forward_config,
    parse_response,
    raw_exchange,
    run_curl,
    start_forward_proxy,
)

upstream = test_forward.upstream  # fixture shared with test_forward.py


class TcpEcho:
    """A raw TCP server that sends back every byte it receives; it tracks its connections."""

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self.received = 0
        self.changed = asyncio.Condition()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self.changed:
            self.accepted += 1
            self.open += 1
            self.changed.notify_all()
        self._writers.add(writer)
        try:
            while data := await reader.read(65536):
                self.received += len(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            async with self.changed:
                self.open -= 1
                self.changed.notify_all()

    async def wait_for(self, predicate: Any, within: float = 10.0) -> None:
        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(predicate)

    def close_connections(self) -> None:
        for writer in list(self._writers):
            writer.close()

    async def aclose(self) -> None:
        self.close_connections()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def tcp_echo() -> AsyncIterator[TcpEcho]:
    server = TcpEcho()
    await server.start()
    yield server
    await server.aclose()


def tunnel_config(
    token_server: TokenServer,
    echo_server: EchoServer,
    upstream: Upstream,
    tcp_echo: TcpEcho,
    **extra: Any,
) -> dict[str, Any]:
    return forward_config(
        token_server,
        echo_server,
        upstream,
        tunnel_allow=[f"localhost:{upstream.port}", f"127.0.0.1:{tcp_echo.port}"],
        **extra,
    )


@pytest.fixture
async def tproxy(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    upstream: Upstream,
    tcp_echo: TcpEcho,
) -> Runtime:
    raw = tunnel_config(token_server, echo_server, upstream, tcp_echo)
    return await start_forward_proxy(make_proxy, raw)


def client_ssl(upstream: Upstream) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(upstream.ca_file))


def assert_untouched(echo: dict[str, Any], own_token: str | None) -> None:
    """The upstream got exactly what the client wrote: its own Authorization or none."""
    expected = [f"Bearer {own_token}"] if own_token else []
    assert header_values(echo, "Authorization") == expected
    assert header_values(echo, "X-Request-ID") == []  # authproxy adds it only when forwarding


class Tunnel:
    """A raw client connection after `CONNECT` was answered."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


async def open_raw_tunnel(
    port: int, authority: str, *, extra_head: str = "", early: bytes = b""
) -> tuple[int, bytes, Tunnel]:
    """Send CONNECT (plus `early` bytes in the same write, as a client that does not wait for
    the answer would); return the status, the answer head and the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra_head}\r\n".encode()
    writer.write(head + early)
    await writer.drain()
    async with asyncio.timeout(10):
        answer = await reader.readuntil(b"\r\n\r\n")
    status = int(answer.split(b" ", 2)[1])
    return status, answer, Tunnel(reader, writer)


async def eventually(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Poll a condition the proxy reaches on its own (no event to wait on), bounded."""
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.01)


# -- real clients through HTTPS_PROXY ----------------------------------------------------------


async def test_curl_tunnels_an_allowed_host_untouched(
    tproxy: Runtime,
    upstream: Upstream,
    token_server: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("https_proxy", proxy_url(tproxy))
    status, text, err = await run_curl(
        "--cacert",
        str(upstream.ca_file),
        "-H",
        "Authorization: Bearer app-own-token",
        f"https://localhost:{upstream.port}/tunnelled?q=1",
    )
    # The echo API itself refuses the app's own (invalid) token: authproxy added nothing.
    assert status == 401, err
    echo = json.loads(text)
    assert (echo["path"], echo["query"]) == ("/tunnelled", "q=1")
    assert_untouched(echo, "app-own-token")
    assert token_server.issued_access_tokens == 0
    await eventually(lambda: tproxy.handler.tunnels_open == 0)  # curl left: the tunnel closes

    # --proxytunnel with -x and HTTP_PROXY-style settings: the same tunnel.
    status, text, err = await run_curl(
        "-p", "-x", proxy_url(tproxy), "--cacert", str(upstream.ca_file),
        f"https://localhost:{upstream.port}/again",
    )  # fmt: skip
    assert status == 401, err
    assert_untouched(json.loads(text), None)
    assert upstream.echo.requests == 2


async def test_requests_httpx_aiohttp_tunnel_through_https_proxy(
    tproxy: Runtime,
    upstream: Upstream,
    token_server: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy_url(tproxy))
    url = f"https://localhost:{upstream.port}/t"

    resp = await asyncio.to_thread(requests.get, url, verify=str(upstream.ca_file), timeout=20)
    assert resp.status_code == 401
    assert_untouched(resp.json(), None)

    async with httpx.AsyncClient(trust_env=True, verify=client_ssl(upstream), timeout=20) as hc:
        resp_x = await hc.get(url, headers={"Authorization": "Bearer from-httpx"})
    assert resp_x.status_code == 401
    assert_untouched(resp_x.json(), "from-httpx")

    async with (
        aiohttp.ClientSession(trust_env=True) as session,
        session.get(url, ssl=client_ssl(upstream)) as r,
    ):
        assert r.status == 401
        assert_untouched(await r.json(), None)
    assert upstream.echo.requests == 3
    assert token_server.issued_access_tokens == 0


async def test_one_port_serves_forward_requests_and_tunnels(
    tproxy: Runtime,
    upstream: Upstream,
    token_server: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTP_PROXY and HTTPS_PROXY both name authproxy: http:// URLs get the token attached,
    https:// URLs to tunnel_allow hosts are tunnelled as they are."""
    monkeypatch.setenv("HTTP_PROXY", proxy_url(tproxy))
    monkeypatch.setenv("HTTPS_PROXY", proxy_url(tproxy))

    def both() -> tuple[requests.Response, requests.Response]:
        with requests.Session() as s:
            a = s.get(f"http://{API_HOST}/v1/a", timeout=20)
            b = s.get(
                f"https://localhost:{upstream.port}/b", verify=str(upstream.ca_file), timeout=20
            )
            return a, b

    forwarded, tunnelled = await asyncio.to_thread(both)
    assert forwarded.status_code == 200
    test_forward.assert_upstream_saw_token(forwarded.json(), token_server, upstream.port)
    assert tunnelled.status_code == 401
    assert_untouched(tunnelled.json(), None)


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authority", "status", "code"),
    [
        (f"{API_HOST}:443", 403, "tunnel_refused"),  # a forward route, but not tunnel_allow
        (f"{API_HOST}:80", 403, "tunnel_refused"),
        ("evil.example:443", 403, "tunnel_refused"),
        ("127.0.0.1:{upstream}", 403, "tunnel_refused"),  # allowed by name, not by address
        ("localhost:{tcp}", 403, "tunnel_refused"),  # allowed by address, not by name
        ("localhost:443", 403, "tunnel_refused"),
        ("[::1]:{upstream}", 403, "tunnel_refused"),
        ("localhost:{upstream}@evil.example:443", 400, "bad_request"),
        ("evil.example@localhost:{upstream}", 400, "bad_request"),
        ("localhost%2e:{upstream}", 400, "bad_request"),
        ("localhost.evil.example:{upstream}", 403, "tunnel_refused"),
        ("localhost..:{upstream}", 400, "bad_request"),
    ],
)
async def test_connect_refused(
    tproxy: Runtime,
    upstream: Upstream,
    tcp_echo: TcpEcho,
    authority: str,
    status: int,
    code: str,
) -> None:
    authority = authority.format(upstream=upstream.port, tcp=tcp_echo.port)
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    # The connection closes right after the answer (well before aiohttp's 10 s linger).
    resp = await raw_exchange(tproxy.proxy_port or 0, head.encode(), within=5.0)
    assert resp.status == status, resp.body
    assert resp.headers["X-Authproxy-Error"] == code
    assert resp.headers["Connection"] == "close"
    body = resp.json()
    assert body["error"] == code
    if code == "tunnel_refused":
        assert "http://" in body["message"] and "tunnel_allow" in body["message"]
    assert upstream.echo.requests == 0 and tcp_echo.accepted == 0


@pytest.mark.parametrize(
    ("authority", "hint"),
    [
        (f"{API_HOST}:443", f"call http://{API_HOST}/..."),
        (f"{API_HOST}:8443", f"call http://{API_HOST}/..."),
        ("alt.example.test:443", "call http://alt.example.test:8080/..."),
        ("evil.example:443", "no route serves this host"),
    ],
)
async def test_refusal_message_names_the_http_url_to_use(
    tproxy: Runtime, authority: str, hint: str
) -> None:
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    resp = await raw_exchange(tproxy.proxy_port or 0, head.encode(), within=5.0)
    assert resp.status == 403
    message = resp.json()["message"]
    assert hint in message and "tunnel_allow" in message


async def test_curl_to_a_route_host_over_https_gets_the_explanation(
    tproxy: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a user sees who kept https:// in the URL: curl reports the proxy's 403."""
    monkeypatch.setenv("https_proxy", proxy_url(tproxy))
    status, _, err = await run_curl("-v", f"https://{API_HOST}/v1/x")
    assert status in (0, 403)  # curl versions report the CONNECT failure differently
    assert "403" in err and "tunnel_refused" in err.lower()


async def test_connect_without_a_port_is_a_bad_request(tproxy: Runtime) -> None:
    head = b"CONNECT localhost HTTP/1.1\r\nHost: localhost\r\n\r\n"
    resp = await raw_exchange(tproxy.proxy_port or 0, head, within=5.0)
    assert resp.status == 400


async def test_unreachable_tunnel_target_is_a_502(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    upstream: Upstream,
) -> None:
    closed = free_port()
    raw = forward_config(token_server, echo_server, upstream, tunnel_allow=[f"127.0.0.1:{closed}"])
    rt = await start_forward_proxy(make_proxy, raw)
    head = f"CONNECT 127.0.0.1:{closed} HTTP/1.1\r\nHost: 127.0.0.1:{closed}\r\n\r\n"
    resp = await raw_exchange(rt.proxy_port or 0, head.encode(), within=5.0)
    assert resp.status == 502
    assert resp.json()["error"] == "upstream_unreachable"
    assert rt.handler.tunnels_open == 0


# -- the tunnel itself -------------------------------------------------------------------------


async def test_bytes_pass_unchanged_both_ways_including_early_data(
    tproxy: Runtime, tcp_echo: TcpEcho, log_capture: LogCapture
) -> None:
    early = b"sent with the CONNECT head\x00\xff\r\n\r\nGET / HTTP/1.1\r\n\r\n"
    status, answer, tunnel = await open_raw_tunnel(
        tproxy.proxy_port or 0, f"127.0.0.1:{tcp_echo.port}", early=early
    )
    assert status == 200
    assert b"Content-Length" not in answer and b"Transfer-Encoding" not in answer
    payload = bytes(range(256)) * 4096 + os.urandom(300_000)  # ~1.3 MB, every byte value

    async def send() -> None:
        for i in range(0, len(payload), 50_000):
            tunnel.writer.write(payload[i : i + 50_000])
            await tunnel.writer.drain()

    expected = early + payload
    async with asyncio.timeout(30), asyncio.TaskGroup() as tg:
        tg.create_task(send())
        reading = tg.create_task(tunnel.reader.readexactly(len(expected)))
    got = reading.result()
    assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest()
    assert tcp_echo.received == len(expected)

    await tunnel.close()  # the client leaves: the target side is closed too
    await tcp_echo.wait_for(lambda: tcp_echo.open == 0)
    await eventually(lambda: tproxy.handler.tunnels_open == 0)  # then the line is logged
    lines = [line for line in log_capture.lines() if line.get("event") == "tunnel"]
    assert lines and lines[-1]["closed_by"] == "client"
    assert lines[-1]["bytes_up"] == len(expected) == lines[-1]["bytes_down"]


async def test_allowed_entry_matches_case_and_trailing_dot(
    tproxy: Runtime, upstream: Upstream
) -> None:
    status, _, tunnel = await open_raw_tunnel(tproxy.proxy_port or 0, f"LocalHost.:{upstream.port}")
    assert status == 200
    await tunnel.close()


async def test_target_closing_closes_the_client(tproxy: Runtime, tcp_echo: TcpEcho) -> None:
    status, _, tunnel = await open_raw_tunnel(tproxy.proxy_port or 0, f"127.0.0.1:{tcp_echo.port}")
    assert status == 200
    tunnel.writer.write(b"ping")
    async with asyncio.timeout(10):
        assert await tunnel.reader.readexactly(4) == b"ping"
    tcp_echo.close_connections()
    async with asyncio.timeout(10):
        assert await tunnel.reader.read() == b""  # EOF: authproxy closed the client side
    await tunnel.close()


async def test_idle_tunnel_is_closed_on_both_sides(
    tproxy: Runtime, tcp_echo: TcpEcho, log_capture: LogCapture
) -> None:
    tproxy.handler.tunnel_idle_timeout = 0.3
    status, _, tunnel = await open_raw_tunnel(tproxy.proxy_port or 0, f"127.0.0.1:{tcp_echo.port}")
    assert status == 200
    tunnel.writer.write(b"hello")
    async with asyncio.timeout(10):
        assert await tunnel.reader.readexactly(5) == b"hello"
        assert await tunnel.reader.read() == b""  # then nothing: the idle timeout ends it
    await tcp_echo.wait_for(lambda: tcp_echo.open == 0)
    await eventually(lambda: tproxy.handler.tunnels_open == 0)
    lines = [line for line in log_capture.lines() if line.get("event") == "tunnel"]
    assert lines[-1]["closed_by"] == "idle_timeout"
    await tunnel.close()


async def test_proxy_auth_guards_connect(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    upstream: Upstream,
    tcp_echo: TcpEcho,
    monkeypatch: pytest.MonkeyPatch,
    log_capture: LogCapture,
) -> None:
    monkeypatch.setenv("TEST_PROXY_PASSWORD", PROXY_PASSWORD)
    raw = tunnel_config(
        token_server,
        echo_server,
        upstream,
        tcp_echo,
        proxy_auth={"users": {PROXY_USER: {"env": "TEST_PROXY_PASSWORD"}}},
    )
    rt = await start_forward_proxy(make_proxy, raw)
    authority = f"127.0.0.1:{tcp_echo.port}"
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    resp = await raw_exchange(rt.proxy_port or 0, head.encode(), within=5.0)
    assert resp.status == 407
    assert resp.headers["Proxy-Authenticate"].startswith("Basic")
    assert tcp_echo.accepted == 0

    cred = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
    status, _, tunnel = await open_raw_tunnel(
        rt.proxy_port or 0, authority, extra_head=f"Proxy-Authorization: Basic {cred}\r\n"
    )
    assert status == 200
    tunnel.writer.write(b"x")
    async with asyncio.timeout(10):
        assert await tunnel.reader.readexactly(1) == b"x"
    assert tcp_echo.received == 1  # the CONNECT head, credentials included, stayed at the proxy
    await tunnel.close()

    # curl and requests with credentials in the proxy URL
    proxy = f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{rt.proxy_port}"
    status_c, text, err = await run_curl(
        "-x", proxy, "--cacert", str(upstream.ca_file), f"https://localhost:{upstream.port}/c"
    )
    assert status_c == 401, err
    assert_untouched(json.loads(text), None)
    monkeypatch.setenv("HTTPS_PROXY", proxy)
    r = await asyncio.to_thread(
        requests.get,
        f"https://localhost:{upstream.port}/r",
        verify=str(upstream.ca_file),
        timeout=20,
    )
    assert r.status_code == 401
    assert header_values(r.json(), "Proxy-Authorization") == []
    log_capture.assert_clean(PROXY_PASSWORD, cred)


async def test_reload_changes_tunnel_allow(
    tproxy: Runtime, tcp_echo: TcpEcho, tmp_path: Path, upstream: Upstream
) -> None:
    authority = f"127.0.0.1:{tcp_echo.port}"
    status, _, tunnel = await open_raw_tunnel(tproxy.proxy_port or 0, authority)
    assert status == 200
    await tunnel.close()

    source = tproxy.config.source
    assert source is not None
    raw = yaml.safe_load(source.read_text())
    raw["tunnel_allow"] = [f"localhost:{upstream.port}"]
    new_file = tmp_path / "reloaded.yaml"
    new_file.write_text(yaml.safe_dump(raw))
    tproxy.reload(load_config(new_file))

    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    resp = await raw_exchange(tproxy.proxy_port or 0, head.encode(), within=5.0)
    assert resp.status == 403
    assert tcp_echo.accepted == 1


async def test_connect_answer_parses_as_http(tproxy: Runtime, tcp_echo: TcpEcho) -> None:
    status, answer, tunnel = await open_raw_tunnel(
        tproxy.proxy_port or 0, f"127.0.0.1:{tcp_echo.port}"
    )
    parsed = parse_response(answer)
    assert (status, parsed.status) == (200, 200)
    assert parsed.headers["X-Request-ID"]
    assert "Connection" not in parsed.headers  # a 200 to CONNECT must not announce a close
    await tunnel.close()


async def test_shutdown_closes_open_tunnels(
    token_server: TokenServer,
    echo_server: EchoServer,
    upstream: Upstream,
    tcp_echo: TcpEcho,
    tmp_path: Path,
    log_capture: LogCapture,
) -> None:
    """A tunnel holds the drain at most for the shutdown grace, then both sides are closed."""
    raw = tunnel_config(token_server, echo_server, upstream, tcp_echo, shutdown_grace="300ms")
    path = tmp_path / "shutdown.yaml"
    path.write_text(yaml.safe_dump(raw))
    rt = Runtime(load_config(path))
    await rt.start()
    status, _, tunnel = await open_raw_tunnel(rt.proxy_port or 0, f"127.0.0.1:{tcp_echo.port}")
    assert status == 200
    tunnel.writer.write(b"abc")
    async with asyncio.timeout(10):
        assert await tunnel.reader.readexactly(3) == b"abc"
        await rt.aclose()
        assert await tunnel.reader.read() == b""
    await tcp_echo.wait_for(lambda: tcp_echo.open == 0)
    assert rt.handler.tunnels_open == 0
    lines = [line for line in log_capture.lines() if line.get("event") == "tunnel"]
    assert lines[-1]["closed_by"] == "shutdown"
    await tunnel.close()
