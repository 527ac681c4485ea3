"""The request pipeline: route -> allow -> subject -> body limits -> token -> upstream (one
replay on 401). It knows nothing of the web server: `server.py` turns web requests into
`Inbound` and streams `Outbound` back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import CredentialConfig, RouteConfig
from proxy.deadlines import Deadlines
from proxy.errors import BadRequest, PayloadTooLarge, ProxyError, UpstreamTimeout
from proxy.headers import downstream_headers, upstream_headers
from proxy.metrics import Metrics
from proxy.models import SUBJECT_RULE, AccessToken, ChainKey, is_valid_subject
from proxy.routing import Resolved, Router
from proxy.tokens import TokenCache
from proxy.transport import SessionPool, map_client_error

_CHUNK: Final = 64 * 1024


@dataclass(slots=True)
class Inbound:
    """A request as the pipeline sees it."""

    method: str
    raw_path: str
    query: str
    host: str | None  # the absolute-form target's host (forward mode), else None
    port: int | None
    headers: CIMultiDictProxy[str]
    body: StreamReader | None
    content_length: int | None
    request_id: str


@dataclass(slots=True)
class Outbound:
    """The upstream's answer, body not yet read; `release()` must be called when done."""

    status: int
    reason: str | None
    headers: CIMultiDict[str]
    response: aiohttp.ClientResponse
    route: str
    credential: str | None
    read_timeout: float  # the longest wait for the next piece of the body
    sent_body: bool  # a request body went upstream (its upload may still be finishing)

    def release(self) -> None:
        self.response.release()


class _LimitedBody:
    """Streams a request body upstream, enforcing `max_body` and keeping up to `keep` bytes so
    that a small body can be replayed after a 401."""

    def __init__(self, source: StreamReader, max_body: int, keep: int) -> None:
        self._source = source
        self._max = max_body
        self._keep = keep
        self._kept: list[bytes] | None = []
        self.size = 0
        self.too_large = False
        self.done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self._source.readany()
            if not chunk:
                break
            self.size += len(chunk)
            if self.size > self._max:
                self.too_large = True
                raise PayloadTooLarge("the request body is over the route's max_body")
            if self._kept is not None:
                if self.size <= self._keep:
                    self._kept.append(chunk)
                else:
                    self._kept = None
            yield chunk
        self.done = True

    def kept(self) -> bytes | None:
        if not self.done or self._kept is None:
            return None
        return b"".join(self._kept)


class Pipeline:
    """Forwards one request; raises `ProxyError` subclasses only."""

    def __init__(
        self,
        router: Router,
        tokens: TokenCache,
        sessions: SessionPool,
        credentials: Mapping[str, CredentialConfig],
        metrics: Metrics,
    ) -> None:
        self.router = router
        self.tokens = tokens
        self.sessions = sessions
        self.credentials = credentials
        self.metrics = metrics
        self.deadlines = Deadlines()
        self._timeouts: dict[str, aiohttp.ClientTimeout] = {}
        self._credential_keys: dict[str, ChainKey] = {}  # the subject-less keys, made once

    def __repr__(self) -> str:
        return f"<Pipeline {self.router!r} {self.tokens!r}>"

    def resolve(self, inbound: Inbound) -> Resolved:
        resolved = self.router.resolve(inbound.raw_path, inbound.query, inbound.host, inbound.port)
        self.router.check_allowed(resolved.route, inbound.method, resolved.rest_raw)
        return resolved

    async def forward(self, inbound: Inbound, resolved: Resolved | None = None) -> Outbound:
        resolved = resolved or self.resolve(inbound)
        route = resolved.route
        cred = self.credentials.get(route.credential) if route.credential else None
        key: ChainKey | None = None
        drop: frozenset[str] = frozenset()
        if cred is not None:
            if cred.subject_header:
                subject = inbound.headers.get(cred.subject_header)
                if subject is None or not is_valid_subject(subject):
                    raise BadRequest(
                        f"route {route.name} needs the {cred.subject_header} header "
                        f"({SUBJECT_RULE}) to pick the end user's token",
                        route=route.name,
                    )
                drop = frozenset({cred.subject_header.lower()})
                key = ChainKey(cred.name, subject)
            else:
                key = self._credential_keys.get(cred.name)
                if key is None:
                    key = self._credential_keys[cred.name] = ChainKey(cred.name)

        length = inbound.content_length
        if length is not None and length > route.max_body:
            raise PayloadTooLarge(
                f"the request body ({length} bytes) is over the route's max_body "
                f"({route.max_body} bytes)",
                route=route.name,
            )
        data: bytes | _LimitedBody | None = None
        if inbound.body is not None and (length is None or length > 0):
            if length is not None and length <= route.replay_body:
                data = await inbound.body.readexactly(length) if length else b""
            else:
                data = _LimitedBody(inbound.body, route.max_body, route.replay_body)

        token: AccessToken | None = None
        if key is not None:
            token = self.tokens.get_cached(key) or await self._token(key, route)
        for attempt in range(2):
            resp = await self._send(inbound, resolved, route, token, data, drop)
            if (
                resp.status == 401
                and key is not None
                and token is not None
                and attempt == 0
                and self._replayable(data)
            ):
                resp.release()
                self.tokens.invalidate(key, token)
                self.metrics.upstream_retries.labels(route.name, "401").inc()
                token = await self._token(key, route)
                if isinstance(data, _LimitedBody):
                    data = data.kept()
                continue
            return Outbound(
                status=resp.status,
                reason=resp.reason,
                headers=downstream_headers(resp.headers),
                response=resp,
                route=route.name,
                credential=route.credential,
                read_timeout=route.total_timeout,
                sent_body=data is not None,
            )
        raise AssertionError("unreachable: the loop returns on its second pass")

    @staticmethod
    def _replayable(data: bytes | _LimitedBody | None) -> bool:
        return not isinstance(data, _LimitedBody) or data.kept() is not None

    async def _token(self, key: ChainKey, route: RouteConfig) -> AccessToken:
        try:
            return await self.tokens.get(key, timeout=route.total_timeout)
        except ProxyError as exc:
            exc.route = route.name
            raise

    def _timeout(self, route: RouteConfig) -> aiohttp.ClientTimeout:
        t = self._timeouts.get(route.name)
        if t is None:
            # total bounds the wait for response headers (the deadline in _send); while the
            # body is read, the same value bounds each idle gap (Outbound.read_timeout, applied
            # by the server per read), so a 1 GiB download is not cut off. No sock_read here:
            # aiohttp would re-arm that timer on every packet, and cancel it again, for every
            # request, also when the whole answer came in one packet.
            t = self._timeouts[route.name] = aiohttp.ClientTimeout(
                total=None,
                connect=route.connect_timeout,
                sock_connect=route.connect_timeout,
            )
        return t

    async def _send(
        self,
        inbound: Inbound,
        resolved: Resolved,
        route: RouteConfig,
        token: AccessToken | None,
        data: bytes | _LimitedBody | None,
        drop: frozenset[str],
    ) -> aiohttp.ClientResponse:
        headers = upstream_headers(
            inbound.headers,
            bearer=token.value.reveal() if token is not None else None,
            request_id=inbound.request_id,
            drop=drop,
            content_length=inbound.content_length if inbound.body is not None else None,
        )
        session = self.sessions.session_for(route.tls)
        server_hostname = route.tls.server_name if route.tls is not None else None
        try:
            with self.deadlines.within(route.total_timeout):
                return await session.request(
                    inbound.method,
                    URL(resolved.url, encoded=True),
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                    timeout=self._timeout(route),
                    server_hostname=server_hostname,
                )
        except ProxyError as exc:
            exc.route = route.name
            raise
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"the upstream of route {route.name} did not answer within "
                f"{route.total_timeout:g}s",
                route=route.name,
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(data, _LimitedBody) and data.too_large:
                raise PayloadTooLarge(
                    f"the request body is over the route's max_body ({route.max_body} bytes)",
                    route=route.name,
                ) from exc
            raise map_client_error(exc, route.name, route.tls) from exc
