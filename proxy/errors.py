"""Every error authproxy raises, as one tree.

```text
ProxyError(Exception)          code: ClassVar[ErrorCode]; message; route; retry_after
|- NoRoute  Forbidden  TunnelRefused  ProxyAuthRequired  BadRequest  PayloadTooLarge
|- TokenUnavailable  ReauthRequired
`- UpstreamUnreachable  UpstreamTimeout
ConfigError(Exception)         problems: tuple[Problem, ...]   (path, message) -> exit 2
TokenEndpointError(Exception)  error; description; status        (RFC 6749 section 5.2)
|- InvalidGrant  InvalidClient  UnauthorizedClient  InvalidScope     permanent
|- MalformedTokenResponse                                           provider bug
`- TransientTokenError         5xx, 429, network, timeout; retry_after
StoreError(Exception)
`- StoreUnavailable
```

No message here ever holds a secret: messages name the credential and, at most, a
token fingerprint (see `models.fingerprint`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar


class ErrorCode(enum.StrEnum):
    """The codes clients see in the JSON body and in `X-Authproxy-Error` (SPEC section 4)."""

    NO_ROUTE = "no_route"
    FORBIDDEN = "forbidden"
    TUNNEL_REFUSED = "tunnel_refused"
    PROXY_AUTH_REQUIRED = "proxy_auth_required"
    BAD_REQUEST = "bad_request"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    TOKEN_UNAVAILABLE = "token_unavailable"
    REAUTH_REQUIRED = "reauth_required"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_TIMEOUT = "upstream_timeout"

    @property
    def status(self) -> int:
        match self:
            case ErrorCode.NO_ROUTE:
                return 404
            case ErrorCode.FORBIDDEN | ErrorCode.TUNNEL_REFUSED:
                return 403
            case ErrorCode.PROXY_AUTH_REQUIRED:
                return 407
            case ErrorCode.BAD_REQUEST:
                return 400
            case ErrorCode.PAYLOAD_TOO_LARGE:
                return 413
            case ErrorCode.TOKEN_UNAVAILABLE | ErrorCode.REAUTH_REQUIRED:
                return 503
            case ErrorCode.UPSTREAM_UNREACHABLE:
                return 502
            case ErrorCode.UPSTREAM_TIMEOUT:
                return 504


class ProxyError(Exception):
    """An error authproxy answers itself, as JSON with `X-Authproxy-Error`."""

    code: ClassVar[ErrorCode]

    def __init__(
        self, message: str, *, route: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.route = route
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return self.code.status


class NoRoute(ProxyError):
    code = ErrorCode.NO_ROUTE


class Forbidden(ProxyError):
    code = ErrorCode.FORBIDDEN


class TunnelRefused(ProxyError):
    code = ErrorCode.TUNNEL_REFUSED


class ProxyAuthRequired(ProxyError):
    code = ErrorCode.PROXY_AUTH_REQUIRED


class BadRequest(ProxyError):
    code = ErrorCode.BAD_REQUEST


class PayloadTooLarge(ProxyError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class TokenUnavailable(ProxyError):
    code = ErrorCode.TOKEN_UNAVAILABLE


class ReauthRequired(ProxyError):
    code = ErrorCode.REAUTH_REQUIRED


class UpstreamUnreachable(ProxyError):
    code = ErrorCode.UPSTREAM_UNREACHABLE


class UpstreamTimeout(ProxyError):
    code = ErrorCode.UPSTREAM_TIMEOUT


@dataclass(frozen=True, slots=True)
class Problem:
    """One configuration problem: the field path and what to do about it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every problem found."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class TokenEndpointError(Exception):
    """The token endpoint refused or failed; fields follow RFC 6749 section 5.2.

    `outcome` is the metric label (SPEC section 6) this failure is counted under.
    """

    outcome: ClassVar[str] = "oauth_error"
    permanent: ClassVar[bool] = True

    def __init__(
        self,
        error: str,
        description: str | None = None,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.error = error
        self.description = description
        self.status = status
        self.retry_after = retry_after
        text = error if not description else f"{error}: {description}"
        if status is not None:
            text = f"{text} (HTTP {status})"
        super().__init__(text)


class InvalidGrant(TokenEndpointError):
    outcome = "invalid_grant"


class InvalidClient(TokenEndpointError):
    outcome = "invalid_client"


class UnauthorizedClient(TokenEndpointError):
    pass


class InvalidScope(TokenEndpointError):
    pass


class MalformedTokenResponse(TokenEndpointError):
    """The provider answered 2xx with something that is not a usable token response."""

    outcome = "malformed"
    permanent = False


class TransientTokenError(TokenEndpointError):
    """5xx, 429, a network failure or a timeout: worth retrying, maybe later."""

    outcome = "http_error"
    permanent = False


class TokenNetworkError(TransientTokenError):
    outcome = "network_error"


class TokenTimeout(TransientTokenError):
    outcome = "timeout"


# RFC 6749 section 5.2 codes that no retry will fix; anything else is an `oauth_error`.
PERMANENT_OAUTH_ERRORS: dict[str, type[TokenEndpointError]] = {
    "invalid_grant": InvalidGrant,
    "invalid_client": InvalidClient,
    "unauthorized_client": UnauthorizedClient,
    "invalid_scope": InvalidScope,
}


class StoreError(Exception):
    """The chain store failed."""


class StoreUnavailable(StoreError):
    """The chain store cannot be reached; nothing was written."""
