"""Client authentication at the token endpoint (RFC 6749 2.3, RFC 7523, RFC 8705).

An explicit table maps `auth_method` to a function that adds what the method needs to the
form and headers of one token request.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.config import CredentialConfig, SecretRef
from proxy.errors import InvalidClient
from proxy.models import Secret
from proxy.tlsconfig import TlsError, parse_private_key

JWT_ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME: Final = 60.0


@dataclass(slots=True)
class TokenRequestParts:
    """What one token request sends: form fields and headers (values may be secret)."""

    form: dict[str, str]
    headers: dict[str, str]


AuthStep = Callable[[CredentialConfig, TokenRequestParts, Secret | None], None]


def _client_id(cred: CredentialConfig) -> str:
    return cred.client_id.resolve().reveal() if cred.client_id else ""


def _secret_basic(cred: CredentialConfig, parts: TokenRequestParts, secret: Secret | None) -> None:
    # RFC 6749 2.3.1: id and secret are form-urlencoded before the Basic encoding.
    user = quote(_client_id(cred), safe="")
    password = quote(secret.reveal() if secret else "", safe="")
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    parts.headers["Authorization"] = f"Basic {raw}"


def _secret_post(cred: CredentialConfig, parts: TokenRequestParts, secret: Secret | None) -> None:
    parts.form["client_id"] = _client_id(cred)
    parts.form["client_secret"] = secret.reveal() if secret else ""


def _private_key_jwt(
    cred: CredentialConfig, parts: TokenRequestParts, secret: Secret | None
) -> None:
    # RFC 7523 2.2 / 3: a short-lived assertion signed by the client's key, aud = token endpoint,
    # a fresh jti every time (servers refuse a replayed jti).
    key, alg = signing_key(cred)
    client_id = _client_id(cred)
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": str(cred.token_url),
        "jti": uuid.uuid4().hex,
        "iat": now,
        "exp": now + int(ASSERTION_LIFETIME),
    }
    headers = {"kid": cred.key_id} if cred.key_id else None
    parts.form["client_id"] = client_id
    parts.form["client_assertion_type"] = JWT_ASSERTION_TYPE
    parts.form["client_assertion"] = jwt.encode(claims, key, algorithm=alg, headers=headers)


SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# One parsed key per (credential, key text): the key file is re-read when it changes
# (SecretRef.resolve), and a rotated key is parsed once.
_KEYS: dict[tuple[str, str], tuple[SigningKey, str]] = {}


def signing_key(cred: CredentialConfig) -> tuple[SigningKey, str]:
    """The credential's `private_key` and its JWS algorithm; `InvalidClient` when unusable.

    The algorithm is `private_key_alg` when set, else RS256 for an RSA key and ES256 for an
    EC P-256 key. An encrypted key is decrypted with `private_key_password` (when the config
    offers that key)."""
    if cred.private_key is None:
        raise InvalidClient(
            "private_key_missing", f"{cred.name}: private_key_jwt needs private_key"
        )
    try:
        pem = cred.private_key.resolve().reveal()
    except (OSError, KeyError) as exc:
        raise InvalidClient(
            "private_key_unreadable",
            f"cannot read the private key of {cred.name} ({cred.private_key.describe()}): {exc}",
        ) from None
    cache_key = (cred.name, hashlib.sha256(pem.encode()).hexdigest())
    cached = _KEYS.get(cache_key)
    if cached is not None:
        return cached
    where = cred.private_key.name if cred.private_key.source == "file" else cred.name
    password_ref: SecretRef | None = getattr(cred, "private_key_password", None)
    try:
        key = parse_private_key(
            pem.encode(), where, password_ref, "private key", "private_key_password"
        )
    except TlsError as exc:
        raise InvalidClient("private_key_unusable", str(exc)) from None
    if isinstance(key, rsa.RSAPrivateKey):
        alg = cred.private_key_alg or "RS256"
        ok = alg in ("RS256", "PS256")
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        alg = cred.private_key_alg or "ES256"
        ok = alg == "ES256" and key.curve.name == "secp256r1"
    else:
        alg, ok = cred.private_key_alg or "?", False
    if not ok:
        raise InvalidClient(
            "private_key_unusable",
            f"private key {where} cannot sign {alg} (RS256/PS256 need RSA, ES256 needs EC P-256)",
        )
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    if len(_KEYS) > 64:
        _KEYS.clear()
    _KEYS[cache_key] = (key, alg)
    return key, alg


def _tls_client_auth(
    cred: CredentialConfig, parts: TokenRequestParts, secret: Secret | None
) -> None:
    # RFC 8705 2: the certificate on the TLS session is the credential; only client_id is sent.
    # The session is the credential's own TLS identity (tls.cert), so the handshake carries it.
    parts.form["client_id"] = _client_id(cred)


AUTH_STEPS: Final[dict[str, AuthStep]] = {
    "client_secret_basic": _secret_basic,
    "client_secret_post": _secret_post,
    "private_key_jwt": _private_key_jwt,
    "tls_client_auth": _tls_client_auth,
}

USES_CLIENT_SECRET: Final = frozenset({"client_secret_basic", "client_secret_post"})
