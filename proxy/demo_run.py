"""`authproxy demo`: the demo token server and echo API, then the proxy in front of them."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path
from typing import Final

from proxy.config import HostPort, load_config
from proxy.demo import EchoServer, TokenServer
from proxy.errors import ConfigError
from proxy.logs import setup_logging, shutdown_logging
from proxy.models import ChainKey, Secret

DEMO_CONFIG: Final = Path(__file__).resolve().parent / "demo.yaml"  # package data: works installed
TOKEN_PORT: Final = 9181
ECHO_PORT: Final = 9182
DEMO_SECRET: Final = "demo-secret"


def run_demo(port: int = 8080, admin_port: int = 9090) -> int:
    os.environ.setdefault("DEMO_CLIENT_SECRET", DEMO_SECRET)
    try:
        config = load_config(DEMO_CONFIG)
    except ConfigError as exc:
        print(f"authproxy demo: {DEMO_CONFIG} is invalid:\n{exc}")
        return 2
    config = replace(
        config,
        proxy_listen=HostPort("127.0.0.1", port),
        admin_listen=HostPort("127.0.0.1", admin_port),
    )
    setup_logging("info")
    try:
        return asyncio.run(_demo(config))
    except OSError as exc:
        print(f"authproxy demo: cannot listen ({exc.strerror or exc}); is another demo running?")
        return 1
    finally:
        shutdown_logging()


async def _demo(config: object) -> int:
    from proxy.config import Config
    from proxy.runtime import Runtime

    assert isinstance(config, Config)
    tokens = TokenServer(client_secret=DEMO_SECRET, expires_in=60, reuse_grace=30)
    await tokens.start(port=TOKEN_PORT)
    echo = EchoServer(tokens=tokens)
    await echo.start(port=ECHO_PORT)
    runtime = Runtime(config)
    try:
        # Seeded before serving, so the proxy never reports the chains as missing.
        await runtime.seed(ChainKey("rotating"), Secret(tokens.seed_refresh_token()))
        for user in ("alice", "bob"):
            await runtime.seed(ChainKey("users", user), Secret(tokens.seed_refresh_token(user)))
        await runtime.start()
        p, a = runtime.proxy_port, runtime.admin_port
        print(
            f"""
authproxy demo is running: proxy on 127.0.0.1:{p}, admin on 127.0.0.1:{a}
token server {tokens.url} (tokens live 60 s), echo API {echo.url}

Try (the echo API shows what it received, and whether the token was valid):
  curl -s http://127.0.0.1:{p}/echo/hello
  curl -s -X POST -d '{{"amount": 5}}' http://127.0.0.1:{p}/echo/payments
  curl -s http://127.0.0.1:{p}/rotating/accounts
  curl -s -H 'X-Authproxy-Subject: alice' http://127.0.0.1:{p}/users/me
  curl -s -x http://127.0.0.1:{p} http://echo.demo/hello
  curl -s -i http://127.0.0.1:{p}/nowhere                      # no_route, 404
  curl -s -i -H 'X-Authproxy-Subject: carol' http://127.0.0.1:{p}/users/me   # reauth_required
  curl -s http://127.0.0.1:{a}/admin/credentials
  curl -s http://127.0.0.1:{a}/metrics | grep '^authproxy_token'

Stop with Ctrl-C.
""",
            flush=True,
        )
        await runtime.run_until_signalled()
    finally:
        await runtime.aclose()
        await echo.aclose()
        await tokens.aclose()
    return 0
