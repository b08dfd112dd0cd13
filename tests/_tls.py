"""Certificates for TLS tests, made with the openssl CLI: a CA, a server, clients.

``make_pki(folder)`` writes a CA, a server certificate for 127.0.0.1 and localhost
signed by it, a client certificate signed by it, a second CA with a client
certificate of its own (one the server must not accept), and a self-signed server
certificate. openssl is Debian's
``openssl``, which ``nox -s tests`` installs; without it a test skips here and fails
under CI (tests/_tools.py).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests._tools import debian

__all__ = ["PKI", "make_pki"]


@dataclass(frozen=True)
class PKI:
    """Paths of PEM files; ``*_key`` are unencrypted private keys."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path
    #: A self-signed server certificate for 127.0.0.1 and localhost: its own CA.
    self_signed_cert: Path
    self_signed_key: Path

    def read(self, name: str) -> bytes:
        path: Path = getattr(self, name)
        return path.read_bytes()


def _openssl(openssl: str, *args: str) -> None:
    subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)


def _ca(openssl: str, folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        openssl,
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2"),
        *("-subj", f"/CN=protoserve test {name}"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    return cert, key


def _issue(
    openssl: str, folder: Path, name: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    cert, key, request = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    _openssl(
        openssl,
        *("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-keyout", str(key), "-out", str(request), "-subj", f"/CN={name}"),
    )
    ext = folder / f"{name}.ext"
    ext.write_text(extensions)
    _openssl(
        openssl,
        *("x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1])),
        *("-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext)),
    )
    return cert, key


def make_pki(folder: Path) -> PKI:
    """Write the certificates into ``folder`` (skips, or fails on CI, without openssl)."""
    openssl = debian("openssl", "openssl")
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(openssl, folder, "ca")
    other = _ca(openssl, folder, "other-ca")
    client_ext = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
    server = _issue(
        openssl,
        folder,
        "server",
        ca,
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    client = _issue(openssl, folder, "client", ca, client_ext)
    other_client = _issue(openssl, folder, "other-client", other, client_ext)
    self_signed = folder / "self-signed.pem", folder / "self-signed.key"
    _openssl(
        openssl,
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-keyout", str(self_signed[1]), "-out", str(self_signed[0])),
        *("-days", "2", "-subj", "/CN=localhost"),
        *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
    )
    return PKI(
        ca=ca[0],
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        other_ca=other[0],
        other_client_cert=other_client[0],
        other_client_key=other_client[1],
        self_signed_cert=self_signed[0],
        self_signed_key=self_signed[1],
    )
