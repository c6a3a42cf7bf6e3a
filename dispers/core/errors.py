"""Errors with stable codes; transports map each code to a public status in one place."""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    """Stable error codes. The value is what crosses the wire."""

    MALFORMED = "MALFORMED"  # a message or payload that does not decode or validate
    BAD_CIPHERTEXT = "BAD_CIPHERTEXT"  # tampered, truncated or sealed to another actor
    BAD_SIGNATURE = "BAD_SIGNATURE"
    UNAUTHORIZED = "UNAUTHORIZED"  # an unknown querier or actor
    UNKNOWN_CONCEPT = "UNKNOWN_CONCEPT"
    INVALID_EXPRESSION = "INVALID_EXPRESSION"
    TOO_FEW_TARGETS = "TOO_FEW_TARGETS"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"  # the querier's privacy budget would be overspent
    NOT_FOUND = "NOT_FOUND"
    REPLAY = "REPLAY"  # a query id or message seen before
    EXPIRED = "EXPIRED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAVAILABLE = "UNAVAILABLE"
    CONFIG = "CONFIG"
    INTERNAL = "INTERNAL"


class DispersError(Exception):
    """An error every actor may raise; its message must never carry plaintext or key material."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[DispersError], tuple[ErrorCode, str]]:
        return (type(self), (self.code, self.message))


def malformed(message: str) -> DispersError:
    """Shorthand for the most common error."""
    return DispersError(ErrorCode.MALFORMED, message)


class QueryFailed(DispersError):
    """A query that ended without a result: refused (for example too few targets), failed (a
    budget overspent, an actor unavailable), or not finished in time. `code` and `message` are
    the Conductor's record of why; `state` is the query's last state."""

    def __init__(
        self, code: ErrorCode, message: str, *, query_id: str = "", state: str = "", reason: str = ""
    ) -> None:
        super().__init__(code, message)
        self.query_id = query_id
        self.state = state
        self.reason = reason or message  # the Conductor's record of why, without the query id

    def __reduce__(self) -> tuple[type[DispersError], tuple[ErrorCode, str]]:
        return (type(self), (self.code, self.message))
