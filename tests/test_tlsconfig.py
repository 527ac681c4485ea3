"""TLS identities: contexts, reload on rotation, and checks that name the file and the fix."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxy.config import Config, SecretRef, TlsConfig, parse_config
from proxy.tlsconfig import (
    ReloadingContext,
    TlsError,
    build_context,
    certificate_not_after,
    check_identity,
    check_tls_files,
)
from tests.tls_helpers import (
    Identity,
    atomic_write,
    issue,
    rotate_identity,
    server_context,
    write_ca,
    write_identity,
)

NOW = dt.datetime.now(dt.UTC)
PASSWORD = b"correct horse battery staple"


def config_with_tls(tmp_path: Path, tls: dict[str, Any], *, upstream: str | None = None) -> Config:
    raw = {
        "store": {"kind": "memory"},
        "credentials": {
            "pay": {
                "token_url": "https://127.0.0.1:9/token",
                "client_id": "abc",
                "client_secret": {"env": "TEST_CLIENT_SECRET"},
                "tls": tls,
            }
        },
        "routes": [
            {
                "name": "pay",
                "match": {"prefix": "/pay"},
                "upstream": upstream or "https://127.0.0.1:9/v1",
                "credential": "pay",
                "tls": tls,
            }
        ],
    }
    return parse_config(raw, base_dir=tmp_path)


@pytest.fixture
def ident(ca: trustme.CA, tmp_path: Path) -> Identity:
    return write_identity(ca, tmp_path, "client-one")


def test_a_good_identity_has_no_problems(ca: trustme.CA, ident: Identity, tmp_path: Path) -> None:
    tls = TlsConfig(cert=ident.cert, key=ident.key, ca=write_ca(ca, tmp_path / "ca.pem"))
    assert check_identity(tls) == []
    ctx = build_context(tls)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    # `ca` replaces the system's trust store: only the one CA is trusted.
    assert len(ctx.get_ca_certs()) == 1


def test_without_ca_the_system_store_is_used() -> None:
    ctx = build_context(TlsConfig(min_version="1.3"))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_expired_certificate_is_named(ca: trustme.CA, tmp_path: Path) -> None:
    old = write_identity(
        ca,
        tmp_path,
        "old",
        not_before=NOW - dt.timedelta(days=30),
        not_after=NOW - dt.timedelta(days=1),
    )
    problems = check_identity(TlsConfig(cert=old.cert, key=old.key))
    assert [f for f, _ in problems] == ["cert"]
    assert str(old.cert) in problems[0][1] and "expired on" in problems[0][1]


def test_not_yet_valid_certificate_is_named(ca: trustme.CA, tmp_path: Path) -> None:
    future = write_identity(ca, tmp_path, "future", not_before=NOW + dt.timedelta(days=2))
    problems = check_identity(TlsConfig(cert=future.cert, key=future.key))
    assert len(problems) == 1 and "is not valid before" in problems[0][1]
    assert str(future.cert) in problems[0][1]


def test_key_that_does_not_match_its_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    one = write_identity(ca, tmp_path / "one", "one")
    two = write_identity(ca, tmp_path / "two", "two")
    problems = check_identity(TlsConfig(cert=one.cert, key=two.key))
    assert problems == [
        (
            "key",
            f"key {two.key} does not match certificate {one.cert} "
            "(install the key this certificate was issued for)",
        )
    ]
    with pytest.raises(TlsError, match="does not match"):
        build_context(TlsConfig(cert=one.cert, key=two.key))


def test_encrypted_key_with_its_passphrase(
    ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enc = write_identity(ca, tmp_path, "enc", password=PASSWORD)
    monkeypatch.setenv("TLS_KEY_PASSWORD", PASSWORD.decode())
    good = TlsConfig(cert=enc.cert, key=enc.key, key_password=SecretRef("env", "TLS_KEY_PASSWORD"))
    assert check_identity(good) == []
    build_context(good)

    missing = check_identity(TlsConfig(cert=enc.cert, key=enc.key))
    assert missing and missing[0][0] == "key"
    assert f"key {enc.key} is encrypted: give its passphrase as key_password" in missing[0][1]
    with pytest.raises(TlsError, match="is encrypted"):
        build_context(TlsConfig(cert=enc.cert, key=enc.key))

    monkeypatch.setenv("TLS_WRONG", "not the passphrase")
    wrong = TlsConfig(cert=enc.cert, key=enc.key, key_password=SecretRef("env", "TLS_WRONG"))
    problems = check_identity(wrong)
    assert problems == [("key", f"key_password does not decrypt key {enc.key}")]
    assert "not the passphrase" not in repr(problems)


def test_combined_pem_with_certificate_and_key(ca: trustme.CA, tmp_path: Path) -> None:
    leaf = issue(ca, tmp_path, "combined")
    both = tmp_path / "both.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(both))
    assert check_identity(TlsConfig(cert=both)) == []
    build_context(TlsConfig(cert=both))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"hello, not a certificate\n", "holds no PEM certificate"),
        ("leaf", "is not a CA certificate"),
        ("key", "holds no PEM certificate (it holds a private key)"),
    ],
)
def test_ca_bundle_that_is_not_a_ca(
    ca: trustme.CA, ident: Identity, tmp_path: Path, content: object, expected: str
) -> None:
    bundle = tmp_path / "ca.pem"
    if content == "leaf":
        bundle.write_bytes(
            ident.cert.read_bytes().split(b"-----END CERTIFICATE-----")[0]
            + (b"-----END CERTIFICATE-----\n")
        )
    elif content == "key":
        bundle.write_bytes(ident.key.read_bytes())
    else:
        assert isinstance(content, bytes)
        bundle.write_bytes(content)
    problems = check_identity(TlsConfig(ca=bundle))
    assert len(problems) == 1 and problems[0][0] == "ca"
    assert expected in problems[0][1] and str(bundle) in problems[0][1]


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_files_are_named(ident: Identity, tmp_path: Path, kind: str) -> None:
    target = tmp_path / "nowhere.key"
    if kind == "directory":
        target.mkdir()
    problems = check_identity(TlsConfig(cert=ident.cert, key=target))
    assert len(problems) == 1 and problems[0][0] == "key"
    assert f"cannot read key {target}" in problems[0][1]
    with pytest.raises(TlsError, match=str(target)):
        build_context(TlsConfig(cert=ident.cert, key=target))


def test_check_tls_files_gives_field_paths(ca: trustme.CA, tmp_path: Path) -> None:
    one = write_identity(ca, tmp_path / "one", "one")
    two = write_identity(ca, tmp_path / "two", "two")
    config = config_with_tls(tmp_path, {"cert": str(one.cert), "key": str(two.key)})
    problems = check_tls_files(config, probe_endpoints=False)
    assert problems == [
        f"credentials.pay.tls.key: key {two.key} does not match certificate {one.cert} "
        "(install the key this certificate was issued for)",
        f"routes[0].tls.key: key {two.key} does not match certificate {one.cert} "
        "(install the key this certificate was issued for)",
    ]


def test_certificate_not_after(ca: trustme.CA, tmp_path: Path) -> None:
    when = (NOW + dt.timedelta(days=10)).replace(microsecond=0)
    short = write_identity(ca, tmp_path, "short", not_after=when)
    assert certificate_not_after(short.cert) == when.timestamp()


def test_reload_builds_a_new_context_only_when_files_change(
    ca: trustme.CA, ident: Identity
) -> None:
    rc = ReloadingContext(TlsConfig(cert=ident.cert, key=ident.key))
    first = rc.context
    assert rc.reload() is None and rc.context is first
    rotate_identity(ca, ident, "client-two")
    second = rc.reload()
    assert second is not None and rc.context is second and rc.generation == 1
    assert rc.reload() is None


def test_half_done_rotation_keeps_the_old_context_and_retries(
    ca: trustme.CA, ident: Identity
) -> None:
    rc = ReloadingContext(TlsConfig(cert=ident.cert, key=ident.key))
    first = rc.context
    leaf = issue(ca, ident.cert.parent, "client-two")
    atomic_write(ident.cert, b"".join(b.bytes() for b in leaf.cert_chain_pems))  # key still old
    with pytest.raises(TlsError, match="does not match"):
        rc.reload()
    assert rc.context is first and rc.generation == 0
    atomic_write(ident.key, leaf.private_key_pem.bytes())
    assert rc.reload() is not None and rc.generation == 1


async def test_probe_reports_a_wrong_ca(ca: trustme.CA, tmp_path: Path) -> None:
    """A CA that did not issue the server's certificate is caught by `check`, naming the file."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(
        handle, "127.0.0.1", 0, ssl=server_context(ca, client_certs=ssl.CERT_NONE)
    )
    port = server.sockets[0].getsockname()[1]
    try:
        upstream = f"https://127.0.0.1:{port}/v1"
        wrong = write_ca(trustme.CA(), tmp_path / "wrong-ca.pem")
        config = config_with_tls(tmp_path, {"ca": str(wrong)}, upstream=upstream)
        problems = await asyncio.to_thread(check_tls_files, config)
        route_problems = [p for p in problems if p.startswith("routes[0].tls.ca:")]
        assert len(route_problems) == 1
        assert f"CA bundle {wrong} does not verify" in route_problems[0]
        right = write_ca(ca, tmp_path / "ca.pem")
        config = config_with_tls(tmp_path, {"ca": str(right)}, upstream=upstream)
        problems = await asyncio.to_thread(check_tls_files, config)
        # The route's upstream verifies; the credential's token URL (port 9) is down: not a problem.
        assert problems == []
    finally:
        server.close()
        await server.wait_closed()


def test_rotation_to_an_expired_certificate_is_refused(ca: trustme.CA, ident: Identity) -> None:
    rc = ReloadingContext(TlsConfig(cert=ident.cert, key=ident.key))
    first = rc.context
    leaf = issue(
        ca,
        ident.cert.parent,
        "stale",
        not_before=NOW - dt.timedelta(days=9),
        not_after=NOW - dt.timedelta(days=1),
    )
    atomic_write(ident.key, leaf.private_key_pem.bytes())
    atomic_write(ident.cert, b"".join(b.bytes() for b in leaf.cert_chain_pems))
    with pytest.raises(TlsError, match=f"certificate {ident.cert} expired on"):
        rc.reload()
    assert rc.context is first and rc.generation == 0
