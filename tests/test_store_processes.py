"""Several OS processes on one chain: no lost update, and one lease holder at a time.

Each round starts WORKERS real processes (this module run with `python -m`), lets them
all reach a start line, then releases them together:

1. free-for-all: every process does get -> compare_and_set, retrying on conflict. Every
   version from 2 to the final one must have been written by exactly one process.
2. leased: every process takes the lease (waiting with `wait_for_change` while another
   holds it), does get -> compare_and_set (which must then never conflict) and releases.
   Each records the interval in which it held the lease, measured inside the lease; the
   intervals of all processes must not overlap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from proxy.models import ChainKey, Secret
from proxy.store import ChainStore
from proxy.store_redis import RedisStore
from proxy.store_sqlite import SqliteStore
from tests.redis_fixture import redis_server, redis_url

__all__ = ["redis_server", "redis_url"]

ROOT = Path(__file__).resolve().parent.parent
KEY = ChainKey("payoneer", "shared-user")
WORKERS = 4
FREE_INCREMENTS = 40
LEASED_INCREMENTS = 15
ROUND_TIMEOUT = 60.0
ATTEMPTS = 100_000  # bound on retries of one increment


def open_for(kind: str, target: str, prefix: str) -> ChainStore:
    return SqliteStore(target) if kind == "sqlite" else RedisStore(target, key_prefix=prefix)


async def increment(store: ChainStore, worker: int, i: int) -> tuple[int, int]:
    """One get -> compare_and_set, retried on conflict. Returns (version written, conflicts)."""
    for conflicts in range(ATTEMPTS):
        current = await store.get(KEY)
        assert current is not None
        new = dataclasses.replace(
            current, refresh_token=Secret(f"rt-{worker}-{i}"), version=current.version + 1
        )
        if await store.compare_and_set(new, expected_version=current.version):
            return new.version, conflicts
    raise AssertionError("an increment kept conflicting")


async def work(kind: str, target: str, prefix: str, mode: str, worker: int) -> dict[str, Any]:
    store = open_for(kind, target, prefix)
    owner = f"{os.getpid()}:{worker}"
    written: list[int] = []
    intervals: list[tuple[int, int]] = []
    conflicts = lease_waits = 0
    try:
        if mode == "free":
            for i in range(FREE_INCREMENTS):
                version, lost = await increment(store, worker, i)
                written.append(version)
                conflicts += lost
        else:
            for i in range(LEASED_INCREMENTS):
                for _ in range(ATTEMPTS):
                    if await store.acquire_lease(KEY, owner, ttl=30):
                        break
                    lease_waits += 1
                    current = await store.get(KEY)
                    assert current is not None
                    await store.wait_for_change(KEY, current.version, timeout=2.0)
                else:
                    raise AssertionError("never got the lease")
                start = time.time_ns()
                version, lost = await increment(store, worker, i)
                end = time.time_ns()
                await store.release_lease(KEY, owner)
                written.append(version)
                conflicts += lost
                intervals.append((start, end))
    finally:
        await store.aclose()
    return {
        "worker": worker,
        "written": written,
        "conflicts": conflicts,
        "intervals": intervals,
        "lease_waits": lease_waits,
    }


def run_round(kind: str, target: str, prefix: str, mode: str) -> list[dict[str, Any]]:
    argv = [sys.executable, "-m", "tests.test_store_processes", kind, target, prefix, mode]
    procs = [
        subprocess.Popen(
            [*argv, str(n)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n in range(WORKERS)
    ]
    try:
        for proc in procs:  # every worker imported everything and waits at the start line
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n", proc.stderr and proc.stderr.read()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=ROUND_TIMEOUT)
            assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
            results.append(json.loads(out))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(params=["sqlite", "redis"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str, str]:
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "shared" / "authproxy.db"), ""
    url: str = request.getfixturevalue("redis_url")
    return "redis", url, f"procs-{uuid.uuid4().hex[:10]}"


@pytest.mark.slow
def test_processes_share_one_chain_without_lost_updates_or_overlapping_leases(
    target: tuple[str, str, str],
) -> None:
    kind, where, prefix = target

    async def seed() -> int:
        store = open_for(kind, where, prefix)
        try:
            return (await store.seed(KEY, Secret("rt-seed"))).version
        finally:
            await store.aclose()

    async def final() -> tuple[int, str]:
        store = open_for(kind, where, prefix)
        try:
            record = await store.get(KEY)
            assert record is not None
            return record.version, record.refresh_token.reveal()
        finally:
            await store.aclose()

    assert asyncio.run(seed()) == 1
    free = run_round(kind, where, prefix, "free")
    leased = run_round(kind, where, prefix, "leased")

    total = WORKERS * (FREE_INCREMENTS + LEASED_INCREMENTS)
    version, refresh = asyncio.run(final())
    assert version == 1 + total
    written = sorted(v for r in free + leased for v in r["written"])
    assert written == list(range(2, total + 2))  # each version written by exactly one process
    # The last writer's token is the one stored: nothing was lost or overwritten late.
    last = next(r for r in leased if r["written"] and r["written"][-1] == version)
    assert refresh == f"rt-{last['worker']}-{LEASED_INCREMENTS - 1}"

    assert all(r["conflicts"] == 0 for r in leased)  # under the lease nobody else writes
    intervals = sorted(tuple(i) for r in leased for i in r["intervals"])
    assert len(intervals) == WORKERS * LEASED_INCREMENTS
    for (_, prev_end), (start, _) in itertools.pairwise(intervals):
        assert start >= prev_end, "two processes held the lease at once"

    print(
        f"{kind}: free-round conflicts {sum(r['conflicts'] for r in free)}, "
        f"lease waits {sum(r['lease_waits'] for r in leased)}"
    )


if __name__ == "__main__":
    _kind, _target, _prefix, _mode, _worker = sys.argv[1:6]
    print("ready", flush=True)
    if sys.stdin.readline().strip() == "go":
        print(json.dumps(asyncio.run(work(_kind, _target, _prefix, _mode, int(_worker)))))
