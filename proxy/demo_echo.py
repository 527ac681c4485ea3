"""The demo API (`EchoServer`): answers any request with a JSON description of what it
received, checks bearer tokens, and has special paths for big bodies, redirects, statuses
and 401s."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import ClientSession, ClientTimeout, web
from yarl import URL

from proxy.demo_http import LoopbackServer, peer_cert
from proxy.demo_idp import TokenServer

CHUNK: Final = 256 * 1024


# -- echo API ---------------------------------------------------------------------------------


@dataclass(slots=True)
class EchoRequest:
    """What the echo server received (and answered, for the JSON body)."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    token: str | None
    token_valid: bool | None
    client_cert: str | None
    body_length: int = 0
    body_sha256: str = field(default_factory=lambda: hashlib.sha256().hexdigest())

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def as_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": [list(pair) for pair in self.headers],
            "body_length": self.body_length,
            "body_sha256": self.body_sha256,
            "token_valid": self.token_valid,
            "client_cert": self.client_cert,
        }


def header_values(echo: Mapping[str, Any], name: str) -> list[str]:
    """Values of header `name` (any case) in an echo JSON body."""
    return [v for k, v in echo["headers"] if k.lower() == name.lower()]


class EchoServer(LoopbackServer):
    """The demo API: answers any method and path with JSON describing what it received.

    Special last path segments (under any prefix): `_big?size=N` streams N bytes;
    `_redirect?to=URL` answers 302; `_status/CODE` answers CODE; `_slow?delay=S` waits S
    seconds first; `_401_once` rejects the presented token from then on (as a revocation at
    the API would) and answers 401.
    """

    def __init__(
        self,
        *,
        tokens: TokenServer | None = None,
        introspect_url: URL | None = None,
        require_token: bool = True,
    ) -> None:
        super().__init__()
        self.tokens = tokens
        self.introspect_url = introspect_url
        self.require_token = require_token
        self.last_request: EchoRequest | None = None
        self.requests_by_token: collections.Counter[str | None] = collections.Counter()
        self.unauthorized = 0  # 401 answers sent
        self.rejected_tokens: set[str] = set()
        self._reject_next = 0
        self._session: ClientSession | None = None

    def __repr__(self) -> str:
        return (
            f"<EchoServer {self.url} requests={self.requests} unauthorized={self.unauthorized} "
            f"reject_next={self._reject_next}>"
        )

    def reject_next(self, n: int = 1) -> None:
        """Answer 401 (invalid_token) to the next `n` requests, whatever their token."""
        self._reject_next += n

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "unauthorized": self.unauthorized,
            "tokens_seen": len([t for t in self.requests_by_token if t is not None]),
            "held": self.held,
        }

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, ssl: ssl.SSLContext | None = None
    ) -> None:
        if self.introspect_url is not None and self._session is None:
            self._session = ClientSession(timeout=ClientTimeout(total=10), trust_env=False)
        await super().start(host, port, ssl)

    async def aclose(self) -> None:
        await super().aclose()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/_demo/stats", self._control_stats)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        return app

    async def _control_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _check(self, token: str | None) -> bool | None:
        if token is None:
            return False if self.tokens or self.introspect_url else None
        if token in self.rejected_tokens:
            return False
        if self.tokens is not None:
            return self.tokens.is_valid(token)
        if self.introspect_url is not None and self._session is not None:
            async with self._session.post(self.introspect_url, data={"token": token}) as resp:
                return bool(resp.status == 200 and (await resp.json()).get("active") is True)
        return None

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        await self._bump()
        auth = request.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        token = value.strip() if scheme.lower() == "bearer" and value.strip() else None
        record = EchoRequest(
            method=request.method,
            path=request.path,
            query=request.rel_url.raw_query_string,
            headers=list(request.headers.items()),
            token=token,
            token_valid=await self._check(token),
            client_cert=peer_cert(request)[0],
        )
        self.last_request = record
        self.requests_by_token[token] += 1
        await self._pass_gate()
        hasher = hashlib.sha256()
        async for chunk in request.content.iter_chunked(CHUNK):
            hasher.update(chunk)
            record.body_length += len(chunk)
        record.body_sha256 = hasher.hexdigest()

        segments = request.path.rstrip("/").split("/")
        last, parent = segments[-1], (segments[-2] if len(segments) > 1 else "")
        if last == "_401_once" and token is not None:
            self.rejected_tokens.add(token)
            record.token_valid = False
        missing = token is None or record.token_valid is False
        if self._reject_next or (self.require_token and missing) or last == "_401_once":
            self._reject_next = max(0, self._reject_next - 1)
            self.unauthorized += 1
            return web.json_response(
                {"error": "invalid_token", **record.as_json()},
                status=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if last == "_big":
            return await self._big(request, int(request.query.get("size", "0")))
        if last == "_redirect":
            raise web.HTTPFound(request.query.get("to", "/"))
        if last == "_slow":
            await self._park(asyncio.sleep(float(request.query.get("delay", "1"))))
        status = 200
        if parent == "_status" and last.isdigit() and 200 <= int(last) <= 599:
            status = int(last)
        if status in (204, 304):
            return web.Response(status=status)
        return web.json_response(record.as_json(), status=status)

    async def _big(self, request: web.Request, size: int) -> web.StreamResponse:
        """Stream `size` bytes from one reused chunk: nothing is built in memory."""
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        block = memoryview(b"\xab" * CHUNK)
        left = size
        while left > 0:
            await resp.write(block[: min(left, CHUNK)])
            left -= CHUNK
        await resp.write_eof()
        return resp


# -- command line -----------------------------------------------------------------------------
