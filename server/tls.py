"""The gRPC port's TLS: ``--certfile``/``--keyfile``, and ``--client-ca`` for mTLS.

With a certificate the port speaks TLS only (a plaintext client fails its
handshake); with ``--client-ca`` as well, the handshake requires a client
certificate signed by one of those CAs, so a client without one never reaches a
method. The files are read and checked when the server is built: a bad one is a
start-up error naming the flag, not a failure at the first connection.
"""

from __future__ import annotations

import grpc

from protoserve.common.tls import TLSFileError, read_ca, read_pair
from protoserve.server.config import ServerConfig

__all__ = ["TLSFileError", "server_credentials"]


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """The credentials of the gRPC port; None for plaintext (no ``certfile``).

    Raises:
        TLSFileError: a flag without its partner (``--certfile`` and ``--keyfile`` go
            together; ``--client-ca`` needs them), or a file that cannot be used.
    """
    if (config.certfile is None) != (config.keyfile is None):
        raise TLSFileError("--certfile and --keyfile go together")
    if config.certfile is None or config.keyfile is None:
        if config.client_ca is not None:
            raise TLSFileError("--client-ca needs --certfile and --keyfile (mTLS is TLS)")
        return None
    chain, key = read_pair(
        config.certfile, config.keyfile, cert_flag="--certfile", key_flag="--keyfile"
    )
    if config.client_ca is None:
        return grpc.ssl_server_credentials([(key, chain)])
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=read_ca(config.client_ca, "--client-ca"),
        require_client_auth=True,
    )
