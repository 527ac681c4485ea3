"""A real `redis-server` for the tests, on a free loopback port, that a test can stop and
start again on the same port (to play "Redis went away mid-load").

Use it from `tests/conftest.py` with `from tests.redis_fixture import redis_server`.
`redis-server` comes from the system (`make system-deps`); when it is missing the tests
that need it fail, unless AUTHPROXY_TEST_SKIP_REDIS=1 turns that into a skip.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process we started; `url` stays the same across stop/start."""

    def __init__(
        self, executable: str, workdir: Path, port: int | None = None, *, appendonly: bool = False
    ) -> None:
        self.executable = executable
        self.appendonly = appendonly  # fsync every write, so a killed server keeps its chains
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc is not None else None
        return f"<RedisServer {self.url} pid={pid} running={self.running}>"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the server (no-op when running) and wait, bounded, until it answers PING."""
        if self.running:
            return
        log = (self.workdir / "redis.log").open("ab")
        try:
            self._proc = subprocess.Popen(
                [
                    self.executable,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "yes" if self.appendonly else "no",
                    "--appendfsync",
                    "always",
                    "--dir",
                    str(self.workdir),
                    "--protected-mode",
                    "yes",
                ],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not answers_ping(self.port):
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self._proc.returncode}: {self.log()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING in {START_TIMEOUT}s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill the server we started (SIGKILL, like a crash) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)

    # The async twins keep the blocking waits off the event loop (blockbuster checks that).
    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A running redis-server for the whole session. A test that stops it must start it
    again (`try/finally`); `ensure_redis` below does that for the next test anyway."""
    executable = shutil.which("redis-server")
    if executable is None:
        if os.environ.get("AUTHPROXY_TEST_SKIP_REDIS") == "1":
            pytest.skip("redis-server is not installed")
        pytest.fail("redis-server is not installed: run `make system-deps` (apt redis-server)")
    server = RedisServer(executable, tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, restarted first if an earlier test left it stopped."""
    redis_server.start()
    return redis_server.url


class ReplyLosingRelay:
    """A TCP relay on loopback in front of a real redis-server. `lose_reply(script, nth)` arms it:
    the nth EVALSHA of that script still reaches Redis and runs, but its reply is thrown away
    and the client's connection closed, as when a connection drops after a write committed.
    `lost` is set once that happened."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.port = 0
        self.lost = asyncio.Event()
        self._sha = b""
        self._countdown = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def lose_reply(self, script: str, nth: int) -> None:
        self._sha = hashlib.sha1(script.encode()).hexdigest().encode()  # noqa: S324 - Redis's id
        self._countdown = nth

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _client(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        r_reader, r_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self._writers += [c_writer, r_writer]
        lose = asyncio.Event()  # set once the armed command went to Redis

        async def upstream() -> None:
            while chunk := await _read(c_reader):
                if self._countdown and self._sha in chunk:
                    self._countdown -= 1
                    if self._countdown == 0:
                        lose.set()
                r_writer.write(chunk)
            r_writer.close()

        async def downstream() -> None:
            while chunk := await _read(r_reader):
                if lose.is_set():  # the armed command's reply: Redis has run it; drop both
                    c_writer.close()
                    r_writer.close()
                    self.lost.set()
                    return
                c_writer.write(chunk)
            c_writer.close()

        for coro in (upstream(), downstream()):
            task = asyncio.ensure_future(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def _read(reader: asyncio.StreamReader) -> bytes:
    """The next bytes, or b"" once either side has gone (a closed relay ends quietly)."""
    try:
        return await reader.read(65536)
    except (ConnectionError, OSError):
        return b""
