"""nginx configurations for the bench: the upstream (static bodies) and the nginx proxy contender.

Each instance lives in its own prefix directory (config, pid file, logs, temp paths) and runs
as a non-daemon child: `nginx -p DIR -c DIR/nginx.conf -e DIR/error.log`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

SMALL_BODY = json.dumps({"id": 42, "name": "bench", "ok": True, "items": [1, 2, 3]}).encode()
LARGE_SIZE = 64 * 1024


def large_body() -> bytes:
    head = b'{"pad":"'
    tail = b'"}'
    return head + b"x" * (LARGE_SIZE - len(head) - len(tail)) + tail


def body_size(name: str) -> int:
    return len(SMALL_BODY) if name == "small" else LARGE_SIZE


_MAIN = """\
daemon off;
master_process on;
worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 20000; multi_accept on; }}
http {{
    access_log off;
    server_tokens off;
    sendfile on;
    tcp_nopush off;  # on: TCP_CORK + delayed ACK gave 40 ms p99 stalls on 64 KiB bodies
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
{body}
}}
"""

_UPSTREAM_SERVER = """\
    open_file_cache max=16 inactive=3600s;
    open_file_cache_valid 3600s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {root}/www;
        default_type application/json;
        location = /small {{ }}
        location = /large {{ }}
        # What the upstream received as Authorization (the bench checks a token was attached).
        location = /whoami {{ default_type text/plain; return 200 "$http_authorization"; }}
    }}
"""

_PROXY_SERVER = """\
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer x";
            proxy_buffer_size 8k;
            proxy_buffers 16 8k;
            proxy_max_temp_file_size 0;
        }}
    }}
"""


def _prefix(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    # nginx workers run as `nobody` when the master is root: they must read the prefix.
    root.chmod(0o755)
    root.parent.chmod(root.parent.stat().st_mode | 0o755)


def write_upstream(root: Path, port: int, workers: int = 1) -> Path:
    _prefix(root)
    www = root / "www"
    www.mkdir(exist_ok=True)
    www.chmod(0o755)
    (www / "small").write_bytes(SMALL_BODY)
    (www / "large").write_bytes(large_body())
    for f in www.iterdir():
        f.chmod(0o644)
    conf = root / "nginx.conf"
    server = _UPSTREAM_SERVER.format(port=port, root=root)
    conf.write_text(_MAIN.format(workers=workers, root=root, body=server))
    return conf


def write_proxy(root: Path, port: int, upstream_port: int, workers: int = 1) -> Path:
    _prefix(root)
    conf = root / "nginx.conf"
    server = _PROXY_SERVER.format(port=port, upstream_port=upstream_port)
    conf.write_text(_MAIN.format(workers=workers, root=root, body=server))
    return conf


def argv(root: Path, conf: Path) -> list[str]:
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    return [exe, "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")]


def version() -> str:
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    try:
        out = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "not installed"
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")
