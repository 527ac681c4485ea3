"""`open_store()`: the one place a `store.kind` becomes a concrete `ChainStore`.

Kinds resolve through an explicit table (no import-time self-registration). Opening is
lazy for every kind: nothing touches a file or a socket until the first call, so
`open_store` is safe on the event loop; call `await store.ping()` to find out at startup
whether the store can be reached (it raises `StoreUnavailable` naming the path or URL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from proxy.config import StoreConfig
from proxy.errors import ConfigError, Problem
from proxy.store import ChainStore
from proxy.store_memory import MemoryStore
from proxy.store_redis import RedisStore
from proxy.store_sqlite import SqliteStore


def _memory(config: StoreConfig) -> ChainStore:
    return MemoryStore()


def _sqlite(config: StoreConfig) -> ChainStore:
    return SqliteStore(config.path)


def _redis(config: StoreConfig) -> ChainStore:
    if not config.url:
        raise ConfigError(
            [Problem("store.url", "is required for kind: redis (redis://HOST:PORT/DB)")]
        )
    return RedisStore(config.url, key_prefix=config.key_prefix)


STORE_FACTORIES: Final[dict[str, Callable[[StoreConfig], ChainStore]]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "redis": _redis,
}


def open_store(config: StoreConfig) -> ChainStore:
    """The store `config.kind` names; `ConfigError` for a kind that does not exist."""
    factory = STORE_FACTORIES.get(config.kind)
    if factory is None:
        kinds = ", ".join(sorted(STORE_FACTORIES))
        raise ConfigError(
            [Problem("store.kind", f"unknown kind {config.kind!r}; use one of {kinds}")]
        )
    return factory(config)
