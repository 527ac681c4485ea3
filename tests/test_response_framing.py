"""Response framing passes through: a HEAD answer keeps the upstream's Content-Length (the
size a GET would get, small or streamed), bodiless statuses stay bodiless, and a GET's
Content-Length is its body's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from proxy.demo import EchoServer, TokenServer
from tests.conftest import ProxyFactory, proxy_config, proxy_url

SMALL = 1234  # read whole and answered with one Response
LARGE = 10 * 1024 * 1024  # over the small-body limit: streamed


async def _sized(request: web.Request) -> web.StreamResponse:
    size = int(request.match_info["size"])
    if request.method == "HEAD":
        # What a file server says about a body it does not send.
        return web.Response(headers={"Content-Length": str(size), "ETag": '"v1"'})
    return web.Response(body=b"x" * size, headers={"ETag": '"v1"'})


async def _no_content(request: web.Request) -> web.StreamResponse:
    return web.Response(status=204, headers={"X-Done": "yes"})


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/sized/{size}", _sized)
    app.router.add_route("*", "/none", _no_content)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def proxy(
    make_proxy: ProxyFactory, token_server: TokenServer, echo_server: EchoServer, upstream: str
) -> str:
    raw = proxy_config(token_server, echo_server)
    raw["routes"].append(
        {"name": "up", "match": {"prefix": "/up"}, "upstream": upstream, "credential": "demo"}
    )
    return proxy_url(await make_proxy(raw), "/up")


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["small", "streamed"])
async def test_head_keeps_the_length_a_get_would_get(proxy: str, size: int) -> None:
    async with aiohttp.ClientSession(trust_env=False) as http:
        async with http.head(f"{proxy}/sized/{size}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(size)
            assert resp.headers["ETag"] == '"v1"'
            assert await resp.read() == b""
        # The connection stays usable: the HEAD answer was framed as bodiless.
        async with http.get(f"{proxy}/sized/{SMALL}") as resp:
            assert resp.headers["Content-Length"] == str(SMALL)
            assert len(await resp.read()) == SMALL


async def test_a_no_content_answer_stays_bodiless(proxy: str) -> None:
    async with (
        aiohttp.ClientSession(trust_env=False) as http,
        http.delete(f"{proxy}/none") as resp,
    ):
        assert resp.status == 204
        assert resp.headers["X-Done"] == "yes"
        assert "Content-Length" not in resp.headers
        assert "Transfer-Encoding" not in resp.headers
        assert await resp.read() == b""
