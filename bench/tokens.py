"""Token figures for the bench report.

1. Cold cache: N concurrent requests (default 10,000) reach a freshly started authproxy; the
   token endpoint must be called once.
2. Several token lifetimes: the demo token server issues 4-second tokens; a moderate load runs
   for ~20 s; after warm-up no request may wait for a token fetch (refresh ahead of expiry).
3. Memory: RSS of an authproxy process holding 100,000 per-user refresh-token chains.

    python -m bench.tokens [--concurrent 10000] [--seconds 20] [--chains 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import aiohttp

from bench import nginx, servers
from bench.procs import (
    ProcessGroup,
    StartError,
    free_port,
    group_rss_kib,
    raise_fd_limit,
    wait_http,
)


@dataclass
class Figure:
    name: str
    value: str
    target: str = ""
    ok: bool | None = None  # None: informative, or not measured
    details: list[str] = field(default_factory=list)


def _cache(text: str, credential: str = "demo") -> dict[str, float]:
    return {
        r: servers.metric(text, "authproxy_token_cache_total", credential=credential, result=r)
        for r in ("hit", "miss", "coalesced")
    }


def _token_requests(text: str, credential: str = "demo") -> float:
    return servers.metric(text, "authproxy_token_requests_total", credential=credential)


# ---------------------------------------------------------------------------- 1. cold cache


async def _burst(url: str, n: int, timeout: float) -> dict[str, int]:
    """n requests started at once, each on its own connection (bounded by `timeout`)."""
    counts: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=n, force_close=True)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(
        connector=connector, trust_env=False, timeout=client_timeout
    ) as session:

        async def one() -> None:
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    key = str(resp.status)
            except (aiohttp.ClientError, TimeoutError) as e:
                key = type(e).__name__
            counts[key] = counts.get(key, 0) + 1

        async with asyncio.TaskGroup() as tg:
            for _ in range(n):
                tg.create_task(one())
    return counts


def cold_cache(group: ProcessGroup, work: Path, upstream_port: int, n: int, workers: int) -> Figure:
    name = f"cold cache: {n:,} concurrent requests, {workers} worker(s)"
    token = servers.start_token_server(group, f"token-cold-{workers}w", expires_in=3600)
    ap = servers.start_authproxy(
        group,
        work,
        f"authproxy-cold-{workers}w",
        workers=workers,
        token_url=token.token_url,
        upstream_port=upstream_port,
        warm=False,
    )
    try:
        before = _token_requests(ap.metrics_text())
        seen_before = token.requests_seen()
        started = time.monotonic()
        counts = asyncio.run(_burst(f"{ap.base}/bench/small", n, timeout=120))
        elapsed = time.monotonic() - started
        text = ap.metrics_text()
        fetches = _token_requests(text) - before
        seen_after = token.requests_seen()
        seen = None if seen_after is None else seen_after - (seen_before or 0)
        cache = _cache(text)
    finally:
        group.stop(ap.child)
        group.stop(token.child)
    count = seen if seen is not None else int(fetches)
    source = "counted by the token server" if seen is not None else "authproxy_token_requests_total"
    want = workers  # each worker process keeps its own cache (memory store, no `share`)
    return Figure(
        name,
        f"{count} token request(s)",
        target="1" if workers == 1 else f"at most {workers} (one per worker process)",
        ok=count <= want,
        details=[
            f"source: {source}; responses {dict(sorted(counts.items()))} in {elapsed:.1f} s"
            + "".join(f"; {n}" for n in ap.notes),
            "authproxy_token_cache_total: " + ", ".join(f"{k} {int(v)}" for k, v in cache.items()),
        ],
    )


# ---------------------------------------------------------------------------- 2. lifetimes


async def _steady(url: str, seconds: float, concurrency: int, cap: int) -> tuple[list[float], int]:
    """`concurrency` clients in closed loops for `seconds` (at most `cap` requests in all)."""
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, trust_env=False, timeout=aiohttp.ClientTimeout(total=10)
    ) as session:

        async def client() -> None:
            nonlocal errors
            while time.monotonic() < deadline and len(latencies) + errors < cap:
                t0 = time.perf_counter()
                try:
                    async with session.get(url) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - t0) * 1000)
                else:
                    errors += 1

        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(client())
    return latencies, errors


def lifetimes(
    group: ProcessGroup, work: Path, upstream_port: int, seconds: float, expires_in: int = 4
) -> Figure:
    token = servers.start_token_server(group, "token-life", expires_in=expires_in)
    ap = servers.start_authproxy(
        group,
        work,
        "authproxy-life",
        workers=1,
        token_url=token.token_url,
        upstream_port=upstream_port,
    )
    try:
        m0 = ap.metrics_text()
        lat, errors = asyncio.run(
            _steady(f"{ap.base}/bench/small", seconds, concurrency=16, cap=2_000_000)
        )
        m1 = ap.metrics_text()
    finally:
        group.stop(ap.child)
        group.stop(token.child)
    c0, c1 = _cache(m0), _cache(m1)
    waited = int((c1["miss"] - c0["miss"]) + (c1["coalesced"] - c0["coalesced"]))
    fetches = int(_token_requests(m1) - _token_requests(m0))
    lat.sort()
    q = statistics.quantiles(lat, n=1000) if len(lat) >= 1000 else []
    p50 = statistics.median(lat) if lat else float("nan")
    p99 = q[989] if q else float("nan")
    slow = sum(1 for v in lat if q and v > 3 * p99)
    return Figure(
        f"{seconds:.0f} s across {seconds / expires_in:.0f} lifetimes of {expires_in} s tokens",
        f"{waited} request(s) waited for a token fetch",
        target="0",
        ok=waited == 0 and fetches > 0,
        details=[
            f"token fetches during the run: {fetches} (ahead of expiry, in the background)",
            f"{len(lat):,} requests, {errors} errors; latency p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
            f"p99.9 {q[998] if q else float('nan'):.2f} ms, max {lat[-1] if lat else 0:.1f} ms; "
            f"{slow} over 3 x p99",
            "authproxy_token_cache_total deltas after warm-up: "
            + ", ".join(f"{k} {int(c1[k] - c0[k])}" for k in c1),
        ],
    )


# ---------------------------------------------------------------------------- 3. memory


def rss_chains(group: ProcessGroup, work: Path, upstream_port: int, chains: int) -> Figure:
    """RSS with `chains` per-user refresh-token chains cached.

    Needs (a) the refresh_token grant with `subject_header` in `authproxy run`, (b) the admin
    seed endpoint `PUT /admin/credentials/users/refresh-token`, and (c) the demo token server's
    `POST /_demo/seed` to mint each chain's first refresh token. Each chain is seeded, then used
    once (so it also holds an access token). Until all of that answers, the figure is reported
    as "not measured" with the reason; no number is made up.
    """
    name = f"RSS with {chains:,} per-user chains cached"
    token = servers.start_token_server(group, "token-rss", expires_in=3600)
    try:
        ap = servers.start_authproxy(
            group,
            work,
            "authproxy-rss",
            workers=1,
            token_url=token.token_url,
            upstream_port=upstream_port,
            per_user_token_url=token.token_url,
            warm=False,
        )
    except StartError as e:
        group.stop(token.child)
        return Figure(name, "not measured", details=[f"per-user config refused: {e}"])
    try:
        mint = token.control_url("/_demo/seed")  # mints the first refresh token of a chain
        if mint is None:
            return Figure(name, "not measured", details=["the demo server has no /_demo/seed"])
        base_rss = group_rss_kib(ap.child.pid)
        seeded, used = asyncio.run(_seed_and_use(ap, mint, chains, deadline=900))
        rss = group_rss_kib(ap.child.pid)
    finally:
        group.stop(ap.child)
        group.stop(token.child)
    if used == 0:
        return Figure(name, "not measured", details=[f"{seeded} chains seeded, none usable"])
    per = (rss - base_rss) * 1024 / used
    return Figure(
        name,
        f"{rss / 1024:.0f} MiB" + ("" if used == chains else f" (only {used:,} chains held)"),
        ok=None if used == chains else False,
        details=[
            f"{base_rss / 1024:.0f} MiB after start, {(rss - base_rss) / 1024:.0f} MiB more for "
            f"{used:,} chains (~{per:.0f} bytes each: the memory store's records plus the cached "
            f"access token); {seeded:,} seeded through the admin API"
        ],
    )


async def _seed_and_use(
    ap: servers.AuthProxy, mint_url: str, chains: int, deadline: float
) -> tuple[int, int]:
    """Seed one chain per subject through the admin API, then send one request per subject so
    that each chain holds an access token. Bounded: 64 at a time, 10 s per call, `deadline` s
    in all (what was done by then is counted)."""
    seeded = used = 0
    stop_at = time.monotonic() + deadline
    subjects = iter(range(chains))
    admin = f"http://127.0.0.1:{ap.admin_port}/admin/credentials/users/refresh-token"
    async with aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=10)) as s:

        async def one(subject: str) -> None:
            nonlocal seeded, used
            async with s.post(mint_url, json={"subject": subject}) as r:
                rt = (await r.json())["refresh_token"]
            async with s.put(admin, json={"refresh_token": rt, "subject": subject}) as r:
                if r.status != 204:
                    return
            seeded += 1
            headers = {servers.SUBJECT_HEADER: subject}
            async with s.get(f"{ap.base}/users/small", headers=headers) as r:
                await r.read()
                used += r.status == 200

        async def worker() -> None:
            for i in subjects:  # shared iterator: each subject is taken by one worker
                if time.monotonic() > stop_at:
                    return
                try:
                    await one(f"user-{i}")
                except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
                    continue

        async with asyncio.TaskGroup() as tg:
            for _ in range(64):
                tg.create_task(worker())
    return seeded, used


# ---------------------------------------------------------------------------- report


def run_all(
    group: ProcessGroup,
    work: Path,
    upstream_port: int,
    *,
    concurrent: int = 10_000,
    seconds: float = 20.0,
    chains: int = 100_000,
) -> list[Figure]:
    figures: list[Figure] = []
    args = (group, work, upstream_port)
    steps: list[tuple[str, Callable[[], Figure]]] = [
        (
            f"cold cache, {concurrent:,} requests, 1 worker",
            partial(cold_cache, *args, concurrent, 1),
        ),
        (
            f"cold cache, {concurrent:,} requests, 2 workers",
            partial(cold_cache, *args, concurrent, 2),
        ),
        ("token lifetimes", partial(lifetimes, *args, seconds)),
        (f"RSS with {chains:,} chains", partial(rss_chains, *args, chains)),
    ]
    for label, step in steps:
        print(f"  token figures: {label} ...", flush=True)
        try:
            fig = step()
        except (StartError, RuntimeError, OSError) as e:
            fig = Figure(label, "not measured", details=[str(e)])
        print(f"    {fig.value}" + (f" (target {fig.target})" if fig.target else ""), flush=True)
        figures.append(fig)
    return figures


def markdown(figures: list[Figure]) -> str:
    out = ["| figure | measured | target | |", "|---|---|---|---|"]
    for f in figures:
        verdict = {True: "ok", False: "**FAILS**", None: ""}[f.ok]
        out.append(f"| {f.name} | {f.value} | {f.target} | {verdict} |")
    out.append("")
    for f in figures:
        for d in f.details:
            out.append(f"- {f.name}: {d}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrent", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--chains", type=int, default=100_000)
    args = p.parse_args(argv)
    raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="authproxy-bench-"))
    group = ProcessGroup(work)
    try:
        up = free_port()
        conf = nginx.write_upstream(work / "upstream", up)
        child = group.start("upstream", nginx.argv(work / "upstream", conf))
        wait_http(child, f"http://127.0.0.1:{up}/small", 10)
        figures = run_all(
            group, work, up, concurrent=args.concurrent, seconds=args.seconds, chains=args.chains
        )
    finally:
        group.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
