"""The demo OAuth2 authorization server (`TokenServer`): RFC 6749 token endpoint with four
client authentication methods, rotating refresh tokens with a reuse grace window and family
revocation on theft, fault switches, and RFC 7662 introspection. Token values never reach a
log line: only `fingerprint()`s are kept in the call records."""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import enum
import hashlib
import json
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Final
from urllib.parse import unquote_plus

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from yarl import URL

from proxy.demo_http import LoopbackServer, peer_cert
from proxy.models import Secret

JWT_BEARER: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
AUTH_METHODS: Final = frozenset(
    {"client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth"}
)
MAX_ASSERTION_LIFETIME: Final = 300.0  # RFC 7523 leaves it to the server; 5 minutes is common
SENSITIVE_PARAMS: Final = frozenset({"client_secret", "client_assertion", "refresh_token", "token"})
HTML_500: Final = "<html><body><h1>500 Internal Server Error</h1></body></html>"


def fingerprint(value: str) -> str:
    """The tag kept in call records instead of a secret (same form as `proxy.models`)."""
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:12]


class FaultKind(enum.StrEnum):
    """What the token endpoint does instead of (or on top of) a normal answer.

    `commits` says whether the grant is processed and stored before the fault shows: a
    committing fault on a refresh grant rotates the chain server-side even though the client
    never learns the new pair (or learns it through a lying field).
    """

    HTTP_500 = "http_500"  # 500, HTML body
    HTTP_500_AFTER_COMMIT = "http_500_after_commit"  # grant stored, then 500 HTML
    DROP = "drop"  # connection closed without a response
    DROP_AFTER_COMMIT = "drop_after_commit"  # grant stored, then connection closed
    HTTP_429 = "http_429"  # 429 with Retry-After (default 1)
    HTTP_503 = "http_503"  # 503, Retry-After only when given
    OAUTH_ERROR = "oauth_error"  # 400 {"error": <error>}
    SLOW = "slow"  # waits `delay` seconds, then answers normally
    HANG = "hang"  # 200 headers and half a body, then nothing until the server closes
    HTML_200 = "html_200"  # 200 text/html
    NOT_JSON = "not_json"  # 200 application/json that does not parse
    NO_ACCESS_TOKEN = "no_access_token"
    ERROR_200 = "error_200"  # 200 {"error": <error>} (GitHub style)
    # 400 {"error": <error>, "error_description": the secrets the call carried, raw and
    # percent-encoded}: a provider that quotes what it refused.
    ECHO_SECRETS = "echo_secrets"
    TOKEN_TYPE_NOT_BEARER = "token_type_not_bearer"
    EXPIRES_IN_STRING = "expires_in_string"  # real grant, "expires_in": "60"
    EXPIRES_IN_NEGATIVE = "expires_in_negative"  # real grant, "expires_in": -60
    EXPIRES_IN_HUGE = "expires_in_huge"  # real grant, "expires_in": 10**12
    EXPIRES_IN_MISSING = "expires_in_missing"  # real grant, no expires_in

    @property
    def commits(self) -> bool:
        return self in _COMMITTING


_COMMITTING: Final = frozenset(
    {
        FaultKind.HTTP_500_AFTER_COMMIT,
        FaultKind.DROP_AFTER_COMMIT,
        FaultKind.SLOW,
        FaultKind.TOKEN_TYPE_NOT_BEARER,
        FaultKind.EXPIRES_IN_STRING,
        FaultKind.EXPIRES_IN_NEGATIVE,
        FaultKind.EXPIRES_IN_HUGE,
        FaultKind.EXPIRES_IN_MISSING,
    }
)
_LYING_FIELDS: Final[dict[FaultKind, Callable[[dict[str, Any]], None]]] = {
    FaultKind.TOKEN_TYPE_NOT_BEARER: lambda b: b.update(token_type="mac"),
    FaultKind.EXPIRES_IN_STRING: lambda b: b.update(expires_in=str(b.get("expires_in", 60))),
    FaultKind.EXPIRES_IN_NEGATIVE: lambda b: b.update(expires_in=-60),
    FaultKind.EXPIRES_IN_HUGE: lambda b: b.update(expires_in=10**12),
    FaultKind.EXPIRES_IN_MISSING: lambda b: b.pop("expires_in", None),
}


@dataclass(slots=True)
class Fault:
    """One queued fault: applies to the next `remaining` calls (None: until cleared)."""

    kind: FaultKind
    remaining: int | None
    delay: float = 1.0
    retry_after: int | None = None
    error: str = "invalid_request"


@dataclass(slots=True)
class TokenCall:
    """What one token-endpoint call carried and got. Secret values are fingerprints."""

    grant_type: str | None
    auth_method: str | None
    client_id: str | None
    scope: str | None
    audience: str | None
    resources: tuple[str, ...]
    params: dict[str, str]
    fault: FaultKind | None
    status: int | None = None  # None: no answer (dropped, hanging, or still in progress)
    error: str | None = None  # the OAuth `error` answered, if any


class _Family:
    """A rotating refresh-token chain: revoking it voids all its refresh and access tokens."""

    __slots__ = ("id", "revoked", "scope", "subject")

    def __init__(self, subject: str | None, scope: str | None) -> None:
        self.id = secrets.token_hex(6)
        self.subject = subject
        self.scope = scope
        self.revoked = False


@dataclass(slots=True)
class _Access:
    expires_at: float
    subject: str | None
    scope: str | None
    family: _Family | None
    revoked: bool = False

    def active(self, now: float) -> bool:
        family_ok = self.family is None or not self.family.revoked
        return not self.revoked and family_ok and now < self.expires_at


@dataclass(slots=True)
class _Refresh:
    family: _Family
    used_at: float | None = None
    answer: dict[str, Any] | None = None  # the pair issued when it was used (grace reuse)


class _OAuthError(Exception):
    def __init__(self, status: int, error: str, reason: str, basic: bool = False) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.reason = reason  # why, for `auth_failures` (never a secret)
        self.basic = basic  # answer with WWW-Authenticate: Basic


def _num(seconds: float) -> int | float:
    return int(seconds) if float(seconds).is_integer() else seconds


class TokenServer(LoopbackServer):
    """A demo OAuth2 authorization server (token and introspection endpoints).

    >>> server = TokenServer(reuse_grace=30)
    >>> await server.start()
    >>> rt = server.seed_refresh_token("alice")
    >>> server.fail_next(1, FaultKind.HTTP_500_AFTER_COMMIT)

    Time is the server's own clock, `now() = time.time() + clock_offset`: it stamps the `Date`
    header and decides expiry, JWT `exp` and grace windows, so a test can move the server's
    clock instead of sleeping.
    """

    def __init__(
        self,
        *,
        client_id: str = "demo-client",
        client_secret: str = "demo-secret",  # noqa: S107 (the demo's published secret)
        expires_in: float = 60,
        rotate_refresh_tokens: bool = True,
        reuse_grace: float = 0.0,
        token_prefix: str = "demo",  # noqa: S107
        jwt_access_tokens: bool = False,
    ) -> None:
        super().__init__()
        self.client_id = client_id
        self.client_secrets: set[str] = {client_secret}
        self.expires_in = expires_in
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.reuse_grace = reuse_grace
        self.token_prefix = token_prefix
        self.jwt_access_tokens = jwt_access_tokens
        self.token_type = "Bearer"
        self.clock_offset = 0.0
        self.outage = False  # every token call answers 503 while True
        self.auth_methods: set[str] = set(AUTH_METHODS)  # the methods this client may use
        self.basic_urlencoded = True  # RFC 6749 2.3.1; False: take Basic id/secret raw
        # Counters.
        self.grants: collections.Counter[str] = collections.Counter()
        self.invalid_grant = 0
        self.invalid_client = 0
        self.auth_failures: collections.Counter[str] = collections.Counter()
        self.revoked_families = 0
        self.rotations: collections.Counter[str | None] = collections.Counter()  # by subject
        self.grace_reuses = 0
        self.issued_access_tokens = 0
        self.introspections = 0
        self.faults_served: collections.Counter[FaultKind] = collections.Counter()
        self.calls: collections.deque[TokenCall] = collections.deque(maxlen=1000)
        # State.
        self._faults: list[Fault] = []
        self._access: dict[str, _Access] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._jwt_keys: list[tuple[str | None, Any]] = []
        self._jti_seen: set[str] = set()
        self._cert_cns: set[str] = set()
        self._cert_sha256: set[str] = set()
        self._signing_key: ec.EllipticCurvePrivateKey | None = None

    def __repr__(self) -> str:
        return (
            f"<TokenServer {self.url} requests={self.requests} grants={dict(self.grants)} "
            f"invalid_grant={self.invalid_grant} revoked_families={self.revoked_families} "
            f"faults={[(f.kind.value, f.remaining) for f in self._faults]} outage={self.outage}>"
        )

    @property
    def token_url(self) -> URL:
        return self.url / "oauth2" / "token"

    @property
    def introspect_url(self) -> URL:
        return self.url / "oauth2" / "introspect"

    @property
    def last_request(self) -> TokenCall | None:
        return self.calls[-1] if self.calls else None

    def now(self) -> float:
        return time.time() + self.clock_offset

    # -- set-up by tests -------------------------------------------------------------------

    def add_client_secret(self, secret: str) -> None:
        self.client_secrets.add(secret)

    def remove_client_secret(self, secret: str) -> None:
        self.client_secrets.discard(secret)

    def register_jwt_key(self, public_pem: bytes, *, kid: str | None = None) -> None:
        """Accept `private_key_jwt` assertions signed (RS256 / ES256) by this key's pair."""
        self._jwt_keys.append((kid, serialization.load_pem_public_key(public_pem)))

    def register_client_cert(self, *, cn: str | None = None, sha256: str | None = None) -> None:
        """Accept `tls_client_auth` from a verified certificate with this subject CN or this
        SHA-256 fingerprint (hex of the DER, case and colons ignored)."""
        if cn is not None:
            self._cert_cns.add(cn)
        if sha256 is not None:
            self._cert_sha256.add(sha256.replace(":", "").lower())

    def seed_refresh_token(self, subject: str | None = None, *, scope: str | None = None) -> str:
        """Start a new token family and return its first refresh token."""
        token = self._new_token("rt")
        self._refresh[token] = _Refresh(_Family(subject, scope))
        return token

    def fail_next(
        self,
        n: int | None,
        kind: FaultKind,
        *,
        delay: float = 1.0,
        retry_after: int | None = None,
        error: str = "invalid_request",
    ) -> None:
        """Queue `kind` for the next `n` token calls (None: every call until `clear_faults`).

        Faults queue in order: `fail_next(1, A); fail_next(2, B)` gives A, B, B. The fault is
        chosen when a call arrives, before the gate. `delay` is for SLOW, `retry_after` for
        429 / 503, `error` for OAUTH_ERROR / ERROR_200.
        """
        if n is not None and n < 1:
            raise ValueError("n must be at least 1, or None for 'until cleared'")
        self._faults.append(Fault(kind, n, delay, retry_after, error))

    def clear_faults(self) -> None:
        self._faults.clear()

    @property
    def pending_faults(self) -> tuple[Fault, ...]:
        return tuple(self._faults)

    def revoke(self, token: str) -> None:
        """Revoke a token as an admin would: a refresh token's whole family, or one access
        token (its family too, when it came from a refresh chain)."""
        if (refresh := self._refresh.get(token)) is not None:
            self._revoke_family(refresh.family)
        elif (access := self._access.get(token)) is not None:
            access.revoked = True
            if access.family is not None:
                self._revoke_family(access.family)

    # -- inspection ------------------------------------------------------------------------

    def is_valid(self, token: str | Secret) -> bool:
        """True for an access token that was issued, has not expired on the server's clock,
        and whose family (if any) is not revoked. Given as a `Secret`, a failing assertion
        shows its fingerprint, not the token."""
        access = self._access.get(token.reveal() if isinstance(token, Secret) else token)
        return access is not None and access.active(self.now())

    def issued_tokens(self) -> list[str]:
        """Every access and refresh token ever issued, for scanning logs for leaks."""
        return [*self._access, *self._refresh]

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "grants": dict(self.grants),
            "invalid_grant": self.invalid_grant,
            "invalid_client": self.invalid_client,
            "auth_failures": dict(self.auth_failures),
            "revoked_families": self.revoked_families,
            "rotations": {str(k) if k is not None else "": v for k, v in self.rotations.items()},
            "grace_reuses": self.grace_reuses,
            "issued_access_tokens": self.issued_access_tokens,
            "introspections": self.introspections,
            "faults_served": {k.value: v for k, v in self.faults_served.items()},
            "held": self.held,
        }

    @property
    def jwt_public_pem(self) -> bytes:
        """The public key that verifies JWT access tokens (`jwt_access_tokens=True`)."""
        return (
            self._signer()
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    # -- HTTP ------------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth2/token", self._token)
        app.router.add_post("/oauth2/introspect", self._introspect)
        app.router.add_get("/_demo/stats", self._control_stats)
        app.router.add_post("/_demo/seed", self._control_seed)
        app.router.add_post("/_demo/faults", self._control_faults)
        app.router.add_delete("/_demo/faults", self._control_faults)
        app.router.add_patch("/_demo/settings", self._control_settings)
        return app

    def _take_fault(self) -> Fault | None:
        if not self._faults:
            return None
        fault = self._faults[0]
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining == 0:
                self._faults.pop(0)
        self.faults_served[fault.kind] += 1
        return fault

    def _json(self, body: Mapping[str, Any], status: int = 200, **headers: str) -> web.Response:
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache", **headers}
        return self._raw(json.dumps(body), "application/json", status, headers)

    def _raw(
        self, text: str, ctype: str, status: int, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        resp = web.Response(text=text, content_type=ctype, status=status, headers=headers)
        resp.headers["Date"] = formatdate(self.now(), usegmt=True)
        return resp

    async def _token(self, request: web.Request) -> web.StreamResponse:
        await self._bump()
        fault = self._take_fault()
        is_form = request.content_type == "application/x-www-form-urlencoded"
        form: Mapping[str, Any] = await request.post() if is_form else {}
        params = {k: (fingerprint(v) if k in SENSITIVE_PARAMS else v) for k, v in form.items()}
        call = TokenCall(
            grant_type=form.get("grant_type"),
            auth_method=_auth_method_of(request, form),
            client_id=None,
            scope=form.get("scope"),
            audience=form.get("audience"),
            resources=tuple(str(v) for k, v in form.items() if k == "resource"),
            params={k: str(v) for k, v in params.items()},
            fault=fault.kind if fault else None,
        )
        self.calls.append(call)
        if call.grant_type:
            self.grants[call.grant_type] += 1
        await self._pass_gate()
        resp = await self._answer(request, form, call, fault)
        call.status = resp.status if resp is not None else None
        if resp is None:  # DROP: no response at all
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        return resp

    async def _answer(
        self, request: web.Request, form: Mapping[str, Any], call: TokenCall, fault: Fault | None
    ) -> web.StreamResponse | None:
        if self.outage:
            return self._json({"error": "temporarily_unavailable"}, 503)
        kind = fault.kind if fault else None
        if fault is not None and not fault.kind.commits:
            early = await self._early_fault(request, form, fault)
            if early is not None or kind is FaultKind.DROP:
                return early
        if fault is not None and kind is FaultKind.SLOW:
            await self._park(asyncio.sleep(fault.delay))
        try:
            if request.content_type != "application/x-www-form-urlencoded":
                raise _OAuthError(400, "invalid_request", "not_form")
            call.client_id = self._authenticate(request, form)
            body = self._grant(form)
        except _OAuthError as exc:
            call.error = exc.error
            if exc.error == "invalid_client":
                self.invalid_client += 1
                self.auth_failures[exc.reason] += 1
            elif exc.error == "invalid_grant":
                self.invalid_grant += 1
            extra = {"WWW-Authenticate": 'Basic realm="demo"'} if exc.basic else {}
            return self._json({"error": exc.error}, exc.status, **extra)
        # The grant is stored from here on: what follows only changes what the client sees.
        if kind is FaultKind.HTTP_500_AFTER_COMMIT:
            return self._raw(HTML_500, "text/html", 500)
        if kind is FaultKind.DROP_AFTER_COMMIT:
            return None
        if kind is not None and kind in _LYING_FIELDS:
            body = dict(body)
            _LYING_FIELDS[kind](body)
        return self._json(body)

    async def _early_fault(
        self, request: web.Request, form: Mapping[str, Any], fault: Fault
    ) -> web.StreamResponse | None:
        retry = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
        match fault.kind:
            case FaultKind.HTTP_500:
                return self._raw(HTML_500, "text/html", 500)
            case FaultKind.DROP:
                return None
            case FaultKind.HTTP_429:
                retry.setdefault("Retry-After", "1")
                return self._json({"error": "rate_limited"}, 429, **retry)
            case FaultKind.HTTP_503:
                return self._json({"error": "temporarily_unavailable"}, 503, **retry)
            case FaultKind.OAUTH_ERROR:
                return self._json({"error": fault.error}, 400)
            case FaultKind.HANG:
                resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
                resp.content_length = 4096
                await resp.prepare(request)
                await resp.write(b'{"access_token": "')
                await self._forever()
                return resp  # not reached: aclose() cancels the parked handler
            case FaultKind.HTML_200:
                return self._raw("<html><body>Sign in</body></html>", "text/html", 200)
            case FaultKind.NOT_JSON:
                return self._raw('{"access_token": "unterminated', "application/json", 200)
            case FaultKind.NO_ACCESS_TOKEN:
                return self._json({"token_type": "Bearer", "expires_in": 60})
            case FaultKind.ERROR_200:
                return self._json({"error": fault.error})
            case FaultKind.ECHO_SECRETS:
                quoted = [f"{k}={v}" for k, v in form.items() if k in SENSITIVE_PARAMS]
                quoted.append(f"Authorization: {request.headers.get('Authorization', '')}")
                raw = await request.text()  # the form body as sent, percent-encoding and all
                text = f"refused {'; '.join(quoted)}; body {raw}"
                return self._json({"error": fault.error, "error_description": text}, 400)
            case _:
                raise AssertionError(f"{fault.kind} commits; not an early fault")

    # -- client authentication -------------------------------------------------------------

    def _authenticate(self, request: web.Request, form: Mapping[str, Any]) -> str:
        """Return the authenticated client_id or raise invalid_client (RFC 6749 2.3, 5.2)."""
        method = _auth_method_of(request, form)
        if method is None:
            raise _OAuthError(401, "invalid_client", "no_credentials")
        if method == "multiple":
            raise _OAuthError(400, "invalid_request", "multiple_methods")
        basic = method == "client_secret_basic"
        if method not in self.auth_methods:
            raise _OAuthError(401, "invalid_client", "method_not_allowed", basic)
        form_id = form.get("client_id")
        if method == "client_secret_basic":
            client_id, secret = self._basic(request.headers["Authorization"])
            if form_id is not None and form_id != client_id:
                raise _OAuthError(400, "invalid_request", "client_id_mismatch")
        elif method == "client_secret_post":
            client_id, secret = str(form_id or ""), str(form["client_secret"])
        elif method == "private_key_jwt":
            client_id = self._check_assertion(form)
            if form_id is not None and form_id != client_id:
                raise _OAuthError(401, "invalid_client", "client_id_mismatch")
            return client_id
        else:  # tls_client_auth
            self._check_cert(request)
            client_id = str(form_id)
            if client_id != self.client_id:
                raise _OAuthError(401, "invalid_client", "unknown_client")
            return client_id
        if client_id != self.client_id:
            raise _OAuthError(401, "invalid_client", "unknown_client", basic)
        if not any(
            secrets.compare_digest(secret.encode(), s.encode()) for s in self.client_secrets
        ):
            raise _OAuthError(401, "invalid_client", "bad_secret", basic)
        return client_id

    def _basic(self, header: str) -> tuple[str, str]:
        try:
            raw = base64.b64decode(header.split(" ", 1)[1].strip(), validate=True).decode()
            user, _, password = raw.partition(":")
        except (IndexError, ValueError, binascii.Error):
            raise _OAuthError(401, "invalid_client", "bad_basic_header", True) from None
        if self.basic_urlencoded:
            return unquote_plus(user), unquote_plus(password)
        return user, password

    def _check_assertion(self, form: Mapping[str, Any]) -> str:
        if form.get("client_assertion_type") != JWT_BEARER:
            raise _OAuthError(401, "invalid_client", "jwt_assertion_type")
        assertion = str(form.get("client_assertion", ""))
        try:
            kid = jwt.get_unverified_header(assertion).get("kid")
        except jwt.PyJWTError:
            raise _OAuthError(401, "invalid_client", "jwt_malformed") from None
        keys = [k for key_id, k in self._jwt_keys if kid is None or key_id in (None, kid)]
        claims: dict[str, Any] | None = None
        for key in keys:
            try:
                claims = jwt.decode(
                    assertion,
                    key,
                    algorithms=["RS256", "ES256"],
                    audience=str(self.token_url),
                    # Expiry is checked below on the server's own clock.
                    options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
                )
                break
            except jwt.InvalidAudienceError:
                raise _OAuthError(401, "invalid_client", "jwt_aud") from None
            except jwt.MissingRequiredClaimError:
                raise _OAuthError(401, "invalid_client", "jwt_missing_claim") from None
            except (jwt.PyJWTError, TypeError, ValueError):
                continue  # an EC assertion against an RSA key (or the reverse): try the next key
        if claims is None:
            raise _OAuthError(401, "invalid_client", "jwt_signature")
        if claims.get("iss") != self.client_id or claims.get("sub") != self.client_id:
            raise _OAuthError(401, "invalid_client", "jwt_iss_sub")
        now, exp, jti = self.now(), claims.get("exp"), claims.get("jti")
        if not isinstance(exp, int | float) or exp <= now:
            raise _OAuthError(401, "invalid_client", "jwt_exp")
        if exp - now > MAX_ASSERTION_LIFETIME:
            raise _OAuthError(401, "invalid_client", "jwt_exp_too_far")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and nbf > now:
            raise _OAuthError(401, "invalid_client", "jwt_nbf")
        if not isinstance(jti, str) or not jti:
            raise _OAuthError(401, "invalid_client", "jwt_missing_claim")
        if jti in self._jti_seen:
            raise _OAuthError(401, "invalid_client", "jwt_jti_reuse")
        self._jti_seen.add(jti)
        return self.client_id

    def _check_cert(self, request: web.Request) -> None:
        cn, sha256 = peer_cert(request)
        if sha256 is None:
            raise _OAuthError(401, "invalid_client", "no_cert")
        if cn not in self._cert_cns and sha256 not in self._cert_sha256:
            raise _OAuthError(401, "invalid_client", "cert_mismatch")

    # -- grants ----------------------------------------------------------------------------

    def _grant(self, form: Mapping[str, Any]) -> dict[str, Any]:
        grant = form.get("grant_type")
        if grant == "client_credentials":
            scope = form.get("scope")
            return self._issue(self.client_id, str(scope) if scope else None, None)
        if grant == "refresh_token":
            if not form.get("refresh_token"):
                raise _OAuthError(400, "invalid_request", "no_refresh_token")
            return self._rotate(str(form["refresh_token"]))
        raise _OAuthError(400, "unsupported_grant_type", "grant_type")

    def _rotate(self, token: str) -> dict[str, Any]:
        refresh = self._refresh.get(token)
        if refresh is None or refresh.family.revoked:
            raise _OAuthError(400, "invalid_grant", "unknown_or_revoked")
        family, now = refresh.family, self.now()
        if not self.rotate_refresh_tokens:
            return self._issue(family.subject, family.scope, family)
        if refresh.used_at is not None:
            in_grace = self.reuse_grace > 0 and now - refresh.used_at <= self.reuse_grace
            if in_grace and refresh.answer is not None:
                self.grace_reuses += 1  # Okta / Lucid: the same new pair again
                return refresh.answer
            self._revoke_family(family)  # reuse after the window: treat as theft
            raise _OAuthError(400, "invalid_grant", "reuse")
        body = self._issue(family.subject, family.scope, family)
        body["refresh_token"] = successor = self._new_token("rt")
        self._refresh[successor] = _Refresh(family)
        refresh.used_at, refresh.answer = now, body
        self.rotations[family.subject] += 1
        return body

    def _revoke_family(self, family: _Family) -> None:
        if not family.revoked:
            family.revoked = True
            self.revoked_families += 1

    def _issue(
        self, subject: str | None, scope: str | None, family: _Family | None
    ) -> dict[str, Any]:
        now = self.now()
        expires_at = now + self.expires_in
        if self.jwt_access_tokens:
            claims = {
                "iss": str(self.url),
                "sub": subject or self.client_id,
                "client_id": self.client_id,
                "iat": int(now),
                "exp": math.ceil(expires_at),
                "jti": self._new_token("at"),
            }
            if scope:
                claims["scope"] = scope
            token = jwt.encode(claims, self._signer(), algorithm="ES256")
        else:
            token = self._new_token("at")
        self._access[token] = _Access(expires_at, subject, scope, family)
        self.issued_access_tokens += 1
        body: dict[str, Any] = {
            "access_token": token,
            "token_type": self.token_type,
            "expires_in": _num(self.expires_in),
        }
        if scope:
            body["scope"] = scope
        return body

    def _new_token(self, kind: str) -> str:
        return f"{self.token_prefix}-{kind}-{secrets.token_urlsafe(16)}"

    def _signer(self) -> ec.EllipticCurvePrivateKey:
        if self._signing_key is None:
            self._signing_key = ec.generate_private_key(ec.SECP256R1())
        return self._signing_key

    # -- introspection and control ---------------------------------------------------------

    async def _introspect(self, request: web.Request) -> web.Response:
        """RFC 7662, without client authentication (a demo: loopback only)."""
        self.introspections += 1
        token = str((await request.post()).get("token", ""))
        now = self.now()
        if (access := self._access.get(token)) is not None and access.active(now):
            body: dict[str, Any] = {
                "active": True,
                "client_id": self.client_id,
                "token_type": "access_token",
                "exp": int(access.expires_at),
            }
            if access.subject:
                body["sub"] = access.subject
            if access.scope:
                body["scope"] = access.scope
            return self._json(body)
        refresh = self._refresh.get(token)
        if refresh is not None and not refresh.family.revoked and refresh.used_at is None:
            return self._json({"active": True, "token_type": "refresh_token"})
        return self._json({"active": False})

    async def _control_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _control_seed(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        token = self.seed_refresh_token(body.get("subject"), scope=body.get("scope"))
        return web.json_response({"refresh_token": token})

    async def _control_faults(self, request: web.Request) -> web.Response:
        if request.method == "DELETE":
            self.clear_faults()
            return web.json_response({"faults": 0})
        body = await _json_body(request)
        try:
            self.fail_next(
                body.get("n", 1),
                FaultKind(body["kind"]),
                delay=float(body.get("delay", 1.0)),
                retry_after=body.get("retry_after"),
                error=str(body.get("error", "invalid_request")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            return web.json_response({"error": f"bad fault: {exc}"}, status=400)
        return web.json_response({"faults": len(self._faults)})

    async def _control_settings(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        for name in ("outage", "clock_offset", "expires_in", "reuse_grace"):
            if name in body:
                setattr(self, name, body[name])
        return web.json_response({n: getattr(self, n) for n in ("outage", "clock_offset")})


def _auth_method_of(request: web.Request, form: Mapping[str, Any]) -> str | None:
    """The client authentication method a request uses ("multiple" if more than one)."""
    found = []
    if request.headers.get("Authorization", "").lower().startswith("basic "):
        found.append("client_secret_basic")
    if "client_secret" in form:
        found.append("client_secret_post")
    if "client_assertion" in form or "client_assertion_type" in form:
        found.append("private_key_jwt")
    if not found and "client_id" in form and peer_cert(request)[1] is not None:
        found.append("tls_client_auth")
    if len(found) > 1:
        return "multiple"
    return found[0] if found else None


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="body must be JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body
