"""The one place DispersError codes become gRPC statuses (servers) and come back (clients)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NoReturn, TypeVar

import grpc

from dispers.core.errors import DispersError, ErrorCode

log = logging.getLogger(__name__)

CODE_KEY = "dispers-code"
"""Trailing-metadata key carrying the ErrorCode value, so a client restores the exact code."""

INTERNAL_MESSAGE = "internal error"

STATUS_BY_CODE: Mapping[ErrorCode, grpc.StatusCode] = MappingProxyType(
    {
        ErrorCode.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
        ErrorCode.BAD_CIPHERTEXT: grpc.StatusCode.INVALID_ARGUMENT,
        ErrorCode.BAD_SIGNATURE: grpc.StatusCode.INVALID_ARGUMENT,
        ErrorCode.UNKNOWN_CONCEPT: grpc.StatusCode.INVALID_ARGUMENT,
        ErrorCode.INVALID_EXPRESSION: grpc.StatusCode.INVALID_ARGUMENT,
        ErrorCode.UNAUTHORIZED: grpc.StatusCode.PERMISSION_DENIED,
        ErrorCode.TOO_FEW_TARGETS: grpc.StatusCode.FAILED_PRECONDITION,
        ErrorCode.BUDGET_EXCEEDED: grpc.StatusCode.RESOURCE_EXHAUSTED,
        ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
        ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
        ErrorCode.REPLAY: grpc.StatusCode.ALREADY_EXISTS,
        # A stale query is a state of the system, not a call that ran out of time: keeping it
        # off DEADLINE_EXCEEDED leaves that status to the network.
        ErrorCode.EXPIRED: grpc.StatusCode.FAILED_PRECONDITION,
        ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
        ErrorCode.CONFIG: grpc.StatusCode.INTERNAL,
        ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
    }
)

# A status that arrives without CODE_KEY (from gRPC itself or a foreign server): the nearest code.
_CODE_BY_BARE_STATUS: Mapping[grpc.StatusCode, ErrorCode] = MappingProxyType(
    {
        grpc.StatusCode.INVALID_ARGUMENT: ErrorCode.MALFORMED,
        grpc.StatusCode.OUT_OF_RANGE: ErrorCode.MALFORMED,
        grpc.StatusCode.PERMISSION_DENIED: ErrorCode.UNAUTHORIZED,
        grpc.StatusCode.UNAUTHENTICATED: ErrorCode.UNAUTHORIZED,
        grpc.StatusCode.FAILED_PRECONDITION: ErrorCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND: ErrorCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS: ErrorCode.REPLAY,
        grpc.StatusCode.UNIMPLEMENTED: ErrorCode.CONFIG,
    }
)

_NETWORK = {
    grpc.StatusCode.UNAVAILABLE: "is unreachable (not running, or not of this cluster's CA)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "did not answer before the deadline",
    grpc.StatusCode.CANCELLED: "cancelled the call",
}


def status_for(code: ErrorCode) -> grpc.StatusCode:
    """The public gRPC status of an error code."""
    return STATUS_BY_CODE[code]


def abort(context: grpc.ServicerContext, error: DispersError) -> NoReturn:
    """End the current RPC with the error's status, "CODE: message" and the code as metadata."""
    context.set_trailing_metadata(((CODE_KEY, error.code.value),))
    context.abort(status_for(error.code), f"{error.code.value}: {error.message}")
    raise AssertionError("grpc.ServicerContext.abort returned")  # it always raises


Servicer = TypeVar("Servicer")
Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Servicer, Request, Any], Response]


def rpc(method: Handler[Servicer, Request, Response]) -> Handler[Servicer, Request, Response]:
    """Decorate a servicer method: DispersError -> its status; anything else -> INTERNAL.

    An unexpected exception is logged here with its traceback and reaches the client only as
    "internal error": its text might hold a payload.
    """
    name = method.__qualname__

    @functools.wraps(method)
    def wrapper(self: Servicer, request: Request, context: Any) -> Response:
        try:
            return method(self, request, context)
        except DispersError as exc:
            level = logging.WARNING if exc.code in (ErrorCode.INTERNAL, ErrorCode.CONFIG) else logging.INFO
            log.log(level, "%s refused: %s", name, exc)
            abort(context, exc)
        except Exception:
            log.exception("%s failed unexpectedly", name)
            abort(context, DispersError(ErrorCode.INTERNAL, INTERNAL_MESSAGE))

    return wrapper


def error_from_rpc(error: grpc.RpcError, peer: str, method: str) -> DispersError:
    """Turn a failed call back into the DispersError the peer raised (or a network error).

    Only the peer's own DispersError message crosses over; text that gRPC itself produced is
    replaced by a message naming the peer and the method.
    """
    status = _call_attr(error, "code")
    metadata = _call_attr(error, "trailing_metadata") or ()
    sent = next((value for key, value in metadata if key == CODE_KEY), None)
    code = _parse_code(sent)
    if code is not None:
        details = _call_attr(error, "details") or ""
        prefix = f"{code.value}: "
        message = details[len(prefix) :] if details.startswith(prefix) else details
        return DispersError(code, message or f"{peer} refused {method}")
    if status in _NETWORK:
        return DispersError(ErrorCode.UNAVAILABLE, f"{peer} {_NETWORK[status]} ({method})")
    if status is grpc.StatusCode.UNIMPLEMENTED:
        return DispersError(ErrorCode.CONFIG, f"{peer} does not serve {method} (check its roster endpoint)")
    status_name = getattr(status, "name", "UNKNOWN")
    code = _CODE_BY_BARE_STATUS.get(status, ErrorCode.INTERNAL)
    return DispersError(code, f"{peer} failed {method} with status {status_name}")


def _call_attr(error: Any, attr: str) -> Any:
    """error.attr() when the RpcError is also a grpc.Call, else None."""
    fn = getattr(error, attr, None)
    return fn() if callable(fn) else None


def _parse_code(value: object) -> ErrorCode | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        return ErrorCode(value)
    except ValueError:
        return None


_UNDECODABLE = object()


class DecodeGuard(grpc.ServerInterceptor):  # type: ignore[misc]
    """Turns a request that is not a valid protobuf message into INVALID_ARGUMENT/MALFORMED.

    Without it grpc answers INTERNAL "Exception deserializing request!", which reads like a
    server bug rather than the caller's bad input.
    """

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        """Wrap unary-unary handlers with a deserializer that cannot raise."""
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer
        behavior = handler.unary_unary
        method = str(handler_call_details.method).rsplit("/", 1)[-1]

        def safe(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception:
                return _UNDECODABLE

        def run(request: Any, context: Any) -> Any:
            if request is _UNDECODABLE:
                abort(
                    context,
                    DispersError(ErrorCode.MALFORMED, f"{method}: request is not valid protobuf"),
                )
            return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            run, request_deserializer=safe, response_serializer=handler.response_serializer
        )
