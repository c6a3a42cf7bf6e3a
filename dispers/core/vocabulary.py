"""The public concept vocabulary: the concepts a cluster knows, and the syntax every concept follows.

DESIGN.md "Concept vocabulary": the vocabulary is part of the cluster configuration, served by
the Conductor so researchers can list it; a query naming anything else is refused before it is
sealed, and CI tokenizes every vocabulary concept whether or not anyone holds it.
"""

from __future__ import annotations

import re

from dispers.core.errors import DispersError, ErrorCode

MAX_CONCEPT_LENGTH = 64
MAX_ADDRESS_LENGTH = 256
"""An instance address '<host>/<instance id>' (T refuses longer ones; frames must hold it)."""
# namespace:value; the lookahead caps the whole string's length.
CONCEPT_PATTERN = re.compile(rf"(?=.{{1,{MAX_CONCEPT_LENGTH}}}\Z)[a-z_]+:[A-Za-z0-9_.-]+\Z")

AGE_BRACKETS: tuple[int, ...] = (0, 12, 25, 50, 100, 150)
AGE_CONCEPTS: tuple[str, ...] = tuple(
    f"age:{lo}-{hi}" for lo, hi in zip(AGE_BRACKETS, AGE_BRACKETS[1:], strict=False)
)
SEX_CONCEPTS: tuple[str, ...] = ("sex:F", "sex:M")
HAS_HEART_RATE = "has:heart_rate"

CATEGORY_CODES: dict[str, dict[str, int]] = {"sex": {"F": 0, "M": 1}}
"""Categorical fields an instance computes, and the code of each category (group-by by name)."""

DEFAULT_VOCABULARY: tuple[str, ...] = (*AGE_CONCEPTS, *SEX_CONCEPTS, HAS_HEART_RATE)
"""What every instance can derive from its own documents; clusters add declared cohorts."""


def validate_concept(s: str) -> None:
    """Raise MALFORMED unless ``s`` is a concept ``namespace:value``; never echoes ``s``."""
    if not isinstance(s, str) or CONCEPT_PATTERN.match(s) is None:
        raise DispersError(ErrorCode.MALFORMED, "concept does not match namespace:value")
