"""Token sources: client credentials, and rotating refresh-token chains kept in a store.

The rotation protocol (`RefreshChainSource.fetch`), in order; the order is load-bearing:
1. read the record: `reauth_required` answers at once, without calling the provider;
2. a usable access token left by another process is taken as is;
3. take the chain's lease, or wait (bounded) for its holder to move the chain;
4. re-read under the lease, then write the intent (`rotating_since`) with compare-and-set, so
   that a process killed during the call leaves a visible trace;
5. call the provider with the stored refresh token; transient failures are retried with the
   SAME token, only within the provider's reuse window (`rotation_grace`);
6. compare-and-set the new refresh token, and only then hand out the new access token;
7. `invalid_grant`: re-read (another process may have rotated) and use the newer chain;
   otherwise mark `reauth_required` and keep the refresh token for diagnosis.
Nothing is ever deleted on error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

from proxy.config import CredentialConfig
from proxy.errors import (
    InvalidGrant,
    ReauthRequired,
    StoreError,
    TokenEndpointError,
    TokenUnavailable,
)
from proxy.logs import event, scrubber
from proxy.metrics import Metrics
from proxy.models import AccessToken, ChainKey, ChainRecord, CredentialState, HistoryEvent, Secret
from proxy.oauth import TokenEndpoint
from proxy.store import ChainStore
from proxy.tasks import alongside

log = logging.getLogger("authproxy.chains")

SHARED_SUBJECT = "\x00shared"
MAX_CHAIN_MOVES = 3
MIN_LEASE_TTL = 2.0
# The provider has rotated and the new refresh token exists only in this process: its store
# write is retried this long at least (past the lease too: the write is a compare-and-set on
# the refresh token it replaces, so it can never overwrite a newer chain).
WRITE_RETRY_SECONDS = 60.0


def lease_ttl(cred: CredentialConfig) -> float:
    """A chain's rotation lease. Its holder renews it every third of it while alive, so it need
    only outlast a stall; when the holder dies, it lapses soon enough for the next holder to
    retry the interrupted rotation inside the provider's grace window."""
    ttl = _call_budget(cred) + 5.0
    grace = cred.rotation_grace
    return min(ttl, max(MIN_LEASE_TTL, grace / 2)) if grace > 0 else ttl


def longest_fetch(cred: CredentialConfig) -> float:
    """The longest one rotation may take: waiting out another holder's lease, the provider
    call, then retrying the store write (`WRITE_RETRY_SECONDS` at least)."""
    lease, budget = lease_ttl(cred), _call_budget(cred)
    return max(lease, budget) + 5.0 + budget + max(lease, WRITE_RETRY_SECONDS)


def _call_budget(cred: CredentialConfig) -> float:
    grace = cred.rotation_grace
    return min(cred.timeout, grace * 0.8) if grace > 0 else cred.timeout


class _ChainMoved(Exception):
    """A newer token was stored while we rotated (the provider refused ours, or our result lost
    the write): read the chain again."""


def _owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class ClientCredentialsSource:
    """`grant: client_credentials`; with `share: true` the token is shared through the store."""

    def __init__(self, endpoint: TokenEndpoint, store: ChainStore | None = None) -> None:
        self.endpoint = endpoint
        self.cred = endpoint.cred
        self.store = store if self.cred.share else None

    async def fetch(self, key: ChainKey, *, reject: AccessToken | None) -> AccessToken:
        if self.store is None:
            return (await self.endpoint.client_credentials()).access_token
        try:
            return await self._fetch_shared(reject)
        except StoreError as exc:
            # Sharing only saves token requests: without the store, fetch our own.
            event(
                log,
                logging.WARNING,
                "token",
                f"fetching without sharing: {exc}",
                credential=self.cred.name,
            )
            return (await self.endpoint.client_credentials()).access_token

    async def _fetch_shared(self, reject: AccessToken | None) -> AccessToken:
        """One fetch per expiry for the whole fleet: lease, re-check, fetch, publish."""
        assert self.store is not None
        name = self.cred.name
        lease_key = ChainKey(name, SHARED_SUBJECT)
        owner = _owner_id()
        deadline = time.monotonic() + self.cred.timeout * 2
        while True:
            shared = await self.store.get_shared_token(name)
            now = time.time()
            if _fresh(shared, now, reject):
                assert shared is not None
                return shared
            if await self.store.acquire_lease(lease_key, owner, self.cred.timeout + 5):
                break
            if time.monotonic() > deadline:
                # The holder is stuck or gone: fetch our own rather than fail the request.
                return (await self.endpoint.client_credentials()).access_token
            await asyncio.sleep(0.05)  # bounded poll for another replica's token
        try:
            shared = await self.store.get_shared_token(name)
            if _fresh(shared, time.time(), reject):
                assert shared is not None
                return shared
            token = (await self.endpoint.client_credentials()).access_token
            try:
                await self.store.put_shared_token(name, token)
            except StoreError as exc:
                event(
                    log,
                    logging.WARNING,
                    "token",
                    f"could not share the token: {exc}",
                    credential=name,
                )
            return token
        finally:
            try:
                await self.store.release_lease(lease_key, owner)
            except StoreError:
                pass  # the lease expires by itself


def _fresh(token: AccessToken | None, now: float, reject: AccessToken | None) -> bool:
    if token is None or not token.usable(now) or token.due(now):
        return False
    return reject is None or token.value != reject.value


class RefreshChainSource:
    """`grant: refresh_token`: one rotating chain per key, durable in the store."""

    def __init__(
        self,
        endpoint: TokenEndpoint,
        store: ChainStore,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.endpoint = endpoint
        self.cred: CredentialConfig = endpoint.cred
        self.store = store
        self._metrics = metrics
        self._clock = clock
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"<RefreshChainSource {self.cred.name} store={self.store.kind}>"

    @property
    def lease_ttl(self) -> float:
        return lease_ttl(self.cred)

    @property
    def longest_fetch(self) -> float:
        return longest_fetch(self.cred)

    @property
    def _call_budget(self) -> float:
        return _call_budget(self.cred)

    async def fetch(self, key: ChainKey, *, reject: AccessToken | None) -> AccessToken:
        owner = _owner_id()
        rec = await self._read(key)
        if _fresh(rec.access_token, self._clock(), reject):
            assert rec.access_token is not None
            return rec.access_token
        # A live holder renews its lease through a whole provider call: wait that long.
        deadline = time.monotonic() + max(self.lease_ttl, self._call_budget) + 5.0
        while not await self.store.acquire_lease(key, owner, self.lease_ttl):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TokenUnavailable(
                    f"another process has been refreshing {key} for too long", retry_after=1.0
                )
            moved = await self.store.wait_for_change(key, rec.version, min(remaining, 1.0))
            if moved is not None:
                rec = moved
                _check_state(rec)
                if _fresh(rec.access_token, self._clock(), reject):
                    assert rec.access_token is not None
                    return rec.access_token
        try:
            async with alongside(self._keep_lease(key, owner), name=f"lease keeper {key}"):
                return await self._rotate_under_lease(key, reject)
        finally:
            try:
                await self.store.release_lease(key, owner)
            except StoreError:
                pass  # the lease expires by itself

    async def _keep_lease(self, key: ChainKey, owner: str) -> None:
        """Renew the lease while the rotation runs: a slow provider, a store busy for seconds
        or a stalled loop must not let another process take the chain mid-rotation."""
        ttl = self.lease_ttl
        while True:
            await asyncio.sleep(ttl / 3)
            try:
                if not await self.store.acquire_lease(key, owner, ttl):
                    event(
                        log,
                        logging.WARNING,
                        "rotation",
                        "the chain's lease lapsed during a rotation",
                        credential=key.credential,
                    )
                    return
            except StoreError:
                pass  # unreachable for now: the lease runs until its expiry; try again

    async def _read(self, key: ChainKey) -> ChainRecord:
        rec = await self.store.get(key)
        if rec is None:
            who = f" --subject {key.subject}" if key.subject else ""
            raise ReauthRequired(
                f"no refresh token is stored for {key}; seed one with "
                f"`authproxy seed {key.credential}{who}`"
            )
        _check_state(rec)
        return rec

    async def _rotate_under_lease(self, key: ChainKey, reject: AccessToken | None) -> AccessToken:
        for _ in range(MAX_CHAIN_MOVES):
            rec = await self._read(key)
            now = self._clock()
            if _fresh(rec.access_token, now, reject):
                assert rec.access_token is not None
                return rec.access_token
            interrupted: str | None = None
            if rec.rotating_since is not None:
                # A previous holder died mid-call: the provider may or may not have rotated.
                interrupted = f"pid {rec.rotating_pid} at {_iso(rec.rotating_since)}"
                await self._history(
                    key,
                    "interrupted",
                    "unknown",
                    rec.refresh_token,
                    f"rotation by pid {rec.rotating_pid} at "
                    f"{_iso(rec.rotating_since)} never finished; retrying with "
                    "the same refresh token",
                )
            intent = replace(
                rec,
                version=rec.version + 1,
                rotating_since=now,
                rotating_pid=self._pid,
                updated_at=now,
            )
            if not await self._intent_written(key, intent, rec.version):
                continue  # the chain moved under us (an expired lease): read again
            try:
                return await self._call_provider(key, intent, interrupted)
            except _ChainMoved:
                continue  # a newer token was stored meanwhile: use it
        raise TokenUnavailable(f"the chain {key} keeps moving; try again", retry_after=1.0)

    async def _intent_written(self, key: ChainKey, intent: ChainRecord, expected: int) -> bool:
        if await self.store.compare_and_set(intent, expected_version=expected):
            return True
        # Refused: another writer moved the chain, or the write ran and only its answer was
        # lost (the driver's retry then found our own intent). Ours must not read as a rotation
        # that some process began and never finished.
        current = await self.store.get(key)
        return current is not None and _is_our_write(current, intent)

    async def _call_provider(
        self, key: ChainKey, rec: ChainRecord, interrupted: str | None
    ) -> AccessToken:
        grace = self.cred.rotation_grace
        try:
            resp = await self.endpoint.refresh(
                rec.refresh_token, budget=self._call_budget, retry=grace > 0
            )
        except InvalidGrant as exc:
            return await self._on_invalid_grant(key, rec, exc, interrupted)
        except TokenEndpointError as exc:
            # Outcome unknown (maybe committed, answer lost): keep the token, clear the intent;
            # the next attempt retries with the same token.
            now = self._clock()
            kept = replace(
                rec,
                version=rec.version + 1,
                rotating_since=None,
                rotating_pid=None,
                last_error=str(exc),
                updated_at=now,
            )
            await self._cas_quietly(kept, rec.version)
            await self._history(key, "failure", exc.outcome, rec.refresh_token, str(exc))
            raise
        now = self._clock()
        new_refresh = resp.refresh_token or rec.refresh_token  # non-rotating providers
        new = ChainRecord(
            key=key,
            refresh_token=new_refresh,
            version=rec.version + 1,
            state=CredentialState.OK,
            access_token=resp.access_token,
            updated_at=now,
            last_refresh_at=now,
            last_error=None,
        )
        if not await self._write_rotated(key, rec, new):
            # Another process stored a newer refresh token while our lease had lapsed, or the
            # chain was seeded anew. Its write wins; ours is dropped, loudly, so history shows
            # the race, and the caller gets a token of the stored chain, not of the old one.
            await self._history(
                key,
                "conflict",
                "lost_race",
                new_refresh,
                "the chain moved while this process was rotating it",
            )
            event(
                log,
                logging.ERROR,
                "rotation",
                "the chain moved during a rotation",
                credential=key.credential,
            )
            raise _ChainMoved
        self._metrics.rotations.labels(key.credential).inc()
        if resp.refresh_token is not None:
            await self._history(
                key, "rotate", "success", new_refresh, f"replaced {rec.refresh_token.fingerprint()}"
            )
        else:
            await self._history(key, "refresh", "success", new_refresh, "refresh token kept")
        return resp.access_token

    async def _write_rotated(self, key: ChainKey, sent: ChainRecord, new: ChainRecord) -> bool:
        """Store the rotated chain. The provider has already revoked `sent`'s refresh token, so
        a store that fails now is retried (for `WRITE_RETRY_SECONDS` or the lease, the longer:
        a store failover outlasts a short lease), and a chain that moved without a newer token
        (only another process's intent or reauth mark, written while our lease had lapsed)
        still takes ours. False: a newer token is stored; it wins."""
        deadline = time.monotonic() + max(self.lease_ttl, WRITE_RETRY_SECONDS)
        delay = 0.1
        expected = sent.version
        moves = 0
        while moves <= MAX_CHAIN_MOVES:
            try:
                if await self.store.compare_and_set(new, expected_version=expected):
                    return True
                current = await self.store.get(key)
            except StoreError:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if current is not None and _is_our_write(current, new):
                # The write ran but its answer was lost (a dropped connection, a timeout), and
                # the driver's or our own retry then found the chain already moved: by us.
                return True
            if current is None or current.refresh_token != sent.refresh_token:
                return False
            moves += 1
            expected = current.version
            new = replace(new, version=expected + 1)
        return False

    async def _on_invalid_grant(
        self, key: ChainKey, rec: ChainRecord, exc: InvalidGrant, interrupted: str | None
    ) -> AccessToken:
        current = await self.store.get(key)
        if current is not None and current.refresh_token != rec.refresh_token:
            # Another process rotated (or someone seeded) meanwhile: use the newer chain.
            await self._history(
                key,
                "failure",
                "invalid_grant",
                rec.refresh_token,
                "refused, but the chain had moved on; using the newer token",
            )
            raise _ChainMoved from exc
        reason = (
            "the provider refused the refresh token (invalid_grant)"
            + (
                f": an interrupted rotation ({interrupted}) may have rotated it and the new "
                "token never arrived"
                if interrupted
                else ""
            )
            + f"; seed a new one with `authproxy seed {key.credential}"
            + (f" --subject {key.subject}`" if key.subject else "`")
        )
        dead = replace(
            rec,
            version=rec.version + 1,
            state=CredentialState.REAUTH_REQUIRED,
            rotating_since=None,
            rotating_pid=None,
            last_error=reason,
            access_token=None,
            updated_at=self._clock(),
        )
        await self._cas_quietly(dead, rec.version)
        await self._history(key, "reauth_required", "invalid_grant", rec.refresh_token, reason)
        raise ReauthRequired(reason) from exc

    async def _cas_quietly(self, record: ChainRecord, expected: int) -> None:
        try:
            await self.store.compare_and_set(record, expected_version=expected)
        except StoreError as exc:
            event(
                log,
                logging.WARNING,
                "store",
                f"could not record the chain state: {exc}",
                credential=record.key.credential,
            )

    async def _history(
        self, key: ChainKey, name: str, outcome: str, token: Secret | None, detail: str | None
    ) -> None:
        ev = HistoryEvent(
            at=self._clock(),
            event=name,
            outcome=outcome,
            pid=self._pid,
            token_fingerprint=token.fingerprint() if token else None,
            detail=detail,
        )
        await _add_history(self.store, key, ev)

    async def seed(self, key: ChainKey, refresh_token: Secret) -> ChainRecord:
        """Store the first refresh token of a chain (or replace a dead one)."""
        return await seed_chain(self.store, key, refresh_token, at=self._clock())


async def seed_chain(
    store: ChainStore, key: ChainKey, refresh_token: Secret, *, at: float, detail: str | None = None
) -> ChainRecord:
    """Store the first refresh token of a chain (or replace a dead one) and note it in the
    chain's history: the admin API and `authproxy seed` both come here."""
    scrubber().add_token(refresh_token.reveal())  # known to the log scrubber from now on
    rec = await store.seed(key, refresh_token)
    ev = HistoryEvent(
        at=at,
        event="seed",
        outcome="success",
        pid=os.getpid(),
        token_fingerprint=refresh_token.fingerprint(),
        detail=detail,
    )
    await _add_history(store, key, ev)
    return rec


async def _add_history(store: ChainStore, key: ChainKey, ev: HistoryEvent) -> None:
    """History is for people reading `status`: a failed write is logged, never fatal."""
    try:
        await store.add_history(key, ev)
    except StoreError as exc:
        event(
            log,
            logging.WARNING,
            "store",
            f"could not write chain history: {exc}",
            credential=key.credential,
        )


def _check_state(rec: ChainRecord) -> None:
    if rec.state is CredentialState.REAUTH_REQUIRED:
        raise ReauthRequired(
            rec.last_error or f"the chain {rec.key} needs a new refresh token (authproxy seed)"
        )


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _is_our_write(current: ChainRecord, written: ChainRecord) -> bool:
    """`current` is `written` as this process wrote it. An intent is told apart by its pid and
    timestamp, a result by the access token the provider just issued: no other writer holds
    either."""
    return (
        current.version == written.version
        and current.refresh_token == written.refresh_token
        and current.rotating_since == written.rotating_since
        and current.rotating_pid == written.rotating_pid
        and current.access_token == written.access_token
    )
