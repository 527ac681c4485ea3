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


def _connection_listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    listed: set[str] = set()
    for value in headers.getall("Connection", ()):
        listed.update(v.strip().lower() for v in value.split(",") if v.strip())
    return listed


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
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lname = name.lower()
        if lname in _DROP_UPSTREAM or lname in drop or lname in extra:
            continue
        out.add(name, value)
    if bearer is not None:
        out["Authorization"] = f"Bearer {bearer}"
    out["X-Request-ID"] = request_id
    if content_length is not None:
        out["Content-Length"] = str(content_length)
    return out


def downstream_headers(incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """What the client receives from the upstream's answer: hop-by-hop headers removed."""
    extra = _connection_listed(incoming) if "Connection" in incoming else set()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in extra:
            continue
        out.add(name, value)
    return out
