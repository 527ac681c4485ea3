"""Certificates made at test time (trustme) and written to files the way an operator would."""

from __future__ import annotations

import datetime as dt
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography.hazmat.primitives import serialization

HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path
    cn: str


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def encrypt_key(leaf: trustme.LeafCert, password: bytes) -> bytes:
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )


def issue(
    ca: trustme.CA,
    directory: Path,
    cn: str,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key_type: trustme.KeyType = trustme.KeyType.ECDSA,
) -> trustme.LeafCert:
    directory.mkdir(parents=True, exist_ok=True)
    return ca.issue_cert(
        *HOSTS, common_name=cn, not_before=not_before, not_after=not_after, key_type=key_type
    )


def write_identity(
    ca: trustme.CA,
    directory: Path,
    cn: str,
    *,
    name: str = "client",
    password: bytes | None = None,
    **kwargs: object,
) -> Identity:
    """A client certificate (CN=`cn`) and its key as `name`.crt / `name`.key in `directory`."""
    leaf = issue(ca, directory, cn, **kwargs)  # type: ignore[arg-type]
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    atomic_write(cert, b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key_pem = encrypt_key(leaf, password) if password else leaf.private_key_pem.bytes()
    atomic_write(key, key_pem)
    return Identity(cert, key, cn)


def rotate_identity(ca: trustme.CA, ident: Identity, cn: str) -> Identity:
    """Replace an identity's files with a new pair (key first, then certificate), atomically."""
    leaf = issue(ca, ident.cert.parent, cn)
    atomic_write(ident.key, leaf.private_key_pem.bytes())
    atomic_write(ident.cert, b"".join(b.bytes() for b in leaf.cert_chain_pems))
    return Identity(ident.cert, ident.key, cn)


def write_ca(ca: trustme.CA, path: Path) -> Path:
    ca.cert_pem.write_to_path(str(path))
    return path


def server_context(ca: trustme.CA, *, client_certs: ssl.VerifyMode) -> ssl.SSLContext:
    """A server context for 127.0.0.1/localhost that asks for (or requires) client certs."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*HOSTS, common_name="server").configure_cert(ctx)
    ctx.verify_mode = client_certs
    ca.configure_trust(ctx)
    return ctx
