"""`workers: N`: N worker processes share the proxy and admin ports (SO_REUSEPORT).

The parent only supervises: it starts the workers, restarts one that dies (with backoff, and
logs it), forwards SIGTERM/SIGINT (drain and exit) and SIGHUP (reload) to all. Metrics are
kept in prometheus-client's multiprocess files, so a scrape on any worker reports the whole
process group.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType
from typing import Final

from proxy.chains import longest_fetch
from proxy.config import Config
from proxy.logs import event
from proxy.tokens import drain_bound

log = logging.getLogger("authproxy.workers")

WORKER_ENV: Final = "AUTHPROXY_WORKER"
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
MAX_RESTART_DELAY: Final = 10.0


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) is not None


def supervise(config: Config) -> int:
    assert config.source is not None
    own_dir = MULTIPROC_ENV not in os.environ
    metrics_dir = os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="authproxy-metrics-")
    env = dict(os.environ)
    env[MULTIPROC_ENV] = metrics_dir
    argv = [sys.executable, "-m", "proxy", "run", "-c", str(config.source)]
    workers: dict[int, subprocess.Popen[bytes]] = {}
    restarts: dict[int, float] = {}
    stopping = False
    received: list[int] = []

    def start(index: int) -> None:
        worker_env = dict(env)
        worker_env[WORKER_ENV] = str(index)
        # A SIGHUP that arrives before the worker installs its reload handler would kill it
        # (the default action); an ignored disposition survives exec until the runtime's
        # handler replaces it.
        proc = subprocess.Popen(argv, env=worker_env, preexec_fn=_ignore_sighup)
        workers[index] = proc
        event(log, logging.INFO, "worker", "worker started", worker=index, pid=proc.pid)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    for handled in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(handled, on_signal)
    try:
        for i in range(config.workers):
            start(i)
        while True:
            while received:
                signum = received.pop(0)
                if signum == signal.SIGHUP:
                    event(log, logging.INFO, "worker", "forwarding SIGHUP to workers")
                    for proc in workers.values():
                        proc.send_signal(signal.SIGHUP)
                else:
                    stopping = True
            if stopping:
                break
            for index, proc in list(workers.items()):
                code = proc.poll()
                if code is None:
                    continue
                _mark_dead(proc.pid, metrics_dir)
                delay = min(MAX_RESTART_DELAY, restarts.get(index, 0.0) * 2 or 0.1)
                restarts[index] = delay
                event(
                    log,
                    logging.ERROR,
                    "worker",
                    "worker exited; restarting",
                    worker=index,
                    pid=proc.pid,
                    exit_code=code,
                    restart_in_seconds=delay,
                )
                time.sleep(delay)
                start(index)
            time.sleep(0.2)
        return _stop_all(workers, shutdown_bound(config))
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def shutdown_bound(config: Config) -> float:
    """How long a worker may take to stop: its requests drain (`shutdown_grace`), then the
    token fetches in flight finish (a rotation cut short by SIGKILL may lose its chain), then
    the store closes. The supervisor kills a worker only after this."""
    fetches = (longest_fetch(c) for c in config.credentials.values() if c.grant == "refresh_token")
    return config.shutdown_grace + drain_bound(fetches) + 5.0


def _ignore_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _stop_all(workers: dict[int, subprocess.Popen[bytes]], grace: float) -> int:
    for proc in workers.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    code = 0
    for proc in workers.values():
        try:
            rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        code = code or (0 if rc in (0, -signal.SIGTERM) else 1)
    event(log, logging.INFO, "worker", "all workers stopped")
    return code


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Drop a dead worker's live gauges (its counters stay: they are history)."""
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
    except OSError as exc:
        event(log, logging.WARNING, "worker", f"could not clear metrics of pid {pid}: {exc}")
