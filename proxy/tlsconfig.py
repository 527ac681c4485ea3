"""SSL contexts for outbound identities, checked up front and rebuilt when their files change.

- `build_context(tls)` makes a verifying client context: the system's CAs, or only `tls.ca`
  when given; TLS 1.2 or newer; the client certificate chain when `tls.cert` is set.
- `ReloadingContext` remembers the files a context was built from; when one changes, `reload()`
  builds a new context, so the caller can send new connections through it while connections in
  flight finish on the old one. A half-written rotation (new certificate, old key) fails to load
  and the old context stays until the next check.
- `check_tls_files(config)` is what `authproxy check` and start run: every problem is one line,
  "field.path: what is wrong with which file, and the fix", never a traceback. It also probes,
  with a short handshake, the endpoints of identities that set their own trust (`tls.ca` /
  `tls.server_name`), so a wrong CA is reported before the first request fails.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from yarl import URL

from proxy.config import Config, SecretRef, TlsConfig

MIN_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
PROBE_TIMEOUT: Final = 3.0
EXPIRY_WARNING_SECONDS: Final = 14 * 86400


class TlsError(Exception):
    """A TLS file is unusable; the message names the file and the fix (never a key or secret)."""


# -- reading files -----------------------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsError(f"cannot read {what} {path}: file not found") from None
    except IsADirectoryError:
        raise TlsError(f"cannot read {what} {path}: it is a directory, not a file") from None
    except PermissionError:
        raise TlsError(f"cannot read {what} {path}: permission denied") from None
    except OSError as exc:
        raise TlsError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def load_certificates(path: Path, what: str = "certificate") -> list[x509.Certificate]:
    """Every PEM certificate in `path` (in order); `TlsError` when there is none."""
    data = _read(path, what)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        hint = " (it holds a private key)" if b"PRIVATE KEY-----" in data else ""
        raise TlsError(f"{what} {path} holds no PEM certificate{hint}")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsError(f"{what} {path} is not a valid PEM certificate") from None


def _password(ref: SecretRef | None, field: str) -> bytes | None:
    if ref is None:
        return None
    try:
        return ref.resolve().reveal().encode()
    except (OSError, KeyError) as exc:
        raise TlsError(f"cannot read {field} ({ref.describe()}): {exc}") from None


def load_private_key(path: Path, password: SecretRef | None, what: str = "key") -> PrivateKeyTypes:
    """The PEM private key in `path`, decrypted with `password` when it is encrypted."""
    return parse_private_key(_read(path, what), str(path), password, what)


def parse_private_key(
    data: bytes,
    path: str,
    password: SecretRef | None,
    what: str = "key",
    field_name: str = "key_password",
) -> PrivateKeyTypes:
    """Parse a PEM private key; `path` only names it in errors, `field_name` is the config
    key that holds its passphrase (`key_password` in `tls`, `private_key_password` for JWT)."""
    if b"PRIVATE KEY-----" not in data:
        raise TlsError(f"{what} {path} holds no PEM private key")
    secret = _password(password, field_name)
    try:
        return serialization.load_pem_private_key(data, password=secret)
    except TypeError:
        if secret is None:
            raise TlsError(
                f"{what} {path} is encrypted: give its passphrase as {field_name} "
                "({env: NAME} or {file: PATH})"
            ) from None
        # A password for a key that is not encrypted: harmless, load it without.
        try:
            return serialization.load_pem_private_key(data, password=None)
        except (TypeError, ValueError):
            raise TlsError(f"{what} {path} is not a valid PEM private key") from None
    except ValueError:
        if secret is not None and b"ENCRYPTED" in data:
            raise TlsError(f"{field_name} does not decrypt {what} {path}") from None
        raise TlsError(f"{what} {path} is not a valid PEM private key") from None
    except UnsupportedAlgorithm:
        raise TlsError(f"{what} {path} is not a supported kind of private key") from None


def _public_der(key: object) -> bytes | None:
    if isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return None


def _when(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def certificate_not_after(path: Path) -> float:
    """The client certificate's notAfter as a unix timestamp (first certificate in the PEM)."""
    return load_certificates(path)[0].not_valid_after_utc.timestamp()


# -- contexts ----------------------------------------------------------------------------------


def load_client_chain(ctx: ssl.SSLContext, tls: TlsConfig) -> None:
    """Load `tls.cert` / `tls.key` into `ctx`, translating OpenSSL's errors into `TlsError`."""
    if tls.cert is None:
        return
    key = tls.key or tls.cert
    # Read and parse first: OpenSSL's own errors name neither the file nor the cause.
    _read(tls.cert, "certificate")
    load_private_key(key, tls.key_password)
    password = _password(tls.key_password, "key_password")
    try:
        # A callable password: OpenSSL never prompts on the terminal for an encrypted key.
        ctx.load_cert_chain(tls.cert, tls.key, password=lambda: password or b"")
    except FileNotFoundError as exc:
        raise TlsError(f"cannot read {exc.filename or tls.cert}: file not found") from None
    except PermissionError as exc:
        raise TlsError(f"cannot read {exc.filename or tls.cert}: permission denied") from None
    except IsADirectoryError as exc:
        raise TlsError(f"cannot read {exc.filename or tls.cert}: it is a directory") from None
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).upper()
        if "KEY_VALUES_MISMATCH" in reason:
            raise TlsError(f"key {key} does not match certificate {tls.cert}") from None
        if "BAD_DECRYPT" in reason or "BAD PASSWORD" in reason:
            if password is None:
                raise TlsError(
                    f"key {key} is encrypted: give its passphrase as key_password"
                ) from None
            raise TlsError(f"key_password does not decrypt key {key}") from None
        raise TlsError(
            f"cannot load certificate {tls.cert} with key {key}: {exc.reason or exc}"
            " (PEM expected; an encrypted key needs key_password)"
        ) from None


def build_context(tls: TlsConfig | None) -> ssl.SSLContext:
    """A verifying client context: system CAs (or only `ca`), TLS >= min_version, client cert."""
    if tls is None:
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if tls.ca is not None:
        _read(tls.ca, "CA bundle")
        try:
            # With a cafile, create_default_context trusts that bundle only, not the system's.
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(
                f"cannot load CA bundle {tls.ca}: {getattr(exc, 'reason', None) or exc}"
                " (PEM certificates expected)"
            ) from None
    else:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = MIN_VERSIONS.get(tls.min_version, ssl.TLSVersion.TLSv1_2)
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    load_client_chain(ctx, tls)
    return ctx


def watched_files(tls: TlsConfig | None) -> list[Path]:
    """The files a context depends on (a file key_password included)."""
    if tls is None:
        return []
    files = [p for p in (tls.cert, tls.key, tls.ca) if p is not None]
    if tls.key_password is not None and tls.key_password.source == "file":
        files.append(Path(tls.key_password.name))
    return files


def _stamp(paths: list[Path]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append((0, 0, 0))
    return tuple(out)


def _valid_now(cert_path: Path) -> None:
    leaf = load_certificates(cert_path)[0]
    now = time.time()
    if leaf.not_valid_after_utc.timestamp() <= now:
        raise TlsError(f"certificate {cert_path} expired on {_when(leaf.not_valid_after_utc)}")
    if leaf.not_valid_before_utc.timestamp() > now:
        raise TlsError(
            f"certificate {cert_path} is not valid before {_when(leaf.not_valid_before_utc)}"
        )


@dataclass(slots=True)
class ReloadingContext:
    """An SSLContext plus the stamps (mtime, size, inode) of the files it was built from."""

    tls: TlsConfig | None
    context: ssl.SSLContext = field(init=False)
    generation: int = field(init=False, default=0)
    _stamp: tuple[tuple[int, int, int], ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        self._stamp = _stamp(watched_files(self.tls))
        self.context = build_context(self.tls)

    def __repr__(self) -> str:
        cert = self.tls.cert if self.tls is not None else None
        return f"<ReloadingContext cert={cert} generation={self.generation}>"

    def changed(self) -> bool:
        return self.tls is not None and _stamp(watched_files(self.tls)) != self._stamp

    def reload(self) -> ssl.SSLContext | None:
        """A new context if a file changed since the last load, else None.

        The stamp is taken before the files are read: a change landing while we read is seen
        again on the next check. A load that fails (a rotation half done: new certificate, old
        key) raises `TlsError` and keeps the current context and stamp, so the next check
        retries."""
        if self.tls is None:
            return None
        stamp = _stamp(watched_files(self.tls))
        if stamp == self._stamp:
            return None
        if self.tls.cert is not None:
            # Never swap a working certificate for one the server will refuse.
            _valid_now(self.tls.cert)
        context = build_context(self.tls)
        self.context = context
        self._stamp = stamp
        self.generation += 1
        return context


# -- checking ----------------------------------------------------------------------------------


Problem = tuple[str, str]
"""(field inside the `tls` block, message)."""


def _check_client_cert(tls: TlsConfig, now: float) -> list[Problem]:
    assert tls.cert is not None
    problems: list[Problem] = []
    try:
        leaf = load_certificates(tls.cert)[0]
    except TlsError as exc:
        return [("cert", str(exc))]
    if leaf.not_valid_after_utc.timestamp() <= now:
        problems.append(
            (
                "cert",
                f"certificate {tls.cert} expired on {_when(leaf.not_valid_after_utc)}; "
                "install a renewed certificate",
            )
        )
    elif leaf.not_valid_before_utc.timestamp() > now:
        problems.append(
            (
                "cert",
                f"certificate {tls.cert} is not valid before "
                f"{_when(leaf.not_valid_before_utc)} (check the clock or the certificate)",
            )
        )
    key_path = tls.key or tls.cert
    try:
        key = load_private_key(key_path, tls.key_password)
    except TlsError as exc:
        return [*problems, ("key" if tls.key else "cert", str(exc))]
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        problems.append(
            (
                "key" if tls.key else "cert",
                f"key {key_path} does not match certificate {tls.cert} "
                "(install the key this certificate was issued for)",
            )
        )
    return problems


def _check_ca(ca: Path, now: float) -> list[Problem]:
    try:
        certs = load_certificates(ca, "CA bundle")
    except TlsError as exc:
        return [("ca", str(exc))]
    problems: list[Problem] = []
    for i, cert in enumerate(certs):
        which = f"certificate {i + 1} of CA bundle {ca}" if len(certs) > 1 else f"CA bundle {ca}"
        try:
            ca_flag = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca_flag = cert.issuer == cert.subject  # an old self-signed root may lack it
        if not ca_flag:
            problems.append(
                (
                    "ca",
                    f"{which} is not a CA certificate (it is a server or client certificate); "
                    "give the CA that issued the server's certificate",
                )
            )
        elif cert.not_valid_after_utc.timestamp() <= now:
            problems.append(("ca", f"{which} expired on {_when(cert.not_valid_after_utc)}"))
    return problems


def check_identity(tls: TlsConfig, now: float | None = None) -> list[Problem]:
    """Problems with one TLS identity: (field inside its `tls` block, message)."""
    now = time.time() if now is None else now
    problems: list[Problem] = []
    if tls.cert is not None:
        problems += _check_client_cert(tls, now)
    if tls.ca is not None:
        problems += _check_ca(tls.ca, now)
    if not problems:
        # Whatever cryptography accepted, OpenSSL must accept too.
        try:
            build_context(tls)
        except TlsError as exc:
            problems.append(("cert" if tls.cert else "ca", str(exc)))
    return problems


def check_private_key(
    ref: SecretRef, alg: str | None, password: SecretRef | None = None
) -> str | None:
    """A problem with a `private_key_jwt` signing key, or None."""
    path = ref.name if ref.source == "file" else ref.describe()
    try:
        data = ref.resolve().reveal().encode()
        key = parse_private_key(data, path, password, "private key", "private_key_password")
    except (OSError, KeyError) as exc:
        return f"cannot read private key ({ref.describe()}): {exc}"
    except TlsError as exc:
        return str(exc)
    if alg in ("RS256", "PS256") and not isinstance(key, rsa.RSAPrivateKey):
        return f"private key {path} is not an RSA key, as {alg} needs"
    if alg == "ES256" and not (
        isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    ):
        return f"private key {path} is not an EC P-256 key, as ES256 needs"
    if alg is None and not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        return f"private key {path} is neither RSA nor EC P-256 (RS256, PS256 or ES256)"
    return None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One place a TLS identity is used: the field path of its `tls` block and the URL."""

    path: str
    url: URL
    tls: TlsConfig


def endpoints(config: Config) -> Iterator[Endpoint]:
    for name, cred in config.credentials.items():
        if cred.tls is not None:
            yield Endpoint(f"credentials.{name}.tls", cred.token_url, cred.tls)
    for i, route in enumerate(config.routes):
        if route.tls is not None:
            yield Endpoint(f"routes[{i}].tls", route.upstream, route.tls)


def probe(ep: Endpoint, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Handshake with `ep`; a problem when the server fails *our* verification, else None.

    Only verification failures count: an endpoint that is down or slow is not a configuration
    problem (it may be down only from here, or only now)."""
    if ep.url.scheme != "https" or ep.url.host is None or ep.tls.insecure_skip_verify:
        return None
    try:
        ctx = build_context(ep.tls)
    except TlsError:
        return None  # reported by check_identity
    host = ep.tls.server_name or ep.url.host
    try:
        with (
            socket.create_connection((ep.url.host, ep.url.port or 443), timeout=timeout) as sock,
            ctx.wrap_socket(sock, server_hostname=host),
        ):
            return None
    except ssl.SSLCertVerificationError as exc:
        trust = f"CA bundle {ep.tls.ca}" if ep.tls.ca else "the system's CAs"
        where = f"{ep.url.host}:{ep.url.port}" + (
            f" (as {ep.tls.server_name})" if ep.tls.server_name else ""
        )
        return (
            f"{ep.path}.ca: the server at {where} presented a certificate that {trust} does "
            f"not verify ({exc.verify_message}); set ca to the CA that issued that certificate"
        )
    except (OSError, ssl.SSLError):
        return None


def check_tls_files(config: Config, *, probe_endpoints: bool = True) -> list[str]:
    """Check every TLS identity and signing key; problems worded with their field path.

    With `probe_endpoints`, identities that set `ca` or `server_name` are also tried with a
    short TLS handshake (in parallel, `PROBE_TIMEOUT` each) to catch a wrong CA."""
    now = time.time()
    problems: list[str] = []
    to_probe: list[Endpoint] = []
    for ep in endpoints(config):
        found = check_identity(ep.tls, now)
        problems += [f"{ep.path}.{fld}: {message}" for fld, message in found]
        if not found and (ep.tls.ca is not None or ep.tls.server_name is not None):
            to_probe.append(ep)
    for name, cred in config.credentials.items():
        if cred.auth_method == "private_key_jwt" and cred.private_key is not None:
            password: SecretRef | None = getattr(cred, "private_key_password", None)
            problem = check_private_key(cred.private_key, cred.private_key_alg, password)
            if problem:
                problems.append(f"credentials.{name}.private_key: {problem}")
    if probe_endpoints and to_probe:
        with ThreadPoolExecutor(max_workers=min(8, len(to_probe))) as pool:
            problems += [p for p in pool.map(probe, to_probe) if p]
    return problems
