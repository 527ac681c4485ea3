"""Two builds of authproxy against the bare forwarder, in one interleaved run.

    python -m bench.ab --base REV [--head REV] [--connections 16,128] [--rounds 5]
                       [--duration 3] [--body small] [--workers 1] [--fwd]

`--base` (and `--head`, default: the working tree as it is) are checked out into temporary
git worktrees and served with `authproxy run` (PYTHONPATH pointing at each). At every
connection count, wrk drives the forwarder and both builds in a rotating order, round after
round. For each contender the table gives the CPU time its processes spent per request and
its req/s, medians over rounds, each with its ratio to the forwarder in the same run: on a
shared host the forwarder moves with the noise too, so only those ratios compare builds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench import nginx, servers, wrk
from bench.procs import (
    ProcessGroup,
    free_port,
    group_cpu_seconds,
    raise_fd_limit,
    wait_http,
    wait_line,
)

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Build:
    name: str
    url: str
    pgid: int
    script: Path | None = None
    cpu_us: dict[int, list[float]] = field(default_factory=dict)
    rps: dict[int, list[float]] = field(default_factory=dict)


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


def _run_round(builds: list[Build], conns: int, duration: float, offset: int) -> None:
    order = builds[offset % len(builds) :] + builds[: offset % len(builds)]
    for b in order:
        before = group_cpu_seconds(b.pgid)
        res = wrk.run(b.url, connections=conns, duration=duration, script=b.script)
        used = group_cpu_seconds(b.pgid) - before
        if res.requests:
            b.cpu_us.setdefault(conns, []).append(used / res.requests * 1e6)
            b.rps.setdefault(conns, []).append(res.rps)
        print(f"  c{conns:<4} {b.name:<24} {res.rps:>8.0f} req/s  {used:.2f} s CPU", flush=True)


def _table(builds: list[Build], connections: list[int]) -> str:
    floor = builds[0]
    lines = [
        "| conns | contender | CPU us/req | vs forwarder | req/s | vs forwarder |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for conns in connections:
        f_cpu = statistics.median(floor.cpu_us.get(conns, [float("nan")]))
        f_rps = statistics.median(floor.rps.get(conns, [float("nan")]))
        for b in builds:
            cpu = statistics.median(b.cpu_us.get(conns, [float("nan")]))
            rps = statistics.median(b.rps.get(conns, [float("nan")]))
            lines.append(
                f"| {conns} | {b.name} | {cpu:,.0f} | {cpu / f_cpu:.2f}x | {rps:,.0f} "
                f"| {rps / f_rps:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", required=True, help="the revision to compare against")
    p.add_argument("--head", default=None, help="default: the working tree as it is")
    p.add_argument("--connections", default="16,128")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    p.add_argument("--body", default="small", choices=("small", "large"))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--fwd", action="store_true", help="forward-proxy mode (absolute-form)")
    args = p.parse_args(argv)
    connections = [int(c) for c in args.connections.split(",") if c]
    raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="authproxy-ab-"))
    group = ProcessGroup(work)
    trees: list[Path] = []
    try:
        revisions = [("base", args.base)] + ([("head", args.head)] if args.head else [])
        sources: list[tuple[str, Path]] = []
        for label, rev in revisions:
            tree = work / label
            _git("worktree", "add", "--detach", str(tree), rev)
            trees.append(tree)
            sources.append((f"{label} {_git('rev-parse', '--short', rev)}", tree))
        if not args.head:
            sources.append(("head (working tree)", REPO))

        up_port = free_port()
        conf = nginx.write_upstream(work / "upstream", up_port)
        upstream = group.start("upstream", nginx.argv(work / "upstream", conf))
        wait_http(upstream, f"http://127.0.0.1:{up_port}/small", 10)
        token = servers.start_token_server(group, "token-server", expires_in=3600)

        port = free_port()
        argv_fw = [sys.executable, "-m", "bench.forwarder", "--port", str(port)]
        argv_fw += ["--upstream", f"http://127.0.0.1:{up_port}", "--workers", str(args.workers)]
        fw = group.start("forwarder", argv_fw, env={"PYTHONPATH": str(REPO)})
        wait_line(fw, 20)
        builds = [Build(f"aiohttp-{args.workers}w", f"http://127.0.0.1:{port}/{args.body}", fw.pid)]
        script = (
            wrk.forward_script(work / "fwd.lua", "bench.local", f"/{args.body}")
            if args.fwd
            else None
        )
        for i, (label, tree) in enumerate(sources):
            ap = servers.start_authproxy(
                group,
                work,
                f"authproxy-{i}",
                workers=args.workers,
                token_url=token.token_url,
                upstream_port=up_port,
                env={"PYTHONPATH": str(tree)},
            )
            url = ap.base + "/" if args.fwd else f"{ap.base}/bench/{args.body}"
            builds.append(Build(label, url, ap.child.pid, script))
        for b in builds:  # warm-up, not recorded
            wrk.run(b.url, connections=16, duration=1, script=b.script)
        for r in range(args.rounds):
            for conns in connections:
                _run_round(builds, conns, args.duration, r)
        mode = "forward" if args.fwd else "base-URL"
        print(f"\n{args.body} body, {mode} mode, {args.workers} worker(s), {args.rounds} rounds")
        print(_table(builds, connections))
    finally:
        group.stop_all()
        for tree in trees:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                capture_output=True,
                check=False,
                timeout=60,
            )
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
