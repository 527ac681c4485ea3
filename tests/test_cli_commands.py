"""`authproxy seed`, `status` and `demo` as a user runs them: real processes, real curl."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import signal
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.cli import GC_YOUNG_THRESHOLD, tune_gc_for_serving
from proxy.demo import EchoServer, TokenServer, header_values
from proxy.demo_run import DEMO_SECRET
from proxy.models import CredentialState
from proxy.runtime import MAINTENANCE_INTERVAL
from tests.conftest import CLIENT_SECRET, ProxyFactory, proxy_config, proxy_url
from tests.proxyproc import run_cli
from tests.redis_fixture import free_port


def chain_config(tmp_path: Path, token_server: TokenServer) -> Path:
    raw: dict[str, Any] = {
        "store": {"kind": "sqlite", "path": str(tmp_path / "cli.db")},
        "listen": {"proxy": f"127.0.0.1:{free_port()}", "admin": f"127.0.0.1:{free_port()}"},
        "credentials": {
            "po": {
                "grant": "refresh_token",
                "token_url": str(token_server.token_url),
                "client_id": "demo-client",
                "client_secret": {"env": "TEST_CLIENT_SECRET"},
                "subject_header": "X-User",
            },
            "cc": {
                "grant": "client_credentials",
                "token_url": str(token_server.token_url),
                "client_id": "demo-client",
                "client_secret": {"env": "TEST_CLIENT_SECRET"},
            },
        },
        "routes": [],
    }
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_seed_from_stdin_and_file_then_status(tmp_path: Path, token_server: TokenServer) -> None:
    config = chain_config(tmp_path, token_server)
    token = token_server.seed_refresh_token("alice")
    seeded = subprocess.run(
        [sys.executable, "-m", "proxy", "seed", "-c", str(config), "po", "--subject", "alice"],
        input=token + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert seeded.returncode == 0, seeded.stderr
    assert "seeded po for subject alice" in seeded.stdout
    f = tmp_path / "rt"
    f.write_text(token_server.seed_refresh_token("bob"))
    assert (
        run_cli(
            "seed", "-c", str(config), "po", "--subject", "bob", "--refresh-token-file", str(f)
        ).returncode
        == 0
    )
    status = run_cli("status", "-c", str(config), "--json")
    # No proxy is running: status reads the store; the client-credentials state is unknown.
    assert status.returncode == 0, status.stdout + status.stderr
    creds = {c["name"]: c for c in json.loads(status.stdout)["credentials"]}
    assert creds["po"]["subjects"] == 2
    assert creds["cc"]["state"] == "unknown"
    assert token not in status.stdout
    human = run_cli("status", "-c", str(config))
    assert human.returncode == 0
    assert re.search(r"^po\s+ok", human.stdout, re.MULTILINE)


async def test_a_running_proxy_picks_up_a_chain_seeded_from_the_command_line(
    make_proxy: ProxyFactory, token_server: TokenServer, echo_server: EchoServer, tmp_path: Path
) -> None:
    raw = proxy_config(
        token_server, echo_server, store={"kind": "sqlite", "path": str(tmp_path / "seed.db")}
    )
    raw["credentials"]["po"] = {
        "grant": "refresh_token",
        "token_url": str(token_server.token_url),
        "client_id": "demo-client",
        "client_secret": {"env": "TEST_CLIENT_SECRET"},
    }
    raw["routes"].append(
        {
            "name": "po",
            "match": {"prefix": "/po"},
            "upstream": str(echo_server.url),
            "credential": "po",
        }
    )
    rt = await make_proxy(raw)

    def state() -> CredentialState:
        return rt.engine.tokens.health["po"].state

    assert state() is CredentialState.REAUTH_REQUIRED  # never seeded
    seed_file = tmp_path / "rt"
    seed_file.write_text(token_server.seed_refresh_token())
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "seed",
        "-c",
        str(tmp_path / "authproxy-0.yaml"),  # the file make_proxy serves
        "po",
        "--refresh-token-file",
        str(seed_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    # Nothing tells the proxy: its maintenance pass finds the new chain in the store.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3 * MAINTENANCE_INTERVAL
    while state() is CredentialState.REAUTH_REQUIRED and loop.time() < deadline:
        await asyncio.sleep(0.05)
    assert state() is CredentialState.OK
    gauge = rt.metrics.registry.get_sample_value(
        "authproxy_credential_state", {"credential": "po", "state": "reauth_required"}
    )
    assert gauge == 0
    assert token_server.grants["refresh_token"] == 0  # picked up without a rotation
    async with (
        aiohttp.ClientSession(trust_env=False) as http,
        http.get(proxy_url(rt, "/po/x")) as resp,
    ):
        assert resp.status == 200
    assert token_server.grants["refresh_token"] == 1


def test_seed_refuses_bad_usage(tmp_path: Path, token_server: TokenServer) -> None:
    config = chain_config(tmp_path, token_server)
    missing = str(tmp_path / "missing")
    cases = [
        (["seed", "-c", str(config), "nope"], "no credential named 'nope'"),
        (["seed", "-c", str(config), "cc"], "only refresh_token chains are seeded"),
        (
            [
                "seed",
                "-c",
                str(config),
                "po",
                "--subject",
                "alice",
                "--refresh-token-file",
                missing,
            ],
            "cannot read",
        ),
        (["seed", "-c", str(config), "po"], "keeps one chain per user (X-User)"),
        # The subject header could never carry it: such a chain would never be used.
        (["seed", "-c", str(config), "po", "--subject", "a b"], "--subject must be 1-256 visible"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.returncode == 2, args
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_status_exits_3_when_a_chain_needs_attention(
    tmp_path: Path, token_server: TokenServer
) -> None:
    raw = yaml.safe_load(chain_config(tmp_path, token_server).read_text())
    del raw["credentials"]["po"]["subject_header"]
    config = tmp_path / "single.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = run_cli("status", "-c", str(config))
    assert result.returncode == 3  # never seeded: reauth_required
    assert "authproxy seed po" in result.stdout


@pytest.mark.slow
async def test_demo_prints_curl_lines_that_work(tmp_path: Path) -> None:
    """Every curl line the demo prints works; nothing the demo or those calls print (the
    echo answers aside, which show the token they received on purpose) holds the demo's
    client secret or an access token its token server issued."""
    port, admin = free_port(), free_port()
    argv = [sys.executable, "-m", "proxy", "demo", "--port", str(port), "--admin-port", str(admin)]
    demo_log = tmp_path / "demo.log"
    with demo_log.open("wb") as err:  # the child keeps its own descriptor
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
    printed = ""
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while loop.time() < deadline:
            line = await asyncio.to_thread(proc.stdout.readline)
            if not line or line.startswith("Stop with"):
                break
            lines.append(line.strip())
        curls = [ln.split("  #")[0].strip() for ln in lines if ln.startswith("curl ")]
        assert len(curls) >= 8
        outputs = {}
        for cmd in curls:
            done = await asyncio.to_thread(  # through bash, as a user would paste it
                subprocess.run,
                ["bash", "-c", cmd],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert done.returncode == 0, cmd
            outputs[cmd] = done.stdout
        echo_lines = [
            c for c in curls if "/echo/hello" in c or "/rotating/" in c or "Subject: alice" in c
        ]
        for cmd in echo_lines:
            assert json.loads(outputs[cmd])["token_valid"] is True, cmd
        assert any('"error": "no_route"' in out for out in outputs.values())
        assert any('"error": "reauth_required"' in out for out in outputs.values())
        assert any("authproxy_token_requests_total" in out for out in outputs.values())
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        if proc.stdout is not None:
            printed = "\n".join(lines) + proc.stdout.read()
            proc.stdout.close()
    # The access tokens the demo's token server issued, as the echo API received them.
    echoed = {cmd: _echo_answer(out) for cmd, out in outputs.items()}
    issued = {
        auth.removeprefix("Bearer ")
        for answer in echoed.values()
        if answer is not None
        for auth in header_values(answer, "Authorization")
    }
    assert len(issued) >= 3  # demo, rotating and users: the scan has tokens to look for
    shown = [printed, demo_log.read_text()]
    shown += [out for cmd, out in outputs.items() if echoed[cmd] is None]
    for secret in (DEMO_SECRET, CLIENT_SECRET, *issued):  # CLIENT_SECRET: the tests', unused
        for text in shown:
            assert secret not in text
    # The chains are seeded before the proxy serves: no state line says one is missing.
    events = [json.loads(ln) for ln in demo_log.read_text().splitlines() if ln.startswith("{")]
    assert any(e["event"] == "start" for e in events)
    states = [e for e in events if e["event"] == "state" and e.get("credential") == "rotating"]
    assert states == [], states


def _echo_answer(output: str) -> dict[str, Any] | None:
    """The echo API's JSON answer in a curl output, or None for anything else."""
    try:
        answer = json.loads(output)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) and "token_valid" in answer else None


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_serving_collects_rarely_but_still_frees_cycles() -> None:
    """`authproxy run` raises the young-generation threshold; reference cycles are still
    collected once that many objects pile up."""
    before = gc.get_threshold()
    collections: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            collections.append(info["generation"])

    try:
        tune_gc_for_serving()
        assert gc.get_threshold() == (max(before[0], GC_YOUNG_THRESHOLD), *before[1:])
        gc.callbacks.append(seen)
        first = _Node()
        first.other = first
        probe = weakref.ref(first)
        del first
        for _ in range(4 * GC_YOUNG_THRESHOLD):  # bounded: a collection comes long before
            node = _Node()
            node.other = node
            if collections:
                break
        assert collections and probe() is None
    finally:
        if seen in gc.callbacks:
            gc.callbacks.remove(seen)
        gc.set_threshold(*before)
