"""The token endpoint client against the real demo token server on loopback: retries (5xx,
429 with Retry-After, dropped connections) inside the budget, permanent errors never retried,
every malformed answer classified without a crash, expiry sanity, JWT exp and clock offset."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from proxy.breaker import PROBE
from proxy.config import CredentialConfig, parse_config
from proxy.demo import EchoServer, FaultKind, TokenServer
from proxy.errors import (
    InvalidClient,
    InvalidGrant,
    InvalidScope,
    MalformedTokenResponse,
    TokenEndpointError,
    TokenTimeout,
    TransientTokenError,
    UnauthorizedClient,
)
from proxy.logs import REDACTED
from proxy.metrics import Metrics
from proxy.models import Secret
from proxy.oauth import TokenEndpoint, parse_retry_after
from tests.conftest import CLIENT_SECRET, LogCapture, proxy_config


def credential(token_server: TokenServer, **extra: Any) -> CredentialConfig:
    raw = proxy_config(token_server, EchoServer())  # the echo URL is not used here
    raw["routes"][0]["upstream"] = "http://127.0.0.1:9/api"
    raw["credentials"]["demo"].update(extra)
    return parse_config(raw).credentials["demo"]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(trust_env=False) as s:
        yield s


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def endpoint(
    token_server: TokenServer,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    **extra: Any,
) -> TokenEndpoint:
    return TokenEndpoint(credential(token_server, **extra), lambda: session, metrics)


def outcome_count(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "authproxy_token_requests_total", {"credential": "demo", "outcome": outcome}
    )
    return value or 0.0


async def test_a_token_and_its_expiry_from_the_receive_time(
    token_server: TokenServer, session: aiohttp.ClientSession, metrics: Metrics
) -> None:
    ep = endpoint(token_server, session, metrics, skew="7s")
    before = time.time()
    resp = await ep.client_credentials()
    after = time.time()
    token = resp.access_token
    assert token_server.is_valid(token.value)
    assert before + 300 <= token.expires_at <= after + 300
    assert token.skew == 7.0 and token.usable_until == token.expires_at - 7.0
    assert outcome_count(metrics, "success") == 1


@pytest.mark.parametrize("kind", [FaultKind.HTTP_500, FaultKind.HTTP_503, FaultKind.DROP])
async def test_transient_failures_are_retried(
    token_server: TokenServer, session: aiohttp.ClientSession, metrics: Metrics, kind: FaultKind
) -> None:
    token_server.fail_next(2, kind)
    resp = await endpoint(token_server, session, metrics).client_credentials()
    assert token_server.is_valid(resp.access_token.value)
    assert token_server.requests == 3  # two failures, then the answer
    assert outcome_count(metrics, "success") == 1  # one logical request...
    attempts = metrics.registry.get_sample_value(
        "authproxy_token_endpoint_attempts_total", {"credential": "demo"}
    )
    assert attempts == 3  # ...of three HTTP calls


async def test_retries_stop_after_four_calls(
    token_server: TokenServer, session: aiohttp.ClientSession, metrics: Metrics
) -> None:
    token_server.fail_next(None, FaultKind.HTTP_500)
    with pytest.raises(TransientTokenError) as info:
        await endpoint(token_server, session, metrics).client_credentials()
    assert info.value.status == 500
    assert token_server.requests == 4
    assert outcome_count(metrics, "http_error") == 1


async def test_a_probe_makes_one_call(
    token_server: TokenServer, session: aiohttp.ClientSession, metrics: Metrics
) -> None:
    token_server.fail_next(None, FaultKind.HTTP_503)
    ep = endpoint(token_server, session, metrics)

    async def probe() -> None:
        PROBE.set(True)
        await ep.client_credentials()

    with pytest.raises(TransientTokenError):
        await asyncio.get_running_loop().create_task(probe())
    assert token_server.requests == 1


async def test_429_retry_after_is_honoured(
    token_server: TokenServer, session: aiohttp.ClientSession, metrics: Metrics
) -> None:
    token_server.fail_next(1, FaultKind.HTTP_429, retry_after=1)
    resp = await endpoint(token_server, session, metrics).client_credentials()
    assert token_server.is_valid(resp.access_token.value)
    assert token_server.requests == 2
    first, second = list(token_server.calls)
    assert first.status == 429 and second.status == 200


async def test_429_retry_after_beyond_the_budget_is_not_waited_for(
    token_server: TokenServer, session: aiohttp.ClientSession, metrics: Metrics
) -> None:
    """The wait would outlast the budget: no retry; the error carries Retry-After for the
    breaker instead of a timeout."""
    token_server.fail_next(1, FaultKind.HTTP_429, retry_after=30)
    with pytest.raises(TransientTokenError) as info:
        await endpoint(token_server, session, metrics, timeout="2s").client_credentials()
    assert info.value.status == 429 and info.value.retry_after == 30.0
    assert token_server.requests == 1


@pytest.mark.parametrize(
    ("error", "cls"),
    [
        ("invalid_client", InvalidClient),
        ("invalid_grant", InvalidGrant),
        ("unauthorized_client", UnauthorizedClient),
        ("invalid_scope", InvalidScope),
    ],
)
async def test_permanent_errors_are_never_retried(
    token_server: TokenServer,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    error: str,
    cls: type[TokenEndpointError],
) -> None:
    token_server.fail_next(None, FaultKind.OAUTH_ERROR, error=error)
    with pytest.raises(cls) as info:
        await endpoint(token_server, session, metrics).client_credentials()
    assert info.value.error == error and info.value.permanent
    assert token_server.requests == 1


async def test_a_refused_secret_falls_back_to_the_next_one(
    token_server: TokenServer,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OLD_SECRET", "not-the-secret-anymore")
    ep = endpoint(
        token_server,
        session,
        metrics,
        client_secret={"env": "OLD_SECRET"},
        client_secret_next={"env": "TEST_CLIENT_SECRET"},
    )
    await ep.client_credentials()
    assert token_server.invalid_client == 1 and token_server.requests == 2
    await ep.client_credentials()  # the working secret goes first from now on
    assert token_server.requests == 3


MALFORMED = [
    FaultKind.HTML_200,
    FaultKind.NOT_JSON,
    FaultKind.NO_ACCESS_TOKEN,
    FaultKind.ERROR_200,
    FaultKind.TOKEN_TYPE_NOT_BEARER,
]


@pytest.mark.parametrize("kind", MALFORMED)
async def test_malformed_answers_are_errors_not_crashes(
    token_server: TokenServer, session: aiohttp.ClientSession, metrics: Metrics, kind: FaultKind
) -> None:
    token_server.fail_next(1, kind)
    with pytest.raises(TokenEndpointError) as info:
        await endpoint(token_server, session, metrics).client_credentials()
    if kind is FaultKind.ERROR_200:
        assert info.value.error == "invalid_request"  # the error field wins over the 200
    else:
        assert isinstance(info.value, MalformedTokenResponse)
    assert token_server.requests == 1  # a provider bug is not retried blindly
    # The next call is normal again.
    resp = await endpoint(token_server, session, metrics).client_credentials()
    assert token_server.is_valid(resp.access_token.value)


@pytest.mark.parametrize(
    ("kind", "lifetime"),
    [
        (FaultKind.EXPIRES_IN_STRING, 120.0),  # "120": read as a number
        (FaultKind.EXPIRES_IN_NEGATIVE, 300.0),  # -60: the configured default_expires_in
        (FaultKind.EXPIRES_IN_MISSING, 300.0),
        (FaultKind.EXPIRES_IN_HUGE, 86400.0),  # 10**12: capped at max_expires_in
    ],
)
async def test_odd_expires_in_values_get_sane_lifetimes(
    token_server: TokenServer,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    log_capture: LogCapture,
    kind: FaultKind,
    lifetime: float,
) -> None:
    token_server.expires_in = 120
    token_server.fail_next(1, kind)
    token = (await endpoint(token_server, session, metrics).client_credentials()).access_token
    assert token.lifetime == pytest.approx(lifetime)
    if kind is not FaultKind.EXPIRES_IN_STRING:
        assert any("expires_in" in line.get("message", "") for line in log_capture.lines())


async def test_a_response_that_never_ends_times_out_within_the_budget(
    token_server: TokenServer, session: aiohttp.ClientSession, metrics: Metrics
) -> None:
    token_server.fail_next(1, FaultKind.HANG)
    with pytest.raises(TokenTimeout):
        await endpoint(token_server, session, metrics, timeout="1s").client_credentials()
    assert outcome_count(metrics, "timeout") == 1


async def test_a_slow_answer_within_the_budget_is_taken(
    token_server: TokenServer, session: aiohttp.ClientSession, metrics: Metrics
) -> None:
    token_server.fail_next(1, FaultKind.SLOW, delay=0.3)
    resp = await endpoint(token_server, session, metrics, timeout="5s").client_credentials()
    assert token_server.is_valid(resp.access_token.value)


async def test_an_unreachable_endpoint_is_a_network_error(
    session: aiohttp.ClientSession, metrics: Metrics
) -> None:
    server = TokenServer(client_secret=CLIENT_SECRET)
    await server.start()
    await server.aclose()  # nothing listens on that port now
    with pytest.raises(TransientTokenError) as info:
        await endpoint(server, session, metrics, timeout="3s").client_credentials()
    assert info.value.outcome == "network_error"


async def test_provider_clock_offset_is_measured_and_warned_about(
    token_server: TokenServer,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    log_capture: LogCapture,
) -> None:
    token_server.clock_offset = 120.0
    await endpoint(token_server, session, metrics).client_credentials()
    offset = metrics.registry.get_sample_value(
        "authproxy_provider_clock_offset_seconds", {"credential": "demo"}
    )
    assert offset is not None and 118.0 <= offset <= 122.0
    warnings = [line for line in log_capture.lines() if line.get("event") == "clock"]
    assert warnings and warnings[0]["level"] == "warning"


async def test_a_small_offset_is_noise(
    token_server: TokenServer, session: aiohttp.ClientSession, metrics: Metrics
) -> None:
    token_server.clock_offset = 0.4
    await endpoint(token_server, session, metrics).client_credentials()
    assert (
        metrics.registry.get_sample_value(
            "authproxy_provider_clock_offset_seconds", {"credential": "demo"}
        )
        == 0.0
    )


async def test_jwt_exp_wins_when_earlier_after_clock_correction(
    token_server: TokenServer, session: aiohttp.ClientSession, metrics: Metrics
) -> None:
    """expires_in lies (10**12, capped at a day); the JWT says 300 s on a clock 1000 s
    ahead: the token expires 300 s after our receive time, not 1300 s."""
    token_server.jwt_access_tokens = True
    token_server.clock_offset = 1000.0
    token_server.fail_next(1, FaultKind.EXPIRES_IN_HUGE)
    before = time.time()
    token = (await endpoint(token_server, session, metrics).client_credentials()).access_token
    after = time.time()
    assert before + 298 <= token.expires_at <= after + 302


ODD_SECRET = "s3cr+t/odd=&chars y"  # changed by both percent-encodings
ODD_REFRESH_TOKEN = "rt+odd/token=value&more"


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
@pytest.mark.parametrize("error", ["invalid_grant", "server_error", "invalid_request"])
async def test_an_error_text_that_quotes_our_secrets_keeps_none_of_them(
    token_server: TokenServer,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    monkeypatch: pytest.MonkeyPatch,
    auth_method: str,
    error: str,
) -> None:
    """Some providers quote the refresh token or client secret they refuse in
    error_description; that text goes on into last_error, /admin, `status` and 503 answers."""
    monkeypatch.setenv("ODD_SECRET", ODD_SECRET)
    ep = endpoint(
        token_server,
        session,
        metrics,
        auth_method=auth_method,
        client_secret={"env": "ODD_SECRET"},
    )
    token_server.fail_next(None, FaultKind.ECHO_SECRETS, error=error)
    with pytest.raises(TokenEndpointError) as info:
        await ep.refresh(Secret(ODD_REFRESH_TOKEN), budget=5.0, retry=False)
    assert token_server.faults_served[FaultKind.ECHO_SECRETS] == 1
    exc = info.value
    assert exc.error == error
    # The provider's words stay (they explain the refusal); what it quoted of ours does not.
    assert exc.description is not None and exc.description.startswith("refused ")
    assert REDACTED in exc.description
    basic = f"{quote('demo-client', safe='')}:{quote(ODD_SECRET, safe='')}"
    for value in (ODD_SECRET, ODD_REFRESH_TOKEN, base64.b64encode(basic.encode()).decode()):
        for form in (value, quote(value, safe=""), quote_plus(value)):
            assert form not in str(exc), f"{form[:4]}... quoted back in the error text"


async def test_a_long_error_text_is_cut(
    token_server: TokenServer, session: aiohttp.ClientSession, metrics: Metrics
) -> None:
    token_server.fail_next(1, FaultKind.ECHO_SECRETS, error="x" * 500)
    ep = endpoint(token_server, session, metrics, scopes=["s" * 500])  # echoed in the body
    with pytest.raises(TokenEndpointError) as info:
        await ep.client_credentials(budget=5.0)
    assert len(info.value.error) == 64 and info.value.error.endswith("...")
    assert info.value.description is not None and len(info.value.description) == 300


def test_retry_after_parsing() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("²") is None  # a digit to str.isdigit, not to float
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    later = parse_retry_after("Wed, 21 Oct 2065 07:28:00 GMT")
    assert later is not None and later > 0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
