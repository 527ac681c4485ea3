"""Outbound HTTP: one pooled `ClientSession` per TLS identity, and client-error translation.

Sessions never follow redirects, never keep cookies (the proxy serves many callers), never
read proxy settings from the environment, and pass bodies through undecoded.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Final

import aiohttp

from proxy.config import TlsConfig
from proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from proxy.logs import event
from proxy.tlsconfig import ReloadingContext, TlsError

log = logging.getLogger("authproxy.transport")

POOL_LIMIT: Final = 1000
KEEPALIVE_SECONDS: Final = 30.0


class SessionPool:
    """Creates and owns the sessions; `session_for(tls)` is cheap and safe on the hot path."""

    def __init__(self) -> None:
        self._sessions: dict[TlsConfig | None, aiohttp.ClientSession] = {}
        self._contexts: dict[TlsConfig | None, ReloadingContext] = {}

    def __repr__(self) -> str:
        return f"<SessionPool identities={len(self._sessions)}>"

    def context_for(self, tls: TlsConfig | None) -> ssl.SSLContext:
        rc = self._contexts.get(tls)
        if rc is None:
            rc = self._contexts[tls] = ReloadingContext(tls)
        return rc.context

    def session_for(self, tls: TlsConfig | None) -> aiohttp.ClientSession:
        session = self._sessions.get(tls)
        if session is None:
            connector = aiohttp.TCPConnector(
                ssl=self.context_for(tls),
                limit=POOL_LIMIT,
                keepalive_timeout=KEEPALIVE_SECONDS,
                ttl_dns_cache=60,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                trust_env=False,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )
            self._sessions[tls] = session
        return session

    def reload_changed(self) -> list[str]:
        """Re-read certificate files that changed; returns the files reloaded (for the log)."""
        reloaded = []
        for tls, rc in self._contexts.items():
            try:
                if rc.maybe_reload() and tls is not None:
                    reloaded.append(str(tls.cert))
            except TlsError as exc:
                event(log, logging.WARNING, "tls", f"kept the previous certificate: {exc}")
        return reloaded

    async def aclose(self) -> None:
        sessions = list(self._sessions.values())
        self._sessions.clear()
        for s in sessions:
            await s.close()


def map_client_error(exc: BaseException, route: str) -> ProxyError:
    """Translate an aiohttp/asyncio failure talking to an upstream into a SPEC section 4 error."""
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"the upstream of route {route} did not answer in time", route=route)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return UpstreamUnreachable(
            f"TLS verification of the upstream of route {route} failed: {exc.certificate_error}",
            route=route,
        )
    if isinstance(exc, aiohttp.ClientSSLError):
        return UpstreamUnreachable(
            f"TLS handshake with the upstream of route {route} failed", route=route
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
    return UpstreamUnreachable(
        f"the upstream of route {route} failed: {type(exc).__name__}", route=route
    )
