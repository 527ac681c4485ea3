"""Child processes for the bench: started in their own session, logged to files, stopped by PID."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class StartError(RuntimeError):
    """A contender (or a helper server) did not come up; the message says why."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 5) -> str:
        """The last lines of stderr (then stdout), for a start failure message."""
        for path in (self.err, self.out):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").strip().splitlines()
                if text:
                    return " | ".join(text[-lines:])
        return "(no output)"


class ProcessGroup:
    """Every process the bench starts; `stop_all()` ends each one by its PID."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str], *, env: dict[str, str] | None = None) -> Child:
        out, err = self.logdir / f"{name}.out", self.logdir / f"{name}.err"
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fo,
                stderr=fe,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # its own process group: workers it forks go with it
            )
        child = Child(name, proc, out, err)
        self.children.append(child)
        return child

    def stop(self, child: Child, grace: float = 10.0) -> None:
        if child.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
            try:
                child.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # The group is the one this child leads (start_new_session): end any worker left in it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(5)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_line(child: Child, timeout: float) -> str:
    """The first complete line the child writes on stdout (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            text = child.out.read_text(errors="replace")
            if "\n" in text:
                return text.split("\n", 1)[0]
        if not child.alive():
            raise StartError(f"{child.name} exited with {child.proc.returncode}: {child.tail()}")
        time.sleep(0.05)
    raise StartError(f"{child.name} printed nothing in {timeout:.0f}s: {child.tail()}")


def http_get(
    url: str, timeout: float = 5.0, headers: dict[str, str] | None = None, proxy: str | None = None
) -> tuple[int, bytes]:
    """GET (absolute-form through `proxy` when given; never through an environment proxy)."""
    req = urllib.request.Request(url, headers=headers or {})
    proxies = {"http": proxy} if proxy else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def wait_http(child: Child | None, url: str, timeout: float, want: int = 200) -> None:
    """Poll `url` until it answers `want` (bounded); fail early when the child has exited."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            name = child.name
            raise StartError(f"{name} exited with {child.proc.returncode}: {child.tail()}")
        try:
            status, _ = http_get(url, timeout=2.0)
            if status == want:
                return
            last = f"HTTP {status}"
        except OSError as e:
            last = type(e).__name__
        time.sleep(0.1)
    raise StartError(f"{url} not ready in {timeout:.0f}s ({last})")


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int) -> int:
    """Resident set size of one process, from /proc (KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def group_rss_kib(pid: int) -> int:
    """RSS of a process and its direct children (a supervisor and its workers)."""
    total = rss_kib(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    with contextlib.suppress(OSError):
        for child in children.read_text().split():
            with contextlib.suppress(OSError, RuntimeError):
                total += rss_kib(int(child))
    return total


def group_cpu_seconds(pgid: int) -> float:
    """User plus system CPU time of every live process in process group `pgid` (a contender
    and the workers or threads it started), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # fields: state ppid pgrp ... utime(11) stime(12)
                total += int(fields[11]) + int(fields[12])
    return total / tick
