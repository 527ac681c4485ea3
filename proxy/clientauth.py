"""Client authentication at the token endpoint (RFC 6749 2.3, RFC 7523, RFC 8705).

An explicit table maps `auth_method` to a function that adds what the method needs to the
form and headers of one token request.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

import jwt

from proxy.config import CredentialConfig
from proxy.models import Secret

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
    assert cred.private_key is not None  # config validation requires it
    pem = cred.private_key.resolve().reveal()
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
    alg = cred.private_key_alg or ("ES256" if "EC PRIVATE" in pem or _is_ec(pem) else "RS256")
    headers = {"kid": cred.key_id} if cred.key_id else None
    parts.form["client_id"] = client_id
    parts.form["client_assertion_type"] = JWT_ASSERTION_TYPE
    parts.form["client_assertion"] = jwt.encode(claims, pem, algorithm=alg, headers=headers)


def _is_ec(pem: str) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        return isinstance(
            load_pem_private_key(pem.encode(), password=None), ec.EllipticCurvePrivateKey
        )
    except (ValueError, TypeError):
        return False


def _tls_client_auth(
    cred: CredentialConfig, parts: TokenRequestParts, secret: Secret | None
) -> None:
    # RFC 8705 2: the certificate on the TLS session is the credential; only client_id is sent.
    parts.form["client_id"] = _client_id(cred)


AUTH_STEPS: Final[dict[str, AuthStep]] = {
    "client_secret_basic": _secret_basic,
    "client_secret_post": _secret_post,
    "private_key_jwt": _private_key_jwt,
    "tls_client_auth": _tls_client_auth,
}

USES_CLIENT_SECRET: Final = frozenset({"client_secret_basic", "client_secret_post"})
