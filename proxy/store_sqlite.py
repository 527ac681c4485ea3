"""`SqliteStore`: the chain store in one SQLite file, shared by processes on one host.

Every SQLite call runs on one dedicated thread (one connection, calls in FIFO order), so
the event loop never blocks. The file is in WAL mode (readers never wait for the writer)
with `synchronous=FULL` (a rotated refresh token that was acknowledged survives a power
cut: losing it would break the chain for good) and a busy timeout. Every write that reads
first (`seed`, `compare_and_set`, `acquire_lease`) runs in `BEGIN IMMEDIATE`, which takes
the file's write lock before the read, so the check and the write are one atomic step
across OS processes.

Tables (schema version 1 in `PRAGMA user_version`; `subject` is '' for the None subject):

    chains(credential, subject, json, version)        the ChainRecord as `record_to_json`
    leases(credential, subject, owner, expires_at)    expires_at: wall clock (time.time)
    history(id, credential, subject, json)            at most HISTORY_LIMIT rows per chain
    shared_tokens(credential, json, expires_at)

Changes made by other processes are seen by polling (`wait_for_change`, 20-50 ms);
changes made in this process wake local waiters at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final, TypeVar

from proxy.errors import StoreUnavailable
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

KIND: Final = "sqlite"
SCHEMA_VERSION: Final = 1
BUSY_TIMEOUT: Final = 5.0
POLL_MIN: Final = 0.02
POLL_MAX: Final = 0.05

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS chains (
        credential TEXT NOT NULL, subject TEXT NOT NULL,
        json TEXT NOT NULL, version INTEGER NOT NULL,
        PRIMARY KEY (credential, subject))""",
    """CREATE TABLE IF NOT EXISTS leases (
        credential TEXT NOT NULL, subject TEXT NOT NULL,
        owner TEXT NOT NULL, expires_at REAL NOT NULL,
        PRIMARY KEY (credential, subject))""",
    """CREATE TABLE IF NOT EXISTS history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        credential TEXT NOT NULL, subject TEXT NOT NULL, json TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS history_chain ON history (credential, subject, id)",
    """CREATE TABLE IF NOT EXISTS shared_tokens (
        credential TEXT PRIMARY KEY, json TEXT NOT NULL, expires_at REAL NOT NULL)""",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

T = TypeVar("T")


def _cols(key: ChainKey) -> tuple[str, str]:
    return key.credential, "" if key.subject is None else key.subject


def _switch_to_wal(conn: sqlite3.Connection, deadline: float) -> str:
    """`PRAGMA journal_mode = WAL`, retried until `deadline`: when several processes open a new
    file at once, SQLite answers "database is locked" at once, without its busy handler (two
    readers upgrading their locks would deadlock), and the switch succeeds a moment later."""
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
        time.sleep(0.005)  # on the store's own thread, never the event loop


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction holding the write lock from its first statement on."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction: every SELECT inside sees the same committed state."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


class SqliteStore:
    """Chains in a SQLite file; safe for several processes on one host sharing the file.

    Opening is lazy: the first call (usually `ping()` at startup) creates the directory and
    the file (mode 0600: it holds refresh tokens) or raises `StoreUnavailable` naming the path.
    """

    kind: str = KIND

    def __init__(self, path: Path | str, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="authproxy-sqlite"
        )
        self._conn: sqlite3.Connection | None = None  # touched only on the executor thread
        self._closed = False
        self._local_changed: dict[ChainKey, asyncio.Event] = {}

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._conn is not None else "unopened")
        return (
            f"<SqliteStore {state} path={str(self.path)!r} "
            f"waiting_chains={len(self._local_changed)}>"
        )

    # -- the protocol --------------------------------------------------------------------

    async def get(self, key: ChainKey) -> ChainRecord | None:
        return await self._run(self._get, key)

    async def seed(self, key: ChainKey, refresh_token: Secret) -> ChainRecord:
        record = await self._run(self._seed, key, refresh_token)
        self._notify(key)
        return record

    async def compare_and_set(self, record: ChainRecord, *, expected_version: int) -> bool:
        check_next_version(record, expected_version)
        written = await self._run(self._cas, record, expected_version)
        if written:
            self._notify(record.key)
        return written

    async def acquire_lease(self, key: ChainKey, owner: str, ttl: float) -> bool:
        check_lease_ttl(ttl)
        return await self._run(self._acquire, key, owner, ttl)

    async def release_lease(self, key: ChainKey, owner: str) -> None:
        if await self._run(self._release, key, owner):
            self._notify(key)

    async def wait_for_change(
        self,
        key: ChainKey,
        version: int,
        timeout: float,
    ) -> ChainRecord | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = POLL_MIN
        while True:
            # Local changes set this event; other processes' changes are found by polling.
            event = self._local_changed.setdefault(key, asyncio.Event())
            record, lease_until = await self._run(self._state, key)
            now = time.time()
            if record is not None and record.version > version:
                return record
            remaining = deadline - loop.time()
            if lease_until is None or lease_until <= now or remaining <= 0 or self._closed:
                return record
            try:
                async with asyncio.timeout(min(delay, remaining, lease_until - now)):
                    await event.wait()
            except TimeoutError:
                pass
            delay = min(delay * 1.5, POLL_MAX)

    async def add_history(self, key: ChainKey, event: HistoryEvent) -> None:
        await self._run(self._add_history, key, event)

    async def history(self, key: ChainKey, limit: int = 20) -> list[HistoryEvent]:
        return await self._run(self._history, key, max(0, min(limit, HISTORY_LIMIT)))

    async def subjects(self, credential: str) -> list[str]:
        return await self._run(self._subjects, credential)

    async def get_shared_token(self, credential: str) -> AccessToken | None:
        return await self._run(self._get_shared, credential)

    async def put_shared_token(self, credential: str, token: AccessToken) -> None:
        if token.expires_at > time.time():
            await self._run(self._put_shared, credential, token)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for event in self._local_changed.values():
            event.set()
        self._local_changed.clear()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close_connection)
        finally:
            self._executor.shutdown(wait=False)

    # -- plumbing ------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(conn, *args)` on the store's thread; SQLite errors -> StoreUnavailable."""
        if self._closed:
            raise StoreUnavailable(f"sqlite store {self.path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._call, fn, args))

    def _call(self, fn: Callable[..., T], args: tuple[object, ...]) -> T:
        try:
            return fn(self._connection(), *args)
        except sqlite3.Error as exc:
            # Nothing was written: the transaction helpers roll back before re-raising.
            raise StoreUnavailable(f"sqlite store {self.path}: {exc}") from exc

    def _notify(self, key: ChainKey) -> None:
        event = self._local_changed.pop(key, None)
        if event is not None:
            event.set()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Refresh tokens live here: create the file private (WAL files inherit its mode).
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot open sqlite store {self.path}: {exc.strerror or exc}"
            ) from exc
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # one executor thread, but not the creating one
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open sqlite store {self.path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            mode = _switch_to_wal(conn, time.monotonic() + self._busy_timeout)
            if str(mode).lower() != "wal":
                raise StoreUnavailable(
                    f"sqlite store {self.path}: cannot switch to WAL mode (got {mode}); "
                    "put the file on a local file system"
                )
            conn.execute("PRAGMA synchronous = FULL")
            with _immediate(conn):
                for statement in _SCHEMA:
                    conn.execute(statement)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreUnavailable(f"cannot open sqlite store {self.path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- statements (on the store's thread) ----------------------------------------------

    @staticmethod
    def _get(conn: sqlite3.Connection, key: ChainKey) -> ChainRecord | None:
        row = conn.execute(
            "SELECT json FROM chains WHERE credential = ? AND subject = ?", _cols(key)
        ).fetchone()
        return record_from_json(row[0]) if row else None

    @staticmethod
    def _state(conn: sqlite3.Connection, key: ChainKey) -> tuple[ChainRecord | None, float | None]:
        with _snapshot(conn):
            record = SqliteStore._get(conn, key)
            row = conn.execute(
                "SELECT expires_at FROM leases WHERE credential = ? AND subject = ?", _cols(key)
            ).fetchone()
        return record, (float(row[0]) if row else None)

    @staticmethod
    def _seed(conn: sqlite3.Connection, key: ChainKey, refresh_token: Secret) -> ChainRecord:
        with _immediate(conn):
            record = seeded_record(key, refresh_token, SqliteStore._get(conn, key))
            conn.execute(
                "INSERT INTO chains (credential, subject, json, version) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (credential, subject) "
                "DO UPDATE SET json = excluded.json, version = excluded.version",
                (*_cols(key), record_to_json(record), record.version),
            )
        return record

    @staticmethod
    def _cas(conn: sqlite3.Connection, record: ChainRecord, expected_version: int) -> bool:
        with _immediate(conn):
            row = conn.execute(
                "SELECT version FROM chains WHERE credential = ? AND subject = ?",
                _cols(record.key),
            ).fetchone()
            if row is None or row[0] != expected_version:
                return False
            conn.execute(
                "UPDATE chains SET json = ?, version = ? WHERE credential = ? AND subject = ?",
                (record_to_json(record), record.version, *_cols(record.key)),
            )
        return True

    @staticmethod
    def _acquire(conn: sqlite3.Connection, key: ChainKey, owner: str, ttl: float) -> bool:
        with _immediate(conn):
            now = time.time()
            row = conn.execute(
                "SELECT owner, expires_at FROM leases WHERE credential = ? AND subject = ?",
                _cols(key),
            ).fetchone()
            if row is not None and row[0] != owner and row[1] > now:
                return False
            conn.execute(
                "INSERT INTO leases (credential, subject, owner, expires_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (credential, subject) "
                "DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at",
                (*_cols(key), owner, now + ttl),
            )
        return True

    @staticmethod
    def _release(conn: sqlite3.Connection, key: ChainKey, owner: str) -> bool:
        cur = conn.execute(
            "DELETE FROM leases WHERE credential = ? AND subject = ? AND owner = ?",
            (*_cols(key), owner),
        )
        return cur.rowcount > 0

    @staticmethod
    def _add_history(conn: sqlite3.Connection, key: ChainKey, event: HistoryEvent) -> None:
        cols = _cols(key)
        with _immediate(conn):
            conn.execute(
                "INSERT INTO history (credential, subject, json) VALUES (?, ?, ?)",
                (*cols, event_to_json(event)),
            )
            conn.execute(
                "DELETE FROM history WHERE credential = ? AND subject = ? AND id <= ("
                " SELECT id FROM history WHERE credential = ? AND subject = ?"
                " ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (*cols, *cols, HISTORY_LIMIT),
            )

    @staticmethod
    def _history(conn: sqlite3.Connection, key: ChainKey, limit: int) -> list[HistoryEvent]:
        rows = conn.execute(
            "SELECT json FROM history WHERE credential = ? AND subject = ? "
            "ORDER BY id DESC LIMIT ?",
            (*_cols(key), limit),
        ).fetchall()
        return [event_from_json(row[0]) for row in rows]

    @staticmethod
    def _subjects(conn: sqlite3.Connection, credential: str) -> list[str]:
        rows = conn.execute(
            "SELECT subject FROM chains WHERE credential = ? AND subject != '' ORDER BY subject",
            (credential,),
        ).fetchall()
        return [row[0] for row in rows]

    @staticmethod
    def _get_shared(conn: sqlite3.Connection, credential: str) -> AccessToken | None:
        row = conn.execute(
            "SELECT json FROM shared_tokens WHERE credential = ? AND expires_at > ?",
            (credential, time.time()),
        ).fetchone()
        return token_from_dict(json.loads(row[0])) if row else None

    @staticmethod
    def _put_shared(conn: sqlite3.Connection, credential: str, token: AccessToken) -> None:
        conn.execute(
            "INSERT INTO shared_tokens (credential, json, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (credential) "
            "DO UPDATE SET json = excluded.json, expires_at = excluded.expires_at",
            (credential, json.dumps(token_to_dict(token)), token.expires_at),
        )
