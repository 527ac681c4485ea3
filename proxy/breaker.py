"""A per-credential circuit breaker for token endpoints.

After a failed fetch (which already retried inside its budget) the breaker opens for a
cooldown that doubles up to `max_cooldown` (or the provider's `Retry-After`, if longer).
While open, callers without a usable token get `token_unavailable` at once; the first fetch
after the cooldown is the probe, and its success closes the breaker.

Bound during an outage of T seconds: at most 1 + log2(max/base) + T / max_cooldown fetches
(each fetch makes at most `oauth.RETRY_ATTEMPTS` HTTP calls) whatever the request rate.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Breaker:
    base_cooldown: float = 1.0
    max_cooldown: float = 30.0
    open_until: float = 0.0
    cooldown: float = 0.0
    failures: int = 0

    def allows(self, now: float) -> bool:
        return now >= self.open_until

    def retry_after(self, now: float) -> float:
        return max(1.0, self.open_until - now)

    def success(self) -> None:
        self.failures = 0
        self.cooldown = 0.0
        self.open_until = 0.0

    def failure(self, now: float, retry_after: float | None = None) -> None:
        self.failures += 1
        self.cooldown = min(
            self.max_cooldown, self.cooldown * 2 if self.cooldown else self.base_cooldown
        )
        self.open_until = now + max(self.cooldown, min(retry_after or 0.0, self.max_cooldown * 2))
