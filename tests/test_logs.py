"""SPEC section 7: JSON lines, redaction, and a scrubber that no code path can skip.

The end-to-end test makes the token server issue recognisable tokens, provokes an error on
every path (each token-endpoint fault, invalid_grant, invalid_client, upstream failures, a
library traceback carrying a token, a secret query string, secret headers) and scans all
captured output for every token issued, the client secret, the admin token, the proxy_auth
password and the private key.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from yarl import URL

from proxy import logs
from proxy.demo import EchoServer, FaultKind, TokenServer
from proxy.logs import REDACTED, Scrubber, event, redact_headers, redact_query, scrubber
from proxy.runtime import Runtime
from tests.conftest import (
    CLIENT_SECRET,
    LogCapture,
    ProxyFactory,
    admin_url,
    proxy_config,
    proxy_url,
)
from tests.redis_fixture import free_port

ADMIN_TOKEN = "adm-7Hq2-planted-admin-token"
PROXY_PASSWORD = "pxy-pw-4c1d-planted"
ODD_SECRET = "odd+secret/with=&chars 7"  # changed by both percent-encodings


# -- units ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a/b", "/a/b"),
        ("/a?x=1&y=2", "/a?x=1&y=2"),
        ("/a?code=abc&y=2", "/a?code=[REDACTED]&y=2"),
        ("/a?ACCESS_TOKEN=abc", "/a?ACCESS_TOKEN=[REDACTED]"),
        (
            "/a?refresh_token=r&client_secret=s",
            "/a?refresh_token=[REDACTED]&client_secret=[REDACTED]",
        ),
        ("/a?code=", "/a?code=[REDACTED]"),
        ("/a?x=1;access_token=t&y", "/a?x=1;access_token=[REDACTED]&y"),
        (
            "/a?access%5Ftoken=t&api-key=k&JWT=j",
            "/a?access%5Ftoken=[REDACTED]&api-key=[REDACTED]&JWT=[REDACTED]",
        ),
        ("/a?q=caf%C3%A9+x&auth=a", "/a?q=caf%C3%A9+x&auth=[REDACTED]"),  # the rest as sent
        ("/a?tokens=keep&token", "/a?tokens=keep&token"),
    ],
)
def test_redact_query(raw: str, expected: str) -> None:
    assert redact_query(raw) == expected


def test_redact_headers() -> None:
    out = redact_headers(
        [("Authorization", "Bearer x"), ("cookie", "a=b"), ("Set-Cookie", "c"), ("Accept", "*/*")]
    )
    assert out == {
        "Authorization": REDACTED,
        "cookie": REDACTED,
        "Set-Cookie": REDACTED,
        "Accept": "*/*",
    }


def _scrubber_with(token: str, *static: str) -> Scrubber:
    s = Scrubber()
    s.add_static_source(lambda: list(static))
    s.add_token(token)
    return s


@pytest.mark.parametrize(
    "template",
    [
        "{t}",
        "token {t}.",
        "rejected: '{t}'",
        '{{"access_token":"{t}"}}',
        "grant_type=refresh_token&refresh_token={t}&x=1",
        "Bearer {t}",
        "https://h/p?access_token={t}#f",
        "a/{t}/b",
        "(={t}=)",
    ],
)
def test_scrubber_finds_run_time_tokens_in_context(template: str) -> None:
    token = "tst-rt-Ab9_x-" + "Q" * 20 + "-"  # ends with an edge character
    s = _scrubber_with(token)
    out = s.scrub(template.format(t=token))
    assert token not in out
    assert REDACTED in out


def test_scrubber_odd_tokens_and_encodings() -> None:
    odd = "tok!with spaces&amp;and:colons"
    static = "s3cr3t/with+plus=="
    s = _scrubber_with(odd, static)
    text = (
        f"a {odd} b {quote(odd, safe='')} c {static} d {quote(static, safe='')} "
        f"e client_secret={quote_plus(static)}"
    )
    out = s.scrub(text)
    for v in (odd, quote(odd, safe=""), static, quote(static, safe=""), quote_plus(static)):
        assert v not in out
    assert out.count(REDACTED) == 5


def test_scrubber_pem_lines() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    s = _scrubber_with("x" * 10, pem)
    body_lines = [ln for ln in pem.splitlines() if not ln.startswith("-----")]
    out = s.scrub(f"key was {pem}; one line: {body_lines[0]}")
    for line in body_lines:
        if len(line) >= 16:
            assert line not in out


def test_scrubber_leaves_ordinary_text_alone() -> None:
    s = _scrubber_with("tst-at-" + "k" * 22, CLIENT_SECRET)
    text = "GET /echo/v4/accounts?limit=2 took 12.5 ms request_id=0123456789abcdef"
    assert s.scrub(text) == text


def test_filter_scrubs_args_exception_fields_and_bad_format(log_capture: LogCapture) -> None:
    token = "tst-at-" + "Z" * 24
    scrubber().add_token(token)

    class Opaque:
        def __str__(self) -> str:
            return f"opaque holding {token}"

    log = logging.getLogger("some.library")
    log.warning("args %s", token)
    log.warning("bad format %d", token)  # TypeError inside logging: must not print raw args
    try:
        raise ValueError(f"boom {token}")
    except ValueError:
        log.exception("failed")
    log.warning("with stack", stack_info=True, extra={"tok": token})
    event(
        logging.getLogger("authproxy.test"),
        logging.ERROR,
        "token",
        "fields",
        nested={"list": [token, 1, None], "obj": Opaque(), "set": {token}},
    )
    lines = log_capture.lines()
    text = json.dumps(lines)
    assert token not in text
    assert len(lines) == 5
    assert all(line["level"] in ("warning", "error") for line in lines)
    assert "ValueError: boom [REDACTED]" in lines[2]["exception"]
    assert lines[4]["nested"]["obj"] == "opaque holding [REDACTED]"


def test_uncaught_exception_hook_writes_scrubbed_json(
    log_capture: LogCapture, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    token = "tst-at-" + "U" * 24
    scrubber().add_token(token)
    try:
        raise RuntimeError(f"crash with {token}")
    except RuntimeError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    err = capsys.readouterr().err
    line = json.loads(err.strip().splitlines()[-1])
    assert line["event"] == "crash"
    assert line["level"] == "critical"
    assert "RuntimeError: crash with [REDACTED]" in line["exception"]
    assert token not in err


# -- end to end -------------------------------------------------------------------------


def _ec_key_pem(tmp_path: Path) -> tuple[Path, bytes, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / "client-key.pem"
    path.write_bytes(pem)
    return path, public, pem.decode()


async def _token_calls(rt: Runtime, credential: str) -> float:
    """Sum of authproxy_token_requests_total for one credential, read from the registry."""
    total = 0.0
    for metric in rt.metrics.token_requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels["credential"] == credential:
                total += sample.value
    return total


async def _wait_for(predicate: Any, what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_no_secret_reaches_any_log_line(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    log_capture: LogCapture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("PROXY_PW", PROXY_PASSWORD)
    key_path, public_pem, key_pem = _ec_key_pem(tmp_path)
    token_server.register_jwt_key(public_pem)
    token_server.auth_methods = {
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
    }
    raw = proxy_config(token_server, echo_server)
    creds = raw["credentials"]
    creds["post"] = {
        "grant": "client_credentials",
        "token_url": str(token_server.token_url),
        "client_id": "demo-client",
        "client_secret": {"env": "TEST_CLIENT_SECRET"},
        "auth_method": "client_secret_post",
        "timeout": "1s",
    }
    creds["jwt"] = {
        "grant": "client_credentials",
        "token_url": str(token_server.token_url),
        "client_id": "demo-client",
        "auth_method": "private_key_jwt",
        "private_key": {"file": str(key_path)},
    }
    creds["chain"] = {
        "grant": "refresh_token",
        "token_url": str(token_server.token_url),
        "client_id": "demo-client",
        "client_secret": {"env": "TEST_CLIENT_SECRET"},
    }
    dead_port = free_port()
    raw["routes"] += [
        {
            "name": n,
            "match": {"prefix": f"/{n}"},
            "upstream": f"{echo_server.url}/api",
            "credential": n,
        }
        for n in ("post", "jwt", "chain")
    ]
    raw["routes"].append(
        {
            "name": "dead",
            "match": {"prefix": "/dead"},
            "upstream": f"http://127.0.0.1:{dead_port}/api",
            "credential": "demo",
        }
    )
    raw["admin_token"] = {"env": "ADMIN_TOKEN"}
    raw["proxy_auth"] = {"users": {"svc": {"env": "PROXY_PW"}}}
    rt = await make_proxy(raw)
    basic = _basic("svc", PROXY_PASSWORD)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async with aiohttp.ClientSession(trust_env=False) as http:

        async def get(path: str, **kw: Any) -> int:
            headers = {"Proxy-Authorization": basic, **kw.pop("headers", {})}
            async with http.get(URL(proxy_url(rt, path), encoded=True), headers=headers, **kw) as r:
                await r.read()
                return r.status

        # Normal traffic on every credential, and a chain seeded through the admin API.
        seed = token_server.seed_refresh_token()
        async with http.put(
            admin_url(rt, "/admin/credentials/chain/refresh-token"),
            json={"refresh_token": seed},
            headers=admin,
        ) as r:
            assert r.status == 204
        for name in ("echo", "post", "jwt", "chain"):
            assert await get(f"/{name}/ok") == 200

        # Every fault of the token endpoint, one forced refresh each (4 in a row for the
        # retried kinds, so the call fails after its retries). HANG goes to "post" (1 s budget).
        for kind in FaultKind:
            if kind is FaultKind.OAUTH_ERROR:
                continue
            name = "post" if kind is FaultKind.HANG else "demo"
            before = await _token_calls(rt, name)
            token_server.fail_next(4, kind, delay=0.05, retry_after=0)
            assert rt.refresh_now(_key(name))
            await _wait_for(lambda n=name, b=before: _gt(rt, n, b), f"a token call after {kind}")
            token_server.clear_faults()
            # Requests keep working (a held token or a fresh one) whatever the fault did.
            assert await get(f"/{'echo' if name == 'demo' else name}/after-fault") in (200, 503)
        # A token endpoint slower than the credential's budget.
        before = await _token_calls(rt, "post")
        token_server.fail_next(1, FaultKind.SLOW, delay=3.0)
        assert rt.refresh_now(_key("post"))
        await _wait_for(lambda: _gt(rt, "post", before), "a timed-out token call")
        for error in ("invalid_client", "invalid_request", "server_error"):
            before = await _token_calls(rt, "post")
            token_server.fail_next(4, FaultKind.OAUTH_ERROR, error=error)
            rt.refresh_now(_key("post"))
            await _wait_for(lambda b=before: _gt(rt, "post", b), f"oauth error {error}")
            token_server.clear_faults()
        # The token endpoint is down: degraded, then token_unavailable for a credential
        # that has no token yet.
        token_server.outage = True
        before = await _token_calls(rt, "jwt")
        rt.refresh_now(_key("jwt"))
        await _wait_for(lambda: _gt(rt, "jwt", before), "a call during the outage")
        token_server.outage = False

        # invalid_grant on the chain: reauth_required, then a request sees it.
        # (The upstream refuses the access token, so the replay must rotate the chain.)
        token_server.revoke(seed)  # the whole family: the stored refresh token is dead
        echo_server.reject_next(1)
        assert await get("/chain/after") == 503
        assert await _state_is(rt, "chain", "reauth_required")

        # Upstream failures: unreachable, 5xx, a 401 replay and a 401 that stays.
        assert await get("/dead/x") == 502
        assert await get("/echo/_status/500") == 500
        echo_server.reject_next(1)
        assert await get("/echo/replayed") == 200
        echo_server.reject_next(2)
        assert await get("/echo/refused") == 401

        # Secrets in the query and in headers the client sends.
        some_token = token_server.issued_tokens()[0]
        assert (
            await get(
                f"/echo/q?access_token={some_token}&code={quote(CLIENT_SECRET)}&keep=1",
                headers={"Authorization": f"Bearer {some_token}", "Cookie": f"s={some_token}"},
            )
            == 200
        )
        # Wrong proxy credentials and a wrong admin token are refused without echoing them.
        async with http.get(
            proxy_url(rt, "/echo/x"),
            headers={"Proxy-Authorization": _basic("svc", "wrong-" + PROXY_PASSWORD)},
        ) as r:
            assert r.status == 407
        async with http.get(
            admin_url(rt, "/admin/credentials"), headers={"Authorization": "Bearer nope"}
        ) as r:
            assert r.status == 401
        async with http.get(admin_url(rt, "/admin/credentials"), headers=admin) as r:
            listing = await r.text()

        # A library raises an exception whose text carries a token and the client secret,
        # and its logger writes the traceback.
        bad_url = (
            f"ftp://127.0.0.1/x?refresh_token={token_server.issued_tokens()[-1]}&s={CLIENT_SECRET}"
        )
        try:
            async with http.get(bad_url):
                pass
        except aiohttp.ClientError:
            logging.getLogger("aiohttp.client").exception(
                "request with %s failed", {"token": some_token}
            )
        else:
            raise AssertionError("aiohttp accepted an ftp:// URL")

    # A library logs a traceback whose text carries a token and the client secret.
    try:
        raise aiohttp.ClientResponseError(
            None,  # type: ignore[arg-type]
            (),
            status=400,
            message=f"bad token {some_token}; secret {CLIENT_SECRET}",
        )
    except aiohttp.ClientResponseError:
        logging.getLogger("aiohttp.client").exception(
            "request with %s failed", {"refresh_token": token_server.issued_tokens()[-1]}
        )

    lines = log_capture.lines()
    text = log_capture.text()
    secrets = [
        *token_server.issued_tokens(),
        seed,
        CLIENT_SECRET,
        quote_plus(CLIENT_SECRET),
        ADMIN_TOKEN,
        PROXY_PASSWORD,
        base64.b64encode(f"svc:{PROXY_PASSWORD}".encode()).decode(),
        *(ln for ln in key_pem.splitlines() if not ln.startswith("-----")),
    ]
    assert len(token_server.issued_tokens()) >= 10
    for secret in secrets:
        assert secret not in text, f"a secret ({secret[:6]}...) reached the log"
        assert secret not in listing, f"a secret ({secret[:6]}...) is in /admin/credentials"

    # The test provoked what it claims: every line is JSON, with the failures in it.
    outcomes = {ln.get("outcome") for ln in lines if ln["event"] == "token"}
    assert {"success", "http_error", "network_error", "malformed", "invalid_client"} <= outcomes
    assert {"oauth_error", "invalid_grant"} <= outcomes
    states = {(ln.get("credential"), ln.get("state")) for ln in lines if ln["event"] == "state"}
    assert ("chain", "reauth_required") in states
    assert ("jwt", "degraded") in states or ("demo", "degraded") in states
    access = [ln for ln in lines if ln["event"] == "access"]
    assert {a["status"] for a in access} >= {200, 401, 500, 502, 503}
    secret_query = [a for a in access if a["path"].startswith("/echo/q?")]
    assert secret_query[0]["path"] == "/echo/q?access_token=[REDACTED]&code=[REDACTED]&keep=1"
    library = [ln for ln in lines if ln.get("logger") == "aiohttp.client"]
    assert "[REDACTED]" in library[0]["message"]
    assert "ftp://127.0.0.1/x?refresh_token=[REDACTED]&s=[REDACTED]" in library[0]["exception"]
    for ln in lines:
        assert {"ts", "level", "event"} <= set(ln)


async def test_a_provider_quoting_our_secrets_reaches_no_answer_listing_status_or_log(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    log_capture: LogCapture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its refusal text is kept (it explains the failure), but the refresh token and client
    secret it quotes reach neither the clients' 503s, nor /admin/credentials, nor
    `authproxy status` (which reads the chain's last_error from the store), nor a log line."""
    monkeypatch.setenv("ODD_SECRET", ODD_SECRET)
    raw = proxy_config(
        token_server, echo_server, store={"kind": "sqlite", "path": str(tmp_path / "chains.db")}
    )
    common = {"token_url": str(token_server.token_url), "client_id": "demo-client"}
    raw["credentials"]["post"] = {
        **common,
        "grant": "client_credentials",
        "client_secret": {"env": "ODD_SECRET"},
        "auth_method": "client_secret_post",
        "timeout": "2s",
    }
    raw["credentials"]["chain"] = {
        **common,
        "grant": "refresh_token",
        "client_secret": {"env": "TEST_CLIENT_SECRET"},  # client_secret_basic
    }
    raw["routes"] += [
        {
            "name": n,
            "match": {"prefix": f"/{n}"},
            "upstream": f"{echo_server.url}/api",
            "credential": n,
        }
        for n in ("post", "chain")
    ]
    rt = await make_proxy(raw)
    seed = token_server.seed_refresh_token()
    async with aiohttp.ClientSession(trust_env=False) as http:
        async with http.put(
            admin_url(rt, "/admin/credentials/chain/refresh-token"), json={"refresh_token": seed}
        ) as r:
            assert r.status == 204
        token_server.fail_next(None, FaultKind.ECHO_SECRETS, error="server_error")
        async with http.get(proxy_url(rt, "/post/x")) as r:
            assert r.status == 503
            unavailable = await r.json()
        token_server.clear_faults()
        token_server.fail_next(None, FaultKind.ECHO_SECRETS, error="server_error")
        async with http.get(proxy_url(rt, "/chain/x")) as r:
            assert r.status == 503
            chain_unavailable = await r.json()
        token_server.clear_faults()
        async with http.get(admin_url(rt, "/admin/credentials")) as r:
            listing = await r.text()
    config = str(tmp_path / "authproxy-0.yaml")  # what make_proxy wrote and serves
    _, status_text = await _cli("status", "-c", config)
    _, status_json = await _cli("status", "-c", config, "--json")

    assert token_server.faults_served[FaultKind.ECHO_SECRETS] >= 2
    assert unavailable["error"] == "token_unavailable"
    assert chain_unavailable["error"] == "token_unavailable"
    # The provider's words got through, with ours taken out.
    for shown in (
        unavailable["message"],
        chain_unavailable["message"],
        listing,
        status_text,
        status_json,
    ):
        assert "refused" in shown and REDACTED in shown
    basic = base64.b64encode(f"demo-client:{CLIENT_SECRET}".encode()).decode()
    secrets = [
        seed,
        CLIENT_SECRET,
        basic,
        *(ODD_SECRET, quote(ODD_SECRET, safe=""), quote_plus(ODD_SECRET)),
        *token_server.issued_tokens(),
    ]
    shown_anywhere = {
        "the 503 answers": json.dumps([unavailable, chain_unavailable]),
        "/admin/credentials": listing,
        "authproxy status": status_text + status_json,
        "the log": log_capture.text(),
    }
    for where, text in shown_anywhere.items():
        for secret in secrets:
            assert secret not in text, f"a secret ({secret[:4]}...) reached {where}"


async def _cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _key(credential: str) -> Any:
    from proxy.models import ChainKey

    return ChainKey(credential)


async def _gt(rt: Runtime, credential: str, before: float) -> bool:
    return await _token_calls(rt, credential) > before


async def _state_is(rt: Runtime, credential: str, state: str) -> bool:
    return rt.engine.tokens.health[credential].state.value == state


def test_setup_logging_routes_library_loggers_through_the_scrubber() -> None:
    import io

    stream = io.StringIO()
    token = "tst-at-" + "L" * 24
    scrubber().add_token(token)
    logs.setup_logging("debug", stream)
    try:
        logging.getLogger("redis.asyncio.connection").debug("sent AUTH %s", token)
        logging.getLogger("aiohttp.access").info("should be disabled %s", token)
    finally:
        logs.shutdown_logging()
        logging.getLogger().handlers.clear()
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [ln["logger"] for ln in lines] == ["redis.asyncio.connection"]
    assert lines[0]["message"] == "sent AUTH [REDACTED]"


def test_access_lines_are_json_and_a_new_secret_invalidates_cached_scrubs() -> None:
    """Access lines are scrubbed with results cached per text; a token learnt after a text
    was cached must still be redacted from the next line that carries it."""
    import io

    stream = io.StringIO()
    token = "tst-at-" + "C" * 24
    target = f"/api/v1/items/{token}?page=2"
    # Cached while the token is unknown: the text comes back unchanged.
    assert scrubber().scrub_cached(target) == target
    scrubber().add_token(token)
    logs.setup_logging("info", stream)
    try:
        logs.access("api", "GET", target, 502, 0.5, "0123abcd", "cred", generated_id=True)
        logs.access("api", "POST", f"/api/x?access_token=q{token}", 201, 0.001, token, "cred")
    finally:
        logs.shutdown_logging()
        logging.getLogger().handlers.clear()
    first, second = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert first["path"] == "/api/v1/items/[REDACTED]?page=2"
    assert {k: first[k] for k in ("event", "route", "method", "status", "credential")} == {
        "event": "access",
        "route": "api",
        "method": "GET",
        "status": 502,
        "credential": "cred",
    }
    assert first["duration_ms"] == 500.0
    assert first["request_id"] == "0123abcd"
    assert second["path"] == "/api/x?access_token=[REDACTED]"  # by the parameter's name
    assert second["request_id"] == REDACTED  # a caller's request id is scrubbed too
    assert token not in stream.getvalue()


def test_an_access_line_built_before_a_token_was_learnt_is_rebuilt_after() -> None:
    """The writer keeps each (route, method, path, credential) combination's formatted text;
    a token registered after that must still be redacted from the next such line."""
    import io
    import queue

    token = "tst-late-" + "D" * 24
    writer = logs._Writer(queue.SimpleQueue(), io.StringIO())
    line = logs._Access((0.0, "api", "GET", f"/items/{token}", 200, 0.01, "ab12", True, "cred"))
    before = json.loads(writer._line(line))
    assert before["path"] == f"/items/{token}"  # not a secret yet
    scrubber().add_token(token)
    after = json.loads(writer._line(line))
    assert after["path"] == "/items/[REDACTED]"
    del before["path"], after["path"]
    assert after == before  # every other field as it was
    assert (after["event"], after["route"], after["status"]) == ("access", "api", 200)


def test_registering_a_known_token_again_keeps_cached_scrubs() -> None:
    """A refresh token is registered when seeded and again on every use: only a new secret
    can change what must be redacted, so only a new one empties the caches."""
    token = "tst-known-" + "E" * 24
    scrubber().add_token(token)
    before = scrubber().generation
    scrubber().add_token(token)
    assert scrubber().generation == before
    scrubber().add_token(token + "-new")
    assert scrubber().generation > before
