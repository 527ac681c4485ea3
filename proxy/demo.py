"""Demo third parties: an OAuth2 token server and an echo API, served on real sockets.

The demo, the test suite and the benchmark all use these two servers, so they behave like
real providers, failure modes included, and they import nothing from the rest of `proxy`
(they stay faithful outsiders):

- `TokenServer`: `POST /oauth2/token` (RFC 6749: `client_credentials` and `refresh_token`),
  four client authentication methods (`client_secret_basic`, `client_secret_post`,
  `private_key_jwt` of RFC 7523, `tls_client_auth` of RFC 8705), rotating refresh tokens with
  a reuse grace window and family revocation on theft (the Okta / Payoneer model), fault
  switches, and `POST /oauth2/introspect` (RFC 7662).
- `EchoServer`: answers any request with a JSON description of what it received, checks
  bearer tokens, and has special paths for big bodies, redirects, statuses and 401s.

Both keep counters that tests assert on. Token values never reach a log line: only
`fingerprint()`s of them are kept in the call records.

Run both in their own process with `python -m proxy.demo servers` (see `main`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from collections.abc import Callable, Sequence

from proxy.demo_echo import EchoRequest, EchoServer, header_values
from proxy.demo_http import LoopbackServer, serve
from proxy.demo_idp import Fault, FaultKind, TokenCall, TokenServer, fingerprint

__all__ = [
    "EchoRequest",
    "EchoServer",
    "Fault",
    "FaultKind",
    "LoopbackServer",
    "TokenCall",
    "TokenServer",
    "fingerprint",
    "header_values",
    "main",
    "serve",
]


async def run_servers(args: argparse.Namespace, ready: Callable[[dict[str, str]], None]) -> None:
    """Start both servers, report their URLs through `ready`, serve until SIGTERM / SIGINT."""
    tokens = TokenServer(
        client_id=args.client_id,
        client_secret=args.client_secret,
        expires_in=args.expires_in,
        reuse_grace=args.reuse_grace,
        rotate_refresh_tokens=not args.no_rotate,
        jwt_access_tokens=args.jwt_access_tokens,
    )
    echo = EchoServer(tokens=tokens)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await tokens.start(args.host, args.token_port)
        await echo.start(args.host, args.echo_port)
        ready(
            {
                "token_server": str(tokens.url),
                "token_url": str(tokens.token_url),
                "introspect_url": str(tokens.introspect_url),
                "echo": str(echo.url),
            }
        )
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await echo.aclose()
        await tokens.aclose()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m proxy.demo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    servers = sub.add_parser("servers", help="run the demo token server and echo API")
    servers.add_argument("--host", default="127.0.0.1")
    servers.add_argument("--token-port", type=int, default=0)
    servers.add_argument("--echo-port", type=int, default=0)
    servers.add_argument("--expires-in", type=float, default=60.0)
    servers.add_argument("--reuse-grace", type=float, default=0.0)
    servers.add_argument("--client-id", default="demo-client")
    servers.add_argument("--client-secret", default="demo-secret")
    servers.add_argument("--no-rotate", action="store_true", help="keep refresh tokens")
    servers.add_argument("--jwt-access-tokens", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m proxy.demo servers [...]`: prints one JSON line of URLs when ready."""
    args = parse_args(argv)

    def ready(urls: dict[str, str]) -> None:
        print(json.dumps(urls), flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_servers(args, ready))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
