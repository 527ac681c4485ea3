"""The Python floor: a bare aiohttp forwarder that adds a static bearer token.

    python -m bench.forwarder --port 8081 --upstream http://127.0.0.1:8080 --workers 2 \
        [--loop uvloop]

Prints one JSON line `{"ready": true, ...}` once every worker is listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import signal
import sys
from collections.abc import AsyncIterator
from multiprocessing.synchronize import Event
from typing import Any

from aiohttp import ClientSession, TCPConnector, web

HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "host"}
HOP |= {"transfer-encoding", "authorization", "proxy-authorization", "proxy-authenticate"}
SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    headers["Authorization"] = "Bearer x"
    body = request.content if request.body_exists else None
    async with request.app[SESSION].request(
        request.method,
        request.app[UPSTREAM] + request.path_qs,
        headers=headers,
        data=body,
        allow_redirects=False,
    ) as up:
        out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
        response = web.StreamResponse(status=up.status, headers=out)
        try:
            await response.prepare(request)
            async for chunk in up.content.iter_chunked(65536):
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:  # the client left (wrk closes its connections at the end)
            pass
        return response


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    connector = TCPConnector(limit=0, ttl_dns_cache=None)
    async with ClientSession(connector=connector, trust_env=False, auto_decompress=False) as s:
        app[SESSION] = s
        yield


async def serve(port: int, upstream: str, ready: Event) -> None:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True, backlog=4096).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    ready.set()
    await stop.wait()
    await runner.cleanup()


def worker(port: int, upstream: str, ready: Event, loop: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(port, upstream, ready))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = p.parse_args(argv)
    ctx = mp.get_context("fork")
    workers = []
    for _ in range(args.workers):
        ready = ctx.Event()
        proc = ctx.Process(
            target=worker, args=(args.port, args.upstream, ready, args.loop), daemon=True
        )
        proc.start()
        workers.append((proc, ready))

    def stop(*_: Any) -> None:
        for proc, _ready in workers:
            proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if all(ready.wait(15) for _, ready in workers):
        print(json.dumps({"ready": True, "port": args.port, "workers": args.workers}), flush=True)
    else:
        stop()
    for proc, _ in workers:
        proc.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
