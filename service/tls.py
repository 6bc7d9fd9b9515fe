"""TLS credentials: the server's (TLS, or mTLS with ``--tls-client-ca``) and the client's (CA, cert, token).

Imports only grpc, so the client command line stays free of TensorFlow.
"""

from __future__ import annotations

import grpc


class TLSConfigError(ValueError):
    """A certificate, key or CA file cannot be read."""


def read_pem(path: str, flag: str) -> bytes:
    """The bytes of a PEM file; the error names the flag and the path."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TLSConfigError(f"{flag} {path!r} cannot be read: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data:
        raise TLSConfigError(f"{flag} {path!r} is not a PEM file (no '-----BEGIN' line)")
    return data


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """Credentials for a TLS port; with ``client_ca`` a client certificate signed by it is REQUIRED."""
    chain = read_pem(cert, "--tls-cert")
    private_key = read_pem(key, "--tls-key")
    ca = read_pem(client_ca, "--tls-client-ca") if client_ca else None
    return grpc.ssl_server_credentials([(private_key, chain)], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    token: str | None = None,
) -> grpc.ChannelCredentials:
    """Client credentials: trust ``ca`` (None: the system roots), present ``cert``/``key`` for mTLS, send ``token``.

    The token rides as ``authorization: Bearer <token>`` on every call (gRPC sends call
    credentials only over TLS).
    """
    if (cert is None) != (key is None):
        raise TLSConfigError("--tls-cert and --tls-key must be given together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca, "--tls-ca") if ca else None,
        private_key=read_pem(key, "--tls-key") if key else None,
        certificate_chain=read_pem(cert, "--tls-cert") if cert else None,
    )
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return credentials
