"""One credential's token endpoint: build the request, send it with bounded retries, and turn
the answer into an `AccessToken` or a `TokenEndpointError` (RFC 6749 sections 4.4, 5, 6).

Retries (aiohttp-retry): exponential backoff with full jitter on 5xx, 429 and connection
failures, honouring `Retry-After`, all inside one time budget. Permanent OAuth errors
(`invalid_grant`, `invalid_client`, ...) are never retried here.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import email.utils
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast
from urllib.parse import quote, quote_plus

import aiohttp
from aiohttp_retry import RetryClient, RetryOptionsBase

from proxy.breaker import PROBE
from proxy.clientauth import AUTH_STEPS, USES_CLIENT_SECRET, TokenRequestParts
from proxy.config import CredentialConfig
from proxy.errors import (
    PERMANENT_OAUTH_ERRORS,
    InvalidClient,
    MalformedTokenResponse,
    TokenEndpointError,
    TokenNetworkError,
    TokenTimeout,
    TransientTokenError,
)
from proxy.logs import REDACTED, event, scrubber
from proxy.metrics import Metrics
from proxy.models import AccessToken, Secret

log = logging.getLogger("authproxy.oauth")

MAX_BODY: Final = 256 * 1024
CLOCK_SKEW_WARN_SECONDS: Final = 30.0
MAX_RETRY_AFTER: Final = 60.0
RETRY_ATTEMPTS: Final = 4  # HTTP calls per fetch at most, while the breaker is closed
_TOKEN_CHARS: Final = re.compile(r"[\x21-\x7e]+")  # what can travel in an Authorization header
# Form fields whose values are credentials (RFC 6749 6, RFC 7523 2.2, client_secret_post).
_SECRET_FIELDS: Final = ("refresh_token", "client_secret", "client_assertion")
MAX_ERROR_CODE: Final = 64
MAX_ERROR_DESCRIPTION: Final = 300


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """A validated token response."""

    access_token: AccessToken
    refresh_token: Secret | None
    clock_offset: float | None  # provider clock minus ours, from the Date header


class ProviderRetry(RetryOptionsBase):
    """Exponential backoff with full jitter on 5xx, 429 and connection failures, honouring
    `Retry-After`, inside a deadline: a retry whose wait would end after the deadline is not
    made, and the last answer is classified instead (a 429's `Retry-After` then reaches the
    breaker). Other statuses (400 `invalid_grant`, 401 `invalid_client`, ...) are never
    retried here. One instance per logical request (it remembers the wait it chose)."""

    def __init__(
        self,
        attempts: int,
        deadline: float,
        *,
        base: float = 0.2,
        cap: float = 5.0,
    ) -> None:
        super().__init__(
            attempts=attempts,
            statuses=set(),
            exceptions={aiohttp.ClientConnectionError},
            methods={"POST"},
            retry_all_server_errors=False,
            evaluate_response_callback=self._final,
        )
        self.base = base
        self.cap = cap
        self.deadline = deadline  # time.monotonic() value
        self._wait = 0.0
        self.retries = 0

    def backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap, self.base * 2**attempt))  # noqa: S311

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    async def _final(self, response: aiohttp.ClientResponse) -> bool:
        """True: this answer is final (classify it); False: retry after `self._wait`."""
        if response.status < 500 and response.status != 429:
            return True
        after = parse_retry_after(response.headers.get("Retry-After"))
        wait = min(after, MAX_RETRY_AFTER) if after is not None else self.backoff(self.retries + 1)
        if wait >= self.remaining():
            return True
        self._wait = wait
        return False

    def get_timeout(self, attempt: int, response: aiohttp.ClientResponse | None = None) -> float:
        self.retries += 1
        if response is not None:
            response.release()
            return self._wait
        # A connection failure: back off, but never past the deadline (the budget's timeout
        # would end the sleep anyway; ending it early leaves time for one more try).
        return max(0.0, min(self.backoff(attempt), self.remaining() - 0.05))


class _CountingSession:
    """What RetryClient calls (`request`), counting every HTTP call it makes
    (`authproxy_token_endpoint_attempts_total`, retries included)."""

    def __init__(self, session: aiohttp.ClientSession, on_call: Callable[[], None]) -> None:
        self._session = session
        self._on_call = on_call

    def request(self, method: str, url: Any, **kwargs: Any) -> Any:
        self._on_call()
        return self._session.request(method, url, **kwargs)

    async def close(self) -> None:  # RetryClient.close(); the session belongs to the pool
        return None


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    when = _http_date(value)
    return None if when is None else max(0.0, when - time.time())


def _http_date(value: str) -> float | None:
    """An HTTP date as a Unix time (a zone-less date is UTC, as RFC 9110 says)."""
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    try:
        return when.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


class TokenEndpoint:
    """Calls one credential's token endpoint. Holds no token state: that is the cache's job."""

    def __init__(
        self,
        cred: CredentialConfig,
        session: Callable[[], aiohttp.ClientSession],
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cred = cred
        self._session = session
        self._metrics = metrics
        self._clock = clock
        self._secret_index = 0  # which of client_secret / client_secret_next worked last

    def __repr__(self) -> str:
        return f"<TokenEndpoint {self.cred.name} {self.cred.token_url} {self.cred.auth_method}>"

    async def client_credentials(self, *, budget: float | None = None) -> TokenResponse:
        form = {"grant_type": "client_credentials"}
        return await self.request(form, budget=budget)

    async def refresh(
        self, refresh_token: Secret, *, budget: float | None = None, retry: bool = True
    ) -> TokenResponse:
        value = refresh_token.reveal()
        scrubber().add_token(value)  # a seeded or stored token is known from its first use
        form = {"grant_type": "refresh_token", "refresh_token": value}
        return await self.request(form, budget=budget, retry=retry)

    def _secrets(self) -> list[Secret | None]:
        if self.cred.auth_method not in USES_CLIENT_SECRET:
            return [None]
        refs = [r for r in (self.cred.client_secret, self.cred.client_secret_next) if r is not None]
        secrets: list[Secret | None] = []
        for ref in refs:
            try:
                secrets.append(ref.resolve())
            except (OSError, KeyError) as exc:
                event(
                    log,
                    logging.WARNING,
                    "token",
                    f"cannot read a client secret ({ref.describe()}): {exc}",
                    credential=self.cred.name,
                )
        if not secrets:
            raise InvalidClient(
                "client_secret_unreadable", f"no readable client secret for {self.cred.name}"
            )
        # Try the secret that worked last first: rotation flips the order once, not per call.
        i = self._secret_index % len(secrets)
        return secrets[i:] + secrets[:i]

    async def request(
        self, grant_form: dict[str, str], *, budget: float | None = None, retry: bool = True
    ) -> TokenResponse:
        """One token request (with retries and secret fallback); raises TokenEndpointError.

        `budget` (default: the credential's `timeout`) bounds the whole call, retries and the
        fallback to `client_secret_next` included. While the breaker probes (`PROBE`), one
        HTTP call is made and nothing is retried."""
        budget = self.cred.timeout if budget is None else budget
        deadline = time.monotonic() + budget
        if PROBE.get():
            retry = False
        secrets = self._secrets()
        last: TokenEndpointError | None = None
        for n, secret in enumerate(secrets):
            remaining = deadline - time.monotonic()
            if n and remaining <= 0:
                break
            try:
                resp = await self._send(grant_form, secret, budget=remaining, retry=retry)
            except InvalidClient as exc:
                last = exc
                if n + 1 < len(secrets):
                    event(
                        log,
                        logging.WARNING,
                        "token",
                        "client secret refused; trying the other one",
                        credential=self.cred.name,
                    )
                continue
            if n:
                self._secret_index += n
                event(
                    log,
                    logging.WARNING,
                    "token",
                    "switched to the other client secret",
                    credential=self.cred.name,
                )
            return resp
        assert last is not None
        raise last

    def _parts(self, grant_form: dict[str, str], secret: Secret | None) -> TokenRequestParts:
        form = dict(grant_form)
        if self.cred.scopes:
            form["scope"] = " ".join(self.cred.scopes)
        if self.cred.audience:
            form["audience"] = self.cred.audience
        if self.cred.resource:
            form["resource"] = self.cred.resource
        form.update(self.cred.extra_params)
        parts = TokenRequestParts(form=form, headers={"Accept": "application/json"})
        AUTH_STEPS[self.cred.auth_method](self.cred, parts, secret)
        return parts

    async def _send(
        self, grant_form: dict[str, str], secret: Secret | None, *, budget: float, retry: bool
    ) -> TokenResponse:
        parts = self._parts(grant_form, secret)
        started = time.monotonic()
        name = self.cred.name

        options = ProviderRetry(RETRY_ATTEMPTS if retry else 1, started + budget)
        attempts = self._metrics.token_attempts.labels(name)
        counting = cast(aiohttp.ClientSession, _CountingSession(self._session(), attempts.inc))
        client = RetryClient(client_session=counting, retry_options=options, logger=log)
        sent_at = self._clock()
        outcome = "success"
        try:
            async with asyncio.timeout(budget):
                async with client.post(
                    str(self.cred.token_url),
                    data=parts.form,
                    headers=parts.headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=budget, sock_connect=min(budget, 5.0)),
                ) as resp:
                    body = await _read_bounded(resp.content, MAX_BODY + 1)
                    result = self._parse(resp, body, sent_at, _sent_secrets(parts, secret))
            return result
        except TokenEndpointError as exc:
            outcome = exc.outcome
            raise
        except TimeoutError as exc:
            outcome = "timeout"
            raise TokenTimeout(
                "timeout",
                f"no complete answer from the token endpoint of {name} within {budget:.3g}s",
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            outcome = "network_error"
            raise TokenNetworkError(
                "network_error",
                f"{type(exc).__name__} talking to the token endpoint of {name}",
            ) from exc
        finally:
            elapsed = time.monotonic() - started
            # One count per logical request (its retries are in the log line's `attempts`).
            self._metrics.token_requests.labels(name, outcome).inc()
            self._metrics.token_request_duration.labels(name).observe(elapsed)
            event(
                log,
                logging.INFO if outcome == "success" else logging.WARNING,
                "token",
                credential=name,
                grant=grant_form.get("grant_type"),
                outcome=outcome,
                attempts=options.retries + 1,
                duration_ms=round(elapsed * 1000, 1),
            )

    def _parse(
        self,
        resp: aiohttp.ClientResponse,
        body: bytes,
        sent_at: float,
        sent: tuple[str, ...] = (),
    ) -> TokenResponse:
        """Classify and validate one answer (RFC 6749 5.1 and 5.2). `sent`: the secrets the
        request carried, which the provider's error text may echo."""
        received = self._clock()
        status = resp.status
        data: Any = None
        try:
            data = json.loads(body) if len(body) <= MAX_BODY else None
        except (ValueError, UnicodeDecodeError):
            data = None
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, str) and error:
            raw_desc = data.get("error_description")
            # The provider's text travels on into the chain's last_error, the admin listing,
            # `authproxy status`, 503 messages and logs: nothing we sent may ride along.
            desc = (
                _provider_text(raw_desc, sent, MAX_ERROR_DESCRIPTION)
                if isinstance(raw_desc, str) and raw_desc
                else None
            )
            cls = PERMANENT_OAUTH_ERRORS.get(error)
            error = _provider_text(error, sent, MAX_ERROR_CODE)
            if cls is not None:
                raise cls(error, desc, status=status)
            if (
                status >= 500
                or status == 429
                or error in ("temporarily_unavailable", "server_error")
            ):
                raise TransientTokenError(
                    error,
                    desc,
                    status=status,
                    retry_after=parse_retry_after(resp.headers.get("Retry-After")),
                )
            raise TokenEndpointError(error, desc, status=status)
        if status >= 500 or status == 429:
            raise TransientTokenError(
                "http_error",
                f"HTTP {status} from the token endpoint",
                status=status,
                retry_after=parse_retry_after(resp.headers.get("Retry-After")),
            )
        if status == 401:
            raise InvalidClient(
                "invalid_client", "HTTP 401 without an OAuth error body", status=status
            )
        if status != 200:
            raise TransientTokenError(
                "http_error", f"HTTP {status} from the token endpoint", status=status
            )
        if not isinstance(data, dict):
            raise MalformedTokenResponse(
                "malformed", "the token response is not a JSON object", status=status
            )
        # Register what the provider sent before validating it: an answer refused below (its
        # token_type, say) may still carry live tokens that an error message could echo.
        for name in ("access_token", "refresh_token"):
            value = data.get(name)
            if isinstance(value, str) and value:
                scrubber().add_token(value)
        access = data.get("access_token")
        if not isinstance(access, str) or not access:
            raise MalformedTokenResponse(
                "malformed", "the token response has no access_token", status=status
            )
        if not _TOKEN_CHARS.fullmatch(access):
            raise MalformedTokenResponse(
                "malformed",
                "the access_token holds characters that cannot travel in a header",
                status=status,
            )
        token_type = data.get("token_type", "Bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise MalformedTokenResponse(
                "malformed", f"unsupported token_type {str(token_type)[:20]!r}", status=status
            )
        refresh = data.get("refresh_token")
        if refresh is not None and (not isinstance(refresh, str) or not refresh):
            raise MalformedTokenResponse(
                "malformed", "refresh_token is not a string", status=status
            )
        offset = self._clock_offset(resp, sent_at, received)
        expires_in = self._expires_in(data.get("expires_in"))
        expires_at = received + expires_in
        # A JWT access token's own exp wins when earlier (corrected by the provider's clock offset).
        jwt_exp = _jwt_exp(access)
        if jwt_exp is not None:
            local_exp = jwt_exp - (offset or 0.0)
            if received < local_exp < expires_at:
                expires_at = local_exp
            elif local_exp <= received:
                # Already expired by its own claim, even after the clock correction: a provider
                # bug or a wild clock. Keep expires_in (an upstream 401 will say the rest).
                event(
                    log,
                    logging.WARNING,
                    "token",
                    "the access token's JWT exp is already past; using expires_in",
                    credential=self.cred.name,
                )
        token = AccessToken(
            value=Secret(access),
            issued_at=received,
            expires_at=expires_at,
            skew=self.cred.skew,
            scope=data.get("scope") if isinstance(data.get("scope"), str) else None,
        )
        return TokenResponse(token, Secret(refresh) if isinstance(refresh, str) else None, offset)

    def _expires_in(self, raw: object) -> float:
        default = self.cred.default_expires_in
        value: float | None = None
        if isinstance(raw, bool):
            value = None
        elif isinstance(raw, int | float):
            try:
                value = float(raw)
            except OverflowError:  # an int beyond any float: enormous
                value = float("inf")
        elif isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                value = None
        if value is None or value != value:  # None or NaN
            event(
                log,
                logging.WARNING,
                "token",
                f"expires_in missing or unreadable; assuming {default:g}s",
                credential=self.cred.name,
            )
            return default
        if value <= 0:
            event(
                log,
                logging.WARNING,
                "token",
                f"expires_in is {value:g}; assuming {default:g}s",
                credential=self.cred.name,
            )
            return default
        if value > self.cred.max_expires_in:
            event(
                log,
                logging.WARNING,
                "token",
                f"expires_in {value:g}s is absurd; capping at {self.cred.max_expires_in:g}s",
                credential=self.cred.name,
            )
            return self.cred.max_expires_in
        return value

    def _clock_offset(
        self, resp: aiohttp.ClientResponse, sent_at: float, received: float
    ) -> float | None:
        date = resp.headers.get("Date")
        if not date:
            return None
        provider = _http_date(date)
        if provider is None:
            return None
        # The Date header has one-second resolution: offsets within the round trip + 1 s are noise.
        midpoint = (sent_at + received) / 2
        offset = provider - midpoint
        if abs(offset) <= (received - sent_at) / 2 + 1.0:
            offset = 0.0
        self._metrics.clock_offset.labels(self.cred.name).set(offset)
        if abs(offset) > CLOCK_SKEW_WARN_SECONDS:
            event(
                log,
                logging.WARNING,
                "clock",
                f"the token endpoint's clock is {offset:+.0f}s from ours",
                credential=self.cred.name,
                offset_seconds=round(offset, 1),
            )
        return offset


def _sent_secrets(parts: TokenRequestParts, secret: Secret | None) -> tuple[str, ...]:
    """The credentials one token request carried: form fields, the client secret, the
    `Authorization` header's credentials (client_secret_basic)."""
    values = [parts.form.get(name) for name in _SECRET_FIELDS]
    values.append(secret.reveal() if secret is not None else None)
    auth = parts.headers.get("Authorization")
    if auth:
        values.append(auth.partition(" ")[2])
    # Longest first: a value that holds another is replaced whole.
    return tuple(sorted((v for v in values if v), key=len, reverse=True))


def _provider_text(text: str, sent: tuple[str, ...], limit: int) -> str:
    """Text a provider wrote (`error`, `error_description`) as we may repeat it: without the
    secrets this request sent (some providers echo the refresh token they refuse), in any
    encoding a form body gave them, without any other secret the process knows, and bounded."""
    for value in sent:
        for form in {value, quote(value, safe=""), quote_plus(value)}:
            text = text.replace(form, REDACTED)
    text = scrubber().scrub(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jwt_exp(token: str) -> float | None:
    """`exp` of a JWT-shaped token, read without verification (we only use it to expire sooner)."""
    if token.count(".") != 2:
        return None
    payload = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return None
    try:
        value = float(exp)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


async def _read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The whole body, or its first `limit` bytes (`StreamReader.read(n)` alone returns
    whatever has arrived so far, which may be a fraction of the answer)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await stream.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
