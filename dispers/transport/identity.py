"""Who is calling: the roster name in the caller's TLS certificate (or, insecure, its claim)."""

from __future__ import annotations

import grpc

from dispers.core.config import Roster
from dispers.core.errors import DispersError, ErrorCode
from dispers.crypto.tls import TlsIdentity
from dispers.transport.grpc_client import CALLER_METADATA_KEY

_COMMON_NAME = "x509_common_name"
_SHOWN = 64  # at most this much of an unknown, caller-chosen name goes into an error


def _shown(name: str) -> str:
    return repr(name) if len(name) <= _SHOWN else repr(name[:_SHOWN]) + "..."


def server_credentials(identity: TlsIdentity) -> grpc.ServerCredentials:
    """Mutual TLS for a server: present the actor's certificate, require a cluster certificate."""
    return grpc.ssl_server_credentials(
        [(identity.key_pem, identity.cert_pem)],
        root_certificates=identity.ca_pem,
        require_client_auth=True,
    )


def caller_name(context: grpc.ServicerContext, roster: Roster, *, insecure: bool) -> str:
    """The roster name of the actor making this call.

    Over mutual TLS it is the common name of the client certificate, which the server has
    already verified against the cluster CA; a name the roster does not know is UNAUTHORIZED.
    In an insecure cluster it is the `dispers-caller` metadata the client chose to send (""
    when absent): nothing authenticates it.
    """
    if insecure:
        for key, value in context.invocation_metadata() or ():
            if key == CALLER_METADATA_KEY:
                return value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")
        return ""
    names = context.auth_context().get(_COMMON_NAME, [])
    if len(names) != 1:
        raise DispersError(ErrorCode.UNAUTHORIZED, "the caller presented no certificate naming an actor")
    raw = names[0]
    name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    if name not in {entry.name for entry in roster}:
        raise DispersError(
            ErrorCode.UNAUTHORIZED,
            f"the caller's certificate names {_shown(name)}, not an actor of this cluster",
        )
    return name
