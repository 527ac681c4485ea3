"""The per-credential breaker on its own: cooldowns, Retry-After, one probe at a time, and
the documented bound on calls during an outage (`proxy.breaker` docstring)."""

from __future__ import annotations

import pytest

from proxy.breaker import Breaker, probe_bound


def test_closed_breaker_allows_everyone() -> None:
    b = Breaker()
    assert b.closed
    assert b.acquire(0.0) and b.acquire(0.0)  # closed: no probe bookkeeping
    assert not b.probing


def test_cooldown_doubles_to_the_cap_and_success_resets() -> None:
    b = Breaker(base_cooldown=1.0, max_cooldown=10.0)
    seen = []
    now = 100.0
    for _ in range(7):
        b.failure(now)
        seen.append(b.open_until - now)
        now = b.open_until
    assert seen == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    b.success()
    assert b.closed and b.open_until == 0.0 and b.cooldown == 0.0


def test_open_breaker_refuses_then_lets_exactly_one_probe_through() -> None:
    b = Breaker()
    b.failure(10.0)
    assert not b.acquire(10.5)
    assert b.retry_after(10.5) == 1.0  # at least one second, for the Retry-After header
    assert b.acquire(11.0)  # the cooldown is over: this caller is the probe
    assert "half-open" in repr(b)
    assert not b.acquire(11.0) and not b.allows(11.0)  # everyone else waits for it
    b.failure(11.2)  # the probe failed: open again, longer
    assert not b.probing and b.open_until == pytest.approx(13.2)
    assert b.acquire(13.2)
    b.release()  # a probe that ended without news frees the slot
    assert b.acquire(13.2)
    b.success()
    assert b.closed and b.acquire(13.3)


def test_retry_after_is_honoured_but_capped() -> None:
    b = Breaker(max_retry_after=120.0)
    b.failure(0.0, retry_after=30.0)
    assert b.open_until == 30.0 and b.retry_after(0.0) == 30.0
    b.failure(30.0, retry_after=10_000.0)
    assert b.open_until == 150.0


def test_a_late_failure_never_shortens_an_open_breaker() -> None:
    b = Breaker()
    b.failure(0.0, retry_after=60.0)
    b.failure(1.0)  # a fetch that started before the breaker opened fails late
    assert b.open_until == 60.0


@pytest.mark.parametrize(
    ("seconds", "probes"), [(0.5, 0), (1, 1), (6, 2), (7, 3), (15, 4), (30, 5), (3600, 362)]
)
def test_probe_bound(seconds: float, probes: int) -> None:
    assert probe_bound(seconds) == probes


def test_probe_bound_matches_a_simulated_outage() -> None:
    """Callers hammering the breaker every 10 ms for 30 s get through only N(30) times."""
    b = Breaker()
    b.failure(0.0)  # the fetch that met the outage
    calls = 0
    for tick in range(1, 3001):
        now = tick / 100
        if b.acquire(now):
            calls += 1
            b.failure(now)  # the provider is still down
    assert calls == probe_bound(30.0) == 5
