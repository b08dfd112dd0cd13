"""TLS files as the server, the gateway and the clients read them: PEM, checked once.

Each function reads a file named by a flag and checks it with Python's ``ssl``
module before gRPC sees it: gRPC takes PEM bytes as they are and would only fail
at the first handshake, far from the flag that named the file. A problem is a
:class:`TLSFileError` whose message names the flag and the file (never the
file's contents), for a one-line start-up error.
"""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["TLSFileError", "read_ca", "read_pair", "read_pem"]


class TLSFileError(ValueError):
    """A TLS file that cannot be read, is not PEM, or does not hold what its flag needs."""


def read_pem(path: str, flag: str) -> bytes:
    """The bytes of the PEM file ``path``, which ``flag`` named.

    Raises:
        TLSFileError: the file cannot be read, or holds no PEM block.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSFileError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in data:
        raise TLSFileError(f"{flag} {path}: not a PEM file")
    return data


def _no_password() -> bytes:
    # Without a callback, ssl would prompt on the terminal for an encrypted key.
    raise TLSFileError("the private key is encrypted; give an unencrypted PEM key")


def read_pair(certfile: str, keyfile: str, *, cert_flag: str, key_flag: str) -> tuple[bytes, bytes]:
    """A certificate chain and its private key, as (chain, key) PEM bytes.

    Raises:
        TLSFileError: a file cannot be read, is not PEM, the key is encrypted, or the
            key is not the certificate's.
    """
    chain = read_pem(certfile, cert_flag)
    key = read_pem(keyfile, key_flag)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_password)
    except TLSFileError as exc:
        raise TLSFileError(f"{key_flag} {keyfile}: {exc}") from None
    except (ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise TLSFileError(
            f"{cert_flag} {certfile} and {key_flag} {keyfile} are not a certificate and its "
            f"private key ({reason})"
        ) from None
    return chain, key


def read_ca(path: str, flag: str) -> bytes:
    """PEM bytes of one or more CA certificates to trust.

    Raises:
        TLSFileError: the file cannot be read, or holds no certificate.
    """
    data = read_pem(path, flag)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        raise TLSFileError(f"{flag} {path}: holds no PEM certificate") from None
    # Any certificate counts, not only CA ones: a self-signed server certificate is its
    # own trust anchor.
    if not context.cert_store_stats()["x509"]:
        raise TLSFileError(f"{flag} {path}: holds no PEM certificate")
    return data
