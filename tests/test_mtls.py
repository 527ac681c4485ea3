"""mTLS end to end: the proxy talks to a token server and an upstream that both require a
client certificate (real TLS on loopback, certificates made now by trustme), rotates the
certificate and the client secret under steady load, and exposes the certificate's expiry."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.config import TlsConfig
from proxy.demo import EchoServer, TokenServer
from proxy.runtime import Runtime
from proxy.transport import SessionPool, map_client_error
from tests.conftest import CLIENT_SECRET, LogCapture, ProxyFactory, admin_url, proxy_url
from tests.tls_helpers import (
    Identity,
    atomic_write,
    rotate_identity,
    server_context,
    write_ca,
    write_identity,
)

LOAD_REQUESTS = 300
LOAD_CONCURRENCY = 10


@dataclass
class Servers:
    token: TokenServer
    echo: EchoServer
    ident: Identity
    ca_file: Path
    tmp: Path


@pytest.fixture
async def servers(ca: trustme.CA, tmp_path: Path) -> AsyncIterator[Servers]:
    """A token server and an echo upstream that both refuse a handshake without a client cert."""
    token = TokenServer(client_secret=CLIENT_SECRET, expires_in=300, token_prefix="tst")
    await token.start(ssl=server_context(ca, client_certs=ssl.CERT_REQUIRED))
    echo = EchoServer(tokens=token)
    await echo.start(ssl=server_context(ca, client_certs=ssl.CERT_REQUIRED))
    ident = write_identity(ca, tmp_path / "tls", "client-one")
    yield Servers(token, echo, ident, write_ca(ca, tmp_path / "ca.pem"), tmp_path)
    await echo.aclose()
    await token.aclose()


def tls_block(s: Servers, **extra: Any) -> dict[str, Any]:
    return {"cert": str(s.ident.cert), "key": str(s.ident.key), "ca": str(s.ca_file), **extra}


def mtls_config(
    s: Servers, *, credential: dict[str, Any] | None = None, **route: Any
) -> dict[str, Any]:
    cred: dict[str, Any] = {
        "grant": "client_credentials",
        "token_url": str(s.token.token_url),
        "client_id": "demo-client",
        "client_secret": {"env": "TEST_CLIENT_SECRET"},
        "tls": tls_block(s),
    }
    cred.update(credential or {})
    echo_route: dict[str, Any] = {
        "name": "echo",
        "match": {"prefix": "/echo"},
        "upstream": f"{s.echo.url}/api",
        "credential": "demo",
        "tls": tls_block(s),
    }
    echo_route.update(route)
    return {
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "store": {"kind": "memory"},
        "credentials": {"demo": cred},
        "routes": [echo_route],
    }


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with client.get(url) as resp:
        return resp.status, await resp.json()


async def wait_for(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Poll `condition` until true; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


# -- the basics -----------------------------------------------------------------------------


async def test_both_hops_present_the_client_certificate(
    servers: Servers, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    rt = await make_proxy(mtls_config(servers))
    status, body = await get(client, proxy_url(rt, "/echo/accounts"))
    assert status == 200, body
    assert body["client_cert"] == "client-one" and body["token_valid"] is True
    assert servers.token.calls[-1].auth_method == "client_secret_basic"
    assert servers.token.calls[-1].status == 200


async def test_servers_refuse_a_handshake_without_a_certificate(
    servers: Servers, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """The fixtures really require client certificates, and the proxy says what is missing."""
    plain = ssl.create_default_context(cafile=str(servers.ca_file))
    for url in (servers.token.token_url, servers.echo.url / "api"):
        with pytest.raises(aiohttp.ClientError):
            async with client.get(url, ssl=plain) as resp:
                await resp.read()
    # The credential keeps its certificate: tokens work. The route has none: a clear 502.
    rt = await make_proxy(mtls_config(servers, tls={"ca": str(servers.ca_file)}))
    status, body = await get(client, proxy_url(rt, "/echo/x"))
    assert status == 502 and body["error"] == "upstream_unreachable", body
    assert servers.echo.requests == 0


async def test_tls_client_auth_end_to_end(
    servers: Servers, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    servers.token.register_client_cert(cn="client-one")
    rt = await make_proxy(
        mtls_config(servers, credential={"auth_method": "tls_client_auth", "client_secret": None})
    )
    status, body = await get(client, proxy_url(rt, "/echo/a"))
    assert status == 200 and body["token_valid"] is True, body
    call = servers.token.calls[-1]
    assert call.auth_method == "tls_client_auth" and call.status == 200
    assert "client_secret" not in call.params


async def test_private_key_jwt_end_to_end(
    servers: Servers, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    key_file = servers.tmp / "signing.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    servers.token.register_jwt_key(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        kid="2026-01",
    )
    rt = await make_proxy(
        mtls_config(
            servers,
            credential={
                "auth_method": "private_key_jwt",
                "client_secret": None,
                "private_key": {"file": str(key_file)},
                "key_id": "2026-01",
            },
        )
    )
    status, body = await get(client, proxy_url(rt, "/echo/a"))
    assert status == 200 and body["token_valid"] is True, body
    assert servers.token.calls[-1].auth_method == "private_key_jwt"
    assert servers.token.invalid_client == 0


async def test_server_name_override(
    ca: trustme.CA, servers: Servers, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """An upstream reached by IP whose certificate names only `payments.internal`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("payments.internal").configure_cert(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(ctx)
    named = EchoServer(tokens=servers.token)
    await named.start(ssl=ctx)
    try:
        raw = mtls_config(servers, upstream=f"{named.url}/api")
        raw["routes"].append(
            {
                "name": "named",
                "match": {"prefix": "/named"},
                "upstream": f"{named.url}/api",
                "credential": "demo",
                "tls": tls_block(servers, server_name="payments.internal"),
            }
        )
        rt = await make_proxy(raw)
        status, body = await get(client, proxy_url(rt, "/echo/a"))
        assert status == 502 and "TLS verification" in body["message"], body
        status, body = await get(client, proxy_url(rt, "/named/a"))
        assert status == 200 and body["client_cert"] == "client-one", body
    finally:
        await named.aclose()


async def test_credential_server_name_override(
    ca: trustme.CA, servers: Servers, tmp_path: Path
) -> None:
    """`tls.server_name` on a credential applies to its token endpoint too (SNI + verification)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("idp.internal").configure_cert(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(ctx)
    server = TokenServer(client_secret=CLIENT_SECRET)
    await server.start(ssl=ctx)
    pool = SessionPool()
    try:
        tls = TlsConfig(
            cert=servers.ident.cert,
            key=servers.ident.key,
            ca=servers.ca_file,
            server_name="idp.internal",
        )
        form = {"grant_type": "client_credentials", "client_id": "demo-client"}
        form["client_secret"] = CLIENT_SECRET
        async with pool.session_for(tls).post(server.token_url, data=form) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await pool.session_for(TlsConfig(ca=servers.ca_file)).post(server.token_url)
    finally:
        await pool.aclose()
        await server.aclose()


async def test_wrong_ca_error_names_the_ca_file(servers: Servers, tmp_path: Path) -> None:
    wrong = write_ca(trustme.CA(), tmp_path / "wrong-ca.pem")
    tls = TlsConfig(cert=servers.ident.cert, key=servers.ident.key, ca=wrong)
    pool = SessionPool()
    try:
        with pytest.raises(aiohttp.ClientError) as info:
            await pool.session_for(tls).get(servers.echo.url / "api")
        error = map_client_error(info.value, "echo", tls)
        assert error.code.value == "upstream_unreachable"
        # trustme servers send their chain up to the root, which the wrong CA does not know.
        assert str(error) == (
            "TLS verification of the upstream of route echo failed: self-signed certificate "
            f"in certificate chain (trusting only CA bundle {wrong})"
        )
    finally:
        await pool.aclose()


# -- expiry metric and warnings --------------------------------------------------------------


async def test_certificate_expiry_metric_and_warning(
    ca: trustme.CA,
    servers: Servers,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(days=5)).replace(microsecond=0)
    short = write_identity(ca, servers.tmp / "short", "short-lived", not_after=soon)
    raw = mtls_config(servers)
    raw["routes"][0]["tls"] = {
        "cert": str(short.cert),
        "key": str(short.key),
        "ca": str(servers.ca_file),
    }
    rt = await make_proxy(raw)
    async with client.get(admin_url(rt, "/metrics")) as resp:
        text = await resp.text()
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith("authproxy_tls_certificate_expiry_timestamp_seconds{")
        and 'name="echo"' in ln
    )
    assert float(line.rsplit(" ", 1)[1]) == soon.timestamp()
    assert 'kind="credential",name="demo"' in text
    warnings = [
        ln
        for ln in log_capture.lines()
        if ln.get("event") == "tls" and "expires soon" in ln["message"]
    ]
    assert any(w.get("route") == "echo" and w.get("file") == str(short.cert) for w in warnings)
    assert not any(w.get("credential") == "demo" for w in warnings)


async def test_insecure_skip_verify_is_loud(
    servers: Servers,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    """Verification off works against an unknown CA, but warns at start and shows in admin."""
    raw = mtls_config(servers)
    for block in (raw["credentials"]["demo"]["tls"], raw["routes"][0]["tls"]):
        del block["ca"]
        block["insecure_skip_verify"] = True
    rt = await make_proxy(raw)
    status, body = await get(client, proxy_url(rt, "/echo/a"))
    assert status == 200, body
    warnings = [ln["message"] for ln in log_capture.lines() if ln.get("event") == "config"]
    assert any("credentials.demo.tls.insecure_skip_verify" in w for w in warnings)
    assert any("routes[0].tls.insecure_skip_verify" in w for w in warnings)
    async with client.get(admin_url(rt, "/admin/credentials")) as resp:
        creds = (await resp.json())["credentials"]
    assert creds[0]["insecure_skip_verify"] is True


# -- rotation under load ---------------------------------------------------------------------


@dataclass
class LoadResult:
    status: int
    cert: str | None
    after_rotation: bool


@dataclass
class Load:
    """`LOAD_REQUESTS` requests, `LOAD_CONCURRENCY` at a time; `reached(n)` fires after n answers."""

    client: aiohttp.ClientSession
    url: str
    rotated: asyncio.Event = field(default_factory=asyncio.Event)
    results: list[LoadResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _marks: dict[int, asyncio.Event] = field(default_factory=dict)

    def reached(self, n: int) -> asyncio.Event:
        return self._marks.setdefault(n, asyncio.Event())

    async def _one(self) -> None:
        after = self.rotated.is_set()
        try:
            async with self.client.get(self.url) as resp:
                body = await resp.json()
                self.results.append(LoadResult(resp.status, body.get("client_cert"), after))
                if resp.status != 200:
                    self.errors.append(f"{resp.status}: {body}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.errors.append(repr(exc))
            self.results.append(LoadResult(0, None, after))
        done = len(self.results)
        if done in self._marks:
            self._marks[done].set()

    async def run(self) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(LOAD_REQUESTS):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                await self._one()

        async with asyncio.timeout(90):
            await asyncio.gather(*(worker() for _ in range(LOAD_CONCURRENCY)))


async def drive(load: Load, rotate: Callable[[], Awaitable[None]], at: int = 100) -> None:
    async def rotator() -> None:
        await load.reached(at).wait()
        await rotate()
        load.rotated.set()

    async with asyncio.TaskGroup() as tg:
        rot = tg.create_task(rotator())
        await load.run()
    assert rot.done()


async def test_certificate_rotation_under_load(
    ca: trustme.CA,
    servers: Servers,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    rt = await make_proxy(mtls_config(servers))
    load = Load(client, proxy_url(rt, "/echo/load"))
    tls = rt.config.routes[0].tls

    async def rotate() -> None:
        rotate_identity(ca, servers.ident, "client-two")
        # The maintenance loop does this every 5 s; call the same code path now.
        reloaded = rt.sessions.reload_changed()
        assert reloaded == [str(servers.ident.cert)]
        assert rt.sessions.generation(tls) == 1
        # The credential shares the identity: its next token request uses the new certificate.
        assert rt.refresh_now(_key("demo"))

    await drive(load, rotate)
    assert load.errors == [] and len(load.results) == LOAD_REQUESTS
    before = {r.cert for r in load.results if not r.after_rotation}
    after = {r.cert for r in load.results if r.after_rotation}
    # A request sent just before the reload may reach the proxy just after it: either is fine.
    assert "client-one" in before and before <= {"client-one", "client-two"}
    assert after == {"client-two"}, "a request started after the reload used the old certificate"
    await wait_for(lambda: servers.token.calls[-1].status == 200 and len(servers.token.calls) == 2)
    assert servers.token.invalid_client == 0
    assert any(
        ln.get("event") == "access" and ln.get("status") == 200 for ln in log_capture.lines()
    )


async def test_half_written_rotation_keeps_serving(
    ca: trustme.CA,
    servers: Servers,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    """A certificate replaced before its key: the old pair stays in use until both are there."""
    rt = await make_proxy(mtls_config(servers))
    assert (await get(client, proxy_url(rt, "/echo/a")))[1]["client_cert"] == "client-one"
    other = write_identity(ca, servers.tmp / "next", "client-two")
    atomic_write(servers.ident.cert, other.cert.read_bytes())
    assert rt.sessions.reload_changed() == []
    status, body = await get(client, proxy_url(rt, "/echo/a"))
    assert status == 200 and body["client_cert"] == "client-one"
    atomic_write(servers.ident.key, other.key.read_bytes())
    assert rt.sessions.reload_changed() == [str(servers.ident.cert)]
    status, body = await get(client, proxy_url(rt, "/echo/a"))
    assert status == 200 and body["client_cert"] == "client-two"
    kept = [
        ln for ln in log_capture.lines() if "kept the previous certificate" in ln.get("message", "")
    ]
    assert len(kept) == 1 and "does not match" in kept[0]["message"]


def _key(name: str) -> Any:
    from proxy.models import ChainKey

    return ChainKey(name)


async def _refresh_and_wait(rt: Runtime, client: aiohttp.ClientSession) -> None:
    """Force a token request through the admin API and wait for it to finish."""
    health = rt.engine.tokens.health["demo"]
    before = health.last_refresh_at
    async with client.post(admin_url(rt, "/admin/credentials/demo/refresh")) as resp:
        assert resp.status == 202
    await wait_for(lambda: health.last_refresh_at != before or health.last_error is not None)
    assert health.last_error is None, health.last_error


async def test_client_secret_file_rotation_under_load(
    servers: Servers,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    """The secret file is replaced while the provider accepts both; then the old one dies."""
    secret_file = servers.tmp / "client_secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    rt = await make_proxy(
        mtls_config(servers, credential={"client_secret": {"file": str(secret_file)}})
    )
    new_secret = "rotated-secret-5b1e"
    load = Load(client, proxy_url(rt, "/echo/load"))

    async def rotate() -> None:
        servers.token.add_client_secret(new_secret)  # the provider issues the new secret
        atomic_write(secret_file, (new_secret + "\n").encode())
        await _refresh_and_wait(rt, client)
        servers.token.remove_client_secret(CLIENT_SECRET)  # ... and revokes the old one
        await _refresh_and_wait(rt, client)

    await drive(load, rotate)
    assert load.errors == [] and len(load.results) == LOAD_REQUESTS
    assert servers.token.invalid_client == 0  # the file was re-read: never the old secret
    assert [c.status for c in servers.token.calls] == [200, 200, 200]
    log_capture.assert_clean(CLIENT_SECRET, new_secret)


async def test_client_secret_next_takes_over_under_load(
    servers: Servers,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`client_secret_next`: when the provider refuses the current secret, the next one is used,
    without a failed request and without a restart."""
    new_secret = "next-secret-0c4d"
    monkeypatch.setenv("TEST_NEXT_SECRET", new_secret)
    rt = await make_proxy(
        mtls_config(servers, credential={"client_secret_next": {"env": "TEST_NEXT_SECRET"}})
    )
    load = Load(client, proxy_url(rt, "/echo/load"))

    async def rotate() -> None:
        servers.token.add_client_secret(new_secret)
        servers.token.remove_client_secret(CLIENT_SECRET)
        await _refresh_and_wait(rt, client)
        await _refresh_and_wait(rt, client)

    await drive(load, rotate)
    assert load.errors == [] and len(load.results) == LOAD_REQUESTS
    # First fetch with the old secret, then one refusal and the switch, then the new one first.
    assert [(c.status, c.error) for c in servers.token.calls] == [
        (200, None),
        (401, "invalid_client"),
        (200, None),
        (200, None),
    ]
    log_capture.assert_clean(CLIENT_SECRET, new_secret)
    assert os.environ["TEST_NEXT_SECRET"] == new_secret


# -- the session pool across a rotation ------------------------------------------------------


class FakeClock:
    """An injected monotonic clock the test moves forward."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_in_flight_request_finishes_on_the_old_session(
    ca: trustme.CA, servers: Servers
) -> None:
    """A request held by the upstream across a rotation completes; its session is closed only
    once idle, and new requests meanwhile use the new certificate."""
    clock = FakeClock()
    pool = SessionPool(clock=clock)
    tls = TlsConfig(cert=servers.ident.cert, key=servers.ident.key, ca=servers.ca_file)
    servers.echo.require_token = False  # this test talks to the upstream directly
    held: asyncio.Future[aiohttp.ClientResponse] | None = None
    try:
        old = pool.session_for(tls)
        gate = servers.echo.gate = asyncio.Event()
        held = asyncio.ensure_future(old.get(servers.echo.url / "api" / "held"))
        await wait_for(lambda: servers.echo.held == 1)

        rotate_identity(ca, servers.ident, "client-two")
        assert pool.reload_changed() == [str(servers.ident.cert)]
        new = pool.session_for(tls)
        assert new is not old and repr(pool) == "<SessionPool identities=1 retired=1>"
        servers.echo.gate = None
        async with new.get(servers.echo.url / "api" / "fresh") as resp:
            assert (await resp.json())["client_cert"] == "client-two"

        clock.now += 120
        pool.reload_changed()
        assert not old.closed, "a session with a request in flight was closed"

        gate.set()
        resp = await held
        async with resp:
            body = await resp.json()
        assert resp.status == 200 and body["client_cert"] == "client-one"
        pool.reload_changed()
        await wait_for(lambda: old.closed)
        assert repr(pool) == "<SessionPool identities=1>"
    finally:
        if held is not None and not held.done():
            held.cancel()
        await pool.aclose()


async def test_prune_retires_identities_a_reload_dropped(servers: Servers) -> None:
    clock = FakeClock()
    pool = SessionPool(clock=clock)
    tls = TlsConfig(cert=servers.ident.cert, key=servers.ident.key, ca=servers.ca_file)
    try:
        session = pool.session_for(tls)
        pool.prune({None})
        assert repr(pool) == "<SessionPool identities=0 retired=1>"
        clock.now += 120
        pool.reload_changed()
        await wait_for(lambda: session.closed)
        assert repr(pool) == "<SessionPool identities=0>"
    finally:
        await pool.aclose()
