"""Forward-proxy mode (issue 6): real clients through HTTP_PROXY, TLS originated to the upstream,
the token attached, proxy authentication, NO_PROXY behaviour of each client.

The upstream is an EchoServer on loopback over TLS (a trustme certificate for localhost); the
route matches `api.example.test`, a name that resolves nowhere: only the proxy can answer it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import pytest
import requests
import trustme
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict
from requests.utils import select_proxy
from urllib3.connectionpool import ConnectionPool

from proxy.config import parse_config
from proxy.demo import EchoServer, TokenServer, header_values
from proxy.runtime import Runtime
from tests.conftest import CLIENT_SECRET, LogCapture, ProxyFactory, proxy_config, proxy_url

API_HOST = "api.example.test"
PROXY_USER = "billing-service"
PROXY_PASSWORD = "proxy-pass-6b1f0e"


# -- fixtures shared with the other forward-mode test files ------------------------------------


@dataclass
class Upstream:
    """A TLS echo API and the CA file a route needs to trust it."""

    echo: EchoServer
    ca_file: Path
    ca: trustme.CA

    @property
    def port(self) -> int:
        port = self.echo.url.port
        assert port is not None
        return port

    @property
    def base(self) -> str:
        return f"https://localhost:{self.port}"


def server_ssl(ca: trustme.CA, *, require_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost", "127.0.0.1", common_name="upstream").configure_cert(ctx)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(ctx)
    return ctx


@pytest.fixture
async def upstream(
    token_server: TokenServer, ca: trustme.CA, tmp_path: Path
) -> AsyncIterator[Upstream]:
    ca_file = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    echo = EchoServer(tokens=token_server)
    await echo.start("127.0.0.1", 0, server_ssl(ca))
    yield Upstream(echo, ca_file, ca)
    await echo.aclose()


def forward_config(
    token_server: TokenServer, echo_server: EchoServer, upstream: Upstream, **extra: Any
) -> dict[str, Any]:
    """Base-URL route `/echo` (plain echo) plus forward routes to the TLS upstream:
    `api.example.test` (any path), `api.example.test` + `/v2` (longer prefix wins) and
    `alt.example.test:8080`."""
    raw = proxy_config(token_server, echo_server, **extra)
    tls = {"ca": str(upstream.ca_file)}
    raw["routes"] += [
        {
            "name": "api",
            "match": {"host": API_HOST},
            "upstream": f"{upstream.base}/base",
            "credential": "demo",
            "tls": tls,
        },
        {
            "name": "api-v2",
            "match": {"host": API_HOST, "prefix": "/v2"},
            "upstream": f"{upstream.base}/second",
            "credential": "demo",
            "tls": tls,
        },
        {
            "name": "alt",
            "match": {"host": "alt.example.test:8080"},
            "upstream": f"{upstream.base}/alt",
            "credential": "demo",
            "tls": tls,
        },
    ]
    return raw


async def start_forward_proxy(make_proxy: ProxyFactory, raw: dict[str, Any]) -> Runtime:
    runtime = await make_proxy(raw)
    # The runtime reads tunnel_allow from its live configuration on every CONNECT.
    assert runtime.handler.tunnel_allow is not None
    return runtime


@pytest.fixture
async def fproxy(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    upstream: Upstream,
) -> Runtime:
    return await start_forward_proxy(
        make_proxy, forward_config(token_server, echo_server, upstream)
    )


@pytest.fixture
async def authed_proxy(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> Runtime:
    monkeypatch.setenv("TEST_PROXY_PASSWORD", PROXY_PASSWORD)
    raw = forward_config(
        token_server,
        echo_server,
        upstream,
        proxy_auth={"users": {PROXY_USER: {"env": "TEST_PROXY_PASSWORD"}}},
    )
    return await start_forward_proxy(make_proxy, raw)


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_exchange(port: int, data: bytes, *, within: float = 10.0) -> RawResponse:
    """Send bytes as they are (no client library normalising them) and read the answer up to
    the connection's close; every request here asks for `Connection: close`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(within):
            raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    return parse_response(raw)


def parse_response(raw: bytes) -> RawResponse:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    return RawResponse(status, headers, body)


async def run_curl(*args: str, within: float = 30.0) -> tuple[int, str, str]:
    """curl with the test's environment; returns (HTTP status, body, stderr)."""
    assert shutil.which("curl"), "curl is needed for the forward-mode tests"
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--max-time",
        "20",
        "-w",
        "\n%{http_code}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(within):
        out, err = await proc.communicate()
    text = out.decode()
    body, _, code = text.rpartition("\n")
    return int(code or 0), body, err.decode()


def assert_upstream_saw_token(echo: dict[str, Any], token_server: TokenServer, port: int) -> None:
    """What the upstream received: our valid bearer token, its own Host, no proxy credentials."""
    auth = header_values(echo, "Authorization")
    assert len(auth) == 1 and auth[0].startswith("Bearer ")
    assert token_server.is_valid(auth[0].removeprefix("Bearer "))
    assert echo["token_valid"] is True
    assert header_values(echo, "Host") == [f"localhost:{port}"]
    assert header_values(echo, "Proxy-Authorization") == []
    assert header_values(echo, "Proxy-Connection") == []


# -- the four clients through HTTP_PROXY -------------------------------------------------------


async def test_curl_through_http_proxy_env(
    fproxy: Runtime,
    upstream: Upstream,
    token_server: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # curl reads only the lower-case http_proxy (HTTP_PROXY is ignored on purpose: httpoxy).
    monkeypatch.setenv("http_proxy", proxy_url(fproxy))
    body = b"amount=10&currency=EUR"
    status, text, err = await run_curl(
        "-X",
        "POST",
        "--data-binary",
        body.decode(),
        "-H",
        "Authorization: Bearer app-own-token",
        f"http://{API_HOST}/v1/payments?limit=2&x=%2F",
    )
    assert status == 200, err
    echo = json.loads(text)
    assert echo["method"] == "POST"
    assert echo["path"] == "/base/v1/payments"
    assert echo["query"] == "limit=2&x=%2F"
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert_upstream_saw_token(echo, token_server, upstream.port)
    assert "app-own-token" not in json.dumps(echo)


async def test_curl_with_dash_x_and_host_prefix_route(
    fproxy: Runtime, upstream: Upstream, token_server: TokenServer
) -> None:
    status, text, err = await run_curl("-x", proxy_url(fproxy), f"http://{API_HOST}/v2/reports")
    assert status == 200, err
    echo = json.loads(text)
    assert echo["path"] == "/second/reports"  # the host+prefix route won over the host route
    assert_upstream_saw_token(echo, token_server, upstream.port)
    status, text, _ = await run_curl("-x", proxy_url(fproxy), "http://alt.example.test:8080/a")
    assert status == 200
    assert json.loads(text)["path"] == "/alt/a"


async def test_curl_ignores_upper_case_http_proxy(
    fproxy: Runtime, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Documented in the README: curl wants `http_proxy`; with only HTTP_PROXY it goes direct."""
    # A loopback URL the proxy answers with no_route; direct, curl meets a TLS port and fails.
    url = f"http://127.0.0.1:{upstream.port}/x"
    monkeypatch.setenv("HTTP_PROXY", proxy_url(fproxy))
    status, text, _ = await run_curl("-D", "-", url)
    assert status != 404 and "x-authproxy-error" not in text.lower()
    monkeypatch.setenv("http_proxy", proxy_url(fproxy))
    status, text, _ = await run_curl("-D", "-", url)
    assert status == 404 and "x-authproxy-error: no_route" in text.lower()
    assert upstream.echo.requests == 0


async def test_requests_through_http_proxy_env(
    fproxy: Runtime,
    upstream: Upstream,
    token_server: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy_url(fproxy))
    payload = {"amount": 10, "note": "ü"}

    def call() -> requests.Response:
        return requests.post(f"http://{API_HOST}/v1/payments", json=payload, timeout=20)

    resp = await asyncio.to_thread(call)
    assert resp.status_code == 200, resp.text
    echo = resp.json()
    assert echo["path"] == "/base/v1/payments"
    sent = json.dumps(payload).encode()
    assert echo["body_sha256"] == hashlib.sha256(sent).hexdigest()
    assert_upstream_saw_token(echo, token_server, upstream.port)
    assert resp.headers["X-Request-ID"]


async def test_httpx_through_http_proxy_env_and_proxy_argument(
    fproxy: Runtime,
    upstream: Upstream,
    token_server: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy_url(fproxy))
    async with httpx.AsyncClient(trust_env=True, timeout=20) as client:
        resp = await client.get(f"http://{API_HOST}/v1/accounts", params={"page": "2"})
    assert resp.status_code == 200, resp.text
    echo = resp.json()
    assert (echo["path"], echo["query"]) == ("/base/v1/accounts", "page=2")
    assert_upstream_saw_token(echo, token_server, upstream.port)

    monkeypatch.delenv("HTTP_PROXY")
    async with httpx.AsyncClient(proxy=proxy_url(fproxy), timeout=20) as client:
        resp = await client.put(f"http://{API_HOST}/v1/accounts/7", content=b"x" * 70_000)
    assert resp.status_code == 200
    echo = resp.json()
    assert echo["method"] == "PUT" and echo["body_length"] == 70_000
    assert_upstream_saw_token(echo, token_server, upstream.port)


async def test_aiohttp_trust_env_through_http_proxy(
    fproxy: Runtime,
    upstream: Upstream,
    token_server: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy_url(fproxy))
    async with (
        aiohttp.ClientSession(trust_env=True) as session,
        session.get(f"http://{API_HOST}/v1/x", headers={"Proxy-Connection": "keep-alive"}) as resp,
    ):
        assert resp.status == 200
        echo = await resp.json()
    assert echo["path"] == "/base/v1/x"
    assert_upstream_saw_token(echo, token_server, upstream.port)


async def test_proxy_credentials_are_dropped_when_proxy_auth_is_off(
    fproxy: Runtime,
    upstream: Upstream,
    token_server: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://someone:secret@127.0.0.1:{fproxy.proxy_port}")
    resp = await asyncio.to_thread(requests.get, f"http://{API_HOST}/v1/x", timeout=20)
    assert resp.status_code == 200
    assert_upstream_saw_token(resp.json(), token_server, upstream.port)  # no Proxy-Authorization


async def test_upstream_redirect_is_passed_back_not_followed(
    fproxy: Runtime, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy_url(fproxy))

    def call() -> requests.Response:
        return requests.get(
            f"http://{API_HOST}/v1/_redirect",
            params={"to": "http://elsewhere.example/steal"},
            allow_redirects=False,
            timeout=20,
        )

    resp = await asyncio.to_thread(call)
    assert resp.status_code == 302
    assert resp.headers["Location"] == "http://elsewhere.example/steal"
    assert upstream.echo.requests == 1


async def test_mtls_upstream_in_forward_mode(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf = ca.issue_cert("authproxy-client", common_name="authproxy-client")
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    mtls = EchoServer(tokens=token_server)
    await mtls.start("127.0.0.1", 0, server_ssl(ca, require_client_cert=True))
    try:
        raw = proxy_config(token_server, echo_server)
        raw["routes"].append(
            {
                "name": "mtls",
                "match": {"host": "mtls.example.test"},
                "upstream": f"https://localhost:{mtls.url.port}",
                "credential": "demo",
                "tls": {"ca": str(ca_file), "cert": str(cert), "key": str(key)},
            }
        )
        rt = await start_forward_proxy(make_proxy, raw)
        monkeypatch.setenv("HTTP_PROXY", proxy_url(rt))
        resp = await asyncio.to_thread(requests.get, "http://mtls.example.test/who", timeout=20)
        assert resp.status_code == 200
        echo = resp.json()
        assert echo["client_cert"] == "authproxy-client"
        assert echo["token_valid"] is True
    finally:
        await mtls.aclose()


async def test_base_url_and_forward_mode_share_one_port(
    fproxy: Runtime,
    echo_server: EchoServer,
    upstream: Upstream,
    token_server: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with aiohttp.ClientSession(trust_env=False) as session:
        async with session.get(proxy_url(fproxy, "/echo/v4/a")) as resp:
            assert resp.status == 200
            assert (await resp.json())["path"] == "/api/v4/a"
        async with session.get(f"http://{API_HOST}/b", proxy=proxy_url(fproxy)) as resp:
            assert resp.status == 200
            assert (await resp.json())["path"] == "/base/b"
    # A base-URL client that also has HTTP_PROXY set sends http://<proxy>/echo/... to the
    # proxy in absolute form: the proxy recognises its own address and routes by prefix.
    monkeypatch.setenv("HTTP_PROXY", proxy_url(fproxy))
    resp2 = await asyncio.to_thread(requests.get, proxy_url(fproxy, "/echo/v4/c"), timeout=20)
    assert resp2.status_code == 200
    assert resp2.json()["path"] == "/api/v4/c"
    assert echo_server.requests == 2 and upstream.echo.requests == 1


# -- proxy authentication ----------------------------------------------------------------------


async def test_proxy_auth_required_then_accepted_for_each_client(
    authed_proxy: Runtime,
    upstream: Upstream,
    token_server: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = authed_proxy.proxy_port
    url = f"http://{API_HOST}/v1/x"

    # Missing, wrong password, unknown user: 407 with a Basic challenge, nothing forwarded.
    status, text, _ = await run_curl("-x", proxy_url(authed_proxy), url)
    assert status == 407
    assert json.loads(text)["error"] == "proxy_auth_required"
    for cred in (f"{PROXY_USER}:wrong", f"nobody:{PROXY_PASSWORD}"):
        status, _, _ = await run_curl("-x", proxy_url(authed_proxy), "-U", cred, url)
        assert status == 407
    async with (
        aiohttp.ClientSession(trust_env=False) as session,
        session.get(url, proxy=proxy_url(authed_proxy)) as resp,
    ):
        assert resp.status == 407
        assert resp.headers["Proxy-Authenticate"].startswith("Basic")
        assert resp.headers["X-Authproxy-Error"] == "proxy_auth_required"
    assert upstream.echo.requests == 0

    with_creds = f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{port}"
    status, text, err = await run_curl("-x", with_creds, url)
    assert status == 200, err
    assert_upstream_saw_token(json.loads(text), token_server, upstream.port)

    monkeypatch.setenv("HTTP_PROXY", with_creds)
    resp_r = await asyncio.to_thread(requests.get, url, timeout=20)
    assert resp_r.status_code == 200
    assert_upstream_saw_token(resp_r.json(), token_server, upstream.port)

    async with httpx.AsyncClient(trust_env=True, timeout=20) as client:
        resp_x = await client.get(url)
    assert resp_x.status_code == 200
    assert_upstream_saw_token(resp_x.json(), token_server, upstream.port)

    async with aiohttp.ClientSession(trust_env=True) as session, session.get(url) as resp:
        assert resp.status == 200
        assert_upstream_saw_token(await resp.json(), token_server, upstream.port)
    assert upstream.echo.requests == 4


async def test_proxy_auth_never_logged(
    authed_proxy: Runtime, upstream: Upstream, log_capture: LogCapture
) -> None:
    port = authed_proxy.proxy_port
    status, _, _ = await run_curl(
        "-x", f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{port}", f"http://{API_HOST}/v1/x"
    )
    assert status == 200
    lines = log_capture.lines()
    assert any(line.get("event") == "access" and line.get("route") == "api" for line in lines)
    log_capture.assert_clean(PROXY_PASSWORD, CLIENT_SECRET)


def test_listening_beyond_loopback_without_proxy_auth_warns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The warning the runtime logs at start (config warnings); no socket is opened here."""
    monkeypatch.setenv("TEST_PROXY_PASSWORD", PROXY_PASSWORD)
    base: dict[str, Any] = {
        "store": {"kind": "memory"},
        "credentials": {},
        "routes": [
            {"name": "a", "match": {"host": API_HOST}, "upstream": "https://api.example.com"}
        ],
    }
    wide = parse_config({**base, "listen": {"proxy": "0.0.0.0:8080"}})
    assert any("proxy_auth" in w and "0.0.0.0:8080" in w for w in wide.warnings)
    local = parse_config({**base, "listen": {"proxy": "127.0.0.1:8080"}})
    assert not any("proxy_auth" in w for w in local.warnings)
    guarded = parse_config(
        {
            **base,
            "listen": {"proxy": "0.0.0.0:8080"},
            "proxy_auth": {"users": {PROXY_USER: {"env": "TEST_PROXY_PASSWORD"}}},
        }
    )
    assert not any("proxy_auth" in w for w in guarded.warnings)


# -- NO_PROXY: what each client does (documented in the README) --------------------------------


class _PinnedResolver(AbstractResolver):
    """aiohttp's resolver hook: `API_HOST` is 127.0.0.1, without a DNS lookup; nothing else
    resolves (IP literals, like the proxy's address, never reach a resolver)."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        assert host == API_HOST, f"only {API_HOST} is pinned, not {host}"
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        pass


class _PinnedAdapter(requests.adapters.HTTPAdapter):
    """requests' transport-adapter hook: a direct (not proxied) call to `API_HOST` connects to
    127.0.0.1 at the URL's port, without a DNS lookup. Proxied calls are untouched."""

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: bool | str | None,
        proxies: Mapping[str, str] | None = None,
        cert: tuple[str, str] | str | None = None,
    ) -> ConnectionPool:
        assert request.url is not None
        target = urlsplit(request.url)
        if select_proxy(request.url, proxies) is None:
            assert target.hostname == API_HOST, f"only {API_HOST} is pinned, not {target}"
            pool: ConnectionPool = self.poolmanager.connection_from_host(
                "127.0.0.1", target.port, scheme="http"
            )
            return pool
        return super().get_connection_with_tls_context(request, verify, proxies, cert)


async def _answered_by_proxy(client: str, url: str, *, pinned: bool) -> bool:
    """Call `url` with `client`, its proxy settings from the environment; True when authproxy
    answered (its X-Authproxy-Error header). A connection error is not an answer: it fails
    the test. `pinned`: `API_HOST` connects to 127.0.0.1 through each client's own hook (curl
    `--resolve`, a requests adapter, an aiohttp resolver), so no name is looked up in DNS."""
    if client == "curl":
        port = urlsplit(url).port
        pin = ["--resolve", f"{API_HOST}:{port}:127.0.0.1"] if pinned else []
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-o", "/dev/null", "-D", "-", "--max-time", "10", *pin, url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(20):
            out, err = await proc.communicate()
        assert proc.returncode == 0, f"curl {url}: {err.decode()}"
        return b"x-authproxy-error" in out.lower()
    if client == "requests":

        def get() -> requests.Response:
            with requests.Session() as s:
                if pinned:
                    s.mount("http://", _PinnedAdapter())
                return s.get(url, timeout=10)

        headers = dict((await asyncio.to_thread(get)).headers)
    elif client == "httpx":
        assert not pinned, "httpx has no public resolver hook that keeps its proxy settings"
        async with httpx.AsyncClient(trust_env=True, timeout=10) as hc:
            headers = dict((await hc.get(url)).headers)
    else:
        connector = aiohttp.TCPConnector(resolver=_PinnedResolver()) if pinned else None
        async with (
            aiohttp.ClientSession(trust_env=True, connector=connector) as session,
            session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp,
        ):
            headers = dict(resp.headers)
    return any(k.lower() == "x-authproxy-error" for k in headers)


def _proxy_requests(runtime: Runtime) -> int:
    """Requests the proxy answered so far (its `authproxy_requests_total`, all labels); it
    counts a request before its answer is sent."""
    return sum(
        int(sample.value)
        for metric in runtime.metrics.registry.collect()
        for sample in metric.samples
        if sample.name == "authproxy_requests_total"
    )


async def _route_taken(
    client: str, url: str, runtime: Runtime, direct: EchoServer, *, pinned: bool = False
) -> str:
    """'proxy' or 'direct', proven on both sides: the side that answered counted exactly
    this one request, the other none."""
    proxy_before, direct_before = _proxy_requests(runtime), direct.requests
    by_proxy = await _answered_by_proxy(client, url, pinned=pinned)
    seen = (_proxy_requests(runtime) - proxy_before, direct.requests - direct_before)
    if by_proxy:
        assert seen == (1, 0), f"{client} {url}: authproxy answered; (proxy, direct) {seen}"
        return "proxy"
    assert seen == (0, 1), f"{client} {url}: the direct server answered; (proxy, direct) {seen}"
    return "direct"


@pytest.mark.parametrize("client", ["curl", "requests", "httpx", "aiohttp"])
async def test_no_proxy_behaviour(
    client: str, fproxy: Runtime, echo_server: EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the proxy in the environment (curl: http_proxy), none of the four clients skips it
    for loopback by default; NO_PROXY names (exact or as a domain suffix) and `*` make them go
    direct; `localhost` and `127.0.0.1` are different entries. The direct server is the plain
    echo on 127.0.0.1; every call is loopback only and counted on both sides."""
    monkeypatch.setenv("http_proxy", proxy_url(fproxy))
    monkeypatch.setenv("HTTP_PROXY", proxy_url(fproxy))
    port = echo_server.url.port
    by_ip, by_name = f"http://127.0.0.1:{port}/x", f"http://localhost:{port}/x"

    async def taken(url: str, *, pinned: bool = False) -> str:
        return await _route_taken(client, url, fproxy, echo_server, pinned=pinned)

    assert await taken(by_ip) == "proxy"  # no_route: not a configured host
    assert await taken(by_name) == "proxy"

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert await taken(by_ip) == "direct"
    assert await taken(by_name) == "proxy"

    monkeypatch.setenv("NO_PROXY", "localhost")
    assert await taken(by_name) == "direct"
    assert await taken(by_ip) == "proxy"

    monkeypatch.setenv("NO_PROXY", "*")
    assert await taken(by_ip) == "direct"
    assert await taken(by_name) == "direct"

    # A domain suffix: `example.test` covers api.example.test. The name is pinned to 127.0.0.1
    # by each client's own hook, so going direct reaches the echo without a DNS lookup.
    by_suffix = f"http://{API_HOST}:{port}/x"
    if client == "httpx":
        # httpx takes proxies from the environment only without a custom transport, so the
        # name cannot be pinned: its own routing decision is checked instead, no call made.
        monkeypatch.setenv("NO_PROXY", "other.test")
        async with httpx.AsyncClient(trust_env=True) as hc:
            assert hc._transport_for_url(httpx.URL(by_suffix)) is not hc._transport
        monkeypatch.setenv("NO_PROXY", "example.test")
        async with httpx.AsyncClient(trust_env=True) as hc:
            assert hc._transport_for_url(httpx.URL(by_suffix)) is hc._transport
        return
    monkeypatch.setenv("NO_PROXY", "other.test")
    assert await taken(by_suffix, pinned=True) == "proxy"  # the pin alone does not bypass it
    monkeypatch.setenv("NO_PROXY", "example.test")
    assert await taken(by_suffix, pinned=True) == "direct"


async def test_expect_100_continue_is_answered_by_the_proxy(
    fproxy: Runtime, upstream: Upstream, token_server: TokenServer, tmp_path: Path
) -> None:
    """curl sends `Expect: 100-continue` with bodies over 1 MiB and waits for the answer."""
    body = tmp_path / "big.bin"
    body.write_bytes(os.urandom(1_500_000))
    status, text, err = await run_curl(
        "-v", "-x", proxy_url(fproxy), "--data-binary", f"@{body}", f"http://{API_HOST}/v1/up"
    )
    assert status == 200
    assert "HTTP/1.1 100 Continue" in err
    echo = json.loads(text)
    assert echo["body_sha256"] == hashlib.sha256(body.read_bytes()).hexdigest()
    assert header_values(echo, "Expect") == []
    assert_upstream_saw_token(echo, token_server, upstream.port)

    # A request the proxy refuses never invites the body.
    status, _, err = await run_curl(
        "-v", "-x", proxy_url(fproxy), "--data-binary", f"@{body}", "http://evil.example/v1/up"
    )
    assert status == 404
    assert "100 Continue" not in err
    assert upstream.echo.requests == 1
