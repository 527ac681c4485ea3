"""Profile authproxy's request path under wrk load with py-spy.

    python -m bench.profile [--seconds 10] [--connections 64] [--body small] [--workers 1]
                            [--fwd] [--out /tmp/authproxy.svg] [--format flamegraph|raw|speedscope]

Starts the upstream nginx, the demo token server and `authproxy run` (as `make bench` does),
then runs `py-spy record` on the authproxy worker(s) while wrk drives the proxy port. Needs
`pip install py-spy` and permission to ptrace the child (root, or ptrace_scope 0). Prints
wrk's result and where the profile went; `--format raw` writes collapsed stacks that
`python -m bench.profile --top FILE` summarises (own time and inclusive time per function).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import nginx, servers, wrk
from bench.procs import ProcessGroup, free_port, raise_fd_limit, wait_http, wait_line


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    return [int(p) for p in out]


def top(path: Path, n: int = 40) -> str:
    """Own and inclusive sample counts per frame from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    lines = [f"{total} samples", "", "own%  function"]
    lines += [f"{100 * c / total:5.1f} {f}" for f, c in own.most_common(n)]
    lines += ["", "incl% function"]
    lines += [f"{100 * c / total:5.1f} {f}" for f, c in incl.most_common(n)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--body", default="small", choices=("small", "large"))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--fwd", action="store_true", help="forward-proxy mode (absolute-form)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--forwarder", action="store_true", help="profile bench/forwarder.py instead")
    p.add_argument("--format", default="raw", choices=("flamegraph", "raw", "speedscope"))
    p.add_argument("--out", type=Path, default=Path("/tmp/authproxy-profile.txt"))
    p.add_argument("--no-profile", action="store_true", help="only run wrk")
    p.add_argument("--top", type=Path, help="summarise a raw profile and exit")
    args = p.parse_args(argv)
    if args.top is not None:
        print(top(args.top))
        return 0
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="authproxy-profile-"))
    (work / "logs").mkdir()
    group = ProcessGroup(work / "logs")
    try:
        up_port = free_port()
        conf = nginx.write_upstream(work / "nginx-up", up_port)
        up = group.start("upstream", nginx.argv(work / "nginx-up", conf))
        wait_http(up, f"http://127.0.0.1:{up_port}/small", 10)
        if args.forwarder:
            port = free_port()
            argv_ = [sys.executable, "-m", "bench.forwarder", "--port", str(port)]
            argv_ += ["--upstream", f"http://127.0.0.1:{up_port}", "--workers", str(args.workers)]
            fw = group.start("forwarder", argv_, env={"PYTHONPATH": str(servers.REPO)})
            wait_line(fw, 20)
            return _drive(args, pyspy, work, f"http://127.0.0.1:{port}", _children(fw.pid))
        token = servers.start_token_server(group, "token-server", expires_in=3600)
        ap = servers.start_authproxy(
            group,
            work,
            "authproxy",
            workers=args.workers,
            token_url=token.token_url,
            upstream_port=up_port,
            log_level=args.log_level,
        )
        pids = [ap.child.pid] if args.workers == 1 else _children(ap.child.pid)
        return _drive(args, pyspy, work, f"{ap.base}/bench", pids)
    finally:
        group.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def _drive(args: argparse.Namespace, pyspy: str, work: Path, base: str, pids: list[int]) -> int:
    script = None
    url = f"{base}/{args.body}"
    if args.fwd:
        script = wrk.forward_script(work / "fwd.lua", "bench.local", f"/{args.body}")
        url = base.removesuffix("/bench") + "/"
    spies = []
    if not args.no_profile:
        for i, pid in enumerate(pids):
            out = args.out if len(pids) == 1 else args.out.with_suffix(f".{i}{args.out.suffix}")
            cmd = [pyspy, "record", "-p", str(pid), "-d", str(args.seconds + 1), "-r", "200"]
            cmd += ["-f", args.format, "-o", str(out), "--nonblocking"]
            spies.append((out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL)))
        time.sleep(1)
    res = wrk.run(url, connections=args.connections, duration=args.seconds, script=script)
    print(f"wrk: {res.rps:,.0f} req/s p50 {res.p50_ms} ms p99 {res.p99_ms} ms errors {res.errors}")
    for out, spy in spies:
        spy.wait(timeout=args.seconds + 60)
        print(f"profile: {out}")
        if args.format == "raw":
            print(top(out, 30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
