"""Route resolution (SPEC section 3): whole-segment prefixes, longest first; host matches for
forward mode; `allow` globs on the rest of the path. Never an open proxy: no match, no request.

Forward mode parses the absolute-form request target itself (`parse_absolute_target`), strictly:
a host is a plain DNS name or an IP literal, compared in one canonical form (`normalize_host`),
so userinfo, percent-encoding, stray ports or spellings cannot pick a route they do not name.
The upstream URL always comes from the route; the request only contributes the path and query.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from proxy.config import AllowRule, RouteConfig
from proxy.errors import BadRequest, Forbidden, NoRoute

_LABEL: Final = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME_RE: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_SCHEME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_PORT_RE: Final = re.compile(r"[0-9]{0,5}")
_AUTHORITY_END: Final = re.compile(r"[/?#]")
_AUTHORITY_CACHE: Final = 1024
"""Hosts and authorities parsed are remembered (forward mode sees the same few on every
request: the target, the Host header, the route lookup). Failures raise and are not kept."""


@functools.lru_cache(maxsize=_AUTHORITY_CACHE)
def normalize_host(text: str) -> str:
    """The canonical form of a host for matching: lower case, one trailing dot dropped, IPv6
    compressed without brackets, international names in IDNA (punycode) form.

    Raises ValueError for anything else (percent-encoding, userinfo, empty labels, ...)."""
    host = text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if "%" in host:
            raise ValueError("IPv6 zone identifiers are not accepted")
        return ipaddress.IPv6Address(host).compressed
    if ":" in host:
        if "%" in host:
            raise ValueError("IPv6 zone identifiers are not accepted")
        return ipaddress.IPv6Address(host).compressed
    if not host.isascii():
        host = host.encode("idna").decode("ascii")
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"not a host name: {text[:100]!r}")
    return host


def format_host(host: str, port: int | None = None) -> str:
    """`host[:port]` with IPv6 literals in brackets (for messages and URLs)."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


@functools.lru_cache(maxsize=_AUTHORITY_CACHE)
def parse_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """`host[:port]` of a request target -> (canonical host, port). Raises BadRequest.

    No userinfo, no percent-encoding, a port of 1-65535 (empty means `default_port`)."""
    if "@" in authority:
        raise BadRequest("userinfo (user@host) in the request target is not accepted")
    if authority.startswith("["):
        end = authority.find("]")
        host_part, rest = authority[: end + 1], authority[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            raise BadRequest(f"malformed IPv6 literal in the request target {authority[:100]!r}")
        port_text = rest[1:] if rest else None
    else:
        host_part, sep, port_text_ = authority.rpartition(":")
        if not sep:
            host_part, port_text = port_text_, None
        else:
            port_text = port_text_
    if port_text is None or port_text == "":
        if default_port is None:
            raise BadRequest(f"the request target {authority[:100]!r} needs a port")
        port = default_port
    else:
        if not _PORT_RE.fullmatch(port_text) or not 0 < int(port_text) <= 65535:
            raise BadRequest(f"bad port in the request target {authority[:100]!r}")
        port = int(port_text)
    try:
        host = normalize_host(host_part)
    except ValueError as exc:
        raise BadRequest(
            f"the request target's host {host_part[:100]!r} is not a plain host name or IP literal"
        ) from exc
    return host, port


@dataclass(slots=True)  # not frozen: built per request, and a frozen init costs 3x
class AbsoluteTarget:
    """An absolute-form request target (`http://host[:port]/path?query`), parsed strictly."""

    scheme: str
    host: str  # canonical (normalize_host)
    port: int
    raw_path: str  # percent-encoded, starts with "/"
    query: str  # percent-encoded, without "?"
    authority: str  # `host[:port]` exactly as sent


def is_absolute_form(raw_target: str) -> bool:
    scheme, sep, _ = raw_target.partition("://")
    return bool(sep) and (scheme == "http" or _SCHEME_RE.fullmatch(scheme) is not None)


def parse_absolute_target(raw_target: str) -> AbsoluteTarget:
    """Split an absolute-form target without decoding anything; raises BadRequest."""
    scheme, sep, rest = raw_target.partition("://")
    if scheme != "http":  # the usual spelling skips the checks below
        if not sep or not _SCHEME_RE.fullmatch(scheme):
            raise BadRequest("the request target is not an absolute URL")
        scheme = scheme.lower()
        if scheme != "http":
            raise BadRequest(
                f"forward mode takes http:// URLs, not {scheme}://; call http://host/... "
                "through the proxy and authproxy speaks TLS to the upstream itself"
            )
    elif not sep:
        raise BadRequest("the request target is not an absolute URL")
    end = _AUTHORITY_END.search(rest)
    authority, tail = (rest[: end.start()], rest[end.start() :]) if end else (rest, "")
    if not authority:
        raise BadRequest("the request target has no host")
    host, port = parse_authority(authority, 80)
    if "#" in tail:
        tail = tail.split("#", 1)[0]
    path, _, query = tail.partition("?")
    return AbsoluteTarget(scheme, host, port, path or "/", query, authority)


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """`*` is one path segment, `**` any number of segments (zero included)."""
    out = []
    for segment in pattern.strip("/").split("/"):
        if segment == "**":
            out.append("(?:/[^/]*)*")
        else:
            out.append("/" + "[^/]*".join(re.escape(p) for p in segment.split("*")))
    return re.compile("".join(out) + "/?" if pattern.strip("/") else "(?:/[^/]*)*")


@dataclass(frozen=True, slots=True)
class CompiledRule:
    methods: frozenset[str]
    paths: tuple[re.Pattern[str], ...]


@dataclass(slots=True)  # not frozen: built per request, and a frozen init costs 3x
class Resolved:
    """A matched route and the upstream target for this request."""

    route: RouteConfig
    rest_raw: str  # the path after the prefix, still percent-encoded
    url: str  # the upstream URL, encoded


def _segments_safe(raw_path: str) -> list[str]:
    """Decoded segments; dot segments (also percent-encoded ones) are refused."""
    if "%" not in raw_path and "\\" not in raw_path:
        # Nothing to decode and no backslash to split on: the segments are the path's own.
        segments = raw_path.split("/")
        if "." in segments or ".." in segments:
            raise BadRequest(
                "the path contains a dot segment ('.' or '..'), which is not forwarded"
            )
        return segments
    decoded = []
    for seg in raw_path.split("/"):
        text = unquote(seg)
        parts = re.split(r"[/\\]", text)
        if any(p in (".", "..") for p in parts):
            raise BadRequest(
                "the path contains a dot segment ('.' or '..'), which is not forwarded"
            )
        decoded.append(text)
    return decoded


class Router:
    """Matches requests to routes; built once per configuration."""

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self._prefix_routes = sorted(
            (r for r in routes if r.host is None and r.prefix is not None),
            key=lambda r: len(r.prefix or ""),
            reverse=True,
        )
        self._host_routes: dict[tuple[str, int], list[RouteConfig]] = {}
        for r in routes:
            if r.host is not None:
                key = (_canonical_config_host(r.host), r.port or 80)
                self._host_routes.setdefault(key, []).append(r)
        for lst in self._host_routes.values():
            lst.sort(key=lambda r: len(r.prefix or ""), reverse=True)
        self._rules: dict[str, tuple[CompiledRule, ...]] = {
            r.name: tuple(_compile(rule) for rule in r.allow) for r in routes
        }
        self._upstream_base = {r.name: _base(r) for r in routes}

    def __repr__(self) -> str:
        prefixes, hosts = len(self._prefix_routes), len(self._host_routes)
        return f"<Router prefix_routes={prefixes} host_routes={hosts}>"

    def has_host(self, host: str, port: int) -> bool:
        """Whether some route matches this (canonical) host and port."""
        return (host, port) in self._host_routes

    def host_ports(self, host: str) -> list[int]:
        """The ports host routes serve for this (canonical) host, for messages."""
        return sorted(p for h, p in self._host_routes if h == host)

    def resolve(
        self, raw_path: str, query: str, host: str | None = None, port: int | None = None
    ) -> Resolved:
        """Pick the route for an origin-form request (host None) or an absolute-form one."""
        if not raw_path.startswith("/"):
            raise BadRequest("the request target must be an absolute path or an absolute http URL")
        _segments_safe(raw_path)
        if host is None:
            candidates: Sequence[RouteConfig] = self._prefix_routes
        else:
            try:
                host = normalize_host(host)
            except ValueError as exc:
                raise BadRequest("the request target's host is not a plain host name") from exc
            candidates = self._host_routes.get((host, port or 80), ())
        for route in candidates:
            rest = _strip_prefix(raw_path, route.prefix)
            if rest is not None:
                url = self._upstream_base[route.name] + rest + (f"?{query}" if query else "")
                return Resolved(route, rest, url)
        if host is None:
            raise NoRoute(f"no route matches the path {raw_path.split('?')[0][:200]!r}")
        if candidates:
            raise NoRoute(
                f"no route for {format_host(host, port or 80)} matches the path "
                f"{raw_path[:200]!r}; authproxy is not an open proxy"
            )
        raise NoRoute(
            f"no route for host {format_host(host, port or 80)}; authproxy is not an open proxy"
        )

    def check_allowed(self, route: RouteConfig, method: str, rest_raw: str) -> None:
        rules = self._rules[route.name]
        if not rules:
            return
        rest = "/".join(_segments_safe(rest_raw)) or "/"
        for rule in rules:
            if method in rule.methods and any(p.fullmatch(rest) for p in rule.paths):
                return
        raise Forbidden(
            f"route {route.name} does not allow {method} {rest[:200]}", route=route.name
        )


def _compile(rule: AllowRule) -> CompiledRule:
    return CompiledRule(rule.methods, tuple(glob_to_regex(p) for p in rule.paths))


def _strip_prefix(path: str, prefix: str | None) -> str | None:
    if prefix is None or prefix == "/":
        return path
    if path == prefix:
        return ""
    if path.startswith(prefix) and path[len(prefix)] == "/":
        return path[len(prefix) :]
    return None


def _canonical_config_host(host: str) -> str:
    try:
        return normalize_host(host)
    except ValueError:
        return host  # never equal to a canonical request host, so it matches nothing


def _base(route: RouteConfig) -> str:
    u = route.upstream
    origin = f"{u.scheme}://{u.raw_authority}"
    return origin + u.raw_path.rstrip("/")
