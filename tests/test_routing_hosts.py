"""Host matching for forward mode, as pure functions: the canonical host form, authorities and
absolute-form targets parsed strictly, host routes found by every spelling of their name and by
nothing else."""

from __future__ import annotations

import pytest
from yarl import URL

from proxy.config import HostPort, RouteConfig
from proxy.errors import BadRequest, NoRoute
from proxy.routing import (
    Router,
    format_host,
    is_absolute_form,
    normalize_host,
    parse_absolute_target,
    parse_authority,
)
from proxy.tunnel import allowed_target


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("api.example.com", "api.example.com"),
        ("API.Example.COM", "api.example.com"),
        ("api.example.com.", "api.example.com"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("[0:0:0:0:0:0:0:1]", "::1"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("svc_internal.local", "svc_internal.local"),
    ],
)
def test_normalize_host(text: str, canonical: str) -> None:
    assert normalize_host(text) == canonical
    assert normalize_host(canonical) == canonical  # idempotent


@pytest.mark.parametrize(
    "text",
    [
        "",
        ".",
        "api..example.com",
        "api.example.com..",
        ".api.example.com",
        "api%2eexample.com",
        "user@api.example.com",
        "api.example.com:80",
        "api example.com",
        " api.example.com",
        "-api.example.com",
        "api-.example.com",
        "[fe80::1%25eth0]",
        "fe80::1%eth0",
        "[::1",
        "a" * 64 + ".example",
        "api/x",
        "api\\x",
    ],
)
def test_normalize_host_refuses(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - ipaddress, idna or our own message
        normalize_host(text)


@pytest.mark.parametrize(
    ("authority", "default", "expected"),
    [
        ("api.example.com", 80, ("api.example.com", 80)),
        ("api.example.com:", 80, ("api.example.com", 80)),
        ("api.example.com:8080", 80, ("api.example.com", 8080)),
        ("API.example.com.:0443", None, ("api.example.com", 443)),
        ("[::1]:8443", None, ("::1", 8443)),
        ("[::1]", 80, ("::1", 80)),
    ],
)
def test_parse_authority(authority: str, default: int | None, expected: tuple[str, int]) -> None:
    assert parse_authority(authority, default) == expected


@pytest.mark.parametrize(
    ("authority", "default"),
    [
        ("api.example.com", None),  # CONNECT needs a port
        ("u@api.example.com", 80),
        ("api.example.com:80@evil", 80),
        ("api.example.com:0", 80),
        ("api.example.com:65536", 80),
        ("api.example.com:+80", 80),
        ("api.example.com:80:80", 80),
        ("api.example.com: 80", 80),
        ("[::1]x", 80),
        ("[::1", 80),
        ("::1", 80),  # unbracketed IPv6 with a port is ambiguous
        ("", 80),
    ],
)
def test_parse_authority_refuses(authority: str, default: int | None) -> None:
    with pytest.raises(BadRequest):
        parse_authority(authority, default)


def test_parse_absolute_target() -> None:
    t = parse_absolute_target("HTTP://API.Example.com./v1/a%2Fb?x=%20&y#frag")
    assert (t.scheme, t.host, t.port) == ("http", "api.example.com", 80)
    assert (t.raw_path, t.query) == ("/v1/a%2Fb", "x=%20&y")
    t = parse_absolute_target("http://api.example.com:8080?q")
    assert (t.port, t.raw_path, t.query) == (8080, "/", "q")
    assert is_absolute_form("http://x/") and is_absolute_form("ftp://x")
    assert not is_absolute_form("/http://x") and not is_absolute_form("api.example.com:443")


@pytest.mark.parametrize(
    "target",
    [
        "https://api.example.com/",
        "ftp://api.example.com/",
        "http:///x",
        "http://u:p@api.example.com/",
        "http://api.example.com%2F@evil/",
    ],
)
def test_parse_absolute_target_refuses(target: str) -> None:
    with pytest.raises(BadRequest):
        parse_absolute_target(target)


def _route(name: str, host: str, port: int | None = None, prefix: str | None = None) -> RouteConfig:
    return RouteConfig(
        name=name,
        prefix=prefix,
        host=host,
        port=port,
        upstream=URL(f"https://{name}.upstream.example/base"),
        credential=None,
    )


def test_router_host_routes_by_canonical_name() -> None:
    router = Router(
        [
            _route("api", "api.example.com"),
            _route("api-v2", "api.example.com", prefix="/v2"),
            _route("alt", "alt.example.com", 8080),
            _route("v6", "::1"),
            _route("idn", "bücher.example"),
        ]
    )
    assert router.resolve("/x", "", "API.example.com.", 80).url == (
        "https://api.upstream.example/base/x"
    )
    assert router.resolve("/v2/r", "a=1", "api.example.com", 80).url == (
        "https://api-v2.upstream.example/base/r?a=1"
    )
    assert router.resolve("/", "", "alt.example.com", 8080).route.name == "alt"
    assert router.resolve("/", "", "[0::1]", 80).route.name == "v6"
    assert router.resolve("/", "", "xn--bcher-kva.example", 80).route.name == "idn"
    assert router.has_host("alt.example.com", 8080) and not router.has_host("alt.example.com", 80)
    for host, port in [("alt.example.com", 80), ("api.example.com", 443), ("evil", 80)]:
        with pytest.raises(NoRoute):
            router.resolve("/x", "", host, port)
    with pytest.raises(BadRequest):
        router.resolve("/x", "", "api%2eexample.com", 80)


def test_tunnel_allow_matching() -> None:
    allow = frozenset({HostPort("Registry.Example.com.", 443), HostPort("::1", 8443)})
    assert allowed_target("registry.example.com", 443, allow) == HostPort(
        "registry.example.com", 443
    )
    assert allowed_target("::1", 8443, allow) == HostPort("::1", 8443)
    assert allowed_target("registry.example.com", 8443, allow) is None
    assert allowed_target("example.com", 443, allow) is None
    assert format_host("::1", 8443) == "[::1]:8443"
    # What a config typo such as ":443" turns into never opens a tunnel anywhere.
    sloppy = frozenset({HostPort("0.0.0.0", 443), HostPort("::", 443), HostPort("h.example", 0)})
    assert allowed_target("0.0.0.0", 443, sloppy) is None
    assert allowed_target("::", 443, sloppy) is None
    assert allowed_target("h.example", 0, sloppy) is None
