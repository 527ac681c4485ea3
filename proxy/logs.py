"""JSON-lines logging on stderr, with redaction that no code path can skip.

Three layers keep secrets out (SPEC section 7):
1. `redact_headers` / `redact_query` for what we choose to log;
2. `Scrubber`, a logging filter over every record (message, args, exception text and
   traceback), replacing every secret value the process knows: config secrets by substring,
   tokens obtained at run time by a set lookup of token-shaped runs (cheap with many tokens);
3. records are written by a thread behind a queue, so logging never blocks the event loop.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from json.encoder import encode_basestring_ascii as _encode_json_str
from types import TracebackType
from typing import IO, Any, Final
from urllib.parse import quote, quote_plus, unquote_plus

REDACTED: Final = "[REDACTED]"
SENSITIVE_HEADERS: Final = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}
)
SENSITIVE_QUERY: Final = frozenset(
    {
        "access_token",
        "refresh_token",
        "id_token",
        "code",
        "client_secret",
        "client_assertion",
        "assertion",
        "password",
        "token",
        "api_key",
        "apikey",
        "key",
        "secret",
        "signature",
        "sig",
        "api-key",
        "x-api-key",
        "jwt",
        "auth",
        "authorization",
        "session",
        "sessionid",
        "private_key",
    }
)
_QUERY_SEPARATOR: Final = re.compile(r"([&;])")  # `;` too: some servers split on it
_TOKEN_CHARS = r"A-Za-z0-9\-._~+/="
_TOKEN_RUN = re.compile(rf"[{_TOKEN_CHARS}]{{8,}}")
_TOKEN_SHAPED = re.compile(rf"[{_TOKEN_CHARS}]+")
_UNRESERVED_RUN = re.compile(r"[A-Za-z0-9\-._~]{8,}")
_EDGE: Final = ".-_~+/="
_MIN_SECRET_LEN: Final = 6
_SCRUB_CACHE_MAX: Final = 10_000


def redact_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {k: (REDACTED if k.lower() in SENSITIVE_HEADERS else v) for k, v in headers}


def redact_query(path_qs: str) -> str:
    """`/x?code=abc&y=1` -> `/x?code=[REDACTED]&y=1`: the value of every sensitive parameter
    (its name compared decoded and case-blind; `&` and `;` both separate), the rest as sent."""
    path, sep, query = path_qs.partition("?")
    if not sep:
        return path_qs
    parts = _QUERY_SEPARATOR.split(query)
    changed = False
    for i in range(0, len(parts), 2):  # odd indexes hold the separators
        name, eq, _ = parts[i].partition("=")
        if eq and unquote_plus(name).strip().lower() in SENSITIVE_QUERY:
            parts[i] = f"{name}={REDACTED}"
            changed = True
    return f"{path}?{''.join(parts)}" if changed else path_qs


class Scrubber(logging.Filter):
    """Replaces every known secret value in a record with `[REDACTED]`.

    `static` secrets (client secrets, admin token, key material) are few and may hold any
    character: matched by substring, also in their percent-encoded forms (a form body or a URL
    a library prints). Run-time tokens are many: matched as whole token-shaped runs against a
    bounded set, so the cost per record does not grow with the number of tokens; the rare token
    with other characters is kept apart and matched by substring.
    """

    def __init__(self, max_tokens: int = 200_000) -> None:
        super().__init__()
        self._static: tuple[str, ...] = ()
        self._static_sources: list[Callable[[], Iterable[str]]] = []
        self._tokens: OrderedDict[str, None] = OrderedDict()
        self._odd_tokens: OrderedDict[str, None] = OrderedDict()
        self._max_tokens = max_tokens
        # scrub() results for texts that repeat (access-line paths, route names), tagged with
        # the generation of the secrets they were computed against: any new secret bumps it.
        self._generation = 0
        self._cache: dict[str, tuple[int, str]] = {}

    def add_static_source(self, source: Callable[[], Iterable[str]]) -> None:
        """A callable returning current static secrets (re-read by `refresh_static`)."""
        self._static_sources.append(source)
        self.refresh_static()

    def refresh_static(self) -> None:
        values: set[str] = set()
        for source in self._static_sources:
            try:
                values.update(v for v in source() if len(v) >= _MIN_SECRET_LEN)
            except Exception:  # noqa: S112 - an unreadable secret must not stop logging
                continue
        for v in list(values):
            # PEM blocks: also scrub each base64 line, since a library may print one.
            if "-----BEGIN" in v:
                values.update(line.strip() for line in v.splitlines() if len(line.strip()) >= 16)
            # As a form body or URL query carries it (client_secret_post, a logged request).
            values.update((quote(v, safe=""), quote_plus(v)))
        # Longest first, so a secret that contains another is replaced whole.
        self._static = tuple(sorted(values, key=len, reverse=True))
        self._generation += 1

    def add_token(self, value: str) -> None:
        """Register a token obtained at run time (access or refresh token)."""
        if len(value) < _MIN_SECRET_LEN:
            return
        encoded = quote(value, safe="")
        # A token with reserved characters also appears percent-encoded (form bodies).
        for v in (value, encoded) if encoded != value else (value,):
            bucket = self._tokens if _TOKEN_SHAPED.fullmatch(v) else self._odd_tokens
            if v not in bucket:  # a known one (a refresh token used again) changes no result
                bucket[v] = None
                self._generation += 1
            bucket.move_to_end(v)
            while len(bucket) > self._max_tokens:
                bucket.popitem(last=False)

    @property
    def generation(self) -> int:
        """Bumped whenever a secret is added: results computed before then may be stale."""
        return self._generation

    def scrub_cached(self, text: str) -> str:
        """`scrub(text)`, remembered for texts seen before while no secret was added since."""
        generation = self._generation
        hit = self._cache.get(text)
        if hit is not None and hit[0] == generation:
            return hit[1]
        out = self.scrub(text)
        if len(self._cache) >= _SCRUB_CACHE_MAX:
            self._cache.clear()
        self._cache[text] = (generation, out)  # computed against `generation` or later secrets
        return out

    def scrub(self, text: str) -> str:
        for secret in self._static:
            if secret in text:
                text = text.replace(secret, REDACTED)
        # tuple(): a snapshot, as other threads may log while the event loop adds tokens.
        for odd in tuple(self._odd_tokens):
            if odd in text:
                text = text.replace(odd, REDACTED)
        if self._tokens:
            tokens = self._tokens

            def piece(m: re.Match[str]) -> str:
                run = m.group(0)
                if run in tokens:
                    return REDACTED
                core = _trimmed_token(run, tokens)
                return run if core is None else run.replace(core, REDACTED)

            def sub(m: re.Match[str]) -> str:
                run = m.group(0)
                if run in tokens:
                    return REDACTED
                core = _trimmed_token(run, tokens)
                if core is not None:
                    return run.replace(core, REDACTED)
                # `refresh_token=tok`, `a/tok`: try the unreserved pieces of the run.
                return _UNRESERVED_RUN.sub(piece, run)

            text = _TOKEN_RUN.sub(sub, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # A bad format string would make logging print the raw args to stderr
            # (Handler.handleError); merge them here instead, and scrub the result.
            message = f"{record.msg} {record.args!r}"
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg = self.scrub(message)
        record.args = None
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        record.exc_info = None
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        fields = getattr(record, "fields", None)
        if fields:
            record.fields = {k: self._scrub_value(v) for k, v in fields.items()}
        return True

    def _scrub_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, Mapping):
            return {k: self._scrub_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._scrub_value(v) for v in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        # Anything else is written with str() by the formatter: scrub that text.
        return self.scrub(str(value))


def _trimmed_token(run: str, tokens: Mapping[str, None]) -> str | None:
    """A known token inside `run` once up to 3 edge characters (`.`, `-`, `=`...) are cut from
    either end: `tok.` at the end of a sentence. Tokens may end in such characters themselves,
    hence every cut is tried, not only the longest."""
    n = len(run)
    for i in range(4):
        if i and run[i - 1] not in _EDGE:
            break
        for j in range(4):
            if j and run[n - j] not in _EDGE:
                break
            if (i or j) and n - i - j >= _MIN_SECRET_LEN and run[i : n - j] in tokens:
                return run[i : n - j]
    return None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        out: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None) or "log",
        }
        msg = record.getMessage()
        if msg:
            out["message"] = msg
        out.update(fields)
        if record.exc_text:
            out["exception"] = record.exc_text
        if out["event"] == "log":
            out["logger"] = record.name
        return json.dumps(out, default=str, separators=(",", ":"))


_iso_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def _iso(ts: float) -> str:
    second = int(ts)
    if _iso_second[0] != second:
        _iso_second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_iso_second[1]}.{int(ts % 1 * 1000):03d}Z"


def event(logger: logging.Logger, level: int, name: str, message: str = "", **fields: Any) -> None:
    """Log an event line: `event(log, logging.INFO, "token", credential="x", outcome="success")`."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"event": name, "fields": fields})


_SCRUBBER = Scrubber()


def scrubber() -> Scrubber:
    """The process-wide scrubber: the token engine registers tokens here as it obtains them."""
    return _SCRUBBER


class _ScrubbingQueueHandler(logging.handlers.QueueHandler):
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The scrubber already merged message and args; keep the record as is for the formatter
        # on the writer thread (QueueHandler.prepare would format it with the default formatter).
        return record


_REQUEST_USERINFO: Final = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*://)?)[^/?#@\s]*@")


def loggable_target(raw_target: str) -> str:
    """A request-target for the access log: query secrets and any userinfo redacted (a refused
    `http://user:password@host/` must not leave its password in the log)."""
    if "@" in raw_target:
        raw_target = _REQUEST_USERINFO.sub(r"\1[REDACTED]@", raw_target, count=1)
    return redact_query(raw_target)


class _Access(tuple[float, str | None, str, str, int, float, str, bool, str | None]):
    """One access line as the event loop hands it over: (time, route, method, raw target,
    status, seconds, request id, whether we generated that id, credential). Redacted, scrubbed
    and formatted on the writer thread, so the loop pays for a tuple and a queue put, not a
    LogRecord and a regex pass."""

    __slots__ = ()


def _json_str(value: str | None, scrub: Callable[[str], str] | None) -> str:
    if value is None:
        return "null"
    return _encode_json_str(scrub(value) if scrub is not None else value)


_STOP: Final = object()


class _Writer:
    """The thread that writes every log line: `LogRecord`s (already scrubbed by the handler's
    filter) and access lines (scrubbed here). It wakes on the first queued item, lets a short
    burst gather, then writes the whole batch with one write and one flush."""

    # Each wake takes the GIL from the event loop: 50 ms batches mean ~20 wakes a second under
    # load, and a batch (~300 lines at 6,000 req/s) formats in about 1 ms.
    GATHER_SECONDS: Final = 0.05
    MAX_BATCH: Final = 4096

    def __init__(self, q: queue.SimpleQueue[Any], stream: IO[str]) -> None:
        self._queue = q
        self._stream = stream
        self._formatter = JsonFormatter()
        self._parts: dict[tuple[str | None, str, str, str | None], tuple[int, str, str]] = {}
        self._thread = threading.Thread(target=self._run, name="authproxy-log-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        q = self._queue
        while True:
            batch = [q.get()]
            if batch[0] is not _STOP:
                time.sleep(self.GATHER_SECONDS)
            try:
                while len(batch) < self.MAX_BATCH:
                    batch.append(q.get_nowait())
            except queue.Empty:
                pass
            lines = []
            stop = False
            for item in batch:
                if item is _STOP:
                    stop = True
                    continue
                try:
                    lines.append(self._line(item))
                except Exception:  # noqa: S112 - one unformattable record must not stop logging
                    continue
            if lines:
                try:
                    self._stream.write("".join(lines))
                    self._stream.flush()
                except (OSError, ValueError):
                    pass  # stderr closed or full: nothing better to do with a log line
            if stop:
                return

    def _line(self, item: Any) -> str:
        if isinstance(item, _Access):
            created, route, method, target, status, seconds, request_id, generated, credential = (
                item
            )
            head, tail = self._access_parts(route, method, target, credential)
            # What json.dumps(..., separators=(",", ":")) writes for these fields, built directly.
            return (
                f'{{"ts":"{_iso(created)}",{head}{int(status)},'
                f'"duration_ms":{round(seconds * 1000, 2)!r},'
                f'"request_id":{_json_str(request_id, None if generated else _SCRUBBER.scrub)}'
                f"{tail}"
            )
        return self._formatter.format(item) + "\n"

    def _access_parts(
        self, route: str | None, method: str, target: str, credential: str | None
    ) -> tuple[str, str]:
        """The redacted, scrubbed text around an access line's per-request fields. Requests
        repeat routes, methods and paths, so it is built once per such combination and kept
        until the next secret is registered (which could change what must be scrubbed)."""
        key = (route, method, target, credential)
        generation = _SCRUBBER.generation
        hit = self._parts.get(key)
        if hit is not None and hit[0] == generation:
            return hit[1], hit[2]
        scrub = _SCRUBBER.scrub_cached
        head = (
            f'"level":"info","event":"access","route":{_json_str(route, scrub)},'
            f'"method":{_json_str(method, scrub)},'
            f'"path":{_json_str(loggable_target(target), scrub)},"status":'
        )
        tail = f',"credential":{_json_str(credential, scrub)}}}\n'
        if len(self._parts) >= _SCRUB_CACHE_MAX:
            self._parts.clear()
        self._parts[key] = (generation, head, tail)
        return head, tail


_ACCESS_LOG: Final = logging.getLogger("authproxy.access")
_queue: queue.SimpleQueue[Any] | None = None
_writer: _Writer | None = None


def access(
    route: str | None,
    method: str,
    target: str,
    status: int,
    seconds: float,
    request_id: str,
    credential: str | None,
    *,
    generated_id: bool = False,
) -> None:
    """The access line of one request (SPEC section 7): `target` is the raw request-target;
    its query secrets and userinfo are redacted and the line scrubbed off the event loop
    (`generated_id`: the request id is ours, random hex, so it is not scrubbed).

    Honours the `authproxy.access` logger's level; without `setup_logging` (a library user,
    some tests) the line goes through the logging module as any other record."""
    if not _ACCESS_LOG.isEnabledFor(logging.INFO):
        return
    q = _queue
    if q is not None:
        q.put(
            _Access(
                (
                    time.time(),
                    route,
                    method,
                    target,
                    status,
                    seconds,
                    request_id,
                    generated_id,
                    credential,
                )
            )
        )
        return
    _ACCESS_LOG.info(
        "",
        extra={
            "event": "access",
            "fields": {
                "route": route,
                "method": method,
                "path": loggable_target(target),
                "status": status,
                "duration_ms": round(seconds * 1000, 2),
                "request_id": request_id,
                "credential": credential,
            },
        },
    )


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    """An uncaught exception becomes one scrubbed JSON line, not a raw traceback on stderr."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    shutdown_logging()  # flush what is queued first, so lines stay in order
    record = logging.getLogger("authproxy").makeRecord(
        "authproxy", logging.CRITICAL, "", 0, "uncaught exception", (), (exc_type, exc, tb)
    )
    record.event = "crash"
    _SCRUBBER.filter(record)
    sys.stderr.write(JsonFormatter().format(record) + "\n")
    sys.stderr.flush()


def setup_logging(level: str = "info", stream: IO[str] | None = None) -> None:
    """Route every logger (ours and libraries') through the scrubber to JSON lines on stderr."""
    global _queue, _writer
    shutdown_logging()
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    q: queue.SimpleQueue[Any] = queue.SimpleQueue()
    qh = _ScrubbingQueueHandler(q)
    qh.addFilter(_SCRUBBER)
    _writer = _Writer(q, stream or sys.stderr)
    _writer.start()
    _queue = q
    root.addHandler(qh)
    root.setLevel(level.upper())
    # aiohttp's own access log duplicates ours and has no redaction.
    logging.getLogger("aiohttp.access").disabled = True
    sys.excepthook = _log_uncaught


def shutdown_logging() -> None:
    """Flush queued records (call before exit)."""
    global _queue, _writer
    _queue = None
    if _writer is not None:
        _writer.stop()
        _writer = None
