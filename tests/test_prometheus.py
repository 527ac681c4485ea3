"""The shipped Prometheus rules and Grafana dashboard, checked by Debian's promtool, and a real
Prometheus server that scrapes a running proxy's admin port and answers through its HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.demo import EchoServer, TokenServer
from proxy.runtime import Runtime
from tests.conftest import ProxyFactory, admin_url, proxy_config, proxy_url
from tests.redis_fixture import free_port

CONFIG = Path(__file__).resolve().parent.parent / "config"
NAME = re.compile(r"\bauthproxy_[a-z_]+\b")
# Names a PromQL expression of ours may use besides our metrics: Prometheus's own `up`.
OTHER_SERIES = {"up"}
DASHBOARD_TOPICS = (
    "request rate",
    "latency",
    "errors",
    "token endpoint calls by outcome",
    "cache hit ratio",
    "credential state",
    "token lifetime",
    "rotations",
    "certificate expiry",
    "store operation latency",
)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make system-deps` (Debian package prometheus)")
    return path


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


# -- rules and dashboard -----------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    result = run([tool("promtool"), "check", "rules", str(CONFIG / "prometheus-alerts.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


def test_alert_rules_unit_tests() -> None:
    """Each alert fires when it should and not before (config/prometheus-alerts.test.yml)."""
    result = run([tool("promtool"), "test", "rules", "prometheus-alerts.test.yml"], cwd=CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_example_prometheus_config_is_valid() -> None:
    result = run([tool("promtool"), "check", "config", str(CONFIG / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_cover_what_issue_8_asks() -> None:
    rules = yaml.safe_load((CONFIG / "prometheus-alerts.yml").read_text())["groups"][0]["rules"]
    by_name = {r["alert"]: r for r in rules}
    assert 'state="reauth_required"' in by_name["AuthproxyReauthRequired"]["expr"]
    degraded = by_name["AuthproxyCredentialDegraded"]
    assert 'state="degraded"' in degraded["expr"] and degraded["for"] == "5m"
    assert 'outcome!="success"' in by_name["AuthproxyTokenEndpointErrors"]["expr"]
    assert "14 * 86400" in by_name["AuthproxyCertificateExpiresSoon"]["expr"]
    assert 'code=~"5.."' in by_name["AuthproxyUpstream5xx"]["expr"]


def dashboard_exprs() -> list[str]:
    model = json.loads((CONFIG / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in model["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in model["templating"]["list"] if v["type"] == "query"]
    return exprs


def dashboard_titles() -> list[str]:
    model = json.loads((CONFIG / "grafana-dashboard.json").read_text())
    return [p["title"].lower() for p in model["panels"] if p["type"] != "row"]


def test_dashboard_is_a_grafana_model_with_the_panels_asked_for() -> None:
    model = json.loads((CONFIG / "grafana-dashboard.json").read_text())
    assert model["uid"] and model["title"] == "authproxy"
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(dashboard_titles())
    for topic in DASHBOARD_TOPICS:
        assert topic in titles, f"no panel for {topic}"
    for panel in model["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"


def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every expression (as recording rules, Grafana variables filled in)."""
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue
        concrete = (
            expr.replace("$__rate_interval", "1m")
            .replace("$route", ".*")
            .replace("$credential", ".*")
            .replace("$job", ".*")
        )
        assert "$" not in concrete, expr
        rules.append({"record": f"dashboard:expr_{i}", "expr": concrete})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([tool("promtool"), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


# -- a running proxy ------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(trust_env=False) as session:
        yield session


@pytest.fixture
async def proxy(
    make_proxy: ProxyFactory,
    token_server: TokenServer,
    echo_server: EchoServer,
    tmp_path: Path,
    ca: Any,
) -> Runtime:
    cert = ca.issue_cert("client.example")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "c.crt")
    cert.private_key_pem.write_to_path(tmp_path / "c.key")
    raw = proxy_config(token_server, echo_server)
    raw["routes"].append(
        {
            "name": "mtls",
            "match": {"prefix": "/mtls"},
            "upstream": f"{echo_server.url}/api",
            "credential": "demo",
            "tls": {"cert": str(tmp_path / "c.crt"), "key": str(tmp_path / "c.key")},
        }
    )
    return await make_proxy(raw)


def exposed_names(text: str) -> set[str]:
    """Every series name a /metrics answer can hold, from its families and their types."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "gauge": ("",),
        "summary": ("", "_sum", "_count"),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


async def test_rules_and_dashboard_use_only_exposed_metrics(
    proxy: Runtime, http: aiohttp.ClientSession
) -> None:
    async with http.get(admin_url(proxy, "/metrics")) as resp:
        names = exposed_names(await resp.text())
    assert "authproxy_requests_total" in names
    assert "authproxy_store_operation_duration_seconds_bucket" in names
    rules = (CONFIG / "prometheus-alerts.yml").read_text()
    used = set(NAME.findall(rules)) | {n for e in dashboard_exprs() for n in NAME.findall(e)}
    assert used, "no metric names found"
    assert used <= names, f"not exposed by the proxy: {sorted(used - names)}"
    # Every series name in the dashboard is ours or Prometheus's `up`.
    for expr in dashboard_exprs():
        for word in re.findall(r"\b([a-z_:][a-z0-9_:]*)\s*\{", expr):
            assert word in names or word in OTHER_SERIES, (word, expr)


class PrometheusServer:
    """A real Prometheus (Debian's package) on a loopback port, started and stopped by PID."""

    def __init__(self, workdir: Path, target_port: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        config = {
            "global": {
                "scrape_interval": "1s",
                "evaluation_interval": "1s",
                "scrape_timeout": "1s",
            },
            "rule_files": [str(CONFIG / "prometheus-alerts.yml")],
            "scrape_configs": [
                {
                    "job_name": "authproxy",
                    "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                }
            ],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        log.close()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[PrometheusServer] = []

    def factory(target_port: int) -> PrometheusServer:
        server = PrometheusServer(tmp_path, target_port)
        server.start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


class NotReady(Exception):
    """Prometheus answered, but not yet with query results (503 text while it starts)."""


async def query(
    http: aiohttp.ClientSession, prom: PrometheusServer, promql: str
) -> list[dict[str, Any]]:
    async with http.get(f"{prom.url}/api/v1/query", params={"query": promql}) as resp:
        if resp.status != 200 or resp.content_type != "application/json":
            raise NotReady(f"HTTP {resp.status} {resp.content_type}: {await resp.text()}")
        body = await resp.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def until_value(
    http: aiohttp.ClientSession,
    prom: PrometheusServer,
    promql: str,
    expected: float,
    within: float = 30.0,
) -> None:
    """Poll Prometheus (bounded) until `promql` returns one series with `expected`."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        assert prom.proc is not None and prom.proc.poll() is None, prom.log()
        try:
            last = await query(http, prom, promql)
        except aiohttp.ClientConnectionError:
            last = "prometheus not listening yet"
        except NotReady as exc:
            last = str(exc)
        else:
            if len(last) == 1 and float(last[0]["value"][1]) == expected:
                return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{promql}: wanted {expected}, last answer {last}\n{prom.log()}")


@pytest.mark.slow
async def test_real_prometheus_scrapes_the_admin_port(
    proxy: Runtime,
    http: aiohttp.ClientSession,
    token_server: TokenServer,
    echo_server: EchoServer,
    prometheus_factory: Any,
) -> None:
    assert proxy.admin_port is not None
    prom = prometheus_factory(proxy.admin_port)

    # Load while Prometheus scrapes: bounded count.
    n = 60
    for i in range(n):
        async with http.get(proxy_url(proxy, f"/echo/load/{i}")) as resp:
            assert resp.status == 200
    async with http.get(proxy_url(proxy, "/nothing/here")) as resp:
        assert resp.status == 404

    await until_value(http, prom, 'up{job="authproxy"}', 1)
    await until_value(
        http, prom, 'authproxy_requests_total{route="echo",method="GET",code="200"}', n
    )
    await until_value(http, prom, 'sum(authproxy_requests_total{route="none"})', 1)
    assert echo_server.requests == n
    await until_value(
        http,
        prom,
        'authproxy_token_requests_total{credential="demo",outcome="success"}',
        token_server.requests,
    )
    await until_value(
        http, prom, 'authproxy_token_cache_total{credential="demo",result="hit"}', n - 1
    )
    await until_value(http, prom, 'authproxy_request_duration_seconds_count{route="echo"}', n)
    await until_value(http, prom, 'authproxy_credential_state{credential="demo",state="ok"}', 1)
    await until_value(
        http,
        prom,
        'count(authproxy_tls_certificate_expiry_timestamp_seconds{kind="route",name="mtls"} - time() > 86400)',
        1,
    )

    # A fault: the token endpoint goes down; the state gauge follows through Prometheus.
    token_server.outage = True
    from proxy.models import ChainKey

    assert proxy.refresh_now(ChainKey("demo"))
    await until_value(
        http, prom, 'authproxy_credential_state{credential="demo",state="degraded"}', 1
    )
    await until_value(http, prom, 'authproxy_credential_state{credential="demo",state="ok"}', 0)
    token_server.outage = False

    # Prometheus loaded our alert rules and evaluates them without errors.
    async with http.get(f"{prom.url}/api/v1/rules") as resp:
        rules = (await resp.json())["data"]["groups"]
    ours = yaml.safe_load((CONFIG / "prometheus-alerts.yml").read_text())["groups"]
    assert [g["name"] for g in rules] == [g["name"] for g in ours] == ["authproxy"]
    expected = [r["alert"] for r in ours[0]["rules"]]
    assert expected  # the file has rules to compare
    assert [r["name"] for r in rules[0]["rules"]] == expected  # every rule, in file order
    deadline = time.monotonic() + 15
    while any(r.get("health") != "ok" for r in rules[0]["rules"]):
        assert time.monotonic() < deadline, rules
        await asyncio.sleep(0.2)
        async with http.get(f"{prom.url}/api/v1/rules") as resp:
            rules = (await resp.json())["data"]["groups"]
    # Its target list shows only our loopback admin port.
    async with http.get(f"{prom.url}/api/v1/targets") as resp:
        targets = (await resp.json())["data"]["activeTargets"]
    assert [t["scrapeUrl"] for t in targets] == [admin_url(proxy, "/metrics")]
    assert targets[0]["health"] == "up"
