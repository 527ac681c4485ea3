"""What the demo servers share: an aiohttp app on a real loopback socket, with a request
counter that tests can wait on without sleeping, and a gate that holds calls."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Awaitable
from typing import Any, Self

from aiohttp import web
from yarl import URL


class RequestCounter:
    """`requests` plus a way to wait, without sleeping, until it reaches a number."""

    def __init__(self) -> None:
        self.requests = 0
        self._changed = asyncio.Condition()

    async def _bump(self) -> None:
        self.requests += 1
        await self._notify()

    async def _notify(self) -> None:
        """Wake every `wait_*` call so it re-checks its condition."""
        async with self._changed:
            self._changed.notify_all()

    async def wait_requests(self, n: int, *, within: float = 10.0) -> None:
        """Return once `requests >= n`; `TimeoutError` after `within` seconds."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: self.requests >= n)


class LoopbackServer(RequestCounter):
    """An aiohttp app on a real socket, with handlers parked on events cancelled at close."""

    def __init__(self) -> None:
        super().__init__()
        self.url = URL()
        self.gate: asyncio.Event | None = None  # when set, every call waits for it first
        self.held = 0  # calls waiting at the gate now; `wait_held` waits on it
        self._runner: web.AppRunner | None = None
        self._parked: set[asyncio.Task[Any]] = set()

    def _app(self) -> web.Application:
        raise NotImplementedError

    async def wait_held(self, n: int = 1, *, within: float = 10.0) -> None:
        """Return once `held >= n` calls wait at the gate; `AssertionError` after `within`
        seconds, naming how many were held."""
        try:
            async with asyncio.timeout(within), self._changed:
                await self._changed.wait_for(lambda: self.held >= n)
        except TimeoutError:
            raise AssertionError(
                f"{self.held} call(s) held at the gate after {within}s, expected {n}"
            ) from None

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, ssl: ssl.SSLContext | None = None
    ) -> None:
        """Listen on `host:port` (0: a free port); `url` tells where."""
        self._runner, self.url = await serve(self._app(), host, port, ssl)

    async def aclose(self) -> None:
        for task in list(self._parked):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        """Start on a free loopback port unless `start()` was already called."""
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _park(self, waiting: Awaitable[Any]) -> None:
        """Await `waiting`; `aclose()` cancels it so a held call never blocks shutdown."""
        task = asyncio.current_task()
        if task is not None:
            self._parked.add(task)
        try:
            await waiting
        finally:
            self._parked.discard(task)

    async def _pass_gate(self) -> None:
        gate = self.gate
        if gate is not None and not gate.is_set():
            self.held += 1
            try:
                await self._notify()
                await self._park(gate.wait())
            finally:
                self.held -= 1

    async def _forever(self) -> None:
        await self._park(asyncio.get_running_loop().create_future())


async def serve(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, URL]:
    """Serve `app` on a real socket; return the runner (to `cleanup()`) and the base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    bound = runner.addresses[0]
    scheme = "https" if ssl_context is not None else "http"
    return runner, URL.build(scheme=scheme, host=bound[0], port=bound[1])


def peer_cert(request: web.Request) -> tuple[str | None, str | None]:
    """(subject CN, SHA-256 hex of the DER) of a verified client certificate, or Nones."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None, None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None, None
    cn = None
    for rdn in ssl_object.getpeercert().get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = value
    return cn, hashlib.sha256(der).hexdigest()
