"""Header rules for both directions (SPEC section 4), as pure functions."""

from __future__ import annotations

from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9110 7.6.1 plus the de-facto Proxy-Connection and Keep-Alive.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_DROP_UPSTREAM: Final = HOP_BY_HOP | {"host", "authorization", "content-length"}


_CONNECTION_USUAL: Final = frozenset({"keep-alive", "close", "upgrade", "te"})


def _connection_listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    listed: set[str] = set()
    for value in headers.getall("Connection", ()):
        lowered = value.strip().lower()
        if lowered in _CONNECTION_USUAL:  # the usual single token: no splitting
            listed.add(lowered)
            continue
        listed.update(v.strip().lower() for v in value.split(",") if v.strip())
    return listed


def _without(
    incoming: CIMultiDictProxy[str], names: frozenset[str], extra: set[str]
) -> CIMultiDict[str]:
    """A copy of `incoming` without the (lower-case) `names` and `extra`, order kept: a C-level
    copy and a delete per name present, rather than a Python loop over every header."""
    out = CIMultiDict(incoming)
    for name in names:
        if name in out:
            del out[name]
    for name in extra:
        if name in out:
            del out[name]
    return out


def upstream_headers(
    incoming: CIMultiDictProxy[str],
    *,
    bearer: str | None,
    request_id: str,
    drop: frozenset[str] = frozenset(),
    content_length: int | None = None,
) -> CIMultiDict[str]:
    """What the upstream receives: no hop-by-hop headers, no client credentials, our token.

    `Host` is set by the HTTP client from the upstream URL; `drop` holds lower-case extra names
    (a route's subject header)."""
    extra = _connection_listed(incoming) if "Connection" in incoming else set()
    if drop:
        extra |= drop
    out = _without(incoming, _DROP_UPSTREAM, extra)
    if bearer is not None:
        out["Authorization"] = f"Bearer {bearer}"
    out["X-Request-ID"] = request_id
    if content_length is not None:
        out["Content-Length"] = str(content_length)
    return out


def downstream_headers(incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """What the client receives from the upstream's answer: hop-by-hop headers removed."""
    extra = _connection_listed(incoming) if "Connection" in incoming else set()
    return _without(incoming, HOP_BY_HOP, extra)
