"""`make bench`: authproxy against its ceiling, nginx and a bare aiohttp forwarder.

    python -m bench.run [--duration 5] [--rounds 3] [--quick] [--only NAME[,NAME]] [--no-tokens]

Everything runs on 127.0.0.1: an upstream nginx serving /small (JSON) and /large (64 KiB), the
demo token server, and the contenders. Each (body, connections) scenario is measured with
`wrk --latency` once per contender per round; rounds rotate the contenders' order, and the
table reports medians over rounds. Results go to stdout and to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import nginx, servers, wrk
from bench.procs import (
    ProcessGroup,
    StartError,
    free_port,
    group_cpu_seconds,
    raise_fd_limit,
    wait_http,
    wait_line,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"


@dataclass
class Contender:
    name: str
    kind: str  # direct | nginx | aiohttp | authproxy
    workers: int
    base: str = ""  # URL prefix: base + "/small"
    scripts: dict[str, Path] | None = None  # forward mode: the wrk script per body
    skipped: str | None = None
    pgid: int | None = None  # its process group, for CPU time (None: nothing to count)
    runs: dict[tuple[str, int], list[wrk.WrkResult]] = field(default_factory=dict)
    cpu_us: dict[tuple[str, int], list[float]] = field(default_factory=dict)  # per request
    failures: dict[tuple[str, int], list[str]] = field(default_factory=dict)

    def target(self, body: str) -> tuple[str, Path | None]:
        if self.scripts is not None:
            return self.base + "/", self.scripts[body]
        return f"{self.base}/{body}", None


# ---------------------------------------------------------------------------- environment


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        commit = "unknown"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": nginx.version(),
        "wrk": wrk.version(),
        "commit": commit,
    }


# ---------------------------------------------------------------------------- contenders


def start_contenders(
    group: ProcessGroup, work: Path, upstream_port: int, only: list[str]
) -> list[Contender]:
    up = f"http://127.0.0.1:{upstream_port}"

    def wanted(name: str) -> bool:
        return not only or any(o in name for o in only)

    out: list[Contender] = []

    if wanted("direct"):
        out.append(Contender("direct", "direct", 1, base=up))

    if wanted("nginx"):
        c = Contender("nginx", "nginx", 1)
        try:
            port = free_port()
            conf = nginx.write_proxy(work / "nginx-proxy", port, upstream_port)
            child = group.start("nginx-proxy", nginx.argv(work / "nginx-proxy", conf))
            wait_http(child, f"http://127.0.0.1:{port}/small", 10)
            servers.check_bearer(f"http://127.0.0.1:{port}/whoami", c.name)
            c.base = f"http://127.0.0.1:{port}"
            c.pgid = child.pid
        except StartError as e:
            c.skipped = str(e)
        out.append(c)

    forwarders = [(f"aiohttp-{n}w", n, "asyncio") for n in (1, 2)]
    if any("uvloop" in o for o in only):  # opt-in: the bare forwarder on uvloop
        forwarders.append(("aiohttp-1w-uvloop", 1, "uvloop"))
    for name, n, loop in forwarders:
        if not wanted(name) or (loop == "asyncio" and only and all("uvloop" in o for o in only)):
            continue
        c = Contender(name, "aiohttp", n)
        try:
            port = free_port()
            argv = [sys.executable, "-m", "bench.forwarder", "--port", str(port)]
            argv += ["--upstream", up, "--workers", str(n), "--loop", loop]
            child = group.start(name, argv, env={"PYTHONPATH": str(HERE.parent)})
            wait_line(child, 20)
            servers.check_bearer(f"http://127.0.0.1:{port}/whoami", name)
            c.base = f"http://127.0.0.1:{port}"
            c.pgid = child.pid
        except StartError as e:
            c.skipped = str(e)
        out.append(c)

    ap_names = [f"authproxy-{n}w-{m}" for n in (1, 2) for m in ("base", "fwd", "quiet")]
    if not any(wanted(n) for n in ap_names):
        return out
    token: servers.TokenServer | None = None
    token_error = ""
    try:
        token = servers.start_token_server(group, "token-server", expires_in=3600)
    except StartError as e:
        token_error = f"token server: {e}"
    for n in (1, 2):
        base_c = Contender(f"authproxy-{n}w-base", "authproxy", n)
        fwd_c = Contender(f"authproxy-{n}w-fwd", "authproxy", n)
        if not (wanted(base_c.name) or wanted(fwd_c.name)):
            continue
        try:
            if token is None:
                raise StartError(token_error)
            ap = servers.start_authproxy(
                group,
                work,
                f"authproxy-{n}w",
                workers=n,
                token_url=token.token_url,
                upstream_port=upstream_port,
            )
            base_c.base = f"{ap.base}/bench"
            fwd_c.base = ap.base
            base_c.pgid = fwd_c.pgid = ap.child.pid
            fwd_c.scripts = {
                b: wrk.forward_script(work / f"fwd-{b}.lua", "bench.local", f"/{b}")
                for b in ("small", "large")
            }
        except (StartError, OSError) as e:
            base_c.skipped = fwd_c.skipped = str(e)
        else:
            try:
                servers.check_bearer("http://bench.local/whoami", fwd_c.name, proxy=ap.base)
            except (StartError, OSError) as e:
                fwd_c.skipped = f"forward mode: {e}"
        out += [c for c in (base_c, fwd_c) if wanted(c.name)]
    # Opt-in variants of authproxy-1w-base, named in --only: `quiet` is log_level warning (no
    # access lines: the logging cost).
    variants: dict[str, tuple[str, dict[str, str]]] = {
        "authproxy-1w-quiet": ("warning", {}),
    }
    for name, (level, env) in variants.items():
        if token is None or not any(name.rsplit("-", 1)[1] in o for o in only):
            continue
        c = Contender(name, "authproxy", 1)
        try:
            ap = servers.start_authproxy(
                group,
                work,
                c.name,
                workers=1,
                token_url=token.token_url,
                upstream_port=upstream_port,
                log_level=level,
                env=env,
            )
            c.base = f"{ap.base}/bench"
            c.pgid = ap.child.pid
        except (StartError, OSError) as e:
            c.skipped = str(e)
        out.append(c)
    return out


# ---------------------------------------------------------------------------- measuring


def measure(
    contenders: list[Contender],
    scenarios: list[tuple[str, int]],
    rounds: int,
    duration: float,
) -> None:
    live = [c for c in contenders if c.skipped is None]
    for c in live:  # warm-up, not recorded: pools filled, tokens cached, caches hot
        url, script = c.target("small")
        try:
            wrk.run(url, connections=16, duration=1, script=script)
        except wrk.WrkError as e:
            print(f"  warm-up of {c.name} failed: {e}", flush=True)
    total = len(live) * len(scenarios) * rounds
    done = 0
    for r in range(rounds):
        for body, conns in scenarios:
            k = (r + scenarios.index((body, conns))) % max(1, len(live))
            for c in live[k:] + live[:k]:  # a rotating order, so no contender is always first
                url, script = c.target(body)
                done += 1
                cpu_before = group_cpu_seconds(c.pgid) if c.pgid is not None else 0.0
                try:
                    res = wrk.run(url, connections=conns, duration=duration, script=script)
                except wrk.WrkError as e:
                    c.failures.setdefault((body, conns), []).append(str(e))
                    print(f"  [{done}/{total}] {c.name} {body} c{conns}: FAILED {e}", flush=True)
                    continue
                c.runs.setdefault((body, conns), []).append(res)
                if c.pgid is not None and res.requests:
                    used = group_cpu_seconds(c.pgid) - cpu_before
                    c.cpu_us.setdefault((body, conns), []).append(used / res.requests * 1e6)
                print(
                    f"  [{done}/{total}] round {r + 1} {c.name:<18} {body:<5} c{conns:<3} "
                    f"{res.rps:>9.0f} req/s  p50 {res.p50_ms:.2f} ms  p99 {res.p99_ms:.2f} ms"
                    f"  errors {res.errors}",
                    flush=True,
                )


# ---------------------------------------------------------------------------- reporting


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _ms(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def table(contenders: list[Contender], scenarios: list[tuple[str, int]]) -> str:
    by_name = {c.name: c for c in contenders}

    def med_rps(name: str, key: tuple[str, int]) -> float | None:
        c = by_name.get(name)
        if c is None or not c.runs.get(key):
            return None
        return _median([r.rps for r in c.runs[key]])

    def med_cpu(name: str, key: tuple[str, int]) -> float | None:
        c = by_name.get(name)
        if c is None or not c.cpu_us.get(key):
            return None
        return _median(c.cpu_us[key])

    head = (
        "| body | conns | contender | req/s (median) | min-max | p50 ms | p99 ms | errors "
        "| vs aiohttp | vs nginx | CPU us/req (vs aiohttp) |\n"
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows: list[str] = []
    for key in scenarios:
        body, conns = key
        for c in contenders:
            label = f"| {body} | {conns} | {c.name} "
            if c.skipped is not None:
                rows.append(label + f"| skipped: {c.skipped} | | | | | | | |")
                continue
            runs = c.runs.get(key, [])
            if not runs:
                why = "; ".join(c.failures.get(key, ["no run"]))[:200]
                rows.append(label + f"| failed: {why} | | | | | | | |")
                continue
            rps = [r.rps for r in runs]
            m = _median(rps)
            floor = med_rps(f"aiohttp-{c.workers}w", key) or med_rps("aiohttp-1w", key)
            ceil = med_rps("nginx", key)
            failed = len(c.failures.get(key, []))
            errors = sum(r.errors for r in runs)
            p50 = _ms(_median([r.p50_ms for r in runs]))
            p99 = _ms(_median([r.p99_ms for r in runs]))
            err = f"{errors}" + (f" (+{failed} failed runs)" if failed else "")
            cpu = med_cpu(c.name, key)
            cpu_floor = med_cpu(f"aiohttp-{c.workers}w", key) or med_cpu("aiohttp-1w", key)
            cpu_text = f"{cpu:,.0f} ({_ratio(cpu, cpu_floor)})" if cpu is not None else "-"
            rows.append(
                label + f"| {m:,.0f} | {min(rps):,.0f}-{max(rps):,.0f} | {p50} | {p99} | {err} "
                f"| {_ratio(m, floor)} | {_ratio(m, ceil)} | {cpu_text} |"
            )
    return head + "\n".join(rows) + "\n"


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base else "-"


def report(
    info: dict[str, str],
    settings: str,
    contenders: list[Contender],
    scenarios: list[tuple[str, int]],
    token_md: str | None,
) -> str:
    small = len(nginx.SMALL_BODY)
    lines = [
        "# authproxy benchmark",
        "",
        f"Run {info['date']} on {info['cpus']} CPUs ({info['cpu']}), Linux {info['kernel']}, "
        f"Python {info['python']}, nginx {info['nginx']}, {info['wrk']}; authproxy at "
        f"commit {info['commit']}.",
        "",
        f"Settings: {settings}. Everything (wrk, the upstream, the token server and the "
        "contenders) shares this machine's CPUs over loopback, so the figures compare "
        "contenders with each other; they are not absolute capacities.",
        "",
        "Contenders: `direct` is wrk straight to the upstream nginx (the ceiling); `nginx` is "
        'one nginx worker with `proxy_set_header Authorization "Bearer x"` and upstream '
        "keepalive (the native limit); `aiohttp-Nw` is the bare aiohttp forwarder of "
        "bench/forwarder.py with N SO_REUSEPORT processes (the Python floor); `authproxy-Nw-base` "
        "is authproxy with N workers in base-URL mode (`/bench/small`), `authproxy-Nw-fwd` the "
        "same process in forward-proxy mode (absolute-form `GET http://bench.local/small`).",
        "",
        f"Bodies: `small` is {small} bytes of JSON, `large` is 64 KiB. `vs aiohttp` is the "
        "ratio of median req/s to the bare forwarder with the same number of workers (1 for "
        "direct and nginx); `vs nginx` to the nginx proxy. Latencies are wrk's, medians over "
        "rounds; errors are non-2xx responses plus socket errors, summed over rounds. `CPU "
        "us/req` is the user plus system CPU time of the contender's processes (all workers "
        "and threads) during its runs divided by the requests served, median over rounds, "
        "with its ratio to the bare forwarder's at equal workers: the work each request costs, "
        "less coupled to how the shared CPUs were divided than req/s.",
        "",
        table(contenders, scenarios),
    ]
    if token_md is not None:
        lines += ["## Token figures", "", token_md]
    lines += ["Reproduce: `make bench` (or `python -m bench.run --help`).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over every contender (default 3)")
    p.add_argument("--connections", default="16,128", help="comma list (default 16,128)")
    p.add_argument("--bodies", default="small,large", help="comma list (default small,large)")
    p.add_argument(
        "--only",
        default="",
        help="contenders whose name contains one of NAME[,NAME]; token figures run only when "
        "one NAME is `tokens`; `quiet` adds authproxy-1w-quiet (log_level warning), `uvloop` "
        "aiohttp-1w-uvloop (the forwarder on uvloop, if installed)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 round of 1 s runs, small "
        "token figures; writes no RESULTS.md unless --output is given",
    )
    p.add_argument("--no-tokens", action="store_true", help="skip the token figures")
    p.add_argument("--output", type=Path, default=None, help=f"default {RESULTS}")
    p.add_argument("--keep", action="store_true", help="keep the work dir (configs and logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 1.0, 1
    output = args.output or (None if args.quick else RESULTS)
    missing = [
        t for t in ("nginx", "wrk") if not (shutil.which(t) or Path(f"/usr/sbin/{t}").exists())
    ]
    if missing:
        print(f"missing: {', '.join(missing)} (run `make bench-deps`)", file=sys.stderr)
        return 2
    bodies = [b for b in args.bodies.split(",") if b]
    if not set(bodies) <= {"small", "large"}:
        p.error("--bodies takes small and/or large")
    scenarios = [(b, int(c)) for b in bodies for c in args.connections.split(",") if c]
    only = [o for o in args.only.split(",") if o]
    raise_fd_limit()
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="authproxy-bench-"))
    group = ProcessGroup(work)
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    token_md: str | None = None
    try:
        up = free_port()
        conf = nginx.write_upstream(work / "upstream", up)
        upstream = group.start("upstream", nginx.argv(work / "upstream", conf))
        wait_http(upstream, f"http://127.0.0.1:{up}/small", 10)
        print(f"upstream nginx on 127.0.0.1:{up}; work dir {work}", flush=True)
        contenders = start_contenders(group, work, up, only)
        for c in contenders:
            print(f"  {c.name:<18} {'skipped: ' + c.skipped if c.skipped else c.base}", flush=True)
        live = [c for c in contenders if c.skipped is None]
        estimate = len(live) * len(scenarios) * args.rounds * (args.duration + 0.5)
        print(
            f"{len(live)} contenders x {len(scenarios)} scenarios x {args.rounds} rounds "
            f"of {args.duration:.0f} s: about {estimate / 60:.1f} min",
            flush=True,
        )
        measure(contenders, scenarios, args.rounds, args.duration)
        for child in [ch for ch in group.children if ch is not upstream]:
            group.stop(child)  # the contenders are done: free the CPUs for the token figures
        if not args.no_tokens and not (only and not any("token" in o for o in only)):
            from bench import tokens

            quick = args.quick
            figures = tokens.run_all(
                group,
                work,
                up,
                concurrent=1_000 if quick else 10_000,
                seconds=8.0 if quick else 20.0,
                chains=1_000 if quick else 100_000,
            )
            token_md = tokens.markdown(figures)
    finally:
        group.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    settings = (
        f"`wrk --latency -t2`, {args.duration:.0f} s per run, {args.rounds} round(s), "
        f"connections {args.connections}, run took {(time.monotonic() - started) / 60:.1f} min; "
        f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
        "(a load before the run means other work shared the CPUs)"
    )
    text = report(info, settings, contenders, scenarios, token_md)
    print()
    print(text)
    if output is not None:
        output.write_text(text)
        print(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
