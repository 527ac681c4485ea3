"""Real `authproxy run` processes for multi-process tests: started on free loopback ports,
waited for by polling /healthz (bounded), stopped by their own PID."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.redis_fixture import free_port


@dataclass
class ProxyProcess:
    proc: subprocess.Popen[bytes]
    port: int
    admin: int
    config: Path
    log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin}{path}"


def write_config(tmp_path: Path, raw: dict[str, Any], name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


async def wait_healthy(
    session: aiohttp.ClientSession, p: ProxyProcess, within: float = 20.0
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        assert p.proc.poll() is None, f"the proxy exited at start: {p.log.read_text()[-2000:]}"
        try:
            async with session.get(p.admin_url("/healthz")) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)  # polling a bounded condition, not standing in for one
    raise AssertionError("the proxy did not become healthy")


async def start_proxy(
    session: aiohttp.ClientSession, tmp_path: Path, raw: dict[str, Any], name: str | None = None
) -> ProxyProcess:
    port, admin = free_port(), free_port()
    raw = {**raw, "listen": {"proxy": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{admin}"}}
    name = name or f"proxy-{port}"
    config = write_config(tmp_path, raw, name)
    log = tmp_path / f"{name}.log"
    with log.open("wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "-c", str(config)], stderr=out
        )
    p = ProxyProcess(proc, port, admin, config, log)
    await wait_healthy(session, p)
    return p


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def stop_processes(procs: list[ProxyProcess], timeout: float = 30.0) -> list[int]:
    """SIGTERM every process still running, wait, SIGKILL stragglers; return exit codes."""
    for p in procs:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    codes = []
    for p in procs:
        try:
            codes.append(p.proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            p.proc.kill()
            codes.append(p.proc.wait())
    return codes


async def astop_processes(procs: list[ProxyProcess], timeout: float = 30.0) -> list[int]:
    """`stop_processes` off the event loop: the loop keeps serving the test's own token server
    and upstreams, which a proxy may still call while it shuts down (a refresh in flight is
    let finish)."""
    return await asyncio.to_thread(stop_processes, procs, timeout)
