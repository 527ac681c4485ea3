"""The in-process token cache: single-flight fetches, refresh ahead of expiry, stale-if-error.

`TokenCache.get(key)`:
1. a usable token is a `hit`; if it is due, one background refresh starts (single-flight);
2. otherwise the caller joins the fetch in flight (`coalesced`) or starts it (`miss`);
3. an open breaker with no usable token answers `TokenUnavailable` at once.

The in-flight dict is updated before any await; the fetch is one owned task that every
waiter awaits through `asyncio.shield`, so a cancelled request never cancels it, and all
waiters get its result or its exception (aiohttp's `_resolve_host` recipe).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cachetools import LRUCache

from proxy.breaker import Breaker
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
        self._owner = TaskOwner("token-cache")
        self._tokens: dict[ChainKey, AccessToken] = {}
        self._subject_tokens: LRUCache[ChainKey, AccessToken] = LRUCache(max_subject_tokens)
        self._inflight: dict[ChainKey, asyncio.Task[AccessToken]] = {}
        self._timers: dict[ChainKey, asyncio.TimerHandle] = {}
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
            f"inflight={len(self._inflight)} timers={len(self._timers)}>"
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

    async def get(self, key: ChainKey, *, timeout: float | None = None) -> AccessToken:
        """A usable access token for `key`; raises `TokenUnavailable` or `ReauthRequired`."""
        now = self._clock()
        token = self._held(key)
        if token is not None and now < token.usable_until:
            if now >= token.refresh_at and key not in self._inflight:
                health = self.health[key.credential]
                if health.breaker.allows(now):
                    _ = self._start(key, None)
            self._counters[(key.credential, "hit")].inc()
            return token
        task = self._inflight.get(key)
        if task is None:
            health = self.health[key.credential]
            if not health.breaker.allows(now):
                raise TokenUnavailable(
                    f"the token endpoint of {key.credential} is failing "
                    f"({health.last_error or 'unknown error'}); retrying later",
                    retry_after=health.breaker.retry_after(now),
                )
            task = self._start(key, None)
            self._counters[(key.credential, "miss")].inc()
        else:
            self._counters[(key.credential, "coalesced")].inc()
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            raise TokenUnavailable(
                f"no token for {key.credential} within {timeout:g}s; the token endpoint is slow",
                retry_after=1.0,
            ) from None

    def invalidate(self, key: ChainKey, token: AccessToken) -> bool:
        """Drop `token` if it is still the current one (an upstream refused it).

        A burst of 401s for one token drops it once; the next `get` fetches one new token."""
        current = self._held(key)
        if current is None or current.value != token.value:
            return False
        if key.subject is None:
            self._tokens.pop(key, None)
        else:
            self._subject_tokens.pop(key, None)
        if key not in self._inflight:
            _ = self._start(key, token)
        return True

    def forget(self, key: ChainKey) -> None:
        """Drop what is cached for `key` (after a seed): the next `get` reads the store."""
        if key.subject is None:
            self._tokens.pop(key, None)
        else:
            self._subject_tokens.pop(key, None)
        health = self.health.get(key.credential)
        if health is not None:
            health.breaker.success()

    def adopt(self, previous: TokenCache, credentials: set[str]) -> None:
        """Take over tokens and health of unchanged credentials after a reload."""
        now = self._clock()
        for key, token in previous._tokens.items():
            if key.credential in credentials and token.usable(now):
                self._tokens[key] = token
                self._schedule(key, token.refresh_at - now)
        for key, token in previous._subject_tokens.items():
            if key.credential in credentials and token.usable(now):
                self._subject_tokens[key] = token
        for name in credentials:
            if name in previous.health and name in self.health:
                self.health[name] = previous.health[name]
                self._metrics.set_state(name, self.health[name].state)

    def mark_seeded(self, key: ChainKey) -> None:
        """A chain was seeded anew: a credential in reauth_required is usable again."""
        if key.subject is None and key.credential in self.health:
            self._set_state(key, CredentialState.OK, None)

    def refresh_now(self, key: ChainKey) -> bool:
        """Start a refresh in the background (admin `POST .../refresh`); False if one runs."""
        if key in self._inflight:
            return False
        _ = self._start(key, None)
        return True

    def _start(self, key: ChainKey, reject: AccessToken | None) -> asyncio.Task[AccessToken]:
        # Registered before any await, so every later caller joins this task (#single-flight).
        task = self._owner.spawn(self._fetch(key, reject), name=f"fetch {key.credential}")
        self._inflight[key] = task
        return task

    async def _fetch(self, key: ChainKey, reject: AccessToken | None) -> AccessToken:
        health = self.health[key.credential]
        try:
            token = await self._sources[key.credential].fetch(key, reject=reject)
        except ReauthRequired as exc:
            self._set_state(key, CredentialState.REAUTH_REQUIRED, str(exc))
            raise
        except (TokenEndpointError, StoreError, ProxyError) as exc:
            now = self._clock()
            retry_after = getattr(exc, "retry_after", None)
            health.breaker.failure(now, retry_after)
            message = _describe(exc)
            held = self._held(key)
            if (
                held is not None
                and now < held.usable_until
                and (reject is None or held.value != reject.value)
            ):
                # Stale-if-error: the current token has not expired; keep serving it.
                self._set_state(key, CredentialState.DEGRADED, message)
                self._schedule(key, health.breaker.retry_after(now))
                return held
            self._set_state(key, CredentialState.DEGRADED, message)
            if isinstance(exc, ProxyError):
                raise
            raise TokenUnavailable(
                f"cannot obtain a token for {key.credential}: {message}",
                retry_after=health.breaker.retry_after(now),
            ) from exc
        finally:
            self._inflight.pop(key, None)
        now = self._clock()
        self._store_token(key, token)
        health.breaker.success()
        health.last_refresh_at = now
        health.expires_at = token.expires_at
        self._metrics.token_expiry.labels(key.credential).set(token.expires_at)
        if health.state is not CredentialState.OK or health.last_error is not None:
            self._set_state(key, CredentialState.OK, None)
        if key.subject is None:
            self._schedule(key, token.refresh_at - now)
        return token

    def _schedule(self, key: ChainKey, delay: float) -> None:
        """Refresh `key` in the background after `delay` (credential-level tokens only:
        idle per-user chains are not rotated for nothing)."""
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(max(0.0, delay), self._timer_fired, key)

    def _timer_fired(self, key: ChainKey) -> None:
        self._timers.pop(key, None)
        if key not in self._inflight:
            _ = self._start(key, None)

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
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        await self._owner.aclose()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
