"""The Prometheus metrics of SPEC section 6, bound to a registry passed in.

No label ever holds a subject, a token or a secret: labels are route, credential, method,
status code and the fixed outcome/result/state/reason vocabularies.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from proxy.models import CredentialState

# `*_created` series double the series count and no dashboard or alert of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

TOKEN_OUTCOMES = (
    "success",
    "invalid_grant",
    "invalid_client",
    "oauth_error",
    "http_error",
    "network_error",
    "timeout",
    "malformed",
)
CACHE_RESULTS: Final = ("hit", "miss", "coalesced")
# The method label takes these values only (anything else is "other"), so a client sending
# made-up methods cannot create series; the route label takes configured route names and
# "none", the code label HTTP status codes.
METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)
NO_ROUTE: Final = "none"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Every authproxy metric; one instance per process, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "authproxy_requests",
            "Requests answered, by route, method and status code.",
            ["route", "method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "authproxy_request_duration_seconds",
            "Time from request to response headers.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.token_requests = Counter(
            "authproxy_token_requests",
            "Calls to token endpoints, by outcome.",
            ["credential", "outcome"],
            registry=r,
        )
        self.token_attempts = Counter(
            "authproxy_token_endpoint_attempts",
            "HTTP calls made to token endpoints, retries included (token_requests counts "
            "logical requests, one per outcome).",
            ["credential"],
            registry=r,
        )
        self.token_request_duration = Histogram(
            "authproxy_token_request_duration_seconds",
            "Duration of token endpoint calls.",
            ["credential"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.token_cache = Counter(
            "authproxy_token_cache",
            "Token lookups: hit, miss (started a fetch), coalesced (joined a fetch in flight).",
            ["credential", "result"],
            registry=r,
        )
        self.token_expiry = Gauge(
            "authproxy_token_expiry_timestamp_seconds",
            "Expiry (unix time) of the newest access token per credential.",
            ["credential"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.credential_state = Gauge(
            "authproxy_credential_state",
            "1 for the current state of each credential.",
            ["credential", "state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.upstream_retries = Counter(
            "authproxy_upstream_retries",
            "Requests replayed to the upstream, by reason.",
            ["route", "reason"],
            registry=r,
        )
        self.rotations = Counter(
            "authproxy_refresh_token_rotations",
            "Refresh tokens rotated and stored.",
            ["credential"],
            registry=r,
        )
        self.tls_cert_expiry = Gauge(
            "authproxy_tls_certificate_expiry_timestamp_seconds",
            "notAfter (unix time) of each configured client certificate.",
            ["kind", "name"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.store_duration = Histogram(
            "authproxy_store_operation_duration_seconds",
            "Chain store operation latency (wait_for_change includes waiting for other holders).",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "authproxy_store_errors",
            "Chain store operations that failed (store unreachable or refusing).",
            ["operation"],
            registry=r,
        )
        self.clock_offset = Gauge(
            "authproxy_provider_clock_offset_seconds",
            "Provider clock minus local clock, estimated from token responses' Date header.",
            ["credential"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}

    def observe_request(self, route: str, method: str, code: int, seconds: float) -> None:
        """Hot path: label lookups are cached per (route, method, code)."""
        if method not in METHODS:
            method = "other"
        key = (route, method, code)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(route, method, str(code))
        child.inc()
        hist = self._duration_children.get(route)
        if hist is None:
            hist = self._duration_children[route] = self.request_duration.labels(route)
        hist.observe(seconds)

    def set_state(self, credential: str, state: CredentialState) -> None:
        for s in CredentialState:
            self.credential_state.labels(credential, s.value).set(1 if s is state else 0)

    def init_credential(self, credential: str) -> None:
        """Create every series of a credential so dashboards see zeros, not gaps."""
        for outcome in TOKEN_OUTCOMES:
            self.token_requests.labels(credential, outcome)
        self.token_attempts.labels(credential)
        for result in CACHE_RESULTS:
            self.token_cache.labels(credential, result)
        self.rotations.labels(credential)
