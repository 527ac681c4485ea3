"""Token-endpoint calls per token lifetime versus replicas, on one Redis (issue 7's figure).

Starts a redis-server, the demo token server (2 s tokens, no reuse grace: any reuse would
revoke the family) and N authproxy replicas sharing the Redis store, drives a bounded load
across them for a fixed time, and counts what the token server saw: refresh-token rotations
of one shared chain, client-credentials fetches with `share: true` and without it.

    .venv/bin/python -m bench.fleet --replicas 1,2,4 --seconds 12
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.demo import EchoServer, TokenServer

SECRET = "bench-fleet-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(
    idp: TokenServer, echo: EchoServer, redis_url: str, port: int, admin: int
) -> dict[str, Any]:
    common = {
        "token_url": str(idp.token_url),
        "client_id": "demo-client",
        "client_secret": {"env": "BENCH_FLEET_SECRET"},
    }
    return {
        "listen": {"proxy": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{admin}"},
        "log_level": "warning",
        "store": {"kind": "redis", "url": redis_url},
        "credentials": {
            "chain": {"grant": "refresh_token", "rotation_grace": "0s", **common},
            "shared": {
                "grant": "client_credentials",
                "share": True,
                "scopes": ["shared"],
                **common,
            },
            "own": {"grant": "client_credentials", "scopes": ["own"], **common},
        },
        "routes": [
            {
                "name": n,
                "match": {"prefix": f"/{n}"},
                "upstream": f"{echo.url}/api",
                "credential": n,
            }
            for n in ("chain", "shared", "own")
        ],
    }


async def wait_healthy(session: aiohttp.ClientSession, admin: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            async with session.get(f"http://127.0.0.1:{admin}/healthz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("a replica did not start")


async def measure(replicas: int, seconds: float, redis_url: str, workdir: Path) -> dict[str, Any]:
    async with (
        TokenServer(client_secret=SECRET, expires_in=2, reuse_grace=0, token_prefix="fleet") as idp,
        EchoServer(tokens=idp) as echo,
        aiohttp.ClientSession() as session,
    ):
        procs: list[tuple[subprocess.Popen[bytes], int, int]] = []
        try:
            for i in range(replicas):
                port, admin = free_port(), free_port()
                path = workdir / f"r{replicas}-{i}.yaml"
                path.write_text(yaml.safe_dump(config(idp, echo, redis_url, port, admin)))
                proc = subprocess.Popen(
                    [sys.executable, "-m", "proxy", "run", "-c", str(path)],
                    stderr=subprocess.DEVNULL,
                    env={**os.environ, "BENCH_FLEET_SECRET": SECRET},
                )
                procs.append((proc, port, admin))
            for _, _, admin in procs:
                await wait_healthy(session, admin, time.monotonic() + 30)
            async with session.put(
                f"http://127.0.0.1:{procs[0][2]}/admin/credentials/chain/refresh-token",
                json={"refresh_token": idp.seed_refresh_token()},
            ) as r:
                assert r.status == 204
            before = idp.rotations[None]
            idp.calls.clear()
            statuses: dict[int, int] = {}
            end = time.monotonic() + seconds
            counter = 0

            async def worker(n: int) -> None:
                nonlocal counter
                while time.monotonic() < end:
                    counter += 1
                    _, port, _ = procs[(counter + n) % replicas]
                    route = ("chain", "shared", "own")[counter % 3]
                    async with session.get(f"http://127.0.0.1:{port}/{route}/x") as r:
                        await r.read()
                        statuses[r.status] = statuses.get(r.status, 0) + 1

            await asyncio.gather(*(worker(n) for n in range(16)))
            lifetimes = seconds / 2.0

            def cc_calls(scope: str) -> int:
                return sum(
                    1
                    for c in idp.calls
                    if c.grant_type == "client_credentials" and c.scope == scope
                )

            return {
                "replicas": replicas,
                "requests": sum(statuses.values()),
                "errors": sum(v for k, v in statuses.items() if k != 200),
                "chain_rotations_per_lifetime": (idp.rotations[None] - before) / lifetimes,
                "shared_per_lifetime": cc_calls("shared") / lifetimes,
                "own_per_lifetime": cc_calls("own") / lifetimes,
                "invalid_grant": idp.invalid_grant,
                "revoked_families": idp.revoked_families,
            }
        finally:
            for proc, _, _ in procs:
                proc.send_signal(signal.SIGTERM)
            for proc, _, _ in procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


async def main_async(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="authproxy-fleet-"))
    redis_port = free_port()
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is missing (make system-deps)")
    redis = subprocess.Popen(
        [
            exe,
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _answers_ping(redis_port):
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            await asyncio.sleep(0.02)
        rows = [
            await measure(n, args.seconds, f"redis://127.0.0.1:{redis_port}/0", workdir)
            for n in args.replicas
        ]
    finally:
        redis.kill()
        redis.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        "| replicas | requests | errors | rotating chain: rotations per token lifetime | "
        "`share: true`: fetches per lifetime | per-replica credential: fetches per lifetime | "
        "invalid_grant |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['replicas']} | {r['requests']:,} | {r['errors']} | "
            f"{r['chain_rotations_per_lifetime']:.2f} | {r['shared_per_lifetime']:.2f} | "
            f"{r['own_per_lifetime']:.2f} | {r['invalid_grant']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--replicas", default="1,2,4", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument("--seconds", type=float, default=12.0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
