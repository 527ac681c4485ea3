"""Never an open proxy: request targets, Host headers and CONNECT authorities that try to reach a
host, port or scheme no route names. Sent as raw bytes (no client library tidies them up); each
is refused (`no_route`, `bad_request`, `tunnel_refused`, or the HTTP parser's own 400) and no
upstream receives anything."""

from __future__ import annotations

import pytest

from proxy.demo import EchoServer, TokenServer
from proxy.runtime import Runtime
from tests import test_forward
from tests.conftest import LogCapture
from tests.test_forward import API_HOST, Upstream, raw_exchange

upstream = test_forward.upstream  # fixtures shared with test_forward.py
fproxy = test_forward.fproxy

# (request-target, Host header or None, expected status, expected X-Authproxy-Error or None
#  when the HTTP parser itself refuses the request with a plain 400)
TRICKS: list[tuple[str, str | None, int, str | None]] = [
    # unknown hosts, also ones that contain a configured name
    ("http://evil.example/x", "evil.example", 404, "no_route"),
    (f"http://{API_HOST}.evil.example/x", f"{API_HOST}.evil.example", 404, "no_route"),
    (f"http://evil{API_HOST}/x", f"evil{API_HOST}", 404, "no_route"),
    ("http://example.test/x", "example.test", 404, "no_route"),
    # userinfo: either side of the @ is the configured host
    (f"http://{API_HOST}@evil.example/x", "evil.example", 400, "bad_request"),
    (f"http://evil.example@{API_HOST}/x", API_HOST, 400, "bad_request"),
    (f"http://user:pw@{API_HOST}/x", API_HOST, 400, "bad_request"),
    (f"http://{API_HOST}:80@evil.example/x", "evil.example", 400, "bad_request"),
    # ports no route names, or that are not ports
    (f"http://{API_HOST}:8080/x", f"{API_HOST}:8080", 404, "no_route"),
    (f"http://{API_HOST}:443/x", f"{API_HOST}:443", 404, "no_route"),
    ("http://alt.example.test/x", "alt.example.test", 404, "no_route"),  # route is :8080
    (f"http://{API_HOST}:80:80/x", API_HOST, 400, None),
    (f"http://{API_HOST}:0/x", API_HOST, 400, "bad_request"),
    (f"http://{API_HOST}:+80/x", API_HOST, 400, "bad_request"),
    (f"http://{API_HOST}:99999/x", API_HOST, 400, None),
    # IPv6 and IP literals (no route names one), zone identifiers
    ("http://[::1]/x", "[::1]", 404, "no_route"),
    ("http://[::1]:8443/x", "[::1]:8443", 404, "no_route"),
    ("http://[fe80::1%25lo]/x", "[fe80::1%25lo]", 400, "bad_request"),
    ("http://127.0.0.1/x", "127.0.0.1", 404, "no_route"),
    ("http://[::ffff:127.0.0.1]/x", "[::ffff:127.0.0.1]", 404, "no_route"),
    # case and trailing dots: unknown hosts stay unknown, empty labels are not names
    ("http://EVIL.Example/x", "EVIL.Example", 404, "no_route"),
    ("http://evil.example./x", "evil.example.", 404, "no_route"),
    (f"http://{API_HOST}../x", f"{API_HOST}..", 400, "bad_request"),
    (f"http://.{API_HOST}/x", f".{API_HOST}", 400, "bad_request"),
    # percent-encoding in the authority
    ("http://api%2Eexample.test/x", "api%2Eexample.test", 400, "bad_request"),
    ("http://evil%2Eexample/x", "evil%2Eexample", 400, "bad_request"),
    (f"http://{API_HOST}%2F@evil.example/x", "evil.example", 400, "bad_request"),
    (f"http://{API_HOST}%00.evil.example/x", API_HOST, 400, "bad_request"),
    # absolute form and Host header that disagree: the target wins, a mismatch is refused
    ("http://evil.example/x", API_HOST, 404, "no_route"),
    (f"http://{API_HOST}/x", "evil.example", 400, "bad_request"),
    (f"http://{API_HOST}/x", f"{API_HOST}:8080", 400, "bad_request"),
    (f"http://{API_HOST}/x", f"{API_HOST}\r\nHost: evil.example", 400, None),  # two Hosts
    (f"http://{API_HOST}/x", "", 400, "bad_request"),
    # schemes no route serves
    (f"https://{API_HOST}/x", API_HOST, 400, "bad_request"),
    (f"ftp://{API_HOST}/x", API_HOST, 400, "bad_request"),
    (f"ws://{API_HOST}/x", API_HOST, 400, "bad_request"),
    # no host at all; origin form with a forward host only in Host (base-URL mode: prefixes)
    ("http:///x", API_HOST, 400, None),
    ("/x", API_HOST, 404, "no_route"),
    ("//evil.example/x", "evil.example", 404, "no_route"),
    # dot segments that would climb out of the route's upstream path
    (f"http://{API_HOST}/%2e%2e/admin", API_HOST, 400, "bad_request"),
    (f"http://{API_HOST}/v1/../../admin", API_HOST, 400, "bad_request"),
    (f"http://{API_HOST}/v1/%2E%2E%2Fadmin", API_HOST, 400, "bad_request"),
]


def _ids() -> list[str]:
    return [f"{i}:{t[0][:48]}|{t[1]}" for i, t in enumerate(TRICKS)]


@pytest.mark.parametrize(("target", "host", "status", "code"), TRICKS, ids=_ids())
async def test_open_proxy_trick_is_refused(
    fproxy: Runtime,
    upstream: Upstream,
    echo_server: EchoServer,
    token_server: TokenServer,
    target: str,
    host: str | None,
    status: int,
    code: str | None,
) -> None:
    head = f"GET {target} HTTP/1.1\r\n"
    if host is not None:
        head += f"Host: {host}\r\n"
    head += "Connection: close\r\n\r\n"
    resp = await raw_exchange(fproxy.proxy_port or 0, head.encode())
    assert resp.status == status, resp.body
    assert resp.headers.get("X-Authproxy-Error") == code
    if code is not None:
        assert resp.json()["error"] == code
    # Nothing reached either upstream, and no token was even fetched for the attempt.
    assert upstream.echo.requests == 0
    assert echo_server.requests == 0
    assert token_server.issued_access_tokens == 0


@pytest.mark.parametrize(
    ("target", "host"),
    [
        (f"http://{API_HOST}/x", API_HOST),
        ("http://API.Example.TEST/x", "API.EXAMPLE.test"),
        (f"http://{API_HOST}./x", f"{API_HOST}."),
        (f"http://{API_HOST}:80/x", API_HOST),
        (f"http://{API_HOST}:/x", API_HOST),
        (f"HTTP://{API_HOST}/x", f"{API_HOST}:80"),
        (f"http://{API_HOST}/x#fragment", None),
    ],
)
async def test_spellings_of_a_configured_host_reach_only_its_upstream(
    fproxy: Runtime, upstream: Upstream, target: str, host: str | None
) -> None:
    """Case, one trailing dot, an explicit default port: the same route, the same upstream,
    which receives its own Host, never what the client wrote."""
    head = f"GET {target} HTTP/1.1\r\n"
    if host is not None:
        head += f"Host: {host}\r\n"
    head += "Connection: close\r\n\r\n"
    version = "HTTP/1.1" if host is not None else "HTTP/1.0"
    resp = await raw_exchange(fproxy.proxy_port or 0, head.replace("HTTP/1.1", version).encode())
    assert resp.status == 200, resp.body
    echo = resp.json()
    assert echo["path"] == "/base/x"
    assert [v for k, v in echo["headers"] if k.lower() == "host"] == [f"localhost:{upstream.port}"]
    assert upstream.echo.requests == 1


async def test_path_that_looks_like_an_authority_stays_on_the_upstream(
    fproxy: Runtime, upstream: Upstream
) -> None:
    head = (
        f"GET http://{API_HOST}//evil.example/x?u=http://evil.example HTTP/1.1\r\n"
        f"Host: {API_HOST}\r\nConnection: close\r\n\r\n"
    )
    resp = await raw_exchange(fproxy.proxy_port or 0, head.encode())
    assert resp.status == 200
    echo = resp.json()
    assert echo["path"] == "/base//evil.example/x"
    assert echo["query"] == "u=http://evil.example"
    assert upstream.echo.requests == 1


async def test_the_upstreams_own_address_is_not_a_route(
    fproxy: Runtime, upstream: Upstream, token_server: TokenServer
) -> None:
    """Knowing where the upstream or the token endpoint live does not help: the proxy routes by
    configured names only, never by where a route happens to point."""
    for authority in (
        f"localhost:{upstream.port}",
        f"127.0.0.1:{upstream.port}",
        f"127.0.0.1:{token_server.url.port}",
    ):
        head = (
            f"GET http://{authority}/x HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
        )
        resp = await raw_exchange(fproxy.proxy_port or 0, head.encode())
        assert (resp.status, resp.headers.get("X-Authproxy-Error")) == (404, "no_route")
    assert upstream.echo.requests == 0


async def test_refused_userinfo_never_reaches_the_log(
    fproxy: Runtime, upstream: Upstream, log_capture: LogCapture
) -> None:
    secret = "pw-in-the-url-51c2"
    for head in (
        f"GET http://app:{secret}@{API_HOST}/x?access_token={secret} HTTP/1.1\r\n"
        f"Host: {API_HOST}\r\nConnection: close\r\n\r\n",
        f"CONNECT app:{secret}@localhost:{upstream.port} HTTP/1.1\r\n"
        f"Host: localhost:{upstream.port}\r\nConnection: close\r\n\r\n",
    ):
        resp = await raw_exchange(fproxy.proxy_port or 0, head.encode(), within=5.0)
        assert resp.status == 400
        assert secret not in resp.body.decode()
    paths = [line["path"] for line in log_capture.lines() if line.get("event") == "access"]
    assert f"http://[REDACTED]@{API_HOST}/x?access_token=[REDACTED]" in paths
    assert f"[REDACTED]@localhost:{upstream.port}" in paths
    log_capture.assert_clean(secret)
    assert upstream.echo.requests == 0
