"""The Conductor's query metadata: a record type, an ABC, in-memory and SQLite stores."""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.state._sqlite import SQLiteStore

QUERY_STATES: tuple[str, ...] = ("pending", "running", "done", "refused", "failed")
"""Every state a query may be in."""


@dataclass
class QueryRecord:
    """What the Conductor keeps about one query: no plaintext, only sizes and timings."""

    query_id: str
    querier: str
    created_at: float
    state: str
    k: int
    phases: dict[str, float] = field(default_factory=dict)  # phase name -> seconds
    counts: dict[str, int] = field(default_factory=dict)
    sealed_result: bytes | None = None
    error_code: str | None = None
    error_message: str | None = None


def _copy(record: QueryRecord) -> QueryRecord:
    """Return a record whose dicts are not shared with the given one."""
    return dataclasses.replace(record, phases=dict(record.phases), counts=dict(record.counts))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_state(state: object) -> None:
    if state not in QUERY_STATES:
        raise malformed(f"state is not one of {', '.join(QUERY_STATES)}")


def _check_phases(phases: object) -> dict[str, float]:
    """Validate phase timings and return them with float values."""
    if not isinstance(phases, Mapping):
        raise malformed("phases are not a mapping")
    checked: dict[str, float] = {}
    for i, (name, seconds) in enumerate(phases.items()):
        if not isinstance(name, str) or not name:
            raise malformed(f"phase {i} has no name")
        if not _is_number(seconds) or not math.isfinite(seconds) or seconds < 0:
            raise malformed(f"phase {i} is not a finite, non-negative number of seconds")
        checked[name] = float(seconds)
    return checked


def _check_counts(counts: object) -> dict[str, int]:
    """Validate counts and return them as a plain dict."""
    if not isinstance(counts, Mapping):
        raise malformed("counts are not a mapping")
    checked: dict[str, int] = {}
    for i, (name, count) in enumerate(counts.items()):
        if not isinstance(name, str) or not name:
            raise malformed(f"count {i} has no name")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise malformed(f"count {i} is not a non-negative integer")
        checked[name] = count
    return checked


def _check_optional(sealed_result: object, error_code: object, error_message: object) -> None:
    if sealed_result is not None and not isinstance(sealed_result, bytes):
        raise malformed("sealed result is not bytes")
    if error_code is not None and not isinstance(error_code, str):
        raise malformed("error code is not a string")
    if error_message is not None and not isinstance(error_message, str):
        raise malformed("error message is not a string")


def _checked(record: QueryRecord) -> QueryRecord:
    """Validate a whole record and return an unshared, normalised copy of it."""
    if not isinstance(record, QueryRecord):
        raise malformed("not a query record")
    if not isinstance(record.query_id, str) or not record.query_id:
        raise malformed("query id is not a non-empty string")
    if not isinstance(record.querier, str) or not record.querier:
        raise malformed("querier is not a non-empty string")
    if not _is_number(record.created_at) or not math.isfinite(record.created_at):
        raise malformed("creation time is not a finite number")
    _check_state(record.state)
    if not isinstance(record.k, int) or isinstance(record.k, bool) or record.k < 1:
        raise malformed("k is not a positive integer")
    _check_optional(record.sealed_result, record.error_code, record.error_message)
    return dataclasses.replace(
        record,
        created_at=float(record.created_at),
        phases=_check_phases(record.phases),
        counts=_check_counts(record.counts),
    )


def _updated(
    record: QueryRecord,
    *,
    state: str | None,
    phases: Mapping[str, float] | None,
    counts: Mapping[str, int] | None,
    sealed_result: bytes | None,
    error_code: str | None,
    error_message: str | None,
) -> QueryRecord:
    """Return a copy of record with the given changes (validated first; dicts merged)."""
    if state is not None:
        _check_state(state)
    new_phases = _check_phases(phases) if phases is not None else {}
    new_counts = _check_counts(counts) if counts is not None else {}
    _check_optional(sealed_result, error_code, error_message)
    return dataclasses.replace(
        record,
        state=record.state if state is None else state,
        phases={**record.phases, **new_phases},
        counts={**record.counts, **new_counts},
        sealed_result=record.sealed_result if sealed_result is None else sealed_result,
        error_code=record.error_code if error_code is None else error_code,
        error_message=record.error_message if error_message is None else error_message,
    )


def _replay() -> DispersError:
    return DispersError(ErrorCode.REPLAY, "query id already used")


def _not_found() -> DispersError:
    return DispersError(ErrorCode.NOT_FOUND, "no query with this id")


class QueryStore(ABC):
    """Every query the Conductor has accepted, with its state, timings and sealed result."""

    @abstractmethod
    def create(self, record: QueryRecord) -> None:
        """Store a new query; REPLAY if its id was used before."""

    @abstractmethod
    def get(self, query_id: str) -> QueryRecord:
        """Return a copy of a query's record; NOT_FOUND if there is none."""

    @abstractmethod
    def update(
        self,
        query_id: str,
        *,
        state: str | None = None,
        phases: Mapping[str, float] | None = None,
        counts: Mapping[str, int] | None = None,
        sealed_result: bytes | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> QueryRecord:
        """Change the given fields of a query (None leaves a field as it is) and return a copy.

        Phases and counts are merged into the existing ones. NOT_FOUND if there is no such
        query; MALFORMED (and nothing changed) if any value is invalid.
        """

    @abstractmethod
    def list_ids(self) -> list[str]:
        """Return every query id, in the order the queries were created."""

    def close(self) -> None:  # noqa: B027 - deliberately a no-op for stores without resources
        """Release any resources held by the store; the store is unusable afterwards."""


class MemoryQueryStore(QueryStore):
    """Query records held in a Python dict; lost when the process ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, QueryRecord] = {}

    def create(self, record: QueryRecord) -> None:
        """Store a new query; REPLAY if its id was used before."""
        stored = _checked(record)
        with self._lock:
            if stored.query_id in self._records:
                raise _replay()
            self._records[stored.query_id] = stored

    def get(self, query_id: str) -> QueryRecord:
        """Return a copy of a query's record; NOT_FOUND if there is none."""
        with self._lock:
            record = self._records.get(query_id)
            if record is None:
                raise _not_found()
            return _copy(record)

    def update(
        self,
        query_id: str,
        *,
        state: str | None = None,
        phases: Mapping[str, float] | None = None,
        counts: Mapping[str, int] | None = None,
        sealed_result: bytes | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> QueryRecord:
        """Change the given fields of a query (None leaves a field as it is) and return a copy.

        Phases and counts are merged into the existing ones. NOT_FOUND if there is no such
        query; MALFORMED (and nothing changed) if any value is invalid.
        """
        with self._lock:
            record = self._records.get(query_id)
            if record is None:
                raise _not_found()
            new = _updated(
                record,
                state=state,
                phases=phases,
                counts=counts,
                sealed_result=sealed_result,
                error_code=error_code,
                error_message=error_message,
            )
            self._records[query_id] = new
            return _copy(new)

    def list_ids(self) -> list[str]:
        """Return every query id, in the order the queries were created."""
        with self._lock:
            return list(self._records)


_COLUMNS = "query_id, querier, created_at, state, k, phases, counts, sealed_result, error_code, error_message"


def _to_row(record: QueryRecord) -> tuple[Any, ...]:
    return (
        record.query_id,
        record.querier,
        record.created_at,
        record.state,
        record.k,
        json.dumps(record.phases, sort_keys=True),
        json.dumps(record.counts, sort_keys=True),
        record.sealed_result,
        record.error_code,
        record.error_message,
    )


def _from_row(row: tuple[Any, ...]) -> QueryRecord:
    return QueryRecord(
        query_id=row[0],
        querier=row[1],
        created_at=float(row[2]),
        state=row[3],
        k=int(row[4]),
        phases={str(name): float(seconds) for name, seconds in json.loads(row[5]).items()},
        counts={str(name): int(count) for name, count in json.loads(row[6]).items()},
        sealed_result=None if row[7] is None else bytes(row[7]),
        error_code=row[8],
        error_message=row[9],
    )


class SQLiteQueryStore(QueryStore, SQLiteStore):
    """Query records in an SQLite file (or ":memory:"), safe to share between threads."""

    def __init__(self, path: str) -> None:
        self._open(path)
        with self._transaction() as conn:
            # A rowid table on purpose: list_ids() returns ids in creation (rowid) order.
            conn.execute(
                "CREATE TABLE IF NOT EXISTS queries ("
                " query_id TEXT NOT NULL UNIQUE, querier TEXT NOT NULL,"
                " created_at REAL NOT NULL, state TEXT NOT NULL, k INTEGER NOT NULL,"
                " phases TEXT NOT NULL, counts TEXT NOT NULL, sealed_result BLOB,"
                " error_code TEXT, error_message TEXT)"
            )

    @staticmethod
    def _fetch(conn: sqlite3.Connection, query_id: str) -> QueryRecord:
        row = conn.execute(f"SELECT {_COLUMNS} FROM queries WHERE query_id = ?", (query_id,)).fetchone()
        if row is None:
            raise _not_found()
        return _from_row(row)

    def create(self, record: QueryRecord) -> None:
        """Store a new query; REPLAY if its id was used before."""
        stored = _checked(record)
        with self._transaction() as conn:
            try:
                conn.execute(
                    f"INSERT INTO queries ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _to_row(stored),
                )
            except sqlite3.IntegrityError:
                raise _replay() from None

    def get(self, query_id: str) -> QueryRecord:
        """Return a copy of a query's record; NOT_FOUND if there is none."""
        with self._lock:
            return self._fetch(self._conn, query_id)

    def update(
        self,
        query_id: str,
        *,
        state: str | None = None,
        phases: Mapping[str, float] | None = None,
        counts: Mapping[str, int] | None = None,
        sealed_result: bytes | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> QueryRecord:
        """Change the given fields of a query (None leaves a field as it is) and return a copy.

        Phases and counts are merged into the existing ones. NOT_FOUND if there is no such
        query; MALFORMED (and nothing changed) if any value is invalid.
        """
        with self._transaction() as conn:
            new = _updated(
                self._fetch(conn, query_id),
                state=state,
                phases=phases,
                counts=counts,
                sealed_result=sealed_result,
                error_code=error_code,
                error_message=error_message,
            )
            conn.execute(
                "UPDATE queries SET state = ?, phases = ?, counts = ?, sealed_result = ?,"
                " error_code = ?, error_message = ? WHERE query_id = ?",
                (
                    new.state,
                    json.dumps(new.phases, sort_keys=True),
                    json.dumps(new.counts, sort_keys=True),
                    new.sealed_result,
                    new.error_code,
                    new.error_message,
                    query_id,
                ),
            )
            return new

    def list_ids(self) -> list[str]:
        """Return every query id, in the order the queries were created."""
        with self._lock:
            rows = self._conn.execute("SELECT query_id FROM queries ORDER BY rowid").fetchall()
        return [row[0] for row in rows]
