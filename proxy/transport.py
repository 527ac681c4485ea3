"""Outbound HTTP: one pooled `ClientSession` per TLS identity, and client-error translation.

Sessions never follow redirects, never keep cookies (the proxy serves many callers), never
read proxy settings from the environment, and pass bodies through undecoded.

Rotation (issue 5): when an identity's certificate, key or CA file changes, `reload_changed()`
builds a new context and a new session for it. New requests go through the new session, so
they open new connections with the new certificate; requests in flight finish on the old
session, which is closed once it is idle. Pooled keep-alive connections would otherwise keep
presenting the old certificate for as long as traffic keeps them busy.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import aiohttp
from multidict import CIMultiDict

from proxy.config import TlsConfig
from proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from proxy.logs import event
from proxy.tlsconfig import ReloadingContext, TlsError

log = logging.getLogger("authproxy.transport")

POOL_LIMIT: Final = 1000
KEEPALIVE_SECONDS: Final = 30.0
RETIRE_MIN_SECONDS: Final = 60.0
"""A replaced session is closed once idle, but not sooner than this: a token request between
two retries holds no connection yet still uses its session."""


_SKIP_AUTO_HEADERS: Final = ("Accept", "Accept-Encoding", "User-Agent")


class _PassThroughRequest(aiohttp.ClientRequest):
    """A client request that adds none of aiohttp's default headers (`Accept`,
    `Accept-Encoding`, `User-Agent`): the upstream sees what the caller sent.

    Same outcome as `skip_auto_headers=` on the session, which copies the request's headers
    and builds a fresh skip set on every request; the skip set here is built once."""

    _SKIP: Final = CIMultiDict[None]((h, None) for h in sorted(_SKIP_AUTO_HEADERS))

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        # Only read by aiohttp (payload headers, the default Content-Type), never mutated.
        self._skip_auto_headers = self._SKIP


def _server_name_middleware(
    name: str,
) -> Callable[
    [aiohttp.ClientRequest, Callable[[aiohttp.ClientRequest], Awaitable[aiohttp.ClientResponse]]],
    Awaitable[aiohttp.ClientResponse],
]:
    async def middleware(
        req: aiohttp.ClientRequest,
        handler: Callable[[aiohttp.ClientRequest], Awaitable[aiohttp.ClientResponse]],
    ) -> aiohttp.ClientResponse:
        # tls.server_name: the SNI sent and the name the certificate is verified against.
        if req.server_hostname is None:
            req.server_hostname = name
        return await handler(req)

    return middleware


@dataclass(slots=True)
class _Retired:
    session: aiohttp.ClientSession
    since: float


@dataclass(slots=True)
class _Identity:
    """One TLS identity: its context (reloaded when files change) and its current session."""

    tls: TlsConfig | None
    context: ReloadingContext
    session: aiohttp.ClientSession | None = None
    retired: list[_Retired] = field(default_factory=list)
    last_error: str | None = None  # logged once per distinct failure, not every check
    pruned: bool = False  # no longer configured: dropped once its sessions are closed


def _busy(session: aiohttp.ClientSession) -> bool:
    # aiohttp has no public count of checked-out connections; `_acquired` is that set.
    acquired = getattr(session.connector, "_acquired", None)
    return bool(acquired) if acquired is not None else False


class SessionPool:
    """Creates and owns the sessions; `session_for(tls)` is cheap and safe on the hot path."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._identities: dict[TlsConfig | None, _Identity] = {}
        self._clock = clock
        self._closing: set[asyncio.Task[None]] = set()  # owned here; awaited, not cancelled

    def __repr__(self) -> str:
        live = sum(1 for i in self._identities.values() if i.session is not None)
        retired = sum(len(i.retired) for i in self._identities.values())
        return f"<SessionPool identities={live}" + (f" retired={retired}>" if retired else ">")

    def _identity(self, tls: TlsConfig | None) -> _Identity:
        ident = self._identities.get(tls)
        if ident is None:
            ident = self._identities[tls] = _Identity(tls, ReloadingContext(tls))
        return ident

    def context_for(self, tls: TlsConfig | None) -> ssl.SSLContext:
        """The current context of an identity (raises `TlsError` if its files are unusable)."""
        return self._identity(tls).context.context

    def generation(self, tls: TlsConfig | None) -> int:
        """How many times this identity's files were reloaded."""
        return self._identity(tls).context.generation

    def session_for(self, tls: TlsConfig | None) -> aiohttp.ClientSession:
        ident = self._identity(tls)
        ident.pruned = False
        if ident.session is None:
            ident.session = self._new_session(tls, ident.context.context)
        return ident.session

    def _new_session(self, tls: TlsConfig | None, context: ssl.SSLContext) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            ssl=context,
            limit=POOL_LIMIT,
            keepalive_timeout=KEEPALIVE_SECONDS,
            ttl_dns_cache=60,
        )
        middlewares = (
            (_server_name_middleware(tls.server_name),)
            if tls is not None and tls.server_name
            else ()
        )
        return aiohttp.ClientSession(
            connector=connector,
            trust_env=False,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
            request_class=_PassThroughRequest,
            middlewares=middlewares,
        )

    def reload_changed(self) -> list[str]:
        """Rebuild identities whose files changed; returns the certificates reloaded.

        A file that fails to load (a rotation half done, a bad file) is logged and the
        previous context kept; the next call tries again. Also closes replaced sessions that
        have gone idle."""
        reloaded = []
        now = self._clock()
        for tls, ident in self._identities.items():
            try:
                context = ident.context.reload()
            except TlsError as exc:
                if str(exc) != ident.last_error:
                    event(log, logging.WARNING, "tls", f"kept the previous certificate: {exc}")
                ident.last_error = str(exc)
                context = None
            if context is not None and tls is not None:
                ident.last_error = None
                if ident.session is not None:
                    ident.retired.append(_Retired(ident.session, now))
                    ident.session = None
                reloaded.append(str(tls.cert or tls.ca))
            self._close_idle(ident, now)
        for tls in [t for t, i in self._identities.items() if i.pruned and not i.retired]:
            if self._identities[tls].session is None:
                del self._identities[tls]
        return reloaded

    def prune(self, keep: set[TlsConfig | None]) -> None:
        """Retire the identities a new configuration no longer uses (after a reload)."""
        now = self._clock()
        for tls in [t for t in self._identities if t not in keep]:
            ident = self._identities[tls]
            if ident.session is None and not ident.retired:
                del self._identities[tls]
                continue
            if ident.session is not None:
                ident.retired.append(_Retired(ident.session, now))
                ident.session = None
            ident.pruned = True  # listed until reload_changed() has closed its sessions

    def _close_idle(self, ident: _Identity, now: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the loop: aclose() closes them
            return
        keep = []
        for r in ident.retired:
            if now - r.since >= RETIRE_MIN_SECONDS and not _busy(r.session):
                task = loop.create_task(r.session.close(), name="close retired session")
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            else:
                keep.append(r)
        ident.retired = keep

    async def aclose(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        sessions = []
        for ident in self._identities.values():
            sessions += [r.session for r in ident.retired]
            if ident.session is not None:
                sessions.append(ident.session)
        self._identities.clear()
        for s in sessions:
            await s.close()


def _trust(tls: TlsConfig | None) -> str:
    if tls is not None and tls.ca is not None:
        return f"trusting only CA bundle {tls.ca}"
    return "trusting the system's CAs (set tls.ca for a private CA)"


def map_client_error(exc: BaseException, route: str, tls: TlsConfig | None = None) -> ProxyError:
    """Translate an aiohttp/asyncio failure talking to an upstream into a SPEC section 4 error.

    `tls` (the route's) lets a verification failure name the CA file that was trusted."""
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"the upstream of route {route} did not answer in time", route=route)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert_error = exc.certificate_error
        reason = getattr(cert_error, "verify_message", None) or str(cert_error)
        return UpstreamUnreachable(
            f"TLS verification of the upstream of route {route} failed: {reason} ({_trust(tls)})",
            route=route,
        )
    if isinstance(exc, aiohttp.ClientSSLError):
        alert = _alert(exc)
        return UpstreamUnreachable(
            f"TLS handshake with the upstream of route {route} failed"
            + (f": {alert}" if alert else ""),
            route=route,
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnreachable(
            f"cannot connect to the upstream of route {route}: "
            f"{exc.os_error.strerror or exc.os_error}",
            route=route,
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return UpstreamUnreachable(
            f"the upstream of route {route} closed the connection", route=route
        )
    alert = _alert(exc)
    if alert:
        return UpstreamUnreachable(
            f"the upstream of route {route} ended the TLS session: {alert}", route=route
        )
    return UpstreamUnreachable(
        f"the upstream of route {route} failed: {type(exc).__name__}", route=route
    )


_ALERTS: Final = {
    "CERTIFICATE_REQUIRED": "the upstream requires a client certificate (set tls.cert, tls.key)",
    "UNKNOWN_CA": "the upstream does not trust the issuer of our client certificate",
    "BAD_CERTIFICATE": "the upstream rejected our client certificate",
    "CERTIFICATE_EXPIRED": "the upstream says our client certificate has expired",
    "HANDSHAKE_FAILURE": "no TLS version or cipher in common with the upstream",
    "PROTOCOL_VERSION": "no TLS version in common with the upstream (tls.min_version)",
}


def _alert(exc: BaseException) -> str | None:
    """A readable reason when `exc` (or its cause) is a TLS alert from the peer."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        text = str(getattr(seen, "reason", None) or getattr(seen, "strerror", None) or seen).upper()
        for key, message in _ALERTS.items():
            if key in text.replace(" ", "_"):
                return message
        seen = getattr(seen, "os_error", None) or seen.__cause__ or seen.__context__
    return None
