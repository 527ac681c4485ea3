"""`RedisStore`: the chain store in Redis, shared by a fleet of proxies.

Key layout (`P` is `store.key_prefix`, default "authproxy"; `C` the credential and `S` the
subject, each percent-encoded so ':' can only be a separator; `ID` is `C` or `C:S`):

    P:chain:ID      hash {version, json}: the ChainRecord as `record_to_json`
    P:lease:ID      string owner, with PX expiry: the "refresh in progress" lease
    P:history:ID    list of event JSON, newest first, LTRIMmed to HISTORY_LIMIT
    P:subjects:C    set of the subjects with a chain
    P:shared:C      string token JSON, with PX = the token's remaining lifetime
    P:changed:ID    pub/sub channel: a version after a write, "released" after a release

Compare-and-set and lease release are Lua scripts, so each check-and-write is one atomic
step for every client. Connection failures and timeouts become `StoreUnavailable`; the
socket timeout is short so an unreachable Redis fails a request fast instead of hanging
it. No message ever holds the URL's password.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Final
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis as redis_package
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    InvalidResponse,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.errors import StoreError, StoreUnavailable
from proxy.models import AccessToken, ChainKey, ChainRecord, HistoryEvent, Secret
from proxy.store import (
    HISTORY_LIMIT,
    check_lease_ttl,
    check_next_version,
    event_from_json,
    event_to_json,
    record_from_json,
    record_to_json,
    seeded_record,
    token_from_dict,
    token_to_dict,
)

KIND: Final = "redis"
SOCKET_TIMEOUT: Final = 2.0
CONNECT_TIMEOUT: Final = 1.0
POLL_FALLBACK: Final = 0.25  # a lost pub/sub message or an expiring lease costs at most this
SEED_ATTEMPTS: Final = 50

# Given explicitly: left to itself, redis-py reads package metadata from disk (a blocking
# call on the event loop) for every new connection.
_DRIVER_INFO: Final = DriverInfo(lib_version=redis_package.__version__)

# KEYS: chain hash, subjects set. ARGV: expected version, new version, json, channel,
# subject ('' for none), may create ('1' only for seed).
_SET_IF_VERSION: Final = """
local current = redis.call('HGET', KEYS[1], 'version')
if current == false then
  if ARGV[6] ~= '1' or ARGV[1] ~= '0' then return 0 end
elseif tonumber(current) ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'json', ARGV[3])
if ARGV[5] ~= '' then redis.call('SADD', KEYS[2], ARGV[5]) end
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
"""

# KEYS: lease. ARGV: owner, ttl ms. Extends the lease only for its current owner.
_EXTEND_LEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease. ARGV: owner, channel. Deletes the lease only for its current owner.
_RELEASE_LEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'released')
  return 1
end
return 0
"""


# Failures after which nothing was written and a later call may succeed: the store is
# unavailable (SPEC: readiness fails, requests get token_unavailable). Anything else from
# Redis (a WRONGTYPE from a foreign key under our prefix, ...) is a plain StoreError.
UNAVAILABLE_ERRORS: Final = (
    RedisConnectionError,  # refused, reset, auth failed, loading, too many connections
    RedisTimeoutError,
    TimeoutError,
    OSError,
    InvalidResponse,  # something that is not Redis answers at that address
    ReadOnlyError,  # a replica, or a failover in progress
    OutOfMemoryError,  # maxmemory reached with a noeviction policy
)


def redact_url(url: str) -> str:
    """The URL without its password (and without a query, which may carry one)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _part(text: str) -> str:
    return quote(text, safe="")


class RedisStore:
    """Chains in Redis (`redis://` or `rediss://`), for proxies on several hosts.

    The connection is made on first use; `ping()` at startup reports an unreachable server.
    """

    kind: str = KIND

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "authproxy",
        socket_timeout: float = SOCKET_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.url = redact_url(url)
        self.prefix = key_prefix
        password = urlsplit(url).password
        # Both spellings, to scrub from any text a driver exception might carry.
        self._secrets = {password, unquote(password)} - {""} if password else set()
        self._closed = False
        try:
            self._client: redis.Redis = redis.from_url(
                url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
                # One quick retry on a dropped connection (a restarted server leaves dead
                # sockets in the pool); none on timeouts, whose outcome is unknown.
                retry=Retry(ConstantBackoff(0.05), 1, supported_errors=(RedisConnectionError,)),
                health_check_interval=30,
                driver_info=_DRIVER_INFO,
            )
        except ValueError as exc:
            raise StoreUnavailable(f"redis store {self.url}: invalid URL") from exc
        self._set_if_version = self._client.register_script(_SET_IF_VERSION)
        self._extend_lease = self._client.register_script(_EXTEND_LEASE)
        self._release_lease = self._client.register_script(_RELEASE_LEASE)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<RedisStore {state} url={self.url!r} prefix={self.prefix!r}>"

    # -- keys ----------------------------------------------------------------------------

    def _id(self, key: ChainKey) -> str:
        cred = _part(key.credential)
        return cred if key.subject is None else f"{cred}:{_part(key.subject)}"

    def _key(self, kind: str, key: ChainKey) -> str:
        return f"{self.prefix}:{kind}:{self._id(key)}"

    def _subjects_key(self, credential: str) -> str:
        return f"{self.prefix}:subjects:{_part(credential)}"

    def _shared_key(self, credential: str) -> str:
        return f"{self.prefix}:shared:{_part(credential)}"

    # -- the protocol --------------------------------------------------------------------

    async def get(self, key: ChainKey) -> ChainRecord | None:
        with self._errors():
            raw = await self._client.hget(self._key("chain", key), "json")
        return record_from_json(raw) if raw else None

    async def seed(self, key: ChainKey, refresh_token: Secret) -> ChainRecord:
        # Optimistic: read, build version + 1, write if nobody moved the chain meanwhile.
        for _ in range(SEED_ATTEMPTS):
            previous = await self.get(key)
            record = seeded_record(key, refresh_token, previous)
            expected = previous.version if previous is not None else 0
            if await self._write(record, expected, create=True):
                return record
        raise StoreError(f"seed of {key} lost {SEED_ATTEMPTS} races in a row; try again")

    async def compare_and_set(self, record: ChainRecord, *, expected_version: int) -> bool:
        check_next_version(record, expected_version)
        return await self._write(record, expected_version, create=False)

    async def acquire_lease(self, key: ChainKey, owner: str, ttl: float) -> bool:
        check_lease_ttl(ttl)
        lease, ms = self._key("lease", key), max(1, int(ttl * 1000))
        with self._errors():
            if await self._client.set(lease, owner, nx=True, px=ms):
                return True
            return bool(await self._extend_lease(keys=[lease], args=[owner, ms]))

    async def release_lease(self, key: ChainKey, owner: str) -> None:
        with self._errors():
            await self._release_lease(
                keys=[self._key("lease", key)], args=[owner, self._key("changed", key)]
            )

    async def wait_for_change(
        self,
        key: ChainKey,
        version: int,
        timeout: float,
    ) -> ChainRecord | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with self._errors():
            async with self._client.pubsub() as pubsub:
                # Subscribe, and see it confirmed, before reading the state: a change after
                # the read is then always announced on the channel.
                await pubsub.subscribe(self._key("changed", key))
                while (remaining := deadline - loop.time()) > 0:
                    msg = await pubsub.get_message(timeout=remaining)
                    if msg is not None and msg["type"] == "subscribe":
                        break
                while True:
                    record, lease_ms = await self._state(key)
                    if record is not None and record.version > version:
                        return record
                    remaining = deadline - loop.time()
                    # PTTL: -2 no lease, -1 a lease without expiry (never written by us).
                    if lease_ms == -2 or remaining <= 0:
                        return record
                    wait = min(remaining, POLL_FALLBACK)
                    if lease_ms > 0:
                        wait = min(wait, lease_ms / 1000)
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)

    async def add_history(self, key: ChainKey, event: HistoryEvent) -> None:
        name = self._key("history", key)
        with self._errors():
            async with self._client.pipeline(transaction=True) as pipe:
                # redis-py types queued pipeline calls as awaitables; they only queue.
                _ = pipe.lpush(name, event_to_json(event))
                _ = pipe.ltrim(name, 0, HISTORY_LIMIT - 1)
                await pipe.execute()

    async def history(self, key: ChainKey, limit: int = 20) -> list[HistoryEvent]:
        limit = min(limit, HISTORY_LIMIT)
        if limit <= 0:
            return []
        with self._errors():
            raws = await self._client.lrange(self._key("history", key), 0, limit - 1)
        return [event_from_json(raw) for raw in raws]

    async def subjects(self, credential: str) -> list[str]:
        with self._errors():
            members = await self._client.smembers(self._subjects_key(credential))
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    async def get_shared_token(self, credential: str) -> AccessToken | None:
        with self._errors():
            raw = await self._client.get(self._shared_key(credential))
        if not raw:
            return None
        token = token_from_dict(json.loads(raw))
        return token if token.expires_at > time.time() else None

    async def put_shared_token(self, credential: str, token: AccessToken) -> None:
        ms = int((token.expires_at - time.time()) * 1000)
        if ms <= 0:
            return
        with self._errors():
            await self._client.set(
                self._shared_key(credential), json.dumps(token_to_dict(token)), px=ms
            )

    async def ping(self) -> None:
        with self._errors():
            await self._client.ping()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    # -- plumbing ------------------------------------------------------------------------

    async def _write(self, record: ChainRecord, expected: int, *, create: bool) -> bool:
        key = record.key
        with self._errors():
            written = await self._set_if_version(
                keys=[self._key("chain", key), self._subjects_key(key.credential)],
                args=[
                    expected,
                    record.version,
                    record_to_json(record),
                    self._key("changed", key),
                    key.subject if key.subject is not None else "",
                    "1" if create else "0",
                ],
            )
        return bool(written)

    async def _state(self, key: ChainKey) -> tuple[ChainRecord | None, int]:
        """The record and the lease's remaining milliseconds (PTTL), read atomically."""
        async with self._client.pipeline(transaction=True) as pipe:
            _ = pipe.hget(self._key("chain", key), "json")
            _ = pipe.pttl(self._key("lease", key))
            raw, lease_ms = await pipe.execute()
        return (record_from_json(raw) if raw else None), int(lease_ms)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """The one place Redis exceptions become ours (see `proxy.errors`)."""
        if self._closed:
            raise StoreUnavailable(f"redis store {self.url} is closed")
        try:
            yield
        except UNAVAILABLE_ERRORS as exc:
            raise StoreUnavailable(
                f"redis store {self.url} unavailable: {self._reason(exc)}"
            ) from exc
        except RedisError as exc:
            raise StoreError(f"redis store {self.url}: {self._reason(exc)}") from exc

    def _reason(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text
