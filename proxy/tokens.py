"""The in-process token cache: single-flight fetches, refresh ahead of expiry, stale-if-error.

`TokenCache.get(key)`:
1. a usable token is a `hit`; if it is due, one background refresh starts (single-flight);
2. otherwise the caller joins the fetch in flight (`coalesced`) or starts it (`miss`);
3. an open breaker with no usable token answers `TokenUnavailable` at once.

A failed fetch feeds the credential's `Breaker` (see `proxy.breaker` for the bound on calls
during an outage); if the current token has not expired (minus its skew) it is still served
(state `degraded`, stale-if-error) and a timer retries in the background when the breaker lets
it, for credential-level tokens even with no token held, so service comes back without
waiting for traffic. `invalidate` (an upstream 401) drops a token only if it is still the
current one, so a burst of 401s for one token causes one fetch.

The in-flight dict is updated before any await; the fetch is one owned task that every
waiter awaits through `asyncio.shield`, so a cancelled request never cancels it, and all
waiters get its result or its exception (aiohttp's `_resolve_host` recipe).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

from cachetools import LRUCache

from proxy.breaker import PROBE, Breaker
from proxy.errors import (
    ProxyError,
    ReauthRequired,
    StoreError,
    TokenEndpointError,
    TokenUnavailable,
)
from proxy.logs import event
from proxy.metrics import Metrics
from proxy.models import AccessToken, ChainKey, CredentialState
from proxy.tasks import TaskOwner

log = logging.getLogger("authproxy.tokens")

DRAIN_SECONDS: Final = 15.0  # aclose() waits this long (or a rotation's longest) for fetches
MIN_REFRESH_INTERVAL: Final = 1.0  # a refresh timer never fires sooner after a fetch


class TokenSource(Protocol):
    """Obtains a fresh access token for a chain key (one credential's grant)."""

    async def fetch(self, key: ChainKey, *, reject: AccessToken | None) -> AccessToken:
        """A new access token for `key`; never `reject` (a token the upstream refused).

        Raises `TokenEndpointError`, `ReauthRequired` or `StoreError`."""
        ...


@dataclass(slots=True)
class CredentialHealth:
    """What `status` and `/admin/credentials` show for a credential."""

    state: CredentialState = CredentialState.OK
    last_refresh_at: float | None = None
    last_error: str | None = None
    expires_at: float | None = None
    breaker: Breaker = field(default_factory=Breaker)


class TokenCache:
    """Access tokens per chain key, fetched once however many requests ask at the same time."""

    def __init__(
        self,
        sources: Mapping[str, TokenSource],
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        max_subject_tokens: int = 200_000,
    ) -> None:
        self._sources = dict(sources)
        self._metrics = metrics
        self._clock = clock
        self._owner = TaskOwner("token-cache", awaited=True)
        self._tokens: dict[ChainKey, AccessToken] = {}
        self._subject_tokens: LRUCache[ChainKey, AccessToken] = LRUCache(max_subject_tokens)
        self._inflight: dict[ChainKey, asyncio.Task[AccessToken]] = {}
        self._waiters: collections.Counter[ChainKey] = collections.Counter()
        self._timers: dict[ChainKey, asyncio.TimerHandle] = {}
        self._closed = False
        self.health: dict[str, CredentialHealth] = {name: CredentialHealth() for name in sources}
        self._counters = {
            (name, result): metrics.token_cache.labels(name, result)
            for name in sources
            for result in ("hit", "miss", "coalesced")
        }
        for name in sources:
            metrics.init_credential(name)
            metrics.set_state(name, CredentialState.OK)

    def __repr__(self) -> str:
        return (
            f"<TokenCache tokens={len(self._tokens)} subject_tokens={len(self._subject_tokens)} "
            f"inflight={len(self._inflight)} waiters={sum(self._waiters.values())} "
            f"timers={len(self._timers)} closed={self._closed}>"
        )

    def _held(self, key: ChainKey) -> AccessToken | None:
        if key.subject is None:
            return self._tokens.get(key)
        return self._subject_tokens.get(key)

    def _store_token(self, key: ChainKey, token: AccessToken) -> None:
        if key.subject is None:
            self._tokens[key] = token
        else:
            self._subject_tokens[key] = token

    def _drop_token(self, key: ChainKey) -> None:
        if key.subject is None:
            self._tokens.pop(key, None)
        else:
            self._subject_tokens.pop(key, None)

    def get_cached(self, key: ChainKey) -> AccessToken | None:
        """The held token for `key` if still usable (starting its refresh ahead of expiry when
        due), else None: the hot path, without the cost of a coroutine. `get` does the rest."""
        token = self._held(key)
        if token is None:
            return None
        now = self._clock()
        if now >= token.usable_until:
            return None
        if now >= token.refresh_at and self._running(key) is None and not self._closed:
            # (A closed cache, after a reload, still serves the requests it had: no new fetch.)
            breaker = self.health[key.credential].breaker
            if breaker.acquire(now):
                _ = self._start(key, None, probe=not breaker.closed)
        self._counters[(key.credential, "hit")].inc()
        return token

    async def get(self, key: ChainKey, *, timeout: float | None = None) -> AccessToken:
        """A usable access token for `key`; raises `TokenUnavailable` or `ReauthRequired`.

        Waits at most `timeout` seconds (the route's timeout); the fetch itself goes on."""
        token = self.get_cached(key)
        if token is not None:
            return token
        now = self._clock()
        breaker = self.health[key.credential].breaker
        task = self._running(key)
        if task is None:
            if not breaker.acquire(now):
                raise TokenUnavailable(
                    f"the token endpoint of {key.credential} is failing "
                    f"({self.health[key.credential].last_error or 'unknown error'}); "
                    "retrying later",
                    retry_after=breaker.retry_after(now),
                )
            task = self._start(key, None, probe=not breaker.closed)
            self._counters[(key.credential, "miss")].inc()
        else:
            self._counters[(key.credential, "coalesced")].inc()
        self._waiters[key] += 1
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            raise TokenUnavailable(
                f"no token for {key.credential} within {timeout:g}s; the token endpoint is slow",
                retry_after=1.0,
            ) from None
        finally:
            self._waiters[key] -= 1
            if self._waiters[key] <= 0:
                del self._waiters[key]

    def invalidate(self, key: ChainKey, token: AccessToken) -> bool:
        """Drop `token` if it is still the current one (an upstream refused it), and start
        fetching its successor when the breaker lets us.

        A burst of 401s for one token drops it once; the next `get` joins one new fetch."""
        current = self._held(key)
        if current is None or current.value != token.value:
            return False
        self._drop_token(key)
        breaker = self.health[key.credential].breaker
        if self._running(key) is None and not self._closed and breaker.acquire(self._clock()):
            _ = self._start(key, token, probe=not breaker.closed)
        return True

    def forget(self, key: ChainKey) -> None:
        """Drop what is cached for `key` (after a seed): the next `get` reads the store."""
        self._drop_token(key)
        health = self.health.get(key.credential)
        if health is not None:
            health.breaker.success()

    def adopt(self, previous: TokenCache, credentials: set[str]) -> None:
        """Take over tokens, health and pending retries of unchanged credentials (reload)."""
        now = self._clock()
        loop = asyncio.get_running_loop()
        for key, token in previous._tokens.items():
            if key.credential in credentials and token.usable(now):
                self._tokens[key] = token
                self._schedule(key, token.refresh_at - now)
        for key, token in previous._subject_tokens.items():
            if key.credential in credentials and token.usable(now):
                self._subject_tokens[key] = token
        for key, handle in previous._timers.items():
            if key.credential in credentials and key not in self._timers:
                self._schedule(key, handle.when() - loop.time())  # e.g. a degraded retry
        for key in previous._inflight:
            if key.credential in credentials and key not in self._timers:
                # Its outcome lands in the closed cache, which schedules nothing: if it fails
                # (or leaves a rotation's outcome unknown), only this retry takes it up again.
                self._schedule(key, MIN_REFRESH_INTERVAL)
        for name in credentials:
            if name in previous.health and name in self.health:
                self.health[name] = previous.health[name]
                self._metrics.set_state(name, self.health[name].state)

    def mark_seeded(self, key: ChainKey) -> None:
        """A chain was seeded anew: a credential in reauth_required is usable again."""
        if key.subject is None and key.credential in self.health:
            self._set_state(key, CredentialState.OK, None)

    def note_state(self, credential: str, state: CredentialState, error: str | None) -> None:
        """A state learned outside a fetch (from the store, at start-up)."""
        if credential in self.health:
            self._set_state(ChainKey(credential), state, error)

    def refresh_now(self, key: ChainKey) -> bool:
        """Start a refresh in the background (admin `POST .../refresh`); False if one runs.

        The held token is passed as `reject`, so the source really calls the provider (a
        chain rotates) instead of handing back the token it already stored."""
        if self._running(key) is not None:
            return False
        _ = self._start(key, self._held(key), probe=False)
        return True

    def _start(
        self, key: ChainKey, reject: AccessToken | None, *, probe: bool
    ) -> asyncio.Task[AccessToken]:
        # Registered before any await, so every later caller joins this task (#single-flight).
        try:
            task = self._owner.spawn(
                self._fetch(key, reject, probe), name=f"fetch {key.credential}"
            )
        except RuntimeError:  # closed (an old engine after a reload): no new fetches
            if probe:
                self.health[key.credential].breaker.release()
            raise TokenUnavailable(
                f"the token cache for {key.credential} is shutting down", retry_after=1.0
            ) from None
        self._inflight[key] = task
        task.add_done_callback(lambda t: self._fetch_done(key, t, probe))
        return task

    def _running(self, key: ChainKey) -> asyncio.Task[AccessToken] | None:
        """The fetch in flight for `key`. One that has ended is not, though its entry stays
        until its done-callback runs, a loop step later: a request in that step must not take
        its answer (a success is held already; a stale token served on failure may have
        expired since). `_start` replaces the entry; the callback leaves a successor alone."""
        task = self._inflight.get(key)
        return task if task is not None and not task.done() else None

    def _fetch_done(self, key: ChainKey, task: asyncio.Task[AccessToken], probe: bool) -> None:
        """However the fetch ended (also cancelled before its first step, by an engine closing
        right after a request started it), the key is no longer in flight and the breaker's
        probe is free again."""
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if probe:
            self.health[key.credential].breaker.release()

    async def _fetch(self, key: ChainKey, reject: AccessToken | None, probe: bool) -> AccessToken:
        PROBE.set(probe)  # this task's own context: the probe makes one call, no retries
        health = self.health[key.credential]
        try:
            token = await self._sources[key.credential].fetch(key, reject=reject)
        except ReauthRequired as exc:
            self._set_state(key, CredentialState.REAUTH_REQUIRED, str(exc))
            raise
        except Exception as exc:  # any failure must become an answer, never a 500
            return self._failed(key, reject, exc)
        now = self._clock()
        self._store_token(key, token)
        health.breaker.success()
        health.last_refresh_at = now
        health.expires_at = token.expires_at
        self._metrics.token_expiry.labels(key.credential).set(token.expires_at)
        if health.state is not CredentialState.OK or health.last_error is not None:
            self._set_state(key, CredentialState.OK, None)
        if key.subject is None:
            self._schedule(key, max(MIN_REFRESH_INTERVAL, token.refresh_at - now))
        return token

    def _failed(self, key: ChainKey, reject: AccessToken | None, exc: Exception) -> AccessToken:
        """A fetch failed: open the breaker, serve the current token if it is still good
        (stale-if-error), schedule the background retry, else raise `TokenUnavailable`."""
        now = self._clock()
        health = self.health[key.credential]
        retry_after = getattr(exc, "retry_after", None)
        health.breaker.failure(now, retry_after if isinstance(retry_after, int | float) else None)
        if isinstance(exc, TokenEndpointError | StoreError | ProxyError):
            message = _describe(exc)
        else:
            message = f"internal error ({type(exc).__name__})"
            log.error("unexpected failure fetching a token for %s", key.credential, exc_info=exc)
        self._set_state(key, CredentialState.DEGRADED, message)
        if key.subject is None or (isinstance(exc, TokenEndpointError) and not exc.permanent):
            # Keep trying in the background (when the breaker lets the probe through). A user's
            # chain too, after a failure whose outcome is unknown: the provider may have rotated
            # it and lost the answer, and only a retry inside its grace window recovers that,
            # whether or not the user comes back in time.
            self._schedule(key, health.breaker.retry_after(now))
        held = self._held(key)
        if (
            held is not None
            and now < held.usable_until
            and (reject is None or held.value != reject.value)
        ):
            return held  # stale-if-error: the current token has not expired; keep serving it
        if isinstance(exc, ProxyError):
            raise exc
        raise TokenUnavailable(
            f"cannot obtain a token for {key.credential}: {message}",
            retry_after=health.breaker.retry_after(now),
        ) from exc

    def _schedule(self, key: ChainKey, delay: float) -> None:
        """Fetch `key` in the background after `delay`: credential-level tokens, and per-user
        chains only to recover a failed rotation (idle users' chains are not rotated for
        nothing)."""
        if self._closed:
            return
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(max(0.0, delay), self._timer_fired, key)

    def _timer_fired(self, key: ChainKey) -> None:
        self._timers.pop(key, None)
        if self._closed or self._running(key) is not None:
            return
        breaker = self.health[key.credential].breaker
        now = self._clock()
        if breaker.acquire(now):
            _ = self._start(key, None, probe=not breaker.closed)
        else:  # still cooling down, or another key of this credential is probing
            self._schedule(key, breaker.retry_after(now))

    def _set_state(self, key: ChainKey, state: CredentialState, error: str | None) -> None:
        health = self.health[key.credential]
        if key.subject is not None and state is CredentialState.REAUTH_REQUIRED:
            # One user's chain needing a new seed does not make the credential unusable.
            event(
                log,
                logging.WARNING,
                "state",
                error or "",
                credential=key.credential,
                subject_chain=True,
                state=state.value,
            )
            return
        if error is not None and key.subject is not None:
            # The credential's last error reaches every user's 503s and /admin: not one
            # user's id (the chain messages name the chain as `credential[subject]`).
            error = error.replace(str(key), f"{key.credential}[one user's chain]")
        health.last_error = error
        if health.state is not state:
            event(
                log,
                logging.WARNING if state is not CredentialState.OK else logging.INFO,
                "state",
                error or "",
                credential=key.credential,
                state=state.value,
                previous=health.state.value,
            )
            health.state = state
            self._metrics.set_state(key.credential, state)

    async def aclose(self) -> None:
        """Stop timers; let every fetch in flight finish (bounded), then cancel what is left.

        Background ones too: a rotation cancelled between the provider's answer and the
        store write loses the new refresh token (the provider has already revoked the old
        one). After a reload, requests in flight on the old pipeline still get their token."""
        self._closed = True
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_bound(
            getattr(src, "longest_fetch", 0.0) for src in self._sources.values()
        )
        # Until none is left: requests still running on this cache may start fetches meanwhile.
        while self._inflight and (remaining := deadline - loop.time()) > 0:
            _ = await asyncio.wait(list(self._inflight.values()), timeout=remaining)
        await self._owner.aclose()


def drain_bound(longest_fetches: Iterable[float]) -> float:
    """How long closing a cache may wait for its fetches: as long as the slowest could take (a
    rotation cancelled between the provider's answer and the store write loses its chain)."""
    return max([DRAIN_SECONDS, *longest_fetches])


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
