"""Shared fixtures: real loopback servers (from proxy.demo), an in-process proxy, log capture
with a secret scan, a trustme CA, a real redis-server, and a clean proxy environment."""

from __future__ import annotations

import asyncio
import io
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from proxy import logs
from proxy.config import load_config
from proxy.demo import EchoServer, TokenServer
from proxy.runtime import Runtime
from tests.redis_fixture import redis_server  # noqa: F401 - re-exported fixture

PROXY_ENV = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "AUTHPROXY_CONFIG",
    "PROMETHEUS_MULTIPROC_DIR",
)
CLIENT_SECRET = "test-client-secret-9f8e7d6c"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Proxy settings from the developer's shell must never leak into a test."""
    for name in PROXY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TEST_CLIENT_SECRET", CLIENT_SECRET)


@pytest.fixture
async def token_server() -> AsyncIterator[TokenServer]:
    server = TokenServer(client_secret=CLIENT_SECRET, expires_in=300, token_prefix="tst")
    await server.start()
    yield server
    await server.aclose()


@pytest.fixture
async def echo_server(token_server: TokenServer) -> AsyncIterator[EchoServer]:
    server = EchoServer(tokens=token_server)
    await server.start()
    yield server
    await server.aclose()


class LogCapture:
    """Everything the proxy logged (through the real JSON pipeline and scrubber)."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def text(self) -> str:
        logs.shutdown_logging()  # flush the writer thread
        text = self.stream.getvalue()
        logs.setup_logging("debug", self.stream)
        self.stream.seek(0, io.SEEK_END)
        return text

    def lines(self) -> list[dict[str, Any]]:
        import json

        return [json.loads(line) for line in self.text().splitlines() if line.strip()]

    def assert_clean(self, *secrets: str) -> None:
        text = self.text()
        for secret in secrets:
            assert secret not in text, f"a secret ({secret[:4]}...) reached the log"


@pytest.fixture
def log_capture() -> Iterator[LogCapture]:
    capture = LogCapture()
    logs.setup_logging("debug", capture.stream)
    yield capture
    logs.shutdown_logging()
    logging.getLogger().handlers.clear()


def proxy_config(
    token_server: TokenServer, echo_server: EchoServer, **extra: Any
) -> dict[str, Any]:
    """A base config: one client-credentials credential and one prefix route to the echo API."""
    config: dict[str, Any] = {
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "store": {"kind": "memory"},
        "credentials": {
            "demo": {
                "grant": "client_credentials",
                "token_url": str(token_server.token_url),
                "client_id": "demo-client",
                "client_secret": {"env": "TEST_CLIENT_SECRET"},
            }
        },
        "routes": [
            {
                "name": "echo",
                "match": {"prefix": "/echo"},
                "upstream": f"{echo_server.url}/api",
                "credential": "demo",
            },
        ],
    }
    config.update(extra)
    return config


ProxyFactory = Callable[[dict[str, Any]], Awaitable[Runtime]]


@pytest.fixture
async def make_proxy(tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    """Start an in-process authproxy (both ports on loopback, random ports) from a config dict."""
    started: list[Runtime] = []

    async def factory(raw: dict[str, Any]) -> Runtime:
        path = tmp_path / f"authproxy-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(raw))
        runtime = Runtime(load_config(path))
        await runtime.start()
        started.append(runtime)
        return runtime

    yield factory
    for runtime in started:
        await runtime.aclose()


def proxy_url(runtime: Runtime, path: str = "") -> str:
    return f"http://127.0.0.1:{runtime.proxy_port}{path}"


def admin_url(runtime: Runtime, path: str = "") -> str:
    return f"http://127.0.0.1:{runtime.admin_port}{path}"


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
def venv_bin(repo_root: Path) -> Path:
    return Path(os.environ.get("VIRTUAL_ENV", repo_root / ".venv")) / "bin"


async def poll(predicate: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """Wait, bounded, until `predicate()` holds: for state the test cannot await directly
    (a background task's effect); `AssertionError` naming `what` after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
