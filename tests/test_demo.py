"""The demo token server and echo API, driven over loopback with a real aiohttp client."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import signal
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from yarl import URL

from proxy.demo import EchoServer, FaultKind, TokenServer, fingerprint, header_values

CC = {"grant_type": "client_credentials"}


def basic(client_id: str, secret: str, *, encode: bool = True) -> dict[str, str]:
    if encode:
        client_id, secret = quote(client_id, safe=""), quote(secret, safe="")
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


DEMO_AUTH = basic("demo-client", "demo-secret")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(trust_env=False) as s:
        yield s


@pytest.fixture
async def tokens() -> AsyncIterator[TokenServer]:
    server = TokenServer(reuse_grace=30)
    await server.start()
    yield server
    await server.aclose()


async def call(
    session: aiohttp.ClientSession,
    server: TokenServer,
    form: dict[str, str],
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, Any]:
    async with session.post(
        server.token_url, data=form, headers=DEMO_AUTH if headers is None else headers, **kwargs
    ) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def refresh(session: aiohttp.ClientSession, server: TokenServer, rt: str) -> tuple[int, Any]:
    return await call(session, server, {"grant_type": "refresh_token", "refresh_token": rt})


# -- grants and client authentication --------------------------------------------------------


async def test_client_credentials_basic(
    session: aiohttp.ClientSession, tokens: TokenServer
) -> None:
    form = {**CC, "scope": "a b", "audience": "https://api.example.com", "resource": "urn:r1"}
    status, body = await call(session, tokens, form)
    assert status == 200
    assert body["access_token"].startswith("demo-at-")
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 60
    assert body["scope"] == "a b"
    assert "refresh_token" not in body
    assert tokens.is_valid(body["access_token"])
    assert not tokens.is_valid("demo-at-unknown")
    assert tokens.requests == 1
    assert tokens.grants["client_credentials"] == 1
    assert tokens.issued_access_tokens == 1
    last = tokens.last_request
    assert last is not None
    assert (last.auth_method, last.client_id, last.status) == (
        "client_secret_basic",
        "demo-client",
        200,
    )
    assert (last.scope, last.audience, last.resources) == (
        "a b",
        "https://api.example.com",
        ("urn:r1",),
    )


async def test_basic_is_form_urlencoded_per_rfc6749(
    session: aiohttp.ClientSession, tokens: TokenServer
) -> None:
    odd = "p+ss word:/é%"
    tokens.add_client_secret(odd)
    assert (await call(session, tokens, CC, basic("demo-client", odd)))[0] == 200
    # A client that skips the urlencoding step fails on a secret with "+" or "%" in it.
    status, body = await call(session, tokens, CC, basic("demo-client", odd, encode=False))
    assert (status, body) == (401, {"error": "invalid_client"})
    tokens.basic_urlencoded = False
    assert (await call(session, tokens, CC, basic("demo-client", odd, encode=False)))[0] == 200


async def test_client_secret_post_and_secret_rotation(
    session: aiohttp.ClientSession, tokens: TokenServer
) -> None:
    def post(secret: str) -> dict[str, str]:
        return {**CC, "client_id": "demo-client", "client_secret": secret}

    assert (await call(session, tokens, post("demo-secret"), {}))[0] == 200
    assert tokens.last_request is not None
    assert tokens.last_request.auth_method == "client_secret_post"
    assert tokens.last_request.params["client_secret"] == fingerprint("demo-secret")
    tokens.add_client_secret("next-secret")
    assert (await call(session, tokens, post("next-secret"), {}))[0] == 200
    assert (await call(session, tokens, post("demo-secret"), {}))[0] == 200
    tokens.remove_client_secret("demo-secret")
    assert await call(session, tokens, post("demo-secret"), {}) == (
        401,
        {"error": "invalid_client"},
    )
    assert tokens.auth_failures["bad_secret"] == 1
    assert tokens.invalid_client == 1


async def test_wrong_client_is_invalid_client(
    session: aiohttp.ClientSession, tokens: TokenServer
) -> None:
    async with session.post(
        tokens.token_url, data=CC, headers=basic("demo-client", "nope")
    ) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Basic")
        assert await resp.json() == {"error": "invalid_client"}
    assert await call(session, tokens, CC, basic("someone-else", "demo-secret")) == (
        401,
        {"error": "invalid_client"},
    )
    assert (await call(session, tokens, CC, {}))[0] == 401
    both = {**CC, "client_id": "demo-client", "client_secret": "demo-secret"}
    assert await call(session, tokens, both) == (400, {"error": "invalid_request"})
    tokens.auth_methods = {"client_secret_post"}
    assert (await call(session, tokens, CC))[0] == 401
    assert dict(tokens.auth_failures) == {
        "bad_secret": 1,
        "unknown_client": 1,
        "no_credentials": 1,
        "method_not_allowed": 1,
    }


async def test_bad_requests(session: aiohttp.ClientSession, tokens: TokenServer) -> None:
    assert await call(session, tokens, {"grant_type": "password"}) == (
        400,
        {"error": "unsupported_grant_type"},
    )
    assert await call(session, tokens, {"grant_type": "refresh_token"}) == (
        400,
        {"error": "invalid_request"},
    )
    async with session.post(tokens.token_url, json=CC, headers=DEMO_AUTH) as resp:
        assert resp.status == 400
        assert await resp.json() == {"error": "invalid_request"}


def _keypair(alg: str) -> tuple[bytes, bytes]:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if alg == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_private_key_jwt(
    session: aiohttp.ClientSession, tokens: TokenServer, alg: str
) -> None:
    private, public = _keypair(alg)
    tokens.register_jwt_key(public)
    now = time.time()

    def assertion(**overrides: Any) -> dict[str, str]:
        claims = {
            "iss": "demo-client",
            "sub": "demo-client",
            "aud": str(tokens.token_url),
            "jti": uuid.uuid4().hex,
            "iat": int(now),
            "exp": int(now) + 60,
            **overrides,
        }
        signed = jwt.encode(claims, private, algorithm=alg)
        return {
            **CC,
            "client_id": "demo-client",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": signed,
        }

    good = assertion()
    assert (await call(session, tokens, good, {}))[0] == 200
    assert tokens.last_request is not None
    assert tokens.last_request.auth_method == "private_key_jwt"
    assert "client_assertion" not in json.dumps(tokens.last_request.params["client_assertion"])
    rejected = [
        good,  # the same jti again
        assertion(aud="https://elsewhere.example/token"),
        assertion(exp=int(now) + 3600),
        assertion(exp=int(now) - 10),
        assertion(iss="mallory", sub="mallory"),
    ]
    for form in rejected:
        assert await call(session, tokens, form, {}) == (401, {"error": "invalid_client"})
    other_private, _ = _keypair(alg)
    forged = jwt.encode(
        {"iss": "demo-client", "sub": "demo-client", "aud": str(tokens.token_url),
         "jti": "x", "exp": int(now) + 60},
        other_private,
        algorithm=alg,
    )  # fmt: skip
    assert (await call(session, tokens, {**good, "client_assertion": forged}, {}))[0] == 401
    assert dict(tokens.auth_failures) == {
        "jwt_jti_reuse": 1,
        "jwt_aud": 1,
        "jwt_exp_too_far": 1,
        "jwt_exp": 1,
        "jwt_iss_sub": 1,
        "jwt_signature": 1,
    }


@dataclass
class Tls:
    """TLS contexts from a trustme CA, built outside the event loop (they read files)."""

    server: ssl.SSLContext
    clients: dict[str | None, ssl.SSLContext]  # by client certificate CN (None: no certificate)
    fingerprinted: ssl.SSLContext  # a certificate known only by its SHA-256
    fingerprint: str


def _client_context(ca: trustme.CA, leaf: trustme.LeafCert | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if leaf is not None:
        leaf.configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def tls() -> Tls:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca.configure_trust(server)
    server.verify_mode = ssl.CERT_OPTIONAL  # other auth methods work without a certificate
    clients = {
        cn: _client_context(
            ca, ca.issue_cert(f"{cn}.clients.example", common_name=cn) if cn else None
        )
        for cn in ("demo-client", "mallory", "svc-a", None)
    }
    leaf = ca.issue_cert("fp.clients.example", common_name="not-registered")
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    return Tls(server, clients, _client_context(ca, leaf), hashlib.sha256(der).hexdigest())


async def test_tls_client_auth(session: aiohttp.ClientSession, tls: Tls) -> None:
    server = TokenServer()
    await server.start(ssl=tls.server)
    try:
        assert server.token_url.scheme == "https"
        form = {**CC, "client_id": "demo-client"}
        server.register_client_cert(cn="demo-client")
        status, body = await call(session, server, form, {}, ssl=tls.clients["demo-client"])
        assert status == 200
        assert server.last_request is not None
        assert server.last_request.auth_method == "tls_client_auth"
        assert server.is_valid(body["access_token"])
        mallory = tls.clients["mallory"]
        assert await call(session, server, form, {}, ssl=mallory) == (
            401,
            {"error": "invalid_client"},
        )
        # Without a certificate, a bare client_id authenticates nothing.
        assert (await call(session, server, form, {}, ssl=tls.clients[None]))[0] == 401
        # Basic still works on the same TLS port.
        assert (await call(session, server, CC, ssl=tls.clients[None]))[0] == 200
        assert dict(server.auth_failures) == {"cert_mismatch": 1, "no_credentials": 1}
    finally:
        await server.aclose()


async def test_tls_client_auth_by_fingerprint(session: aiohttp.ClientSession, tls: Tls) -> None:
    server = TokenServer()
    await server.start(ssl=tls.server)
    server.register_client_cert(sha256=tls.fingerprint.upper())
    try:
        form = {**CC, "client_id": "demo-client"}
        assert (await call(session, server, form, {}, ssl=tls.fingerprinted))[0] == 200
        assert (await call(session, server, form, {}, ssl=tls.clients["svc-a"]))[0] == 401
    finally:
        await server.aclose()


# -- rotating refresh tokens -----------------------------------------------------------------


async def test_rotation(session: aiohttp.ClientSession, tokens: TokenServer) -> None:
    rt0 = tokens.seed_refresh_token("alice", scope="read")
    status, first = await refresh(session, tokens, rt0)
    assert status == 200
    assert first["refresh_token"].startswith("demo-rt-")
    assert first["refresh_token"] != rt0
    assert first["scope"] == "read"
    status, second = await refresh(session, tokens, first["refresh_token"])
    assert status == 200
    assert tokens.rotations["alice"] == 2
    assert tokens.grants["refresh_token"] == 2
    assert tokens.is_valid(first["access_token"])  # rotation does not void earlier access tokens
    assert tokens.is_valid(second["access_token"])
    assert set(tokens.issued_tokens()) >= {rt0, first["refresh_token"], second["access_token"]}


async def test_reuse_within_grace_returns_the_same_pair(
    session: aiohttp.ClientSession, tokens: TokenServer
) -> None:
    rt0 = tokens.seed_refresh_token()
    _, first = await refresh(session, tokens, rt0)
    status, again = await refresh(session, tokens, rt0)
    assert status == 200
    assert again == first
    assert tokens.grace_reuses == 1
    assert tokens.rotations[None] == 1
    assert tokens.revoked_families == 0
    assert (await refresh(session, tokens, first["refresh_token"]))[0] == 200


@pytest.mark.parametrize("grace", [0.0, 30.0])
async def test_reuse_after_grace_revokes_the_family(
    session: aiohttp.ClientSession, grace: float
) -> None:
    tokens = TokenServer(reuse_grace=grace)
    await tokens.start()
    try:
        rt0 = tokens.seed_refresh_token("bob")
        _, first = await refresh(session, tokens, rt0)
        tokens.clock_offset += grace + 1  # move the server's clock past the window
        assert await refresh(session, tokens, rt0) == (400, {"error": "invalid_grant"})
        assert tokens.revoked_families == 1
        assert not tokens.is_valid(first["access_token"])
        assert await refresh(session, tokens, first["refresh_token"]) == (
            400,
            {"error": "invalid_grant"},
        )
        assert await refresh(session, tokens, "demo-rt-never-issued") == (
            400,
            {"error": "invalid_grant"},
        )
        assert tokens.invalid_grant == 3
        assert tokens.revoked_families == 1
    finally:
        await tokens.aclose()


async def test_non_rotating_refresh_tokens(session: aiohttp.ClientSession) -> None:
    async with TokenServer(rotate_refresh_tokens=False) as tokens:
        assert tokens.url.port
        rt = tokens.seed_refresh_token()
        for _ in range(2):
            status, body = await refresh(session, tokens, rt)
            assert status == 200
            assert "refresh_token" not in body
        assert tokens.rotations.total() == 0
        tokens.revoke(rt)
        assert (await refresh(session, tokens, rt))[0] == 400


async def test_expiry_jwt_tokens_and_clock_offset(session: aiohttp.ClientSession) -> None:
    tokens = TokenServer(expires_in=0.5, jwt_access_tokens=True)
    await tokens.start()
    try:
        tokens.clock_offset = 3600.0
        async with session.post(tokens.token_url, data=CC, headers=DEMO_AUTH) as resp:
            body = await resp.json()
            date = parsedate_to_datetime(resp.headers["Date"]).timestamp()
        assert date > time.time() + 3000
        assert body["expires_in"] == 0.5
        claims = jwt.decode(body["access_token"], tokens.jwt_public_pem, algorithms=["ES256"],
                            options={"verify_exp": False, "verify_iat": False})  # fmt: skip
        assert claims["sub"] == "demo-client"
        assert claims["exp"] > time.time() + 3000
        assert tokens.is_valid(body["access_token"])
        tokens.clock_offset += 1
        assert not tokens.is_valid(body["access_token"])
    finally:
        await tokens.aclose()


async def test_introspection(session: aiohttp.ClientSession, tokens: TokenServer) -> None:
    rt0 = tokens.seed_refresh_token("carol")

    async def introspect(token: str) -> dict[str, Any]:
        async with session.post(tokens.introspect_url, data={"token": token}) as resp:
            assert resp.status == 200
            result: dict[str, Any] = await resp.json()
            return result

    assert (await introspect(rt0))["active"] is True
    _, pair = await refresh(session, tokens, rt0)
    at = await introspect(pair["access_token"])
    assert at["active"] is True
    assert at["sub"] == "carol"
    assert (await introspect(rt0)) == {"active": False}
    assert (await introspect("demo-at-unknown")) == {"active": False}
    tokens.revoke(pair["access_token"])
    assert (await introspect(pair["access_token"])) == {"active": False}
    assert tokens.introspections == 5


# -- faults ----------------------------------------------------------------------------------

MALFORMED: list[tuple[FaultKind, str, Any]] = [
    (FaultKind.HTML_200, "text/html", None),
    (FaultKind.NOT_JSON, "application/json", None),
    (FaultKind.NO_ACCESS_TOKEN, "application/json", {"token_type": "Bearer", "expires_in": 60}),
    (FaultKind.ERROR_200, "application/json", {"error": "invalid_request"}),
]


@pytest.mark.parametrize(("kind", "ctype", "expected"), MALFORMED)
async def test_malformed_200_without_commit(
    session: aiohttp.ClientSession, tokens: TokenServer, kind: FaultKind, ctype: str, expected: Any
) -> None:
    rt = tokens.seed_refresh_token()
    tokens.fail_next(1, kind)
    async with session.post(
        tokens.token_url,
        data={"grant_type": "refresh_token", "refresh_token": rt},
        headers=DEMO_AUTH,
    ) as resp:
        assert resp.status == 200
        assert resp.content_type == ctype
        text = await resp.text()
    if expected is None:
        with pytest.raises(ValueError, match=r"Expecting|Unterminated|Expecting value"):
            json.loads(text)
    else:
        assert json.loads(text) == expected
    assert not kind.commits
    assert tokens.rotations.total() == 0
    assert tokens.faults_served[kind] == 1
    assert (await refresh(session, tokens, rt))[0] == 200  # the chain did not move


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        (FaultKind.TOKEN_TYPE_NOT_BEARER, "token_type", "mac"),
        (FaultKind.EXPIRES_IN_STRING, "expires_in", "60"),
        (FaultKind.EXPIRES_IN_NEGATIVE, "expires_in", -60),
        (FaultKind.EXPIRES_IN_HUGE, "expires_in", 10**12),
        (FaultKind.EXPIRES_IN_MISSING, "expires_in", None),
    ],
)
async def test_lying_fields_are_real_grants(
    session: aiohttp.ClientSession,
    tokens: TokenServer,
    kind: FaultKind,
    field: str,
    value: str | int | None,
) -> None:
    tokens.fail_next(1, kind)
    status, body = await call(session, tokens, CC)
    assert status == 200
    assert body.get(field) == value
    assert kind.commits
    assert tokens.is_valid(body["access_token"])
    assert (await call(session, tokens, CC))[1]["expires_in"] == 60


async def test_http_errors(session: aiohttp.ClientSession, tokens: TokenServer) -> None:
    tokens.fail_next(1, FaultKind.HTTP_500)
    tokens.fail_next(1, FaultKind.HTTP_429, retry_after=7)
    tokens.fail_next(1, FaultKind.HTTP_503, retry_after=3)
    tokens.fail_next(1, FaultKind.HTTP_503)
    tokens.fail_next(1, FaultKind.OAUTH_ERROR, error="invalid_scope")
    seen = []
    for _ in range(5):
        async with session.post(tokens.token_url, data=CC, headers=DEMO_AUTH) as resp:
            seen.append((resp.status, resp.content_type, resp.headers.get("Retry-After")))
    assert seen == [
        (500, "text/html", None),
        (429, "application/json", "7"),
        (503, "application/json", "3"),
        (503, "application/json", None),
        (400, "application/json", None),
    ]
    assert tokens.last_request is not None
    assert tokens.last_request.fault is FaultKind.OAUTH_ERROR
    assert tokens.issued_access_tokens == 0
    assert (await call(session, tokens, CC))[0] == 200
    assert tokens.pending_faults == ()


async def test_fault_counts_and_until_cleared(
    session: aiohttp.ClientSession, tokens: TokenServer
) -> None:
    tokens.fail_next(2, FaultKind.HTTP_500)
    statuses = [(await call(session, tokens, CC))[0] for _ in range(3)]
    assert statuses == [500, 500, 200]
    tokens.fail_next(None, FaultKind.HTTP_503)
    statuses = [(await call(session, tokens, CC))[0] for _ in range(3)]
    assert statuses == [503, 503, 503]
    tokens.clear_faults()
    assert (await call(session, tokens, CC))[0] == 200
    tokens.outage = True
    assert await call(session, tokens, CC) == (503, {"error": "temporarily_unavailable"})
    tokens.outage = False
    assert (await call(session, tokens, CC))[0] == 200
    with pytest.raises(ValueError, match="at least 1"):
        tokens.fail_next(0, FaultKind.HTTP_500)


async def test_500_after_commit_loses_the_pair(
    session: aiohttp.ClientSession, tokens: TokenServer
) -> None:
    rt0 = tokens.seed_refresh_token()
    tokens.fail_next(1, FaultKind.HTTP_500_AFTER_COMMIT)
    status, _ = await refresh(session, tokens, rt0)
    assert status == 500
    assert tokens.rotations[None] == 1
    # Within the grace window the retry gets the pair that was lost.
    status, pair = await refresh(session, tokens, rt0)
    assert status == 200
    assert tokens.grace_reuses == 1
    assert tokens.is_valid(pair["access_token"])


@pytest.mark.parametrize(
    ("kind", "rotations"), [(FaultKind.DROP, 0), (FaultKind.DROP_AFTER_COMMIT, 1)]
)
async def test_dropped_connection(
    session: aiohttp.ClientSession, tokens: TokenServer, kind: FaultKind, rotations: int
) -> None:
    rt0 = tokens.seed_refresh_token()
    tokens.fail_next(1, kind)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await refresh(session, tokens, rt0)
    assert tokens.rotations.total() == rotations
    assert tokens.last_request is not None
    assert tokens.last_request.status is None
    assert (await refresh(session, tokens, rt0))[0] == 200
    assert tokens.grace_reuses == rotations


async def test_slow_and_hanging_answers(
    session: aiohttp.ClientSession, tokens: TokenServer
) -> None:
    tokens.fail_next(1, FaultKind.SLOW, delay=30)
    with pytest.raises(asyncio.TimeoutError):
        await call(session, tokens, CC, timeout=aiohttp.ClientTimeout(total=0.2))
    tokens.fail_next(1, FaultKind.HANG)
    async with session.post(
        tokens.token_url, data=CC, headers=DEMO_AUTH, timeout=aiohttp.ClientTimeout(sock_read=0.2)
    ) as resp:
        assert resp.status == 200
        with pytest.raises(asyncio.TimeoutError):
            await resp.read()
    await tokens.wait_requests(2)
    assert tokens.faults_served[FaultKind.SLOW] == tokens.faults_served[FaultKind.HANG] == 1
    # Both handlers are still parked server-side; closing must not wait for them.
    async with asyncio.timeout(5):
        await tokens.aclose()


async def test_slow_commits_after_the_delay(
    session: aiohttp.ClientSession, tokens: TokenServer
) -> None:
    tokens.fail_next(1, FaultKind.SLOW, delay=0.01)
    assert (await call(session, tokens, CC))[0] == 200


async def test_gate_holds_calls_until_set(
    session: aiohttp.ClientSession, tokens: TokenServer
) -> None:
    tokens.gate = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        calls = [tg.create_task(call(session, tokens, CC)) for _ in range(3)]
        await tokens.wait_requests(3)
        assert tokens.held == 3
        assert not any(c.done() for c in calls)
        assert tokens.issued_access_tokens == 0
        tokens.gate.set()
    assert [c.result()[0] for c in calls] == [200, 200, 200]
    assert tokens.held == 0


async def test_token_values_never_in_call_records(
    session: aiohttp.ClientSession, tokens: TokenServer
) -> None:
    rt0 = tokens.seed_refresh_token()
    _, pair = await refresh(session, tokens, rt0)
    records = repr(list(tokens.calls)) + repr(tokens) + json.dumps(tokens.stats())
    for secret in [*tokens.issued_tokens(), "demo-secret", pair["refresh_token"]]:
        assert secret not in records


# -- echo API --------------------------------------------------------------------------------


@pytest.fixture
async def echo(tokens: TokenServer) -> AsyncIterator[EchoServer]:
    server = EchoServer(tokens=tokens)
    await server.start()
    yield server
    await server.aclose()


async def a_token(session: aiohttp.ClientSession, tokens: TokenServer) -> str:
    status, body = await call(session, tokens, CC)
    assert status == 200
    token: str = body["access_token"]
    return token


async def test_echo_describes_the_request(
    session: aiohttp.ClientSession, tokens: TokenServer, echo: EchoServer
) -> None:
    token = await a_token(session, tokens)
    url = (echo.url / "v4" / "accounts").with_query("a=1&b=two")
    headers = {"Authorization": f"Bearer {token}", "X-Thing": "1"}
    async with session.put(url, data=b"hello", headers=headers) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["method"] == "PUT"
    assert body["path"] == "/v4/accounts"
    assert body["query"] == "a=1&b=two"
    assert header_values(body, "x-thing") == ["1"]
    assert body["body_length"] == 5
    assert body["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert body["token_valid"] is True
    assert body["client_cert"] is None
    assert echo.requests == 1
    assert echo.requests_by_token[token] == 1
    assert echo.last_request is not None
    assert echo.last_request.header("X-THING") == "1"


async def test_echo_requires_a_valid_token(
    session: aiohttp.ClientSession, tokens: TokenServer, echo: EchoServer
) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer demo-at-forged"},
        {"Authorization": "Basic eDp5"},
    ):
        async with session.get(echo.url / "x", headers=headers) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert echo.unauthorized == 3
    open_echo = EchoServer(require_token=False)
    await open_echo.start()
    try:
        async with session.get(open_echo.url / "x") as resp:
            assert resp.status == 200
            assert (await resp.json())["token_valid"] is None
    finally:
        await open_echo.aclose()


async def test_echo_checks_tokens_by_introspection(
    session: aiohttp.ClientSession, tokens: TokenServer
) -> None:
    echo = EchoServer(introspect_url=tokens.introspect_url)
    await echo.start()
    try:
        token = await a_token(session, tokens)
        auth = {"Authorization": f"Bearer {token}"}
        async with session.get(echo.url / "x", headers=auth) as resp:
            assert resp.status == 200
        tokens.revoke(token)
        async with session.get(echo.url / "x", headers=auth) as resp:
            assert resp.status == 401
        assert tokens.introspections == 2
    finally:
        await echo.aclose()


async def test_echo_special_paths(
    session: aiohttp.ClientSession, tokens: TokenServer, echo: EchoServer
) -> None:
    auth = {"Authorization": f"Bearer {await a_token(session, tokens)}"}
    async with session.get(
        (echo.url / "api" / "_redirect").with_query(to="https://elsewhere.example/x"),
        headers=auth,
        allow_redirects=False,
    ) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "https://elsewhere.example/x"
    async with session.get(echo.url / "api" / "_status" / "418", headers=auth) as resp:
        assert resp.status == 418
        assert (await resp.json())["path"] == "/api/_status/418"
    async with session.delete(echo.url / "_status" / "204", headers=auth) as resp:
        assert resp.status == 204
    async with session.get((echo.url / "a" / "_slow").with_query(delay="0"), headers=auth) as resp:
        assert resp.status == 200


async def test_echo_401_injection(
    session: aiohttp.ClientSession, tokens: TokenServer, echo: EchoServer
) -> None:
    first = await a_token(session, tokens)
    second = await a_token(session, tokens)

    async def get(path: str, token: str) -> int:
        async with session.get(echo.url / path, headers={"Authorization": f"Bearer {token}"}) as r:
            return int(r.status)

    assert await get("x/_401_once", first) == 401
    assert await get("x/other", first) == 401  # that token stays rejected
    assert await get("x/_401_once", second) == 401
    third = await a_token(session, tokens)
    assert await get("x/other", third) == 200
    echo.reject_next(2)
    assert [await get("y", third) for _ in range(3)] == [401, 401, 200]
    assert echo.unauthorized == 5


async def test_echo_streams_big_bodies(
    session: aiohttp.ClientSession, tokens: TokenServer, echo: EchoServer
) -> None:
    auth = {"Authorization": f"Bearer {await a_token(session, tokens)}"}
    size = 48 * 1024 * 1024 + 7
    expected = hashlib.sha256()
    block = bytes(range(256)) * 4096  # 1 MiB

    async def upload() -> AsyncIterator[bytes]:
        left = size
        while left > 0:
            piece = block[: min(left, len(block))]
            expected.update(piece)
            left -= len(piece)
            yield piece

    async with session.post(echo.url / "up", data=upload(), headers=auth) as resp:
        body = await resp.json()
    assert (body["body_length"], body["body_sha256"]) == (size, expected.hexdigest())

    received = 0
    async with session.get(
        (echo.url / "dl" / "_big").with_query(size=str(size)), headers=auth
    ) as resp:
        assert resp.status == 200
        assert resp.content_length == size
        async for chunk in resp.content.iter_chunked(1 << 20):
            received += len(chunk)
    assert received == size


async def test_echo_reports_client_certificate(session: aiohttp.ClientSession, tls: Tls) -> None:
    echo = EchoServer(require_token=False)
    await echo.start(ssl=tls.server)
    try:
        async with session.get(echo.url / "x", ssl=tls.clients["svc-a"]) as resp:
            assert (await resp.json())["client_cert"] == "svc-a"
        async with session.get(echo.url / "x", ssl=tls.clients[None]) as resp:
            assert (await resp.json())["client_cert"] is None
    finally:
        await echo.aclose()


async def test_echo_gate(
    session: aiohttp.ClientSession, tokens: TokenServer, echo: EchoServer
) -> None:
    echo.gate = asyncio.Event()
    auth = {"Authorization": f"Bearer {await a_token(session, tokens)}"}

    async def get() -> int:
        async with session.get(echo.url / "x", headers=auth) as resp:
            return int(resp.status)

    async with asyncio.TaskGroup() as tg:
        pending = tg.create_task(get())
        await echo.wait_requests(1)
        assert echo.held == 1
        assert not pending.done()
        echo.gate.set()
    assert pending.result() == 200


# -- separate process ------------------------------------------------------------------------


async def test_servers_process(session: aiohttp.ClientSession) -> None:
    argv = ["servers", "--reuse-grace", "5", "--expires-in", "30"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.demo", *argv, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        urls = json.loads(line)
        token_url, echo_url = URL(urls["token_url"]), URL(urls["echo"])
        base = URL(urls["token_server"])
        async with session.post(base / "_demo" / "seed", json={"subject": "dave"}) as resp:
            rt = (await resp.json())["refresh_token"]
        async with session.post(
            base / "_demo" / "faults", json={"kind": "http_503", "n": 1}
        ) as resp:
            assert resp.status == 200
        form = {"grant_type": "refresh_token", "refresh_token": rt}
        async with session.post(token_url, data=form, headers=DEMO_AUTH) as resp:
            assert resp.status == 503
        async with session.post(token_url, data=form, headers=DEMO_AUTH) as resp:
            pair = await resp.json()
        assert pair["expires_in"] == 30
        auth = {"Authorization": f"Bearer {pair['access_token']}"}
        async with session.get(echo_url / "hello", headers=auth) as resp:
            assert (await resp.json())["token_valid"] is True
        async with session.get(base / "_demo" / "stats") as resp:
            stats = await resp.json()
        assert stats["rotations"] == {"dave": 1}
        assert stats["faults_served"] == {"http_503": 1}
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
