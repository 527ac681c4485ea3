"""The proxy port: web request -> `Inbound` -> `Pipeline` -> streamed response, one access line.

Runs on aiohttp's low-level `web.Server` (no router or middleware on the hot path). One port
serves both modes: origin-form targets (`GET /prefix/...`, base-URL mode) and absolute-form
ones (`GET http://host/...`, forward mode through `HTTP_PROXY`), plus `CONNECT`, which is
refused (`tunnel_refused`) unless the target is on `tunnel_allow` (see `proxy.tunnel`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Final

import aiohttp
from aiohttp import web
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import HostPort
from proxy.deadlines import Deadlines
from proxy.errors import BadRequest, ProxyAuthRequired, ProxyError, TunnelRefused, UpstreamTimeout
from proxy.logs import access
from proxy.pipeline import Inbound, Outbound, Pipeline
from proxy.routing import (
    AbsoluteTarget,
    format_host,
    is_absolute_form,
    normalize_host,
    parse_absolute_target,
    parse_authority,
)
from proxy.transport import map_client_error
from proxy.tunnel import allowed_target, open_tunnel

log = logging.getLogger("authproxy.server")

_SMALL_BODY: Final = 256 * 1024
_REQUEST_ID_OK: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:"
)


def new_request_id() -> str:
    return os.urandom(8).hex()


def _request_id(request: web.BaseRequest) -> tuple[str, bool]:
    """The caller's X-Request-ID when it is sane, else a new one; and whether it is new."""
    rid = request.headers.get("X-Request-ID")
    if rid and len(rid) <= 128 and set(rid) <= _REQUEST_ID_OK:
        return rid, False
    return new_request_id(), True


def error_response(exc: ProxyError, request_id: str) -> web.Response:
    """SPEC section 4: JSON body, `X-Authproxy-Error`, `Retry-After` where it applies."""
    body = {
        "error": exc.code.value,
        "message": exc.message,
        "route": exc.route,
        "request_id": request_id,
    }
    headers = {"X-Authproxy-Error": exc.code.value, "X-Request-ID": request_id}
    if exc.retry_after is not None or exc.code.value == "token_unavailable":
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after or 1)))
    if isinstance(exc, ProxyAuthRequired):
        headers["Proxy-Authenticate"] = 'Basic realm="authproxy"'
    return web.Response(
        status=exc.status, text=json.dumps(body), content_type="application/json", headers=headers
    )


class ProxyHandler:
    """The proxy port's request handler; `pipeline` is swapped atomically on reload.

    `proxy_users` and `tunnel_allow` are read per request (so a reload applies at once);
    tunnels end after `tunnel_idle_timeout` seconds without a byte in either direction."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        proxy_users: Callable[[], dict[str, str]] | None = None,
        tunnel_allow: Callable[[], frozenset[HostPort]] | None = None,
        tunnel_idle_timeout: float = 300.0,
        tunnel_connect_timeout: float = 10.0,
    ) -> None:
        self.pipeline = pipeline
        self.proxy_users = proxy_users
        self.tunnel_allow = tunnel_allow
        self.tunnel_idle_timeout = tunnel_idle_timeout
        self.tunnel_connect_timeout = tunnel_connect_timeout
        self.in_flight = 0
        self.tunnels_open = 0

    def __repr__(self) -> str:
        return f"<ProxyHandler in_flight={self.in_flight} {self.pipeline!r}>"

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        request_id, generated_id = _request_id(request)
        self.in_flight += 1
        route: str | None = None
        credential: str | None = None
        status = 500
        try:
            try:
                self._check_proxy_auth(request)
                if request.method == "CONNECT":
                    resp = await self._connect(request, request_id)
                    status = resp.status
                    return resp
                inbound = self._inbound(request, request_id)
                resolved = self.pipeline.resolve(inbound)
                route = resolved.route.name
                credential = resolved.route.credential
                if "Expect" in request.headers:
                    inbound = await _answer_expect(request, inbound, resolved.route.max_body)
                out = await self.pipeline.forward(inbound, resolved)
                status = out.status
                return await self._stream(request, out, request_id)
            except ProxyError as exc:
                resp = error_response(exc, request_id)
                if request.method == "CONNECT":
                    _end_connect(request, resp)
                status = resp.status
                route = exc.route or route
                return resp
        finally:
            self.in_flight -= 1
            elapsed = time.perf_counter() - started
            self.pipeline.metrics.observe_request(route or "none", request.method, status, elapsed)
            access(
                route,
                request.method,
                request.raw_path,
                status,
                elapsed,
                request_id,
                credential,
                generated_id=generated_id,
            )

    def _check_proxy_auth(self, request: web.BaseRequest) -> None:
        if self.proxy_users is None:
            return
        users = self.proxy_users()
        if not users:
            return
        header = request.headers.get("Proxy-Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user, password = "", ""
            expected = users.get(user)
            if expected is not None and hmac.compare_digest(expected.encode(), password.encode()):
                return
        raise ProxyAuthRequired("send Proxy-Authorization: Basic with a configured proxy_auth user")

    def _inbound(self, request: web.BaseRequest, request_id: str) -> Inbound:
        raw_target = request._message.path  # the request-target exactly as sent
        host: str | None = None
        port: int | None = None
        if raw_target.startswith("/"):
            url = request._message.url
            raw_path, query = url.raw_path or "/", url.raw_query_string
        elif is_absolute_form(raw_target):
            # Forward mode (HTTP_PROXY): the target names the host; parsed strictly by hand
            # rather than through yarl, which would accept userinfo and keep %-escapes.
            target = parse_absolute_target(raw_target)
            raw_path, query = target.raw_path, target.query
            if self.pipeline.router.has_host(target.host, target.port):
                _check_host_header(request, target)
                host, port = target.host, target.port
            elif _addressed_to_us(request, target.host, target.port):
                _check_host_header(request, target)
                # http://<the proxy itself>/prefix/...: a base-URL request sent as to a proxy
            else:
                host, port = target.host, target.port  # no route: the router says no_route
        else:
            raise BadRequest(
                "the request target must be an absolute path (base-URL mode) or an absolute "
                "http:// URL (forward mode)"
            )
        length = request.content_length
        has_body = request.body_exists
        return Inbound(
            method=request.method,
            raw_path=raw_path,
            query=query,
            host=host,
            port=port,
            headers=request.headers,
            body=request.content if has_body else None,
            content_length=length if has_body else None,
            request_id=request_id,
        )

    async def _connect(self, request: web.BaseRequest, request_id: str) -> web.StreamResponse:
        """CONNECT: tunnel a `tunnel_allow` target untouched, refuse anything else."""
        host, port = parse_authority(request._message.path, None)
        allow = self.tunnel_allow() if self.tunnel_allow is not None else frozenset()
        target = allowed_target(host, port, allow)
        if target is None:
            refused = f"CONNECT {format_host(host, port)} refused: a tunnel cannot carry the token"
            ports = self.pipeline.router.host_ports(host)
            if ports:
                urls = ", ".join(
                    f"http://{format_host(host, None if p == 80 else p)}/" for p in ports
                )
                hint = (
                    f"call {urls}... (http://, not https://) through the proxy with HTTP_PROXY "
                    "set; authproxy attaches the token and speaks TLS to the upstream itself"
                )
            else:
                hint = (
                    "no route serves this host (authproxy is not an open proxy); forward-mode "
                    "routes are called as http:// URLs through the proxy with HTTP_PROXY set"
                )
            raise TunnelRefused(
                f"{refused}; {hint}. Hosts that must be tunnelled untouched, without a token, "
                "go on tunnel_allow"
            )
        self.tunnels_open += 1
        try:
            resp = await open_tunnel(
                request,
                target,
                connect_timeout=self.tunnel_connect_timeout,
                idle_timeout=self.tunnel_idle_timeout,
                request_id=request_id,
            )
        finally:
            self.tunnels_open -= 1
        _end_connect(request, resp)
        return resp

    async def _stream(
        self, request: web.BaseRequest, out: Outbound, request_id: str
    ) -> web.StreamResponse:
        headers: CIMultiDict[str] = out.headers
        headers["X-Request-ID"] = request_id
        upstream = out.response
        content = upstream.content
        deadlines = self.pipeline.deadlines
        try:
            length = upstream.content_length
            if length is not None and length <= _SMALL_BODY:
                # Small bodies: one read and one write, cheaper than a streamed response. Most
                # came whole with the headers: take them without arming a deadline, and without
                # read()'s coroutines when no request body upload can still be running.
                if content.is_eof():
                    body = content.read_nowait() if not out.sent_body else await upstream.read()
                else:
                    body = await _read_small(content, out, deadlines)
                if len(body) != length and request.method != "HEAD":
                    # The upstream's Content-Length is kept as sent: it is the length of this
                    # body, and for HEAD the length of the body a GET would get.
                    headers["Content-Length"] = str(len(body))
                return web.Response(
                    status=out.status, reason=out.reason, body=body, headers=headers
                )
            # Without Content-Length aiohttp picks chunked for HTTP/1.1 and close-delimited for 1.0.
            resp = web.StreamResponse(status=out.status, reason=out.reason, headers=headers)
            await resp.prepare(request)
            async for chunk in _pieces(content, out.read_timeout, deadlines):
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The upstream broke mid-body after the headers were sent: close the connection.
            log.warning("upstream body failed on route %s: %s", out.route, type(exc).__name__)
            raise
        finally:
            out.release()


async def _read_small(content: StreamReader, out: Outbound, deadlines: Deadlines) -> bytes:
    """A small body that did not come with the headers. Nothing is sent to the client yet, so
    a stall or a broken connection still gets its SPEC error answer."""
    try:
        return b"".join([c async for c in _pieces(content, out.read_timeout, deadlines)])
    except TimeoutError as exc:
        raise UpstreamTimeout(
            f"the upstream of route {out.route} sent part of its answer, then nothing for "
            f"{out.read_timeout:g}s",
            route=out.route,
        ) from exc
    except aiohttp.ClientError as exc:
        raise map_client_error(exc, out.route) from exc


async def _pieces(content: StreamReader, idle: float, deadlines: Deadlines) -> AsyncIterator[bytes]:
    """The upstream body as it arrives; a gap of `idle` seconds without a byte ends it with
    TimeoutError (the route's total timeout bounds each gap, not the whole download)."""
    while True:
        with deadlines.within(idle):
            chunk = await content.readany()
        if not chunk:
            return
        yield chunk


def _end_connect(request: web.BaseRequest, resp: web.StreamResponse) -> None:
    """After a CONNECT (refused or tunnelled) the connection closes: what follows the request
    head was never HTTP. The parser keeps those bytes aside, so the request's own payload is
    marked complete, or aiohttp would linger waiting for a body that never comes."""
    resp.force_close()
    request.content.feed_eof()


def _check_host_header(request: web.BaseRequest, target: AbsoluteTarget) -> None:
    """An absolute-form target and a `Host` header that name different authorities are refused
    (RFC 9112 lets a proxy ignore Host; refusing leaves nothing for a confused hop to misuse)."""
    values = request.headers.getall("Host", ())
    if not values:
        return
    if len(values) > 1:
        raise BadRequest("more than one Host header")
    if values[0] == target.authority:  # the usual case: the same text, so the same authority
        return
    host, port = target.host, target.port
    try:
        h_host, h_port = parse_authority(values[0], 80)
    except BadRequest as exc:
        raise BadRequest(f"the Host header {values[0][:100]!r} is not host[:port]") from exc
    if (h_host, h_port) != (host, port):
        raise BadRequest(
            f"the Host header ({format_host(h_host, h_port)}) names another authority than the "
            f"request target ({format_host(host, port)})"
        )


def _addressed_to_us(request: web.BaseRequest, host: str, port: int) -> bool:
    """Whether an absolute-form target names the address this connection came in on (a
    base-URL client that sent its request through HTTP_PROXY to the proxy itself)."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(sockname, tuple) or len(sockname) < 2 or sockname[1] != port:
        return False
    try:
        local = normalize_host(str(sockname[0]))
    except ValueError:
        return False
    if host == local:
        return True
    return host == "localhost" and (local == "::1" or local.startswith("127."))


async def _answer_expect(request: web.BaseRequest, inbound: Inbound, max_body: int) -> Inbound:
    """`Expect: 100-continue` is hop-by-hop in effect: answered here once the route accepted the
    request (so a refused request never invites its body; curl otherwise waits a second before
    sending bodies over 1 MiB), and not passed upstream, where the body simply streams."""
    expect = request.headers.get("Expect", "").strip().lower()
    length = inbound.content_length
    if (
        expect == "100-continue"
        and request.version >= aiohttp.HttpVersion11
        and inbound.body is not None
        and (length is None or length <= max_body)
    ):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    headers = CIMultiDict(inbound.headers)
    headers.popall("Expect", None)
    inbound.headers = CIMultiDictProxy(headers)
    return inbound
