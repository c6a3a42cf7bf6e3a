"""The Concept Indexor's catalogue of known concept strings: an ABC, in-memory and SQLite."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

from dispers.core.errors import malformed
from dispers.state._sqlite import SQLiteStore

# Well under SQLite's historical limit of 999 bound parameters per statement.
_CHUNK = 500


def _check_concepts(concepts: Sequence[str], *, allow_empty: bool) -> None:
    """Raise MALFORMED naming the first concept that is not a (non-empty) string, by index."""
    for i, concept in enumerate(concepts):
        if not isinstance(concept, str):
            raise malformed(f"concept at index {i} is not a string")
        if not allow_empty and not concept:
            raise malformed(f"concept at index {i} is empty")


class ConceptCatalog(ABC):
    """The set of concept strings the Concept Indexor will turn into tokens."""

    @abstractmethod
    def add(self, concepts: Iterable[str]) -> int:
        """Add concepts (all or none); return how many distinct ones were not yet known."""

    @abstractmethod
    def unknown(self, concepts: Sequence[str]) -> list[int]:
        """Return the indices, in ascending order, of the concepts not in the catalogue."""

    @abstractmethod
    def __len__(self) -> int:
        """Return the number of distinct concepts in the catalogue."""

    def close(self) -> None:  # noqa: B027 - deliberately a no-op for stores without resources
        """Release any resources held by the store; the store is unusable afterwards."""


class MemoryConceptCatalog(ConceptCatalog):
    """A catalogue held in a Python set; lost when the process ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._concepts: set[str] = set()

    def add(self, concepts: Iterable[str]) -> int:
        """Add concepts (all or none); return how many distinct ones were not yet known."""
        batch = list(concepts)
        _check_concepts(batch, allow_empty=False)
        with self._lock:
            new = set(batch) - self._concepts
            self._concepts |= new
        return len(new)

    def unknown(self, concepts: Sequence[str]) -> list[int]:
        """Return the indices, in ascending order, of the concepts not in the catalogue."""
        _check_concepts(concepts, allow_empty=True)
        with self._lock:
            return [i for i, concept in enumerate(concepts) if concept not in self._concepts]

    def __len__(self) -> int:
        """Return the number of distinct concepts in the catalogue."""
        with self._lock:
            return len(self._concepts)


class SQLiteConceptCatalog(ConceptCatalog, SQLiteStore):
    """A catalogue in an SQLite file (or ":memory:"), safe to share between threads."""

    def __init__(self, path: str) -> None:
        self._open(path)
        with self._transaction() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS concepts (concept TEXT PRIMARY KEY) WITHOUT ROWID")

    def add(self, concepts: Iterable[str]) -> int:
        """Add concepts (all or none); return how many distinct ones were not yet known."""
        batch = list(concepts)
        _check_concepts(batch, allow_empty=False)
        with self._transaction() as conn:
            cursor = conn.executemany(
                "INSERT OR IGNORE INTO concepts (concept) VALUES (?)",
                ((concept,) for concept in batch),
            )
            return max(cursor.rowcount, 0)

    def unknown(self, concepts: Sequence[str]) -> list[int]:
        """Return the indices, in ascending order, of the concepts not in the catalogue."""
        _check_concepts(concepts, allow_empty=True)
        distinct = list(dict.fromkeys(concepts))
        known: set[str] = set()
        with self._transaction(write=False) as conn:
            for start in range(0, len(distinct), _CHUNK):
                chunk = distinct[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(f"SELECT concept FROM concepts WHERE concept IN ({marks})", chunk)
                known.update(row[0] for row in rows)
        return [i for i, concept in enumerate(concepts) if concept not in known]

    def __len__(self) -> int:
        """Return the number of distinct concepts in the catalogue."""
        with self._lock:
            (count,) = self._conn.execute("SELECT COUNT(*) FROM concepts").fetchone()
        return int(count)
