"""`InstrumentedStore`: a `ChainStore` that times every call of the store it wraps.

Each operation is observed into `authproxy_store_operation_duration_seconds{operation}`
(success or failure alike, so a slow failing store shows as slow), and a call that raises
`StoreError` also counts in `authproxy_store_errors_total{operation}`. The operation label is
the method name: a fixed vocabulary, never a key, subject or token.

`wait_for_change` blocks by design (up to its timeout while another process rotates), so
its duration measures contention, not store latency; dashboards keep it apart.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Final, TypeVar

from prometheus_client import Histogram

from proxy.errors import StoreError
from proxy.metrics import Metrics
from proxy.models import AccessToken, ChainKey, ChainRecord, HistoryEvent, Secret
from proxy.store import ChainStore

T = TypeVar("T")

OPERATIONS: Final = (
    "get",
    "seed",
    "compare_and_set",
    "acquire_lease",
    "release_lease",
    "wait_for_change",
    "add_history",
    "history",
    "subjects",
    "get_shared_token",
    "put_shared_token",
    "ping",
)


class InstrumentedStore:
    """Wraps any `ChainStore`; behaves exactly like it, plus timing."""

    def __init__(self, inner: ChainStore, metrics: Metrics) -> None:
        self.inner = inner
        self.kind = inner.kind
        self._metrics = metrics
        # Children resolved once: no label lookup on the hot path.
        self._timers: dict[str, Histogram] = {
            op: metrics.store_duration.labels(op) for op in OPERATIONS
        }
        for op in OPERATIONS:
            metrics.store_errors.labels(op)

    def __repr__(self) -> str:
        return f"<InstrumentedStore {self.inner!r}>"

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await call
        except StoreError:
            self._metrics.store_errors.labels(operation).inc()
            raise
        finally:
            self._timers[operation].observe(time.perf_counter() - started)

    async def get(self, key: ChainKey) -> ChainRecord | None:
        return await self._timed("get", self.inner.get(key))

    async def seed(self, key: ChainKey, refresh_token: Secret) -> ChainRecord:
        return await self._timed("seed", self.inner.seed(key, refresh_token))

    async def compare_and_set(self, record: ChainRecord, *, expected_version: int) -> bool:
        return await self._timed(
            "compare_and_set",
            self.inner.compare_and_set(record, expected_version=expected_version),
        )

    async def acquire_lease(self, key: ChainKey, owner: str, ttl: float) -> bool:
        return await self._timed("acquire_lease", self.inner.acquire_lease(key, owner, ttl))

    async def release_lease(self, key: ChainKey, owner: str) -> None:
        await self._timed("release_lease", self.inner.release_lease(key, owner))

    async def wait_for_change(
        self, key: ChainKey, version: int, timeout: float
    ) -> ChainRecord | None:
        return await self._timed(
            "wait_for_change", self.inner.wait_for_change(key, version, timeout)
        )

    async def add_history(self, key: ChainKey, event: HistoryEvent) -> None:
        await self._timed("add_history", self.inner.add_history(key, event))

    async def history(self, key: ChainKey, limit: int = 20) -> list[HistoryEvent]:
        return await self._timed("history", self.inner.history(key, limit))

    async def subjects(self, credential: str) -> list[str]:
        return await self._timed("subjects", self.inner.subjects(credential))

    async def get_shared_token(self, credential: str) -> AccessToken | None:
        return await self._timed("get_shared_token", self.inner.get_shared_token(credential))

    async def put_shared_token(self, credential: str, token: AccessToken) -> None:
        await self._timed("put_shared_token", self.inner.put_shared_token(credential, token))

    async def ping(self) -> None:
        await self._timed("ping", self.inner.ping())

    async def aclose(self) -> None:
        await self.inner.aclose()
