"""YAML configuration -> frozen dataclasses, validated once, every problem with its field path.

`load_config(path)` raises `ConfigError` listing every problem found (SPEC section 3):
unknown keys, bad durations and sizes, non-https upstreams, dangling credential names,
unreadable secret and certificate files. Validation happens here, at start and at SIGHUP,
never on the request path.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import yaml
from yarl import URL

from proxy.errors import ConfigError, Problem
from proxy.models import Secret

GRANTS: Final = ("client_credentials", "refresh_token")
AUTH_METHODS: Final = (
    "client_secret_basic",
    "client_secret_post",
    "private_key_jwt",
    "tls_client_auth",
)
STORE_KINDS: Final = ("sqlite", "redis", "memory")
HTTP_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"}
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS: Final = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_duration(value: object) -> float:
    """`500ms`, `30s`, `5m`, `1h` or a bare number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 30s or 5m")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"expected a duration such as 500ms, 30s or 5m, got {value!r}")


def parse_timeout(value: object) -> float:
    """A duration that bounds a wait: more than zero (zero would fail every call)."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("a timeout must be more than 0")
    return seconds


def _port_number(text: str) -> int | None:
    """`8080` -> 8080; None for anything that is not 1-65535 in ASCII digits (`str.isdigit`
    also accepts `²`, which `int()` then refuses)."""
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        return None
    return int(text)


def parse_size(value: object) -> int:
    """`512KiB`, `10MiB`, `1GiB` or a bare number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512KiB or 10MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(f"expected a size such as 512KiB or 10MiB, got {value!r}")


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class SecretRef:
    """Where a secret comes from: `{env: NAME}`, `{file: PATH}` or a literal.

    File secrets are re-read when the file changes (mtime or size), so a rotated secret
    takes effect without a restart.
    """

    source: str  # env | file | literal
    name: str
    _literal: Secret | None = field(default=None, repr=False, compare=False)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def describe(self) -> str:
        return {"env": f"env {self.name}", "file": f"file {self.name}"}.get(self.source, "literal")

    def resolve(self) -> Secret:
        """The current value; raises `OSError`/`KeyError` naming the source, never the value."""
        if self.source == "literal":
            assert self._literal is not None
            return self._literal
        if self.source == "env":
            value = os.environ.get(self.name)
            if value is None:
                raise KeyError(f"environment variable {self.name} is not set")
            return Secret(value)
        st = os.stat(self.name)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._cache.get("stamp") != stamp:
            text = Path(self.name).read_text(encoding="utf-8").strip()
            self._cache["stamp"] = stamp
            self._cache["value"] = Secret(text)
        value = self._cache["value"]
        assert isinstance(value, Secret)
        return value


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Client certificate, trust and TLS policy for one outbound identity."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    key_password: SecretRef | None = None
    server_name: str | None = None
    min_version: str = "1.2"
    insecure_skip_verify: bool = False

    @property
    def has_client_cert(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True, slots=True)
class CredentialConfig:
    """How to obtain tokens for one credential."""

    name: str
    grant: str
    token_url: URL
    client_id: SecretRef | None
    client_secret: SecretRef | None = None
    client_secret_next: SecretRef | None = None
    auth_method: str = "client_secret_basic"
    scopes: tuple[str, ...] = ()
    audience: str | None = None
    resource: str | None = None
    private_key: SecretRef | None = None
    private_key_password: SecretRef | None = None
    private_key_alg: str | None = None
    key_id: str | None = None
    tls: TlsConfig | None = None
    share: bool = False
    subject_header: str | None = None
    rotation_grace: float = 30.0
    skew: float = 5.0
    default_expires_in: float = 300.0
    max_expires_in: float = 86400.0
    timeout: float = 10.0
    extra_params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class AllowRule:
    methods: frozenset[str]
    paths: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One route: what it matches, where it goes, with which credential."""

    name: str
    prefix: str | None
    host: str | None
    port: int | None
    upstream: URL
    credential: str | None
    allow: tuple[AllowRule, ...] = ()
    tls: TlsConfig | None = None
    connect_timeout: float = 5.0
    total_timeout: float = 30.0
    max_body: int = 10 * 1024**2
    replay_body: int = 1024**2


@dataclass(frozen=True, slots=True)
class StoreConfig:
    kind: str = "sqlite"
    path: Path = Path("authproxy.db")
    url: str | None = None
    key_prefix: str = "authproxy"


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, validated configuration."""

    proxy_listen: HostPort
    admin_listen: HostPort
    workers: int
    store: StoreConfig
    credentials: Mapping[str, CredentialConfig]
    routes: tuple[RouteConfig, ...]
    admin_token: SecretRef | None = None
    tunnel_allow: frozenset[HostPort] = frozenset()
    proxy_auth: Mapping[str, SecretRef] = field(default_factory=dict)
    shutdown_grace: float = 10.0
    tunnel_idle_timeout: float = 300.0
    ready_requires_tokens: bool = False
    log_level: str = "info"
    source: Path | None = None
    warnings: tuple[str, ...] = ()

    def secret_refs(self) -> list[SecretRef]:
        """Every secret this config names, for the log scrubber."""
        refs: list[SecretRef] = []
        for cred in self.credentials.values():
            for ref in (
                cred.client_secret,
                cred.client_secret_next,
                cred.private_key,
                cred.private_key_password,
            ):
                if ref is not None:
                    refs.append(ref)
            if cred.tls and cred.tls.key_password:
                refs.append(cred.tls.key_password)
        for route in self.routes:
            if route.tls and route.tls.key_password:
                refs.append(route.tls.key_password)
        if self.admin_token:
            refs.append(self.admin_token)
        refs.extend(self.proxy_auth.values())
        return refs


T = TypeVar("T")


class _Reader:
    """One pass over the raw YAML that collects problems instead of stopping at the first."""

    def __init__(self, base_dir: Path) -> None:
        self.problems: list[Problem] = []
        self.warnings: list[str] = []
        self.base_dir = base_dir

    def problem(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def mapping(self, raw: object, path: str, allowed: set[str]) -> dict[str, Any] | None:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problem(path, f"expected a mapping, got {type(raw).__name__}")
            return None
        for key in raw:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.problem(_join(path, str(key)), f"unknown key (allowed here: {hint})")
        return raw

    def convert(
        self, raw: dict[str, Any], key: str, path: str, fn: Callable[[object], T], default: T
    ) -> T:
        if key not in raw or raw[key] is None:
            return default
        try:
            return fn(raw[key])
        except (ValueError, TypeError) as exc:
            self.problem(_join(path, key), str(exc))
            return default

    def string(
        self, raw: dict[str, Any], key: str, path: str, *, required: bool = False
    ) -> str | None:
        value = raw.get(key)
        if value is None:
            if required:
                self.problem(_join(path, key), "is required")
            return None
        if not isinstance(value, str | int) or isinstance(value, bool) or str(value) == "":
            self.problem(_join(path, key), "expected a non-empty string")
            return None
        return str(value)

    def boolean(self, raw: dict[str, Any], key: str, path: str, default: bool) -> bool:
        value = raw.get(key, default)
        if not isinstance(value, bool):
            self.problem(_join(path, key), "expected true or false")
            return default
        return value

    def choice(
        self, raw: dict[str, Any], key: str, path: str, choices: tuple[str, ...], default: str
    ) -> str:
        value = raw.get(key, default)
        if value not in choices:
            self.problem(_join(path, key), f"expected one of {', '.join(choices)}, got {value!r}")
            return default
        return str(value)

    def path_value(
        self, raw: dict[str, Any], key: str, path: str, *, must_exist: bool = True
    ) -> Path | None:
        text = self.string(raw, key, path)
        if text is None:
            return None
        p = Path(text)
        if not p.is_absolute():
            p = self.base_dir / p
        if must_exist:
            try:
                with p.open("rb"):
                    pass
            except OSError as exc:
                self.problem(_join(path, key), f"cannot read file {p}: {exc.strerror}")
        return p

    def secret(
        self, raw: dict[str, Any], key: str, path: str, *, required: bool = False
    ) -> SecretRef | None:
        value = raw.get(key)
        where = _join(path, key)
        if value is None:
            if required:
                self.problem(where, "is required (give it as {env: NAME} or {file: PATH})")
            return None
        if isinstance(value, str | int) and not isinstance(value, bool):
            self.warnings.append(
                f"{where}: a literal secret in the config file; use {{env: NAME}} or {{file: PATH}}"
            )
            return SecretRef("literal", "", Secret(str(value)))
        if isinstance(value, dict) and len(value) == 1:
            ((kind, name),) = value.items()
            if kind == "env" and isinstance(name, str) and name:
                ref = SecretRef("env", name)
            elif kind == "file" and isinstance(name, str) and name:
                p = Path(name) if Path(name).is_absolute() else self.base_dir / name
                ref = SecretRef("file", str(p))
            else:
                self.problem(where, "expected {env: NAME} or {file: PATH}")
                return None
            try:
                ref.resolve()
            except KeyError:
                self.problem(where, f"environment variable {ref.name} is not set")
            except OSError as exc:
                self.problem(where, f"cannot read secret file {ref.name}: {exc.strerror}")
            return ref
        self.problem(where, "expected {env: NAME} or {file: PATH}")
        return None

    def url(self, raw: dict[str, Any], key: str, path: str) -> URL | None:
        text = self.string(raw, key, path, required=True)
        if text is None:
            return None
        try:
            url = URL(text)
        except ValueError:
            self.problem(_join(path, key), f"not a URL: {text!r}")
            return None
        if not url.absolute or not url.host:
            self.problem(_join(path, key), "not an absolute https URL")
            return None
        if url.scheme == "https":
            return url
        if url.scheme == "http" and is_loopback_host(url.host):
            return url
        self.problem(
            _join(path, key),
            "not an absolute https URL (http:// is accepted only for loopback addresses)",
        )
        return None

    def host_port(self, value: object, path: str, default: HostPort) -> HostPort:
        if value is None:
            return default
        text = str(value)
        host, sep, port = text.rpartition(":")
        # Port 0 asks the kernel for a free port (tests, the demo).
        number = 0 if port == "0" else _port_number(port)
        if not sep or number is None:
            self.problem(path, f"expected HOST:PORT such as 127.0.0.1:8080, got {text!r}")
            return default
        return HostPort(host.strip("[]") or "0.0.0.0", number)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _tls(r: _Reader, raw: object, path: str) -> TlsConfig | None:
    if raw is None:
        return None
    m = r.mapping(
        raw,
        path,
        {"cert", "key", "ca", "key_password", "server_name", "min_version", "insecure_skip_verify"},
    )
    if m is None:
        return None
    tls = TlsConfig(
        cert=r.path_value(m, "cert", path),
        key=r.path_value(m, "key", path),
        ca=r.path_value(m, "ca", path),
        key_password=r.secret(m, "key_password", path),
        server_name=r.string(m, "server_name", path),
        min_version=r.choice(m, "min_version", path, ("1.2", "1.3"), "1.2"),
        insecure_skip_verify=r.boolean(m, "insecure_skip_verify", path, False),
    )
    if (tls.cert is None) != (tls.key is None) and tls.cert is not None and tls.key is None:
        # A PEM holding both the certificate and its key is fine; a key without a cert is not.
        pass
    if tls.key is not None and tls.cert is None:
        r.problem(_join(path, "cert"), "a client key needs its certificate (cert)")
    if tls.insecure_skip_verify:
        r.warnings.append(f"{path}.insecure_skip_verify: certificate verification is OFF")
    return tls


_CREDENTIAL_KEYS: Final = {
    "grant",
    "token_url",
    "client_id",
    "client_secret",
    "client_secret_next",
    "auth_method",
    "scopes",
    "audience",
    "resource",
    "private_key",
    "private_key_password",
    "private_key_alg",
    "key_id",
    "tls",
    "share",
    "subject_header",
    "rotation_grace",
    "skew",
    "default_expires_in",
    "max_expires_in",
    "timeout",
    "extra_params",
}


def _credential(r: _Reader, name: str, raw: object, path: str) -> CredentialConfig | None:
    m = r.mapping(raw, path, _CREDENTIAL_KEYS)
    if m is None:
        return None
    grant = r.choice(m, "grant", path, GRANTS, "client_credentials")
    token_url = r.url(m, "token_url", path)
    auth_method = r.choice(m, "auth_method", path, AUTH_METHODS, "client_secret_basic")
    scopes_raw = m.get("scopes", [])
    scopes: tuple[str, ...] = ()
    if isinstance(scopes_raw, str):
        scopes = tuple(scopes_raw.split())
    elif isinstance(scopes_raw, list) and all(isinstance(s, str) for s in scopes_raw):
        scopes = tuple(scopes_raw)
    else:
        r.problem(_join(path, "scopes"), "expected a list of strings")
    extra_raw = m.get("extra_params", {})
    extra: tuple[tuple[str, str], ...] = ()
    if isinstance(extra_raw, dict):
        extra = tuple((str(k), str(v)) for k, v in extra_raw.items())
    else:
        r.problem(_join(path, "extra_params"), "expected a mapping of form parameters")
    tls = _tls(r, m.get("tls"), _join(path, "tls"))
    needs_secret = auth_method in ("client_secret_basic", "client_secret_post")
    cred = CredentialConfig(
        name=name,
        grant=grant,
        token_url=token_url or URL("https://invalid.invalid/"),
        client_id=r.secret(m, "client_id", path, required=True)
        if not isinstance(m.get("client_id"), str)
        else SecretRef("literal", "", Secret(str(m["client_id"]))),
        client_secret=r.secret(m, "client_secret", path, required=needs_secret),
        client_secret_next=r.secret(m, "client_secret_next", path),
        auth_method=auth_method,
        scopes=scopes,
        audience=r.string(m, "audience", path),
        resource=r.string(m, "resource", path),
        private_key=r.secret(m, "private_key", path, required=auth_method == "private_key_jwt"),
        private_key_password=r.secret(m, "private_key_password", path),
        private_key_alg=r.string(m, "private_key_alg", path),
        key_id=r.string(m, "key_id", path),
        tls=tls,
        share=r.boolean(m, "share", path, False),
        subject_header=r.string(m, "subject_header", path),
        rotation_grace=r.convert(m, "rotation_grace", path, parse_duration, 30.0),
        skew=r.convert(m, "skew", path, parse_duration, 5.0),
        default_expires_in=r.convert(m, "default_expires_in", path, parse_duration, 300.0),
        max_expires_in=r.convert(m, "max_expires_in", path, parse_duration, 86400.0),
        timeout=r.convert(m, "timeout", path, parse_timeout, 10.0),
        extra_params=extra,
    )
    if auth_method == "tls_client_auth" and (tls is None or tls.cert is None):
        r.problem(
            _join(path, "tls.cert"),
            "tls_client_auth needs a client certificate (tls.cert, tls.key)",
        )
    if cred.private_key_alg is not None and cred.private_key_alg not in ("RS256", "ES256", "PS256"):
        r.problem(_join(path, "private_key_alg"), "expected RS256, ES256 or PS256")
    if cred.subject_header is not None and grant != "refresh_token":
        r.problem(_join(path, "subject_header"), "per-user chains need grant: refresh_token")
    if cred.share and grant != "client_credentials":
        r.problem(_join(path, "share"), "only client_credentials tokens can be shared by a fleet")
    return cred


_ROUTE_KEYS: Final = {
    "name",
    "match",
    "upstream",
    "credential",
    "allow",
    "tls",
    "timeouts",
    "max_body",
    "replay_body",
}


def _route(
    r: _Reader, raw: object, path: str, credentials: Mapping[str, Any]
) -> RouteConfig | None:
    m = r.mapping(raw, path, _ROUTE_KEYS)
    if m is None:
        return None
    name = r.string(m, "name", path, required=True) or path
    match = r.mapping(m.get("match"), _join(path, "match"), {"prefix", "host"}) or {}
    prefix = r.string(match, "prefix", _join(path, "match"))
    host_text = r.string(match, "host", _join(path, "match"))
    if prefix is None and host_text is None:
        r.problem(_join(path, "match"), "give a prefix (base-URL mode) or a host (forward mode)")
    if prefix is not None:
        if not prefix.startswith("/"):
            r.problem(_join(path, "match.prefix"), "must start with /")
        prefix = "/" + prefix.strip("/") if prefix.strip("/") else "/"
    host: str | None = None
    port: int | None = None
    if host_text is not None:
        h, sep, p = host_text.rpartition(":")
        bare_ipv6 = host_text.count(":") > 1 and not host_text.startswith("[")
        if sep and not host_text.endswith("]") and not bare_ipv6:
            host, port = h, _port_number(p)  # host:port or [v6]:port
            if port is None:
                r.problem(_join(path, "match.host"), f"the port must be 1-65535, got {p!r}")
        else:
            host = host_text  # a name, or an IPv6 literal such as ::1 (no port without brackets)
        host = host.strip("[]").lower().rstrip(".")
        if "/" in host or "@" in host or not host:
            r.problem(_join(path, "match.host"), "expected a host name, optionally with :port")
    upstream = r.url(m, "upstream", path)
    credential = r.string(m, "credential", path)
    if credential is not None and credential not in credentials:
        known = ", ".join(sorted(credentials)) or "none defined"
        r.problem(_join(path, "credential"), f"no credential named {credential!r} (known: {known})")
    allow: list[AllowRule] = []
    allow_raw = m.get("allow", [])
    if not isinstance(allow_raw, list):
        r.problem(_join(path, "allow"), "expected a list of {methods, paths}")
        allow_raw = []
    for i, rule in enumerate(allow_raw):
        rp = f"{path}.allow[{i}]"
        rm = r.mapping(rule, rp, {"methods", "paths"})
        if rm is None:
            continue
        methods = rm.get("methods", sorted(HTTP_METHODS))
        paths = rm.get("paths", ["/**"])
        if not isinstance(methods, list) or not all(
            isinstance(x, str) and x.upper() in HTTP_METHODS for x in methods
        ):
            r.problem(
                _join(rp, "methods"),
                f"expected a list of HTTP methods ({', '.join(sorted(HTTP_METHODS))})",
            )
            methods = []
        if not isinstance(paths, list) or not all(
            isinstance(x, str) and x.startswith("/") for x in paths
        ):
            r.problem(_join(rp, "paths"), "expected a list of path globs starting with /")
            paths = []
        allow.append(AllowRule(frozenset(x.upper() for x in methods), tuple(paths)))
    timeouts = r.mapping(m.get("timeouts"), _join(path, "timeouts"), {"connect", "total"}) or {}
    connect = r.convert(timeouts, "connect", _join(path, "timeouts"), parse_timeout, 5.0)
    total = r.convert(timeouts, "total", _join(path, "timeouts"), parse_timeout, 30.0)
    return RouteConfig(
        name=name,
        prefix=prefix,
        host=host,
        port=port,
        upstream=upstream or URL("https://invalid.invalid/"),
        credential=credential,
        allow=tuple(allow),
        tls=_tls(r, m.get("tls"), _join(path, "tls")),
        connect_timeout=connect,
        total_timeout=total,
        max_body=r.convert(m, "max_body", path, parse_size, 10 * 1024**2),
        replay_body=r.convert(m, "replay_body", path, parse_size, 1024**2),
    )


_TOP_KEYS: Final = {
    "listen",
    "workers",
    "store",
    "credentials",
    "admin_token",
    "tunnel_allow",
    "proxy_auth",
    "routes",
    "shutdown_grace",
    "ready_requires_tokens",
    "log_level",
    "tunnel_idle_timeout",
}


def parse_config(raw: object, *, base_dir: Path = Path("."), source: Path | None = None) -> Config:
    """Validate a raw YAML document; raise `ConfigError` with every problem found."""
    r = _Reader(base_dir)
    top = r.mapping(raw, "", _TOP_KEYS)
    if top is None:
        raise ConfigError(r.problems)
    listen = r.mapping(top.get("listen"), "listen", {"proxy", "admin"}) or {}
    proxy_listen = r.host_port(listen.get("proxy"), "listen.proxy", HostPort("127.0.0.1", 8080))
    admin_listen = r.host_port(listen.get("admin"), "listen.admin", HostPort("127.0.0.1", 9090))
    workers = top.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 64:
        r.problem("workers", "expected a whole number from 1 to 64")
        workers = 1

    store_raw = r.mapping(top.get("store"), "store", {"kind", "path", "url", "key_prefix"}) or {}
    kind = r.choice(store_raw, "kind", "store", STORE_KINDS, "sqlite")
    store_url = r.string(store_raw, "url", "store")
    if kind == "redis":
        if store_url is None:
            r.problem(
                "store.url", "is required for kind: redis (redis://HOST:PORT/DB or rediss://...)"
            )
        else:
            try:
                scheme = URL(store_url).scheme
            except ValueError:
                scheme = ""
            if scheme not in ("redis", "rediss", "unix"):
                r.problem(
                    "store.url",  # not echoed: a Redis URL may hold a password
                    "expected a redis://, rediss:// or unix:// URL",
                )
    store_path = (
        r.path_value(store_raw, "path", "store", must_exist=False) or base_dir / "authproxy.db"
    )
    store = StoreConfig(
        kind=kind,
        path=store_path,
        url=store_url,
        key_prefix=r.string(store_raw, "key_prefix", "store") or "authproxy",
    )

    creds_raw = top.get("credentials") or {}
    credentials: dict[str, CredentialConfig] = {}
    if not isinstance(creds_raw, dict):
        r.problem("credentials", "expected a mapping of credential names")
        creds_raw = {}
    for name, craw in creds_raw.items():
        cred = _credential(r, str(name), craw, f"credentials.{name}")
        if cred is not None:
            credentials[str(name)] = cred

    routes: list[RouteConfig] = []
    routes_raw = top.get("routes") or []
    if not isinstance(routes_raw, list):
        r.problem("routes", "expected a list of routes")
        routes_raw = []
    for i, rraw in enumerate(routes_raw):
        route = _route(r, rraw, f"routes[{i}]", creds_raw)
        if route is not None:
            routes.append(route)
    seen: dict[str, int] = {}
    matches: dict[tuple[str | None, int | None, str | None], int] = {}
    for i, route in enumerate(routes):
        if route.name in seen:
            r.problem(
                f"routes[{i}].name", f"duplicate route name (also routes[{seen[route.name]}])"
            )
        seen[route.name] = i
        # A host match without a port means port 80: `h` and `H.:80` are the same match.
        port = route.port if route.host is None or route.port is not None else 80
        mkey = (route.host, port, route.prefix)
        if mkey in matches:
            r.problem(f"routes[{i}].match", f"same match as routes[{matches[mkey]}]")
        matches[mkey] = i

    chains = sorted(n for n, c in credentials.items() if c.grant == "refresh_token")
    if kind == "memory" and workers > 1 and chains:
        r.problem(
            "store.kind",
            f"memory keeps refresh-token chains ({', '.join(chains)}) inside one process; the "
            f"{workers} workers would each rotate their own copy and revoke the others': use "
            "sqlite or redis",
        )

    tunnel: set[HostPort] = set()
    tunnel_raw = top.get("tunnel_allow") or []
    if not isinstance(tunnel_raw, list):
        r.problem("tunnel_allow", "expected a list of host:port")
        tunnel_raw = []
    for i, item in enumerate(tunnel_raw):
        text = str(item)
        host_part = text.rpartition(":")[0].strip("[]")
        hp = r.host_port(item, f"tunnel_allow[{i}]", HostPort("", 0))
        if not host_part or not 1 <= hp.port <= 65535:
            r.problem(
                f"tunnel_allow[{i}]",
                f"expected HOST:PORT with a host and a port 1-65535, got {text!r}",
            )
        elif hp.host:
            tunnel.add(HostPort(hp.host.lower().rstrip("."), hp.port))

    proxy_auth: dict[str, SecretRef] = {}
    pa = r.mapping(top.get("proxy_auth"), "proxy_auth", {"users"})
    if pa:
        users = r.mapping(pa.get("users"), "proxy_auth.users", set(pa.get("users") or {}))
        for user in users or {}:
            ref = r.secret(users or {}, user, "proxy_auth.users", required=True)
            if ref is not None:
                proxy_auth[str(user)] = ref

    config = Config(
        proxy_listen=proxy_listen,
        admin_listen=admin_listen,
        workers=workers,
        store=store,
        credentials=credentials,
        routes=tuple(routes),
        admin_token=r.secret(top, "admin_token", ""),
        tunnel_allow=frozenset(tunnel),
        proxy_auth=proxy_auth,
        shutdown_grace=r.convert(top, "shutdown_grace", "", parse_duration, 10.0),
        tunnel_idle_timeout=r.convert(top, "tunnel_idle_timeout", "", parse_duration, 300.0),
        ready_requires_tokens=r.boolean(top, "ready_requires_tokens", "", False),
        log_level=r.choice(top, "log_level", "", ("debug", "info", "warning", "error"), "info"),
        source=source,
        warnings=tuple(r.warnings),
    )
    if not is_loopback_host(proxy_listen.host) and not proxy_auth:
        r.warnings.append(
            f"listen.proxy: {proxy_listen} is reachable beyond loopback and proxy_auth is not set"
        )
        config = _replace_warnings(config, r.warnings)
    if r.problems:
        raise ConfigError(r.problems)
    return config


def _replace_warnings(config: Config, warnings: list[str]) -> Config:
    from dataclasses import replace

    return replace(config, warnings=tuple(warnings))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML file; relative file paths in it are relative to the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read config file {p}: {exc.strerror}")]) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([Problem("", f"{p}: not valid YAML{where}")]) from exc
    return parse_config(raw, base_dir=p.resolve().parent, source=p)
