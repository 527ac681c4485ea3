"""SSL contexts for outbound identities, built once and reloaded in place when files change.

`SSLContext.load_cert_chain` on a live context affects only new handshakes, so a rotated
certificate takes effect for new connections while connections in flight finish on the old one.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

from proxy.config import Config, TlsConfig

_MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsError(Exception):
    """A TLS file is unusable; the message names the file and the fix."""


def _stamp(paths: list[Path]) -> tuple[tuple[int, int], ...]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((0, 0))
    return tuple(out)


def _password(tls: TlsConfig) -> str | None:
    return tls.key_password.resolve().reveal() if tls.key_password else None


def load_client_chain(ctx: ssl.SSLContext, tls: TlsConfig) -> None:
    if tls.cert is None:
        return
    try:
        ctx.load_cert_chain(tls.cert, tls.key, password=_password(tls))
    except FileNotFoundError as exc:
        raise TlsError(f"cannot read {exc.filename or tls.cert}: file not found") from None
    except PermissionError as exc:
        raise TlsError(f"cannot read {exc.filename or tls.cert}: permission denied") from None
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in reason.upper():
            raise TlsError(
                f"key {tls.key or tls.cert} does not match certificate {tls.cert}"
            ) from None
        raise TlsError(
            f"cannot load certificate {tls.cert} / key {tls.key or tls.cert}: {reason}"
            " (PEM expected; an encrypted key needs key_password)"
        ) from None


def build_context(tls: TlsConfig | None) -> ssl.SSLContext:
    """A verifying client context: system CAs (or `ca`), TLS >= min_version, client cert."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if tls is None:
        return ctx
    ctx.minimum_version = _MIN_VERSIONS[tls.min_version]
    if tls.ca is not None:
        try:
            ctx.load_verify_locations(cafile=tls.ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(
                f"cannot load CA bundle {tls.ca}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    load_client_chain(ctx, tls)
    return ctx


def certificate_not_after(path: Path) -> float:
    """The certificate's notAfter as a unix timestamp (first certificate in the PEM)."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise TlsError(f"cannot read certificate {path}: {exc}") from None
    return cert.not_valid_after_utc.replace(tzinfo=UTC).timestamp()


@dataclass(slots=True)
class ReloadingContext:
    """An SSLContext plus the file stamps it was loaded from; `maybe_reload` re-reads changes."""

    tls: TlsConfig | None
    context: ssl.SSLContext = field(init=False)
    _stamp: tuple[tuple[int, int], ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        self.context = build_context(self.tls)
        self._stamp = _stamp(self._files())

    def _files(self) -> list[Path]:
        if self.tls is None:
            return []
        return [p for p in (self.tls.cert, self.tls.key, self.tls.ca) if p is not None]

    def maybe_reload(self) -> bool:
        """Reload the client chain (and CA) in place if a file changed; True if reloaded.

        A half-written file fails to load: the old chain stays and the error is raised, so
        the caller can log it and try again on the next check."""
        if self.tls is None:
            return False
        stamp = _stamp(self._files())
        if stamp == self._stamp:
            return False
        load_client_chain(self.context, self.tls)
        if self.tls.ca is not None:
            self.context.load_verify_locations(cafile=self.tls.ca)
        self._stamp = stamp
        return True


def check_tls_files(config: Config) -> list[str]:
    """Load every configured TLS identity once; return problems worded with their field path."""
    problems = []
    for name, cred in config.credentials.items():
        if cred.tls is not None:
            try:
                build_context(cred.tls)
            except TlsError as exc:
                problems.append(f"credentials.{name}.tls: {exc}")
    for i, route in enumerate(config.routes):
        if route.tls is not None:
            try:
                build_context(route.tls)
            except TlsError as exc:
                problems.append(f"routes[{i}].tls: {exc}")
    return problems
