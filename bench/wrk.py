"""Run `wrk --latency` and parse what it prints."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_LAT = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_REQS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.M)
_SOCK = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non2xx: int
    socket_errors: int

    @property
    def errors(self) -> int:
        return self.non2xx + self.socket_errors


class WrkError(RuntimeError):
    pass


def parse(text: str) -> WrkResult:
    lat = {m.group(1): float(m.group(2)) * _UNITS[m.group(3)] for m in _LAT.finditer(text)}
    rps = _RPS.search(text)
    reqs = _REQS.search(text)
    if rps is None or reqs is None or "50" not in lat or "99" not in lat:
        raise WrkError(f"cannot parse wrk output: {text.strip()[-300:]!r}")
    sock = _SOCK.search(text)
    non2xx = _NON2XX.search(text)
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=lat["50"],
        p99_ms=lat["99"],
        requests=int(reqs.group(1)),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
    )


def exe() -> str:
    return shutil.which("wrk") or "/usr/bin/wrk"


def run(
    url: str,
    *,
    connections: int,
    duration: float,
    threads: int = 2,
    script: Path | None = None,
    timeout_s: int = 10,
) -> WrkResult:
    """One bounded wrk run; raises `WrkError` when wrk fails or prints nothing usable."""
    argv = [
        exe(),
        "--latency",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={timeout_s}s",
    ]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration + timeout_s + 30, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise WrkError(f"wrk did not finish: {e}") from e
    if out.returncode != 0:
        raise WrkError(f"wrk exited {out.returncode}: {(out.stderr or out.stdout).strip()[-300:]}")
    return parse(out.stdout)


def forward_script(path: Path, host: str, target: str) -> Path:
    """A wrk script sending absolute-form requests (`GET http://host/path`), as HTTP_PROXY does."""
    path.write_text(
        f'wrk.method = "GET"\nwrk.path = "http://{host}{target}"\nwrk.headers["Host"] = "{host}"\n'
    )
    return path


def version() -> str:
    try:
        out = subprocess.run([exe(), "-v"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "not installed"
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0] if first else "unknown"
