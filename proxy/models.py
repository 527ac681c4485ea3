"""Pure values shared by every layer: secrets, chain keys, tokens, chain records, history."""

from __future__ import annotations

import enum
import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Final


class Secret:
    """A secret string whose repr and str never show the value.

    `reveal()` is the one way to read it, so every use is visible in a grep.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def fingerprint(self) -> str:
        return fingerprint(self._value)

    def __repr__(self) -> str:
        return f"Secret({self.fingerprint()})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


def fingerprint(value: str) -> str:
    """A short, stable, non-reversible tag for a secret, safe for logs and history."""
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:12]


class CredentialState(enum.StrEnum):
    """The state of a credential or chain (the `state` label of SPEC section 6)."""

    OK = "ok"
    DEGRADED = "degraded"
    REAUTH_REQUIRED = "reauth_required"


@dataclass(frozen=True, slots=True)
class ChainKey:
    """Which token: a credential, and for per-user chains the subject."""

    credential: str
    subject: str | None = None

    def __str__(self) -> str:
        return self.credential if self.subject is None else f"{self.credential}[{self.subject}]"


_SUBJECT: Final = re.compile(r"[\x21-\x7e]{1,256}")
SUBJECT_RULE: Final = "1-256 visible ASCII characters"


def is_valid_subject(subject: str) -> bool:
    """An end user's id as a chain key: what the subject header can carry (`SUBJECT_RULE`)."""
    return _SUBJECT.fullmatch(subject) is not None


def subject_problem(
    name: str, subject_header: str | None, subject: str | None, *, field: str = "subject"
) -> str | None:
    """Why `subject` cannot name a chain of credential `name`, or None. A per-user credential
    needs one (its chains are per user), others refuse one; `field` is what the caller calls
    it (the admin API's `subject`, the command line's `--subject`)."""
    if subject_header and subject is None:
        return f"{name} keeps one chain per user ({subject_header}): give {field}"
    if subject is not None and not subject_header:
        return f"{name} has no subject_header; omit {field}"
    if subject is not None and not is_valid_subject(subject):
        # The subject header can carry nothing else: such a chain could never be used.
        return f"{field} must be {SUBJECT_RULE}"
    return None


# Refresh timing rules of SPEC section 3.
REFRESH_AT_FRACTION: Final = 0.8
REFRESH_LEAD_SECONDS: Final = 60.0
MIN_REFRESH_FRACTION: Final = 0.5


@dataclass(frozen=True, slots=True)
class AccessToken:
    """An access token as the proxy holds it.

    `expires_at` is the provider's expiry converted to our clock; `skew` is taken off it
    before any use, so `usable` is false from `expires_at - skew` on.
    """

    value: Secret
    issued_at: float
    expires_at: float
    skew: float = 5.0
    token_type: str = "Bearer"
    scope: str | None = None

    @property
    def lifetime(self) -> float:
        return max(0.0, self.expires_at - self.issued_at)

    @property
    def effective_skew(self) -> float:
        return min(self.skew, self.lifetime / 4)

    @property
    def usable_until(self) -> float:
        return self.expires_at - self.effective_skew

    @property
    def refresh_at(self) -> float:
        """80% of the lifetime or 60 s before expiry, whichever is earlier, never before half;
        and while the token is still usable: a skew above a fifth of the lifetime ends its use
        before 80%, so then the refresh comes at 90% of the usable time (still past half)."""
        life = self.lifetime
        at = min(
            self.issued_at + REFRESH_AT_FRACTION * life, self.expires_at - REFRESH_LEAD_SECONDS
        )
        at = max(at, self.issued_at + MIN_REFRESH_FRACTION * life)
        return min(at, self.issued_at + 0.9 * (self.usable_until - self.issued_at))

    def usable(self, now: float) -> bool:
        return now < self.usable_until

    def due(self, now: float) -> bool:
        return now >= self.refresh_at

    def fingerprint(self) -> str:
        return self.value.fingerprint()


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    """One entry of a chain's history: what happened, when, by which process, to which token."""

    at: float
    event: str  # seed | rotate | failure | reauth_required | recovered | interrupted
    outcome: str
    pid: int
    token_fingerprint: str | None = None
    detail: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "at": rfc3339(self.at),
            "event": self.event,
            "outcome": self.outcome,
            "pid": self.pid,
            "token": self.token_fingerprint,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class ChainRecord:
    """A rotating refresh-token chain as the store holds it.

    `version` grows by one with every write; compare-and-set uses it. `rotating_since` is
    set (with the pid) while a process has sent the current refresh token to the provider and
    not yet stored the answer: a restart that finds it knows the outcome of that call is
    unknown. The refresh token is never deleted on error, only replaced by rotation or seed.
    """

    key: ChainKey
    refresh_token: Secret
    version: int
    state: CredentialState = CredentialState.OK
    access_token: AccessToken | None = None
    updated_at: float = field(default_factory=time.time)
    last_refresh_at: float | None = None
    last_error: str | None = None
    rotating_since: float | None = None
    rotating_pid: int | None = None


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
