"""The chain store: where rotating refresh-token chains, leases and history live.

Three implementations share this protocol and one contract test suite
(`tests/test_stores.py`): `memory` (one process), `sqlite` (processes on one host) and
`redis` (a fleet). The rotation protocol built on it (see `proxy.chains`):

1. `get` the record; 2. `acquire_lease` (or `wait_for_change` while another holder works);
3. re-`get`; 4. `mark_rotating` (so a crash mid-call is visible after restart);
5. call the provider; 6. `compare_and_set` the new record with `expected_version`;
7. `add_history`; 8. `release_lease`.

Nothing in a store ever deletes a refresh token on error; only `seed` and a successful
`compare_and_set` replace one.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from proxy.models import AccessToken, ChainKey, ChainRecord, CredentialState, HistoryEvent, Secret

HISTORY_LIMIT = 50


class ChainStore(Protocol):
    """Durable state for refresh-token chains (and fleet-shared access tokens)."""

    kind: str

    async def get(self, key: ChainKey) -> ChainRecord | None:
        """The current record, or None when the chain was never seeded."""
        ...

    async def seed(self, key: ChainKey, refresh_token: Secret) -> ChainRecord:
        """Store a first (or replacement) refresh token: state ok, version + 1, no access
        token, `rotating_since` cleared. Returns the record written."""
        ...

    async def compare_and_set(self, record: ChainRecord, *, expected_version: int) -> bool:
        """Write `record` if and only if the stored version is still `expected_version`.

        `record.version` must be `expected_version + 1`. Returns False (and writes nothing)
        when the chain moved or does not exist."""
        ...

    async def acquire_lease(self, key: ChainKey, owner: str, ttl: float) -> bool:
        """Take the chain's "refresh in progress" lease for `ttl` seconds if it is free or
        expired. Returns whether `owner` now holds it. Re-acquiring one's own lease extends it."""
        ...

    async def release_lease(self, key: ChainKey, owner: str) -> None:
        """Release the lease if, and only if, `owner` still holds it."""
        ...

    async def wait_for_change(
        self,
        key: ChainKey,
        version: int,
        timeout: float,
    ) -> ChainRecord | None:
        """Wait until the chain's version is greater than `version` (or its lease is free),
        at most `timeout` seconds; return the current record (which may be unchanged)."""
        ...

    async def add_history(self, key: ChainKey, event: HistoryEvent) -> None:
        """Append an event; only the latest `HISTORY_LIMIT` are kept per chain."""
        ...

    async def history(self, key: ChainKey, limit: int = 20) -> list[HistoryEvent]:
        """The latest events, newest first."""
        ...

    async def subjects(self, credential: str) -> list[str]:
        """Subjects with a seeded chain for `credential` (not the None subject)."""
        ...

    async def get_shared_token(self, credential: str) -> AccessToken | None:
        """A fleet-shared client-credentials token (`share: true`), if one is stored."""
        ...

    async def put_shared_token(self, credential: str, token: AccessToken) -> None:
        """Publish a fleet-shared token; it expires from the store with the token."""
        ...

    async def ping(self) -> None:
        """Raise `StoreUnavailable` when the store cannot be reached."""
        ...

    async def aclose(self) -> None:
        """Release connections and files."""
        ...


# One JSON shape for every store, so a record reads the same wherever it was written.


def token_to_dict(token: AccessToken) -> dict[str, Any]:
    return {
        "value": token.value.reveal(),
        "issued_at": token.issued_at,
        "expires_at": token.expires_at,
        "skew": token.skew,
        "token_type": token.token_type,
        "scope": token.scope,
    }


def token_from_dict(d: dict[str, Any]) -> AccessToken:
    return AccessToken(
        value=Secret(d["value"]),
        issued_at=float(d["issued_at"]),
        expires_at=float(d["expires_at"]),
        skew=float(d.get("skew", 5.0)),
        token_type=d.get("token_type", "Bearer"),
        scope=d.get("scope"),
    )


def record_to_json(record: ChainRecord) -> str:
    return json.dumps(
        {
            "credential": record.key.credential,
            "subject": record.key.subject,
            "refresh_token": record.refresh_token.reveal(),
            "version": record.version,
            "state": record.state.value,
            "access_token": token_to_dict(record.access_token) if record.access_token else None,
            "updated_at": record.updated_at,
            "last_refresh_at": record.last_refresh_at,
            "last_error": record.last_error,
            "rotating_since": record.rotating_since,
            "rotating_pid": record.rotating_pid,
        },
        separators=(",", ":"),
    )


def record_from_json(text: str | bytes) -> ChainRecord:
    d = json.loads(text)
    return ChainRecord(
        key=ChainKey(d["credential"], d.get("subject")),
        refresh_token=Secret(d["refresh_token"]),
        version=int(d["version"]),
        state=CredentialState(d.get("state", "ok")),
        access_token=token_from_dict(d["access_token"]) if d.get("access_token") else None,
        updated_at=float(d.get("updated_at", 0.0)),
        last_refresh_at=d.get("last_refresh_at"),
        last_error=d.get("last_error"),
        rotating_since=d.get("rotating_since"),
        rotating_pid=d.get("rotating_pid"),
    )


def event_to_json(event: HistoryEvent) -> str:
    return json.dumps(
        {
            "at": event.at,
            "event": event.event,
            "outcome": event.outcome,
            "pid": event.pid,
            "token": event.token_fingerprint,
            "detail": event.detail,
        },
        separators=(",", ":"),
    )


def event_from_json(text: str | bytes) -> HistoryEvent:
    d = json.loads(text)
    return HistoryEvent(
        at=float(d["at"]),
        event=d["event"],
        outcome=d["outcome"],
        pid=int(d["pid"]),
        token_fingerprint=d.get("token"),
        detail=d.get("detail"),
    )


# Rules every store applies the same way.


def seeded_record(
    key: ChainKey, refresh_token: Secret, previous: ChainRecord | None
) -> ChainRecord:
    """The record `seed` writes over `previous` (None when the chain is new).

    A fresh start: state ok, no access token, no error, not rotating. `last_refresh_at`
    is kept, because it is a fact about the past that `status` still shows.
    """
    return ChainRecord(
        key=key,
        refresh_token=refresh_token,
        version=previous.version + 1 if previous is not None else 1,
        state=CredentialState.OK,
        updated_at=time.time(),
        last_refresh_at=previous.last_refresh_at if previous is not None else None,
    )


def check_next_version(record: ChainRecord, expected_version: int) -> None:
    """A compare-and-set must write exactly the next version. Anything else is a caller
    bug, refused loudly (ValueError) rather than reported as "the chain moved"."""
    if record.version != expected_version + 1:
        raise ValueError(
            f"compare_and_set for {record.key}: record.version must be expected_version + 1 "
            f"({expected_version + 1}), got {record.version}"
        )


def check_lease_ttl(ttl: float) -> None:
    if not ttl > 0:
        raise ValueError(f"lease ttl must be positive seconds, got {ttl!r}")
