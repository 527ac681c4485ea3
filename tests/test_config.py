"""Configuration: typed values, every problem with its field path, secrets by reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import load_config, parse_config, parse_duration, parse_size
from proxy.errors import ConfigError
from proxy.models import Secret

UPSTREAM = "https://api.example.com/v1"


def minimal(**extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "credentials": {
            "pay": {
                "grant": "client_credentials",
                "token_url": "https://idp.example.com/oauth2/token",
                "client_id": "abc",
                "client_secret": {"env": "TEST_CLIENT_SECRET"},
            }
        },
        "routes": [
            {
                "name": "pay",
                "match": {"prefix": "/pay"},
                "upstream": "https://api.example.com/v1",
                "credential": "pay",
            }
        ],
        "store": {"kind": "memory"},
    }
    raw.update(extra)
    return raw


def problems_of(raw: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return [str(p) for p in info.value.problems]


def test_minimal_config_loads_with_defaults() -> None:
    config = parse_config(minimal())
    route = config.routes[0]
    assert route.max_body == 10 * 1024**2
    assert route.replay_body == 1024**2
    assert route.total_timeout == 30.0
    assert config.credentials["pay"].auth_method == "client_secret_basic"
    assert config.credentials["pay"].client_secret is not None
    assert (
        config.credentials["pay"].client_secret.resolve().reveal() == "test-client-secret-9f8e7d6c"
    )
    assert str(config.proxy_listen) == "127.0.0.1:8080"


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), (7, 7.0)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"), [("512KiB", 512 * 1024), ("10MiB", 10 * 1024**2), (100, 100)]
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


def test_every_problem_is_reported_with_its_field_path() -> None:
    raw = minimal()
    raw["routes"].append(
        {
            "name": "bad",
            "match": {"prefix": "/x"},
            "upstream": "http://api.example.com",
            "credential": "nope",
            "timeouts": {"total": "soon"},
            "colour": "red",
        }
    )
    raw["credentials"]["pay"]["token_url"] = "ftp://idp.example.com/token"
    raw["workers"] = 0
    raw["surprise"] = True
    found = problems_of(raw)
    expected = [
        "routes[1].upstream: not an absolute https URL",
        "routes[1].credential: no credential named 'nope'",
        "routes[1].timeouts.total: expected a duration",
        "routes[1].colour: unknown key",
        "credentials.pay.token_url: not an absolute https URL",
        "workers: expected a whole number",
        "surprise: unknown key",
    ]
    for prefix in expected:
        assert any(p.startswith(prefix) for p in found), (prefix, found)


def test_http_is_accepted_only_on_loopback() -> None:
    raw = minimal()
    raw["routes"][0]["upstream"] = "http://127.0.0.1:9000/api"
    raw["credentials"]["pay"]["token_url"] = "http://localhost:9001/token"
    config = parse_config(raw)
    assert config.routes[0].upstream.port == 9000
    raw["routes"][0]["upstream"] = "http://10.0.0.1/api"
    assert problems_of(raw) == [
        "routes[0].upstream: not an absolute https URL (http:// is accepted only for loopback addresses)"
    ]


def test_missing_env_secret_and_unreadable_file_are_problems(tmp_path: Path) -> None:
    raw = minimal()
    raw["credentials"]["pay"]["client_secret"] = {"env": "AUTHPROXY_TEST_UNSET_VAR"}
    raw["admin_token"] = {"file": str(tmp_path / "missing")}
    found = problems_of(raw)
    assert (
        "credentials.pay.client_secret: environment variable AUTHPROXY_TEST_UNSET_VAR is not set"
        in found
    )
    assert any(p.startswith("admin_token: cannot read secret file") for p in found)


def test_literal_secret_is_accepted_with_a_warning_that_does_not_show_it() -> None:
    raw = minimal()
    raw["credentials"]["pay"]["client_secret"] = "literal-s3cret-value"
    config = parse_config(raw)
    assert any("credentials.pay.client_secret: a literal secret" in w for w in config.warnings)
    assert not any("literal-s3cret-value" in w for w in config.warnings)
    assert "literal-s3cret-value" not in repr(config)


def test_file_secret_is_reread_when_it_changes(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("first-secret\n")
    raw = minimal()
    raw["credentials"]["pay"]["client_secret"] = {"file": str(secret)}
    ref = parse_config(raw).credentials["pay"].client_secret
    assert ref is not None
    assert ref.resolve() == Secret("first-secret")
    secret.write_text("second-secret-longer\n")
    assert ref.resolve() == Secret("second-secret-longer")


def test_route_rules_are_validated() -> None:
    raw = minimal()
    raw["routes"][0]["allow"] = [{"methods": ["GET", "FETCH"], "paths": ["accounts"]}]
    raw["routes"].append(dict(raw["routes"][0]))
    found = problems_of(raw)
    assert any(p.startswith("routes[0].allow[0].methods") for p in found)
    assert any(p.startswith("routes[0].allow[0].paths") for p in found)
    assert any(p.startswith("routes[1].name: duplicate route name") for p in found)
    assert any(p.startswith("routes[1].match: same match as routes[0]") for p in found)


def test_grant_specific_rules() -> None:
    raw = minimal()
    raw["credentials"]["pay"]["subject_header"] = "X-User"
    raw["credentials"]["pay"]["auth_method"] = "private_key_jwt"
    found = problems_of(raw)
    assert any(p.startswith("credentials.pay.subject_header: per-user chains need") for p in found)
    assert any(p.startswith("credentials.pay.private_key: is required") for p in found)


def test_redis_store_needs_a_url() -> None:
    assert problems_of(minimal(store={"kind": "redis"}))[0].startswith("store.url: is required")


def test_values_that_crashed_or_passed_unnoticed_are_problems() -> None:
    raw = minimal(store={"kind": "redis", "url": "redis://[bad"}, listen={"proxy": "127.0.0.1:²"})
    raw["routes"][0]["timeouts"] = {"total": "0s", "connect": 0}
    raw["credentials"]["pay"]["timeout"] = "0ms"
    raw["routes"].append(
        {"name": "far", "match": {"host": "api.example.com:99999"}, "upstream": UPSTREAM}
    )
    raw["routes"].append({"name": "h1", "match": {"host": "api.example.net"}, "upstream": UPSTREAM})
    raw["routes"].append(
        {"name": "h2", "match": {"host": "API.example.net.:80"}, "upstream": UPSTREAM}
    )
    found = problems_of(raw)
    for expected in (
        "store.url: expected a redis://, rediss:// or unix:// URL",
        "listen.proxy: expected HOST:PORT",
        "routes[0].timeouts.total: a timeout must be more than 0",
        "routes[0].timeouts.connect: a timeout must be more than 0",
        "credentials.pay.timeout: a timeout must be more than 0",
        "routes[1].match.host: the port must be 1-65535, got '99999'",
        "routes[3].match: same match as routes[2]",
    ):
        assert any(p.startswith(expected) for p in found), (expected, found)
    assert not any("[bad" in p for p in found)  # a Redis URL may carry a password


def test_an_encrypted_private_key_has_its_password_key() -> None:
    raw = minimal()
    raw["credentials"]["pay"].update(
        auth_method="private_key_jwt",
        private_key="not a key: config does not parse it, the first token fetch does",
        private_key_password={"env": "TEST_CLIENT_SECRET"},
    )
    del raw["credentials"]["pay"]["client_secret"]
    cred = parse_config(raw).credentials["pay"]
    assert cred.private_key_password is not None
    assert cred.private_key_password.resolve() == Secret("test-client-secret-9f8e7d6c")


def test_memory_store_is_refused_for_chains_shared_by_workers() -> None:
    raw = minimal(workers=2)
    assert parse_config(raw).workers == 2  # client credentials: each worker fetches its own
    raw["credentials"]["chain"] = {
        "grant": "refresh_token",
        "token_url": "https://idp.example.com/oauth2/token",
        "client_id": "abc",
        "client_secret": {"env": "TEST_CLIENT_SECRET"},
    }
    found = problems_of(raw)
    assert found[0].startswith("store.kind: memory keeps refresh-token chains (chain)"), found
    raw["store"] = {"kind": "sqlite", "path": "chains.db"}
    assert parse_config(raw).workers == 2


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    assert problems_of(["a", "list"]) == ["expected a mapping, got list"]


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("file-secret-value")
    raw = minimal()
    raw["credentials"]["pay"]["client_secret"] = {"file": "secret.txt"}
    raw["store"] = {"kind": "sqlite", "path": "state/authproxy.db"}
    path = tmp_path / "authproxy.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    assert config.store.path == tmp_path / "state" / "authproxy.db"
    ref = config.credentials["pay"].client_secret
    assert ref is not None and ref.resolve() == Secret("file-secret-value")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def test_check_exits_2_and_names_every_field(tmp_path: Path) -> None:
    raw = minimal()
    raw["routes"][0]["upstream"] = "api.example.com"
    raw["routes"][0]["max_body"] = "lots"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 2
    assert "routes[0].upstream: not an absolute https URL" in result.stderr
    assert "routes[0].max_body: expected a size" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_check_accepts_the_shipped_configs(repo_root: Path) -> None:
    env_ok = run_cli("check", "-c", str(repo_root / "proxy" / "demo.yaml"))
    # The demo config reads DEMO_CLIENT_SECRET, which `authproxy demo` sets itself.
    assert env_ok.returncode == 2 and "DEMO_CLIENT_SECRET is not set" in env_ok.stderr


def test_run_with_invalid_config_exits_2_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listen: {proxy: nowhere}\n")
    result = run_cli("run", "-c", str(path))
    assert result.returncode == 2
    assert "listen.proxy: expected HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_path_defaults_to_env_then_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "from-env.yaml"
    good.write_text(yaml.safe_dump(minimal()))
    monkeypatch.setenv("AUTHPROXY_CONFIG", str(good))
    ok = run_cli("check", cwd=tmp_path)
    assert ok.returncode == 0
    assert f"{good}: OK (1 route, 1 credential, store memory)" in ok.stdout
    monkeypatch.delenv("AUTHPROXY_CONFIG")
    missing = run_cli("check", cwd=tmp_path)
    assert missing.returncode == 2 and "authproxy.yaml" in missing.stderr


def test_ipv6_host_routes_and_tunnel_allow_entries() -> None:
    raw = minimal(tunnel_allow=["registry.example.com:443", "[::1]:8443"], tunnel_idle_timeout="2m")
    raw["routes"].append(
        {
            "name": "v6",
            "match": {"host": "::1"},
            "upstream": "https://[::1]:9443/",
            "credential": "pay",
        }
    )
    raw["routes"].append(
        {
            "name": "v6p",
            "match": {"host": "[::1]:8080"},
            "upstream": "https://[::1]:9443/",
            "credential": "pay",
        }
    )
    config = parse_config(raw)
    v6, v6p = config.routes[1], config.routes[2]
    assert (v6.host, v6.port) == ("::1", None)
    assert (v6p.host, v6p.port) == ("::1", 8080)
    assert {str(h) for h in config.tunnel_allow} == {"registry.example.com:443", "[::1]:8443"}
    assert config.tunnel_idle_timeout == 120.0
    found = problems_of(minimal(tunnel_allow=[":443", "host:0"]))
    assert any(p.startswith("tunnel_allow[0]: expected HOST:PORT with a host") for p in found)
    assert any(p.startswith("tunnel_allow[1]: expected HOST:PORT with a host") for p in found)
