"""The servers the bench drives: the demo token server and authproxy itself (config + start)."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import Child, ProcessGroup, StartError, free_port, http_get, wait_http, wait_line

REPO = Path(__file__).resolve().parent.parent
CLIENT_ID = "demo-client"
CLIENT_SECRET = "demo-secret"  # the demo token server's published demo secret, not a real one
SUBJECT_HEADER = "X-Authproxy-Subject"


def _env() -> dict[str, str]:
    return {"PYTHONPATH": str(REPO), "BENCH_CLIENT_SECRET": CLIENT_SECRET}


@dataclass
class TokenServer:
    child: Child
    port: int
    echo_port: int
    info: dict[str, Any]

    @property
    def token_url(self) -> str:
        url = self.info.get("token_url")
        return str(url) if isinstance(url, str) else f"http://127.0.0.1:{self.port}/oauth2/token"

    def control_url(self, path: str) -> str | None:
        """A URL of the demo server's control API (`/_demo/...`), when it has one."""
        base = self.info.get("token_server")
        return f"{str(base).rstrip('/')}{path}" if isinstance(base, str) else None

    def requests_seen(self) -> int | None:
        """Token endpoint requests the token server itself counted (`/_demo/stats`)."""
        url = self.control_url("/_demo/stats")
        if url is None:
            return None
        try:
            status, body = http_get(url)
            data = json.loads(body) if status == 200 else None
        except (OSError, ValueError):
            return None
        if isinstance(data, dict) and isinstance(data.get("requests"), int):
            return int(data["requests"])
        return None


def start_token_server(group: ProcessGroup, name: str, expires_in: int) -> TokenServer:
    """`python -m proxy.demo servers ...`: waits for its one JSON line (bounded)."""
    if importlib.util.find_spec("proxy.demo") is None:
        raise StartError("proxy.demo (the demo token server) is not available yet")
    port, echo = free_port(), free_port()
    argv = [sys.executable, "-m", "proxy.demo", "servers", "--token-port", str(port)]
    argv += ["--echo-port", str(echo), "--expires-in", str(expires_in)]
    child = group.start(name, argv, env=_env())
    line = wait_line(child, 20)
    try:
        info = json.loads(line)
    except ValueError as e:
        raise StartError(f"{name}: first line is not JSON: {line[:200]!r}") from e
    if not isinstance(info, dict):
        raise StartError(f"{name}: first line is not a JSON object")
    return TokenServer(child, port, echo, info)


@dataclass
class AuthProxy:
    child: Child
    proxy_port: int
    admin_port: int
    workers: int
    config: Path
    notes: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def metrics_text(self) -> str:
        status, body = http_get(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=10)
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return body.decode()


def metric(text: str, sample: str, **labels: str) -> float:
    """Sum of every sample named `sample` whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def write_config(
    path: Path,
    *,
    proxy_port: int,
    admin_port: int,
    workers: int,
    token_url: str,
    upstream: str,
    per_user_token_url: str | None = None,
    log_level: str = "info",
) -> Path:
    """The authproxy config of SPEC section 3 for the bench: base-URL and forward routes."""
    secret = {"env": "BENCH_CLIENT_SECRET"}
    credentials: dict[str, Any] = {
        "demo": {
            "grant": "client_credentials",
            "token_url": token_url,
            "client_id": CLIENT_ID,
            "client_secret": secret,
        }
    }
    routes: list[dict[str, Any]] = [
        {
            "name": "bench",
            "match": {"prefix": "/bench"},
            "upstream": upstream,
            "credential": "demo",
        },
        {
            "name": "fwd",
            "match": {"host": "bench.local"},
            "upstream": upstream,
            "credential": "demo",
        },
    ]
    if per_user_token_url is not None:
        credentials["users"] = {
            "grant": "refresh_token",
            "token_url": per_user_token_url,
            "client_id": CLIENT_ID,
            "client_secret": secret,
            "subject_header": SUBJECT_HEADER,
        }
        routes.append(
            {
                "name": "users",
                "match": {"prefix": "/users"},
                "upstream": upstream,
                "credential": "users",
            }
        )
    doc = {
        "listen": {"proxy": f"127.0.0.1:{proxy_port}", "admin": f"127.0.0.1:{admin_port}"},
        "workers": workers,
        "log_level": log_level,
        "store": {"kind": "memory"},
        "credentials": credentials,
        "routes": routes,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def authproxy_exe() -> Path:
    return Path(sys.executable).parent / "authproxy"


def start_authproxy(
    group: ProcessGroup,
    workdir: Path,
    name: str,
    *,
    workers: int,
    token_url: str,
    upstream_port: int,
    per_user_token_url: str | None = None,
    warm: bool = True,
    log_level: str = "info",
    env: dict[str, str] | None = None,
) -> AuthProxy:
    """Write a config, run `authproxy run -c CONFIG`, wait for /healthz, then (optionally) fetch
    the first token with one request so that measured runs start on a warm cache."""
    if importlib.util.find_spec("proxy.cli") is None or not authproxy_exe().exists():
        raise StartError("`authproxy run` is not available yet (proxy.cli missing)")
    proxy_port, admin_port = free_port(), free_port()
    conf = write_config(
        workdir / f"{name}.yaml",
        proxy_port=proxy_port,
        admin_port=admin_port,
        workers=workers,
        token_url=token_url,
        upstream=f"http://127.0.0.1:{upstream_port}",
        per_user_token_url=per_user_token_url,
        log_level=log_level,
    )
    child = group.start(
        name, [str(authproxy_exe()), "run", "-c", str(conf)], env={**_env(), **(env or {})}
    )
    ap = AuthProxy(child, proxy_port, admin_port, workers, conf)
    wait_http(child, f"http://127.0.0.1:{admin_port}/healthz", 30)
    if workers > 1 and not _wait_serving(child, workers, 30):
        ap.notes.append(f"could not confirm that all {workers} workers were serving")
    if warm:
        wait_http(child, f"{ap.base}/bench/small", 15)
        check_bearer(f"{ap.base}/bench/whoami", name)
        # Every worker should hold a token before a measured run: a few more requests.
        for _ in range(8 * workers):
            http_get(f"{ap.base}/bench/small")
    return ap


def _wait_serving(child: Child, workers: int, timeout: float) -> bool:
    """/healthz answers once one worker is up (the admin port is shared too): wait until each
    worker has logged `"event": "start"`, so that no load lands on a half-started group."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.alive():
        started = set()
        for line in child.err.read_text(errors="replace").splitlines():
            if '"start"' not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "start":
                started.add(event.get("pid"))
        if len(started) >= workers:
            return True
        time.sleep(0.05)
    return False


def check_bearer(url: str, name: str, proxy: str | None = None) -> None:
    """The upstream's /whoami echoes the Authorization it received: it must be a bearer token.
    Only the scheme is checked and reported, never the token."""
    status, body = http_get(url, proxy=proxy)
    if status != 200 or not body.startswith(b"Bearer ") or len(body) <= len(b"Bearer "):
        raise StartError(f"{name}: the upstream did not receive a bearer token (HTTP {status})")
