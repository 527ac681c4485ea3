"""`MemoryStore`: the chain store for one process (tests, the demo, `store.kind: memory`).

Everything lives in dicts on the event loop; every method body is await-free up to its
one wait, so no lock is needed (the reasoning of httpcore's pool). Waiters sleep on a
per-chain `asyncio.Event` that each change replaces, never on a poll.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from typing import Final

from proxy.errors import StoreUnavailable
from proxy.models import AccessToken, ChainKey, ChainRecord, HistoryEvent, Secret
from proxy.store import HISTORY_LIMIT, check_lease_ttl, check_next_version, seeded_record

KIND: Final = "memory"


@dataclasses.dataclass(slots=True)
class _Lease:
    owner: str
    expires_at: float  # loop.time()


class MemoryStore:
    """Chains, leases, history and shared tokens in process memory; gone at exit."""

    kind: str = KIND

    def __init__(self) -> None:
        self._chains: dict[ChainKey, ChainRecord] = {}
        self._subjects: dict[str, set[str]] = {}
        self._leases: dict[ChainKey, _Lease] = {}
        self._history: dict[ChainKey, collections.deque[HistoryEvent]] = {}
        self._shared: dict[str, AccessToken] = {}
        # One event per chain with waiters; set and dropped on every change, so a waiter
        # that took the event before checking state cannot miss the change.
        self._changed: dict[ChainKey, asyncio.Event] = {}
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<MemoryStore {state} chains={len(self._chains)} leases={len(self._leases)} "
            f"shared_tokens={len(self._shared)} waiting_chains={len(self._changed)}>"
        )

    async def get(self, key: ChainKey) -> ChainRecord | None:
        return self._chains.get(key)

    async def seed(self, key: ChainKey, refresh_token: Secret) -> ChainRecord:
        record = seeded_record(key, refresh_token, self._chains.get(key))
        self._write(record)
        return record

    async def compare_and_set(self, record: ChainRecord, *, expected_version: int) -> bool:
        check_next_version(record, expected_version)
        current = self._chains.get(record.key)
        if current is None or current.version != expected_version:
            return False
        self._write(record)
        return True

    async def acquire_lease(self, key: ChainKey, owner: str, ttl: float) -> bool:
        check_lease_ttl(ttl)
        now = asyncio.get_running_loop().time()
        lease = self._leases.get(key)
        if lease is not None and lease.owner != owner and lease.expires_at > now:
            return False
        self._leases[key] = _Lease(owner, now + ttl)
        return True

    async def release_lease(self, key: ChainKey, owner: str) -> None:
        lease = self._leases.get(key)
        if lease is not None and lease.owner == owner:
            del self._leases[key]
            self._notify(key)

    async def wait_for_change(
        self,
        key: ChainKey,
        version: int,
        timeout: float,
    ) -> ChainRecord | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            # Take the event before looking at state: any change after this line sets it.
            event = self._changed.setdefault(key, asyncio.Event())
            record = self._chains.get(key)
            now = loop.time()
            lease = self._leases.get(key)
            if record is not None and record.version > version:
                return record
            if lease is None or lease.expires_at <= now or now >= deadline or self._closed:
                return record
            # An expiring lease changes nothing in the dicts: wake up for it too.
            try:
                async with asyncio.timeout(min(deadline, lease.expires_at) - now):
                    await event.wait()
            except TimeoutError:
                pass

    async def add_history(self, key: ChainKey, event: HistoryEvent) -> None:
        events = self._history.get(key)
        if events is None:
            events = self._history[key] = collections.deque(maxlen=HISTORY_LIMIT)
        events.append(event)

    async def history(self, key: ChainKey, limit: int = 20) -> list[HistoryEvent]:
        events = self._history.get(key, ())
        return list(reversed(events))[: max(0, limit)]

    async def subjects(self, credential: str) -> list[str]:
        return sorted(self._subjects.get(credential, ()))

    async def get_shared_token(self, credential: str) -> AccessToken | None:
        token = self._shared.get(credential)
        if token is None:
            return None
        if token.expires_at <= time.time():
            del self._shared[credential]
            return None
        return token

    async def put_shared_token(self, credential: str, token: AccessToken) -> None:
        if token.expires_at > time.time():
            self._shared[credential] = token

    async def ping(self) -> None:
        """Always reachable in-process, until closed: then `StoreUnavailable`, like the others."""
        if self._closed:
            raise StoreUnavailable("memory store is closed")

    async def aclose(self) -> None:
        self._closed = True
        for event in self._changed.values():
            event.set()
        self._changed.clear()

    def _write(self, record: ChainRecord) -> None:
        self._chains[record.key] = record
        if record.key.subject is not None:
            self._subjects.setdefault(record.key.credential, set()).add(record.key.subject)
        self._notify(record.key)

    def _notify(self, key: ChainKey) -> None:
        event = self._changed.pop(key, None)
        if event is not None:
            event.set()
