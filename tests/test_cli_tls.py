"""`authproxy check` / `run` with bad TLS files: exit 2, a message naming the file and the field,
never a traceback. Each case is a real subprocess."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from tests.tls_helpers import Identity, server_context, write_ca, write_identity

NOW = dt.datetime.now(dt.UTC)


async def run_cli(venv_bin: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(venv_bin / "authproxy"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def tls_upstream(ca: trustme.CA) -> AsyncIterator[str]:
    """An https endpoint on loopback (certificate from the test CA) for the wrong-CA probe."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(
        handle, "127.0.0.1", 0, ssl=server_context(ca, client_certs=ssl.CERT_OPTIONAL)
    )
    yield f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    await server.wait_closed()


def write_config(tmp_path: Path, upstream: str, tls: dict[str, Any]) -> Path:
    raw = {
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "store": {"kind": "memory"},
        "credentials": {
            "pay": {
                "token_url": f"{upstream}/oauth2/token",
                "client_id": "abc",
                "client_secret": {"env": "TEST_CLIENT_SECRET"},
            }
        },
        "routes": [
            {
                "name": "pay",
                "match": {"prefix": "/pay"},
                "upstream": f"{upstream}/v1",
                "credential": "pay",
                "tls": tls,
            }
        ],
    }
    path = tmp_path / "authproxy.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


Case = Callable[[trustme.CA, Path, Identity], tuple[dict[str, Any], Path, str]]


def _expired(ca: trustme.CA, tmp: Path, ident: Identity) -> tuple[dict[str, Any], Path, str]:
    old = write_identity(
        ca,
        tmp / "old",
        "old",
        not_before=NOW - dt.timedelta(days=9),
        not_after=NOW - dt.timedelta(days=2),
    )
    return {"cert": str(old.cert), "key": str(old.key)}, old.cert, "routes[0].tls.cert"


def _mismatch(ca: trustme.CA, tmp: Path, ident: Identity) -> tuple[dict[str, Any], Path, str]:
    other = write_identity(ca, tmp / "other", "other")
    return {"cert": str(ident.cert), "key": str(other.key)}, other.key, "routes[0].tls.key"


def _missing_key(ca: trustme.CA, tmp: Path, ident: Identity) -> tuple[dict[str, Any], Path, str]:
    gone = tmp / "gone.key"
    return {"cert": str(ident.cert), "key": str(gone)}, gone, "routes[0].tls.key"


def _directory_cert(ca: trustme.CA, tmp: Path, ident: Identity) -> tuple[dict[str, Any], Path, str]:
    # Unreadable even for root (tests may run as root, where chmod 000 does not stop a read).
    folder = tmp / "cert-folder"
    folder.mkdir()
    return {"cert": str(folder), "key": str(ident.key)}, folder, "routes[0].tls.cert"


def _garbage_ca(ca: trustme.CA, tmp: Path, ident: Identity) -> tuple[dict[str, Any], Path, str]:
    bad = tmp / "ca.pem"
    bad.write_text("this is not a certificate\n")
    return {"cert": str(ident.cert), "key": str(ident.key), "ca": str(bad)}, bad, "routes[0].tls.ca"


def _leaf_as_ca(ca: trustme.CA, tmp: Path, ident: Identity) -> tuple[dict[str, Any], Path, str]:
    leaf_only = tmp / "leaf-as-ca.pem"
    leaf_only.write_bytes(
        ident.cert.read_bytes().split(b"-----END CERTIFICATE-----")[0]
        + (b"-----END CERTIFICATE-----\n")
    )
    return {"ca": str(leaf_only)}, leaf_only, "routes[0].tls.ca"


def _encrypted(ca: trustme.CA, tmp: Path, ident: Identity) -> tuple[dict[str, Any], Path, str]:
    enc = write_identity(ca, tmp / "enc", "enc", password=b"s3cret-passphrase")
    return {"cert": str(enc.cert), "key": str(enc.key)}, enc.key, "routes[0].tls.key"


def _wrong_ca(ca: trustme.CA, tmp: Path, ident: Identity) -> tuple[dict[str, Any], Path, str]:
    wrong = write_ca(trustme.CA(), tmp / "wrong-ca.pem")
    return (
        {"cert": str(ident.cert), "key": str(ident.key), "ca": str(wrong)},
        wrong,
        "routes[0].tls.ca",
    )


CASES: dict[str, Case] = {
    "expired certificate": _expired,
    "key does not match": _mismatch,
    "missing key file": _missing_key,
    "certificate path is a directory": _directory_cert,
    "CA file is not PEM": _garbage_ca,
    "CA file is a leaf": _leaf_as_ca,
    "encrypted key without key_password": _encrypted,
    "wrong CA": _wrong_ca,
}


@pytest.mark.parametrize("case", list(CASES))
async def test_check_names_the_bad_file(
    ca: trustme.CA, tmp_path: Path, venv_bin: Path, tls_upstream: str, case: str
) -> None:
    ident = write_identity(ca, tmp_path / "good", "client")
    tls, bad_file, field = CASES[case](ca, tmp_path, ident)
    config = write_config(tmp_path, tls_upstream, tls)
    code, out, err = await run_cli(venv_bin, "check", "-c", str(config))
    assert code == 2, (out, err)
    assert "Traceback" not in err + out
    lines = [ln.strip() for ln in err.splitlines() if ln.strip().startswith(field)]
    assert lines, err
    assert str(bad_file) in lines[0], err
    assert "s3cret-passphrase" not in err


async def test_good_tls_passes_check(
    ca: trustme.CA, tmp_path: Path, venv_bin: Path, tls_upstream: str
) -> None:
    ident = write_identity(ca, tmp_path / "good", "client")
    ca_file = write_ca(ca, tmp_path / "ca.pem")
    config = write_config(
        tmp_path, tls_upstream, {"cert": str(ident.cert), "key": str(ident.key), "ca": str(ca_file)}
    )
    code, out, err = await run_cli(venv_bin, "check", "-c", str(config))
    assert code == 0, err
    assert "OK" in out


async def test_run_refuses_to_start_with_a_bad_certificate(
    ca: trustme.CA, tmp_path: Path, venv_bin: Path, tls_upstream: str
) -> None:
    ident = write_identity(ca, tmp_path / "good", "client")
    tls, bad_file, field = _mismatch(ca, tmp_path, ident)
    config = write_config(tmp_path, tls_upstream, tls)
    code, out, err = await run_cli(venv_bin, "run", "-c", str(config))
    assert code == 2 and "Traceback" not in err
    assert any(ln.strip().startswith(field) and str(bad_file) in ln for ln in err.splitlines()), err
