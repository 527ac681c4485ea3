"""Route resolution (SPEC section 3): whole-segment prefixes, longest first; host matches for
forward mode; `allow` globs on the rest of the path. Never an open proxy: no match, no request.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from proxy.config import AllowRule, RouteConfig
from proxy.errors import BadRequest, Forbidden, NoRoute


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


@dataclass(frozen=True, slots=True)
class Resolved:
    """A matched route and the upstream target for this request."""

    route: RouteConfig
    rest_raw: str  # the path after the prefix, still percent-encoded
    url: str  # the upstream URL, encoded


def _segments_safe(raw_path: str) -> list[str]:
    """Decoded segments; dot segments (also percent-encoded ones) are refused."""
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
                key = (r.host, r.port or 80)
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
            candidates = self._host_routes.get((host.lower().rstrip("."), port or 80), ())
        for route in candidates:
            rest = _strip_prefix(raw_path, route.prefix)
            if rest is not None:
                url = self._upstream_base[route.name] + rest + (f"?{query}" if query else "")
                return Resolved(route, rest, url)
        if host is None:
            raise NoRoute(f"no route matches the path {raw_path.split('?')[0][:200]!r}")
        raise NoRoute(f"no route for host {host}:{port or 80}; authproxy is not an open proxy")

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


def _base(route: RouteConfig) -> str:
    u = route.upstream
    origin = f"{u.scheme}://{u.raw_authority}"
    return origin + u.raw_path.rstrip("/")
