"""Client authentication at the token endpoint, verified by a real token server on loopback:
the demo TokenServer checks Basic/POST secrets, RFC 7523 assertions (signature, iss, sub, aud,
exp, jti) and RFC 8705 client certificates itself."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.clientauth import AUTH_STEPS, JWT_ASSERTION_TYPE, TokenRequestParts
from proxy.config import CredentialConfig, parse_config
from proxy.demo import TokenServer
from proxy.errors import InvalidClient, TokenNetworkError, TokenTimeout
from proxy.metrics import Metrics
from proxy.oauth import TokenEndpoint
from proxy.transport import SessionPool
from tests.conftest import CLIENT_SECRET
from tests.tls_helpers import server_context, write_ca, write_identity


def credential(tmp_path: Path, token_url: object, **fields: Any) -> CredentialConfig:
    raw = {
        "store": {"kind": "memory"},
        "credentials": {"pay": {"token_url": str(token_url), "client_id": "demo-client", **fields}},
    }
    return parse_config(raw, base_dir=tmp_path).credentials["pay"]


def write_key(tmp_path: Path, kind: str) -> tuple[Path, bytes]:
    """A private key file (RSA 2048 or EC P-256) and its public PEM."""
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / f"{kind}-signing.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, public


@pytest.fixture
async def pool() -> AsyncIterator[SessionPool]:
    sessions = SessionPool()
    yield sessions
    await sessions.aclose()


def endpoint(cred: CredentialConfig, pool: SessionPool) -> TokenEndpoint:
    return TokenEndpoint(cred, lambda: pool.session_for(cred.tls), Metrics())


@pytest.mark.parametrize(("kind", "alg"), [("rsa", "RS256"), ("ec", "ES256"), ("rsa", "PS256")])
async def test_private_key_jwt_assertion(
    token_server: TokenServer, pool: SessionPool, tmp_path: Path, kind: str, alg: str
) -> None:
    key_file, public = write_key(tmp_path, kind)
    fields: dict[str, Any] = {
        "auth_method": "private_key_jwt",
        "private_key": {"file": str(key_file)},
    }
    if alg == "PS256":
        fields["private_key_alg"] = "PS256"
    cred = credential(tmp_path, token_server.token_url, key_id="k1", **fields)

    parts = TokenRequestParts(form={}, headers={})
    AUTH_STEPS["private_key_jwt"](cred, parts, None)
    assertion = parts.form["client_assertion"]
    assert parts.form["client_assertion_type"] == JWT_ASSERTION_TYPE
    assert jwt.get_unverified_header(assertion) == {"alg": alg, "kid": "k1", "typ": "JWT"}
    claims = jwt.decode(assertion, public, algorithms=[alg], audience=str(token_server.token_url))
    assert claims["iss"] == claims["sub"] == "demo-client"
    assert 0 < claims["exp"] - claims["iat"] <= 60
    assert "Authorization" not in parts.headers and "client_secret" not in parts.form

    if alg == "PS256":
        return  # the demo server verifies RS256 and ES256 only
    token_server.register_jwt_key(public, kid="k1")
    ep = endpoint(cred, pool)
    first = await ep.client_credentials()
    second = await ep.client_credentials()  # a fresh jti: the server refuses a replayed one
    assert token_server.is_valid(first.access_token.value)
    assert token_server.is_valid(second.access_token.value)
    assert [c.auth_method for c in token_server.calls] == ["private_key_jwt"] * 2
    assert token_server.invalid_client == 0


async def test_private_key_jwt_with_an_unregistered_key_is_refused(
    token_server: TokenServer, pool: SessionPool, tmp_path: Path
) -> None:
    key_file, _ = write_key(tmp_path, "ec")
    (tmp_path / "other").mkdir()
    # Same key type: the demo server's PyJWT raises TypeError (a 500) for an EC assertion
    # checked against an RSA key; reported to the demo's owner.
    _, other_public = write_key(tmp_path / "other", "ec")
    token_server.register_jwt_key(other_public)
    cred = credential(
        tmp_path,
        token_server.token_url,
        auth_method="private_key_jwt",
        private_key={"file": str(key_file)},
    )
    with pytest.raises(InvalidClient):
        await endpoint(cred, pool).client_credentials()
    assert token_server.auth_failures["jwt_signature"] == 1


async def test_private_key_jwt_with_an_encrypted_key_and_its_password(
    token_server: TokenServer, pool: SessionPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = "key-passphrase-5e1f"
    key = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "encrypted.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password.encode()),
        )
    )
    token_server.register_jwt_key(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    monkeypatch.setenv("KEY_PASSWORD", password)
    fields: dict[str, Any] = {
        "auth_method": "private_key_jwt",
        "private_key": {"file": str(key_file)},
    }
    without = credential(tmp_path, token_server.token_url, **fields)
    with pytest.raises(InvalidClient) as info:
        await endpoint(without, pool).client_credentials()
    assert "private_key_password" in str(info.value)
    assert not token_server.calls  # refused before any call
    cred = credential(
        tmp_path, token_server.token_url, private_key_password={"env": "KEY_PASSWORD"}, **fields
    )
    token = (await endpoint(cred, pool).client_credentials()).access_token
    assert token_server.is_valid(token.value)
    assert [c.auth_method for c in token_server.calls] == ["private_key_jwt"]
    assert password not in str(info.value)


def test_a_key_that_cannot_sign_the_algorithm_is_a_clean_error(tmp_path: Path) -> None:
    key_file, _ = write_key(tmp_path, "rsa")
    cred = credential(
        tmp_path,
        "https://idp.example.com/token",
        auth_method="private_key_jwt",
        private_key={"file": str(key_file)},
        private_key_alg="ES256",
    )
    with pytest.raises(InvalidClient) as info:
        AUTH_STEPS["private_key_jwt"](cred, TokenRequestParts({}, {}), None)
    message = str(info.value)
    assert f"private key {key_file} cannot sign ES256" in message
    # The key itself, not just its PEM marker: every base64 line of its body.
    body_lines = [ln for ln in key_file.read_text().splitlines() if not ln.startswith("-----")]
    assert len(body_lines) > 10  # an RSA 2048 key: the scan has something to find
    for line in body_lines:
        assert line not in message
    assert "PRIVATE KEY" not in message


async def test_tls_client_auth_uses_the_certificate_as_the_credential(
    ca: trustme.CA, pool: SessionPool, tmp_path: Path
) -> None:
    server = TokenServer(client_secret=CLIENT_SECRET, token_prefix="tst")
    await server.start(ssl=server_context(ca, client_certs=ssl.CERT_OPTIONAL))
    try:
        good = write_identity(ca, tmp_path / "good", "payments-client")
        stranger = write_identity(ca, tmp_path / "stranger", "someone-else")
        ca_file = write_ca(ca, tmp_path / "ca.pem")
        server.register_client_cert(cn="payments-client")
        cred = credential(
            tmp_path,
            server.token_url,
            auth_method="tls_client_auth",
            tls={"cert": str(good.cert), "key": str(good.key), "ca": str(ca_file)},
        )
        parts = TokenRequestParts({}, {})
        AUTH_STEPS["tls_client_auth"](cred, parts, None)
        assert parts.form == {"client_id": "demo-client"} and parts.headers == {}

        answer = await endpoint(cred, pool).client_credentials()
        assert server.is_valid(answer.access_token.value)
        assert server.calls[-1].auth_method == "tls_client_auth"

        other = credential(
            tmp_path,
            server.token_url,
            auth_method="tls_client_auth",
            tls={"cert": str(stranger.cert), "key": str(stranger.key), "ca": str(ca_file)},
        )
        with pytest.raises(InvalidClient):
            await endpoint(other, pool).client_credentials()
        assert server.auth_failures["cert_mismatch"] == 1
    finally:
        await server.aclose()


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_secret_methods_over_mtls(
    ca: trustme.CA, pool: SessionPool, tmp_path: Path, method: str
) -> None:
    """A token server that requires a client certificate: the secret methods ride on mTLS,
    and without a certificate the handshake is refused."""
    server = TokenServer(client_secret=CLIENT_SECRET, token_prefix="tst")
    await server.start(ssl=server_context(ca, client_certs=ssl.CERT_REQUIRED))
    try:
        ident = write_identity(ca, tmp_path, "payments-client")
        ca_file = write_ca(ca, tmp_path / "ca.pem")
        cred = credential(
            tmp_path,
            server.token_url,
            auth_method=method,
            client_secret={"env": "TEST_CLIENT_SECRET"},
            tls={"cert": str(ident.cert), "key": str(ident.key), "ca": str(ca_file)},
        )
        answer = await endpoint(cred, pool).client_credentials()
        assert server.is_valid(answer.access_token.value)
        assert server.calls[-1].auth_method == method

        no_cert = credential(
            tmp_path,
            server.token_url,
            auth_method=method,
            client_secret={"env": "TEST_CLIENT_SECRET"},
            tls={"ca": str(ca_file)},
        )
        before = server.requests
        with pytest.raises((TokenNetworkError, TokenTimeout)):
            await endpoint(no_cert, pool).client_credentials(budget=3.0)
        assert server.requests == before  # refused at the handshake: no HTTP request was served
    finally:
        await server.aclose()


async def test_second_secret_is_tried_on_invalid_client(
    token_server: TokenServer, pool: SessionPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_OLD_SECRET", "old-secret-that-was-revoked")
    cred = credential(
        tmp_path,
        token_server.token_url,
        client_secret={"env": "TEST_OLD_SECRET"},
        client_secret_next={"env": "TEST_CLIENT_SECRET"},
    )
    ep = endpoint(cred, pool)
    await ep.client_credentials()
    assert token_server.auth_failures["bad_secret"] == 1
    await ep.client_credentials()  # the secret that worked is tried first from now on
    assert token_server.auth_failures["bad_secret"] == 1
    assert [c.error for c in token_server.calls] == ["invalid_client", None, None]
