"""The composition root: builds every part from a `Config`, serves both ports, reloads on
SIGHUP, drains on SIGTERM. The only module that constructs concrete classes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from proxy.admin import admin_app
from proxy.chains import ClientCredentialsSource, RefreshChainSource
from proxy.config import Config, CredentialConfig, load_config
from proxy.errors import ConfigError, StoreError
from proxy.logs import event, scrubber
from proxy.metrics import Metrics
from proxy.models import ChainKey, ChainRecord, CredentialState, Secret, rfc3339
from proxy.oauth import TokenEndpoint
from proxy.pipeline import Pipeline
from proxy.routing import Router
from proxy.server import ProxyHandler
from proxy.store import ChainStore
from proxy.store_metrics import InstrumentedStore
from proxy.stores import open_store
from proxy.tasks import TaskOwner
from proxy.tlsconfig import TlsError, certificate_not_after, check_tls_files
from proxy.tokens import TokenCache, TokenSource

log = logging.getLogger("authproxy.runtime")

MAINTENANCE_INTERVAL: Final = 5.0
CERT_WARN_SECONDS: Final = 14 * 86400


@dataclass(slots=True)
class Engine:
    """What one configuration builds: token sources, cache, router, pipeline."""

    config: Config
    endpoints: dict[str, TokenEndpoint]
    chains: dict[str, RefreshChainSource]
    tokens: TokenCache
    pipeline: Pipeline

    async def aclose(self) -> None:
        await self.tokens.aclose()


class Runtime:
    """A running authproxy process (or one worker of it)."""

    def __init__(self, config: Config, *, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = Metrics(registry)
        # Every store call is timed (authproxy_store_operation_duration_seconds).
        self.store: ChainStore = InstrumentedStore(open_store(config.store), self.metrics)
        from proxy.transport import SessionPool

        self.sessions = SessionPool()
        self.engine = self._build(config)
        self.handler = ProxyHandler(
            self.engine.pipeline,
            proxy_users=self._proxy_users,
            tunnel_allow=lambda: self.config.tunnel_allow,
            tunnel_idle_timeout=config.tunnel_idle_timeout,
        )
        self._owner = TaskOwner("runtime")
        self._runners: list[web.BaseRunner] = []
        self._stopping = asyncio.Event()
        self.proxy_port: int | None = None
        self._cert_warned: set[tuple[str, float]] = set()
        self._users: dict[str, str] = self._read_proxy_users()
        self.admin_port: int | None = None
        self._register_secrets()

    def __repr__(self) -> str:
        return f"<Runtime store={self.store!r} {self.handler!r}>"

    # -- building -----------------------------------------------------------------------

    def _build(self, config: Config, previous: Engine | None = None) -> Engine:
        endpoints: dict[str, TokenEndpoint] = {}
        sources: dict[str, TokenSource] = {}
        chains: dict[str, RefreshChainSource] = {}
        for name, cred in config.credentials.items():
            endpoint = TokenEndpoint(cred, self._session_factory(cred), self.metrics)
            endpoints[name] = endpoint
            if cred.grant == "refresh_token":
                chain = RefreshChainSource(endpoint, self.store, self.metrics)
                chains[name] = chain
                sources[name] = chain
            else:
                sources[name] = ClientCredentialsSource(endpoint, self.store)
        tokens = TokenCache(sources, self.metrics)
        if previous is not None:
            unchanged = {
                n for n, c in config.credentials.items() if previous.config.credentials.get(n) == c
            }
            tokens.adopt(previous.tokens, unchanged)
        pipeline = Pipeline(
            Router(config.routes), tokens, self.sessions, config.credentials, self.metrics
        )
        return Engine(config, endpoints, chains, tokens, pipeline)

    def _session_factory(self, cred: CredentialConfig) -> Any:
        return lambda: self.sessions.session_for(cred.tls)

    def _register_secrets(self) -> None:
        refs = self.config.secret_refs()

        def values() -> list[str]:
            out = []
            for ref in refs:
                try:
                    out.append(ref.resolve().reveal())
                except (OSError, KeyError):
                    continue
            return out

        scrubber().add_static_source(values)

    def _proxy_users(self) -> dict[str, str]:
        """The callers' passwords, as last read (no file I/O on the request path)."""
        return self._users

    def _read_proxy_users(self) -> dict[str, str]:
        users = {}
        for user, ref in self.config.proxy_auth.items():
            try:
                users[user] = ref.resolve().reveal()
            except (OSError, KeyError):
                continue  # an unreadable password lets nobody in as that user
        return users

    def admin_token(self) -> str | None:
        ref = self.config.admin_token
        if ref is None:
            return None
        try:
            return ref.resolve().reveal()
        except (OSError, KeyError):
            # Unreadable admin token: refuse everything rather than open the admin API.
            return os.urandom(32).hex()

    # -- serving ------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind both ports and start background maintenance."""
        for warning in self.config.warnings:
            event(log, logging.WARNING, "config", warning)
        cfg = self.config
        reuse = cfg.workers > 1
        proxy_runner = web.ServerRunner(
            web.Server(self.handler, access_log=None),
            shutdown_timeout=cfg.shutdown_grace,
            handle_signals=False,
        )
        await proxy_runner.setup()
        self._runners.append(proxy_runner)
        site = web.TCPSite(
            proxy_runner,
            cfg.proxy_listen.host,
            cfg.proxy_listen.port,
            reuse_port=reuse or None,
            backlog=1024,
        )
        await site.start()
        self.proxy_port = _bound_port(proxy_runner)
        admin_runner = web.AppRunner(admin_app(self), access_log=None, handle_signals=False)
        await admin_runner.setup()
        self._runners.append(admin_runner)
        admin_site = web.TCPSite(
            admin_runner, cfg.admin_listen.host, cfg.admin_listen.port, reuse_port=reuse or None
        )
        await admin_site.start()
        self.admin_port = _bound_port(admin_runner)
        _ = self._owner.spawn(self._maintenance(), name="maintenance")
        self._update_cert_metrics()
        await self._sync_chain_states()
        event(
            log,
            logging.INFO,
            "start",
            "authproxy is serving",
            proxy=f"{cfg.proxy_listen.host}:{self.proxy_port}",
            admin=f"{cfg.admin_listen.host}:{self.admin_port}",
            routes=len(cfg.routes),
            credentials=len(cfg.credentials),
            store=cfg.store.kind,
            pid=os.getpid(),
        )

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        await self._stopping.wait()
        event(
            log,
            logging.INFO,
            "stop",
            "draining in-flight requests",
            in_flight=self.handler.in_flight,
            grace_seconds=self.config.shutdown_grace,
        )

    def stop(self) -> None:
        self._stopping.set()

    def _on_sighup(self) -> None:
        _ = self._owner.spawn(self.reload_from_file(), name="reload")

    async def reload_from_file(self) -> bool:
        if self.config.source is None:
            event(log, logging.WARNING, "config", "SIGHUP ignored: no config file to reload")
            return False
        new: Config | None = None
        try:
            new = await asyncio.to_thread(load_config, self.config.source)
            problems = await asyncio.to_thread(check_tls_files, new)
        except ConfigError as exc:
            problems = [str(p) for p in exc.problems]
        except Exception as exc:  # a config the validator let through and loading broke on
            problems = [f"{type(exc).__name__} while loading {self.config.source.name}: {exc}"]
        if problems or new is None:
            event(
                log,
                logging.ERROR,
                "config",
                "the new configuration is invalid; keeping the running one",
                problems=problems,
            )
            return False
        self.reload(new)
        return True

    def reload(self, new: Config) -> None:
        """Swap in a new configuration; requests in flight finish on the old pipeline."""
        if new.store != self.config.store or new.proxy_listen != self.config.proxy_listen:
            event(
                log,
                logging.WARNING,
                "config",
                "store and listen changes need a restart; they are not applied",
            )
        old = self.engine
        self.engine = self._build(new, previous=old)
        # Close the sessions of TLS identities the new configuration no longer names.
        self.sessions.prune({c.tls for c in new.credentials.values()} | {r.tls for r in new.routes})
        self.config = new
        self._users = self._read_proxy_users()
        self.handler.pipeline = self.engine.pipeline
        self.handler.tunnel_idle_timeout = new.tunnel_idle_timeout
        self._register_secrets()
        scrubber().refresh_static()
        _ = self._owner.spawn(old.aclose(), name="close old engine")
        event(
            log,
            logging.INFO,
            "config",
            "configuration reloaded",
            routes=len(new.routes),
            credentials=len(new.credentials),
        )

    async def _maintenance(self) -> None:
        """Re-read rotated certificate and secret files; refresh certificate metrics."""
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            try:
                await self._maintenance_pass()
            except Exception:  # one bad pass must not end the loop: the next one tries again
                log.exception("maintenance pass failed; trying again in %gs", MAINTENANCE_INTERVAL)

    async def _maintenance_pass(self) -> None:
        reloaded = self.sessions.reload_changed()
        for path in reloaded:
            event(log, logging.INFO, "tls", "client certificate reloaded", file=path)
        scrubber().refresh_static()
        self._users = await asyncio.to_thread(self._read_proxy_users)
        self._update_cert_metrics()
        await self.pick_up_seeds()

    async def pick_up_seeds(self) -> list[str]:
        """Chains in reauth_required that were seeded anew behind this process's back
        (`authproxy seed`, another worker's or replica's admin API) become ok, and the next
        request uses the new chain; returns their names. While a still-valid access token is
        held nothing else would look at the store before its refresh time."""
        revived: list[str] = []
        tokens = self.engine.tokens

        def needs_seed(name: str) -> bool:
            health = tokens.health.get(name)
            return health is not None and health.state is CredentialState.REAUTH_REQUIRED

        async for key, rec in self._stored_chains(needs_seed):
            if rec is not None and rec.state is CredentialState.OK:
                tokens.forget(key)
                tokens.mark_seeded(key)
                revived.append(key.credential)
        return revived

    async def _stored_chains(
        self, wanted: Callable[[str], bool] = lambda _: True
    ) -> AsyncIterator[tuple[ChainKey, ChainRecord | None]]:
        """The credential-level refresh-token chains (of `wanted` credentials) as stored; a
        store that cannot answer skips them (/readyz reports it)."""
        for name, cred in self.config.credentials.items():
            if cred.grant != "refresh_token" or cred.subject_header or not wanted(name):
                continue
            key = ChainKey(name)
            try:
                rec = await self.store.get(key)
            except StoreError:
                continue
            yield key, rec

    async def _sync_chain_states(self) -> None:
        """Unseeded or refused chains show as reauth_required from the start (metric, /admin,
        alerts), not only once a request has tried them."""
        async for key, rec in self._stored_chains():
            name = key.credential
            if rec is None:
                self.engine.tokens.note_state(
                    name,
                    CredentialState.REAUTH_REQUIRED,
                    f"no refresh token seeded (authproxy seed {name})",
                )
            elif rec.state is not CredentialState.OK:
                self.engine.tokens.note_state(name, rec.state, rec.last_error)

    def _update_cert_metrics(self) -> None:
        now = time.time()
        items: list[tuple[str, str, Any]] = [
            ("credential", n, c.tls) for n, c in self.config.credentials.items()
        ] + [("route", r.name, r.tls) for r in self.config.routes]
        for kind, name, tls in items:
            if tls is None or tls.cert is None:
                continue
            try:
                not_after = certificate_not_after(tls.cert)
            except TlsError as exc:
                event(log, logging.WARNING, "tls", str(exc), **{kind: name})
                continue
            self.metrics.tls_cert_expiry.labels(kind, name).set(not_after)
            warned = (str(tls.cert), not_after)
            if not_after - now < CERT_WARN_SECONDS and warned not in self._cert_warned:
                self._cert_warned.add(warned)  # once per certificate, not every 5 s
                event(
                    log,
                    logging.WARNING,
                    "tls",
                    "client certificate expires soon",
                    file=str(tls.cert),
                    expires_at=rfc3339(not_after),
                    **{kind: name},
                )

    async def aclose(self) -> None:
        for runner in self._runners:
            await runner.cleanup()  # stops accepting, then drains within shutdown_grace
        self._runners.clear()
        await self._owner.aclose()
        await self.engine.aclose()
        await self.sessions.aclose()
        await self.store.aclose()

    # -- admin --------------------------------------------------------------------------

    def metrics_text(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Workers: every process writes its own files; any worker reports them all.
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.metrics.registry)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {"config": True}
        try:
            await asyncio.wait_for(self.store.ping(), 2.0)
            checks["store"] = True
        except (StoreError, TimeoutError) as exc:
            checks["store"] = f"unreachable: {exc}"
        if self.config.ready_requires_tokens:
            health = self.engine.tokens.health
            missing = [
                n
                for n, h in health.items()
                if h.last_refresh_at is None and self.config.credentials[n].subject_header is None
            ]
            checks["tokens"] = (
                True if not missing else f"no token yet for {', '.join(sorted(missing))}"
            )
        return all(v is True for v in checks.values()), checks

    async def seed(self, key: ChainKey, refresh_token: Secret) -> None:
        chain = self.engine.chains.get(key.credential)
        if chain is None:
            raise KeyError(key.credential)
        await chain.seed(key, refresh_token)
        self.engine.tokens.forget(key)
        self.engine.tokens.mark_seeded(key)

    def refresh_now(self, key: ChainKey) -> bool:
        return self.engine.tokens.refresh_now(key)

    async def credential_status(self) -> list[dict[str, Any]]:
        return await credential_status(self.config.credentials, self.store, self.engine.tokens)


async def credential_status(
    credentials: Mapping[str, CredentialConfig], store: ChainStore, tokens: TokenCache | None
) -> list[dict[str, Any]]:
    """SPEC section 5's credential list, from the live cache and/or the store. Never a token."""
    out = []
    for name, cred in credentials.items():
        health = tokens.health.get(name) if tokens is not None else None
        item: dict[str, Any] = {
            "name": name,
            "grant": cred.grant,
            "state": health.state.value if health else "unknown",
            "expires_at": rfc3339(health.expires_at) if health else None,
            "last_refresh_at": rfc3339(health.last_refresh_at) if health else None,
            "last_error": health.last_error if health else None,
            "subjects": 0,
            "history": [],
            "auth_method": cred.auth_method,
        }
        if cred.tls is not None and cred.tls.insecure_skip_verify:
            item["insecure_skip_verify"] = True
        if cred.grant == "refresh_token":
            try:
                if cred.subject_header:
                    item["subjects"] = len(await store.subjects(name))
                    if item["state"] == "unknown":
                        # Per-user chains carry their own states; the credential itself is usable.
                        item["state"] = CredentialState.OK.value
                else:
                    rec = await store.get(ChainKey(name))
                    if rec is None:
                        item["state"] = CredentialState.REAUTH_REQUIRED.value
                        item["last_error"] = f"no refresh token seeded (authproxy seed {name})"
                    else:
                        if rec.state is not CredentialState.OK or item["state"] == "unknown":
                            item["state"] = rec.state.value
                        item["last_error"] = rec.last_error or item["last_error"]
                        if rec.last_refresh_at:
                            item["last_refresh_at"] = rfc3339(rec.last_refresh_at)
                        if rec.access_token and item["expires_at"] is None:
                            item["expires_at"] = rfc3339(rec.access_token.expires_at)
                        if rec.rotating_since is not None:
                            item["rotating_since"] = rfc3339(rec.rotating_since)
                    item["history"] = [e.as_dict() for e in await store.history(ChainKey(name), 10)]
            except StoreError as exc:
                item["store_error"] = str(exc)
        out.append(item)
    return out


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    raise RuntimeError("no bound address")
