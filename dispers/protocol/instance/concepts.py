"""The concepts an instance derives from its own documents, and the syntax every concept follows."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

import numpy as np

from dispers.core.vocabulary import (  # noqa: F401 (re-exported)
    AGE_BRACKETS,
    AGE_CONCEPTS,
    CONCEPT_PATTERN,
    HAS_HEART_RATE,
    MAX_CONCEPT_LENGTH,
    validate_concept,
)
from dispers.protocol.instance.functions import ages_at, bucketize
from dispers.state.documents import Documents, epoch_day


def derive_concepts(store: Documents, ids: Sequence[str], as_of: date) -> list[list[str]]:
    """Return, per instance of ``ids``, the concepts it subscribes to on ``as_of``.

    Age bracket (from AGE_BRACKETS, lo <= age < hi), ``sex:F`` or ``sex:M``, and
    ``has:heart_rate`` when the instance holds a measurement dated on or before ``as_of``,
    then whatever concepts the owner declared (a study or cohort they opted into).
    Two queries per batch, whatever its size.
    """
    birth_days, female, _ = store.identity(ids)
    count, _ = store.heart_rate_summary(ids, np.iinfo(np.int64).min, epoch_day(as_of))
    brackets = bucketize(ages_at(birth_days, as_of), AGE_BRACKETS)
    age_labels = [AGE_CONCEPTS[b] if b >= 0 else None for b in brackets.tolist()]
    declared = store.declared_concepts(ids)
    concepts: list[list[str]] = []
    for age, is_female, measured, extra in zip(
        age_labels, female.tolist(), (count > 0).tolist(), declared, strict=True
    ):
        row = [] if age is None else [age]
        row.append("sex:F" if is_female else "sex:M")
        if measured:
            row.append(HAS_HEART_RATE)
        row.extend(c for c in extra if c not in row)
        concepts.append(row)
    return concepts
