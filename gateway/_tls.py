"""TLS to the upstream: ``--upstream-ca``, and a client certificate for mTLS.

The gateway's own HTTPS (``--certfile``/``--keyfile``) is uvicorn's or hypercorn's;
this is the other hop, the gRPC channel to the server, which the call channel and
the reflection channel (``--from-reflection``) both use.
"""

from __future__ import annotations

import grpc

from protoserve.common.tls import TLSFileError, read_ca, read_pair

__all__ = ["TLSFileError", "upstream_credentials"]


def upstream_credentials(
    *,
    tls: bool = False,
    ca: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> grpc.ChannelCredentials | None:
    """The upstream channel's credentials; None for plaintext.

    Any of the arguments turns TLS on. ``ca`` is what the server's certificate must
    be signed by (the system's roots when None); ``certfile`` and ``keyfile`` are
    the gateway's client certificate, for a server that requires one (mTLS).

    Raises:
        TLSFileError: ``certfile`` without ``keyfile`` or the reverse, or a file that
            cannot be used.
    """
    if (certfile is None) != (keyfile is None):
        raise TLSFileError("--upstream-certfile and --upstream-keyfile go together")
    if not (tls or ca or certfile):
        return None
    roots = None if ca is None else read_ca(ca, "--upstream-ca")
    if certfile is None or keyfile is None:
        return grpc.ssl_channel_credentials(roots)
    chain, key = read_pair(
        certfile, keyfile, cert_flag="--upstream-certfile", key_flag="--upstream-keyfile"
    )
    return grpc.ssl_channel_credentials(roots, private_key=key, certificate_chain=chain)
