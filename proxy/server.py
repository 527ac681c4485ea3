"""The proxy port: web request -> `Inbound` -> `Pipeline` -> streamed response, one access line.

Runs on aiohttp's low-level `web.Server` (no router or middleware on the hot path).
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
from collections.abc import Callable
from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.errors import BadRequest, ProxyAuthRequired, ProxyError, TunnelRefused
from proxy.logs import redact_query
from proxy.pipeline import Inbound, Outbound, Pipeline

access_log = logging.getLogger("authproxy.access")
log = logging.getLogger("authproxy.server")

_SMALL_BODY: Final = 256 * 1024
_REQUEST_ID_OK: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:"
)


def new_request_id() -> str:
    return os.urandom(8).hex()


def _request_id(request: web.BaseRequest) -> str:
    rid = request.headers.get("X-Request-ID")
    if rid and len(rid) <= 128 and set(rid) <= _REQUEST_ID_OK:
        return rid
    return new_request_id()


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
    """The proxy port's request handler; `pipeline` is swapped atomically on reload."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        proxy_users: Callable[[], dict[str, str]] | None = None,
        tunnel: Callable[[web.BaseRequest, str], object] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.proxy_users = proxy_users
        self.tunnel = tunnel
        self.in_flight = 0

    def __repr__(self) -> str:
        return f"<ProxyHandler in_flight={self.in_flight} {self.pipeline!r}>"

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = _request_id(request)
        self.in_flight += 1
        route: str | None = None
        credential: str | None = None
        status = 500
        try:
            try:
                self._check_proxy_auth(request)
                inbound = self._inbound(request, request_id)
                resolved = self.pipeline.resolve(inbound)
                route = resolved.route.name
                credential = resolved.route.credential
                out = await self.pipeline.forward(inbound, resolved)
            except ProxyError as exc:
                resp = error_response(exc, request_id)
                status = resp.status
                route = exc.route or route
                return resp
            status = out.status
            return await self._stream(request, out, request_id)
        finally:
            self.in_flight -= 1
            elapsed = time.perf_counter() - started
            self.pipeline.metrics.observe_request(route or "none", request.method, status, elapsed)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "",
                    extra={
                        "event": "access",
                        "fields": {
                            "route": route,
                            "method": request.method,
                            "path": redact_query(request.raw_path),
                            "status": status,
                            "duration_ms": round(elapsed * 1000, 2),
                            "request_id": request_id,
                            "credential": credential,
                        },
                    },
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
        target = request._message.url  # the request-target as sent (absolute-form in forward mode)
        if request.method == "CONNECT":
            raise TunnelRefused(
                f"CONNECT {target.raw_authority} refused: a tunnel cannot carry the injected "
                "token. "
                f"Call http://{target.raw_host}/... through the proxy (HTTP_PROXY) and authproxy "
                "originates TLS to the upstream itself",
            )
        host: str | None = None
        port: int | None = None
        if target.absolute:
            if target.scheme != "http":
                raise BadRequest(
                    "forward mode takes http:// URLs; authproxy itself speaks TLS upstream"
                )
            if target.raw_user is not None or target.raw_password is not None:
                raise BadRequest("userinfo (user@host) in the request target is not forwarded")
            host = target.raw_host
            if host is None:
                raise BadRequest("the request target has no host")
            host = host.lower().rstrip(".")
            port = target.explicit_port or 80
        raw_path = target.raw_path or "/"
        length = request.content_length
        has_body = request.body_exists
        return Inbound(
            method=request.method,
            raw_path=raw_path,
            query=target.raw_query_string,
            host=host,
            port=port,
            headers=request.headers,
            body=request.content if has_body else None,
            content_length=length if has_body else None,
            request_id=request_id,
        )

    async def _stream(
        self, request: web.BaseRequest, out: Outbound, request_id: str
    ) -> web.StreamResponse:
        headers: CIMultiDict[str] = out.headers
        headers["X-Request-ID"] = request_id
        upstream = out.response
        try:
            length = upstream.content_length
            if length is not None and length <= _SMALL_BODY:
                # Small bodies: one read and one write, cheaper than a streamed response.
                body = await upstream.read()
                headers.popall("Content-Length", None)
                return web.Response(
                    status=out.status, reason=out.reason, body=body, headers=headers
                )
            # Without Content-Length aiohttp picks chunked for HTTP/1.1 and close-delimited for 1.0.
            resp = web.StreamResponse(status=out.status, reason=out.reason, headers=headers)
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The upstream broke mid-body; headers may be sent already, so close the connection.
            log.warning("upstream body failed on route %s: %s", out.route, type(exc).__name__)
            raise
        finally:
            out.release()
