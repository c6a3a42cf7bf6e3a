"""Identifiers: query ids, actor names and roles."""

from __future__ import annotations

import enum
import re
import secrets

from dispers.core.errors import malformed

_QUERY_ID = re.compile(r"^[0-9a-f]{32}$")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class Role(enum.Enum):
    """The roles an actor of the cluster can have."""

    QUERIER = "querier"
    CONDUCTOR = "conductor"
    CONCEPT_INDEXOR = "concept_indexor"
    TARGET_FINDER = "target_finder"
    TARGET = "target"
    DATA_AGGREGATOR = "data_aggregator"
    PERSONAL_CLOUD = "personal_cloud"

    @classmethod
    def parse(cls, value: str) -> Role:
        """Parse a role name, with an error listing the valid ones."""
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(r.value for r in cls)
            raise malformed(f"unknown role {value!r} (valid: {valid})") from None


def new_query_id() -> str:
    """A fresh random query id (128 bits, hex)."""
    return secrets.token_hex(16)


def check_query_id(query_id: str) -> str:
    """Validate a query id: 32 lowercase hex digits."""
    if not isinstance(query_id, str) or not _QUERY_ID.match(query_id):
        raise malformed("query id must be 32 lowercase hex digits")
    return query_id


def check_batch_id(batch_id: str) -> str:
    """Validate a subscription batch id: 32 lowercase hex digits."""
    if not isinstance(batch_id, str) or not _QUERY_ID.match(batch_id):
        raise malformed("batch id must be 32 lowercase hex digits")
    return batch_id


def check_name(name: str, what: str = "actor name") -> str:
    """Validate an actor name: lowercase letters, digits, '-' and '_'."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise malformed(f"{what} must match [a-z][a-z0-9_-]{{0,62}}")
    return name
