"""CONNECT tunnels for the hosts on `tunnel_allow` (SPEC section 1): bytes are spliced both ways
untouched; no header, no token, nothing is parsed.

How it sits on aiohttp's low-level server: for a CONNECT request the HTTP parser marks the
connection as upgraded and keeps every byte after the request head in the protocol's buffer.
`open_tunnel` connects to the target first (so a dead target is a JSON 502, not a broken tunnel),
answers `200 Connection Established` through a `StreamResponse` (aiohttp writes neither
`Content-Length` nor `Transfer-Encoding` for a 2xx answer to CONNECT), then installs a payload
feed on the protocol (`RequestHandler.set_parser`, the hook aiohttp's own WebSocket support
uses): the buffered bytes and all later ones go into a flow-controlled `StreamReader` (reading
from the client pauses while the target is slow). Works with both of aiohttp's HTTP parsers.
Client -> target and target -> client run as two tasks; the tunnel ends when either side
closes, on an error, or after `idle_timeout` seconds without a byte either way, and then both
connections are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Final, cast

from aiohttp import web
from aiohttp.streams import StreamReader

from proxy.config import HostPort
from proxy.errors import UpstreamTimeout, UpstreamUnreachable
from proxy.logs import event
from proxy.routing import format_host, normalize_host

log = logging.getLogger("authproxy.tunnel")

_READ: Final = 64 * 1024
_CLOSE_WAIT: Final = 5.0
_UNSPECIFIED: Final = frozenset({"0.0.0.0", "::", ""})


def allowed_target(host: str, port: int, allow: Iterable[HostPort]) -> HostPort | None:
    """The `tunnel_allow` entry this canonical (host, port) names, or None. Entries that name
    no single host (an unspecified address such as 0.0.0.0, port 0) allow nothing."""
    for entry in allow:
        try:
            entry_host = normalize_host(entry.host)
        except ValueError:
            continue
        if entry_host in _UNSPECIFIED or not 0 < entry.port <= 65535:
            continue
        if entry.port == port and entry_host == host:
            return HostPort(entry_host, entry.port)
    return None


@dataclass(slots=True)
class TunnelStats:
    """What one tunnel carried; logged when it closes (never the bytes themselves)."""

    target: str
    bytes_up: int = 0  # client -> target
    bytes_down: int = 0  # target -> client
    closed_by: str = "unknown"  # client | target | idle_timeout | error | shutdown
    started: float = 0.0

    def as_fields(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "closed_by": self.closed_by,
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 2),
        }


class _Feed:
    """The payload parser aiohttp's protocol feeds once it is set: every byte, as is."""

    def __init__(self, reader: StreamReader) -> None:
        self._reader = reader

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._reader.feed_data(data)
        return False, b""

    def feed_eof(self) -> None:
        self._reader.feed_eof()


async def open_tunnel(
    request: web.BaseRequest,
    target: HostPort,
    *,
    connect_timeout: float,
    idle_timeout: float,
    request_id: str,
) -> web.StreamResponse:
    """Connect to `target`, answer 200, splice until one side closes or the tunnel idles.

    Raises UpstreamUnreachable / UpstreamTimeout (before anything is answered) when the target
    cannot be reached. The returned response is finished and marked to close the connection.
    One `tunnel` event line is logged when the tunnel closes, however it ends."""
    stats = TunnelStats(format_host(target.host, target.port), started=time.perf_counter())
    try:
        async with asyncio.timeout(connect_timeout):
            target_reader, target_writer = await asyncio.open_connection(target.host, target.port)
    except TimeoutError as exc:
        raise UpstreamTimeout(
            f"the tunnel target {stats.target} did not accept a connection within "
            f"{connect_timeout:g}s"
        ) from exc
    except OSError as exc:
        raise UpstreamUnreachable(
            f"cannot connect to the tunnel target {stats.target}: "
            f"{exc.strerror or type(exc).__name__}"
        ) from exc

    try:
        resp = web.StreamResponse(
            status=200, reason="Connection Established", headers={"X-Request-ID": request_id}
        )
        await resp.prepare(request)
        resp.force_close()  # after the tunnel the connection is done, never reused for HTTP
        loop = asyncio.get_running_loop()
        client_reader = StreamReader(request.protocol, _READ, loop=loop)
        # Bytes that came with the CONNECT head: aiohttp's C parser leaves them in the
        # protocol's buffer (set_parser feeds them), its pure-Python parser in the request's
        # payload. Take the latter first so the order holds either way.
        with contextlib.suppress(Exception):
            if early := request.content.read_nowait():
                client_reader.feed_data(early)
        request.protocol.set_parser(cast(Any, _Feed(client_reader)))
        await _splice(client_reader, resp, target_reader, target_writer, idle_timeout, stats)
    except asyncio.CancelledError:
        stats.closed_by = "shutdown"
        raise
    finally:
        target_writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(_CLOSE_WAIT):
                await target_writer.wait_closed()
        event(
            log, logging.INFO, "tunnel", "tunnel closed", request_id=request_id, **stats.as_fields()
        )
    with contextlib.suppress(ConnectionError, OSError):
        await resp.write_eof()
    return resp


async def _splice(
    client_reader: StreamReader,
    client: web.StreamResponse,
    target_reader: asyncio.StreamReader,
    target_writer: asyncio.StreamWriter,
    idle_timeout: float,
    stats: TunnelStats,
) -> None:
    loop = asyncio.get_running_loop()
    last_activity = loop.time()

    async def up() -> str:
        nonlocal last_activity
        while chunk := await client_reader.readany():
            last_activity = loop.time()
            stats.bytes_up += len(chunk)
            try:
                target_writer.write(chunk)
                await target_writer.drain()
            except ConnectionError:
                return "target"
        return "client"

    async def down() -> str:
        nonlocal last_activity
        try:
            while chunk := await target_reader.read(_READ):
                last_activity = loop.time()
                stats.bytes_down += len(chunk)
                try:
                    await client.write(chunk)
                except ConnectionError:
                    return "client"
        except ConnectionError:
            pass  # reset by the target
        return "target"

    async def idle() -> str:
        while True:
            left = last_activity + idle_timeout - loop.time()
            if left <= 0:
                return "idle_timeout"
            await asyncio.sleep(left)

    jobs: list[Coroutine[Any, Any, str]] = [up(), down(), idle()]
    tasks = [loop.create_task(job) for job in jobs]  # owned here: awaited or cancelled below
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first = next(iter(done))
        if first.cancelled():
            stats.closed_by = "error"
        elif (exc := first.exception()) is not None:
            stats.closed_by = "error"
            log.debug("tunnel to %s ended: %s", stats.target, type(exc).__name__)
        else:
            stats.closed_by = first.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
