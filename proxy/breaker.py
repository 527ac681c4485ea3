"""A per-credential circuit breaker for token endpoints.

States: closed (no failure since the last success), open (cooling down), half-open (the
cooldown is over and one probe is in flight).

1. Closed: every fetch may call the provider, with retries (`oauth.RETRY_ATTEMPTS` HTTP calls
   at most, inside the credential's time budget).
2. A fetch fails (after its retries): the breaker opens for a cooldown of 1 s, doubling on
   every further failure up to `max_cooldown` (10 s), or for the provider's `Retry-After`
   when that is longer (capped at `max_retry_after`, 120 s).
3. Open: callers without a usable token get `token_unavailable` with `Retry-After` at once.
4. Cooldown over: exactly one fetch is let through as the probe (`acquire`), and it makes a
   single HTTP call without retries (`PROBE` tells the token endpoint). Its success closes
   the breaker, so the first call that reaches a recovered provider restores service; its
   failure opens the breaker again with the next cooldown.

Bound, for one credential-level token, during an outage of T seconds and whatever the
request rate: at most `A + N(T)` calls to the token endpoint, where A = 4 (the retries of the
fetch that meets the outage) and N(T) = max{k : S_k <= T} probes with
S_k = sum_{i<k} min(max_cooldown, base_cooldown * 2**i). With the defaults (1 s, 10 s):
S = 1, 3, 7, 15, 25, 35, ... so N(6 s) = 2 (<= 6 calls) and N(30 s) = 5 (<= 9 calls); for long
outages about one call per 10 s. (Per-user chains share the breaker: add one fetch, of at
most A calls, per subject whose fetch had already started when the outage began.)
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Final

# Set (in the fetch task's own context) while a fetch is the breaker's probe: the token
# endpoint then makes one HTTP call and no retries.
PROBE: Final[contextvars.ContextVar[bool]] = contextvars.ContextVar(
    "authproxy_breaker_probe", default=False
)


@dataclass(slots=True)
class Breaker:
    """One credential's breaker; the token cache calls `acquire` before every provider fetch
    and `success` / `failure` / `release` after it. Times are the cache's clock."""

    base_cooldown: float = 1.0
    max_cooldown: float = 10.0
    max_retry_after: float = 120.0
    open_until: float = 0.0
    cooldown: float = 0.0
    failures: int = 0
    probing: bool = False

    def __repr__(self) -> str:
        state = "closed" if self.failures == 0 else ("half-open" if self.probing else "open")
        return (
            f"<Breaker {state} failures={self.failures} cooldown={self.cooldown:g} "
            f"open_until={self.open_until:.3f}>"
        )

    @property
    def closed(self) -> bool:
        return self.failures == 0

    def allows(self, now: float) -> bool:
        """Whether `acquire(now)` would succeed (no side effect)."""
        return self.failures == 0 or (now >= self.open_until and not self.probing)

    def acquire(self, now: float) -> bool:
        """Permission to call the provider now; while open, the first caller after the
        cooldown becomes the probe and everyone else is refused until it ends."""
        if self.failures == 0:
            return True
        if now < self.open_until or self.probing:
            return False
        self.probing = True
        return True

    def retry_after(self, now: float) -> float:
        """Seconds a refused caller should wait (at least 1, for the `Retry-After` header)."""
        return max(1.0, self.open_until - now)

    def success(self) -> None:
        self.failures = 0
        self.cooldown = 0.0
        self.open_until = 0.0
        self.probing = False

    def failure(self, now: float, retry_after: float | None = None) -> None:
        self.failures += 1
        self.probing = False
        self.cooldown = min(
            self.max_cooldown, self.cooldown * 2 if self.cooldown else self.base_cooldown
        )
        wait = max(self.cooldown, min(retry_after or 0.0, self.max_retry_after))
        # A fetch that started before the breaker opened may fail late: never shorten.
        self.open_until = max(self.open_until, now + wait)

    def release(self) -> None:
        """The probe ended without telling anything about the provider (cancelled, or a
        store/chain answer that made no call): let the next caller probe."""
        self.probing = False


def probe_bound(seconds: float, base: float = 1.0, maximum: float = 10.0) -> int:
    """N(T) of the module docstring: how many probes fit in an outage of `seconds`."""
    n, total, cooldown = 0, 0.0, 0.0
    while True:
        cooldown = min(maximum, cooldown * 2 if cooldown else base)
        total += cooldown
        if total > seconds:
            return n
        n += 1
