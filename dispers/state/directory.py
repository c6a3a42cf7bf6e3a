"""The Target's pseudonym -> address directory: an ABC, in-memory and SQLite."""

from __future__ import annotations

import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.state._sqlite import SQLiteStore

# Well under SQLite's historical limit of 999 bound parameters per statement.
_CHUNK = 500


def _check_entries(entries: Sequence[tuple[bytes, str]]) -> dict[bytes, str]:
    """Validate every entry and return them as a dict; MALFORMED names the bad entry by index.

    Two entries giving different addresses for one pseudonym are refused.
    """
    batch: dict[bytes, str] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise malformed(f"entry {i} is not a (pseudonym, address) pair")
        pseudonym, address = entry
        if not isinstance(pseudonym, bytes) or not pseudonym:
            raise malformed(f"the pseudonym of entry {i} is not non-empty bytes")
        if not isinstance(address, str) or not address:
            raise malformed(f"the address of entry {i} is not a non-empty string")
        if batch.setdefault(pseudonym, address) != address:
            raise malformed(f"entry {i} gives a second address for a pseudonym of this batch")
    return batch


def _check_conflicts(
    entries: Sequence[tuple[bytes, str]], batch: Mapping[bytes, str], known: Mapping[bytes, str]
) -> None:
    """Raise MALFORMED, naming the first entry by index, if it would change a known address."""
    for pseudonym, address in batch.items():
        if known.get(pseudonym, address) != address:
            index = next(i for i, entry in enumerate(entries) if entry[0] == pseudonym)
            raise malformed(f"entry {index} gives a different address for a known pseudonym")


def _check_pseudonyms(pseudonyms: Sequence[bytes]) -> None:
    """Raise MALFORMED naming the first pseudonym that is not bytes, by index."""
    for i, pseudonym in enumerate(pseudonyms):
        if not isinstance(pseudonym, bytes):
            raise malformed(f"pseudonym at index {i} is not bytes")


def _not_found(missing: int, total: int) -> DispersError:
    """The error for a resolve that met pseudonyms outside the directory; counts only."""
    return DispersError(ErrorCode.NOT_FOUND, f"{missing} of {total} pseudonyms are not in the directory")


def _replay() -> DispersError:
    return DispersError(ErrorCode.REPLAY, "this subscription batch was committed before (replay)")


class AddressDirectory(ABC):
    """Maps each subscribed instance's pseudonym to its address; only the Target holds it."""

    @abstractmethod
    def put_many(self, entries: Sequence[tuple[bytes, str]]) -> int:
        """Record (pseudonym, address) entries, all or none; return how many were new.

        Re-putting a known pair is a no-op; a different address for a known pseudonym
        raises MALFORMED and writes nothing.
        """

    @abstractmethod
    def lookup(self, pseudonyms: Sequence[bytes]) -> list[str | None]:
        """Return the address of each pseudonym, in order, None where it is unknown."""

    @abstractmethod
    def commit_batch(self, batch_id: str, put: Sequence[tuple[bytes, str]], delete: Sequence[bytes]) -> None:
        """Apply one subscription batch's changes once, all or none: REPLAY if `batch_id` was
        committed before; otherwise record it, put the new entries and delete the others."""

    @abstractmethod
    def batch_committed(self, batch_id: str) -> bool:
        """Whether a subscription batch of this id was committed."""

    def resolve(self, pseudonyms: Sequence[bytes]) -> list[str]:
        """Return the address of each pseudonym, in order; NOT_FOUND if any is unknown."""
        found = self.lookup(pseudonyms)
        addresses = [a for a in found if a is not None]
        if len(addresses) != len(found):
            raise _not_found(len(found) - len(addresses), len(found))
        return addresses

    @abstractmethod
    def __len__(self) -> int:
        """Return the number of pseudonyms in the directory."""

    def close(self) -> None:  # noqa: B027 - deliberately a no-op for stores without resources
        """Release any resources held by the store; the store is unusable afterwards."""


class MemoryAddressDirectory(AddressDirectory):
    """A directory held in a Python dict; lost when the process ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._addresses: dict[bytes, str] = {}
        self._batches: set[str] = set()

    def commit_batch(self, batch_id: str, put: Sequence[tuple[bytes, str]], delete: Sequence[bytes]) -> None:
        """Apply one subscription batch's changes once (see AddressDirectory)."""
        batch = _check_entries(put)
        _check_pseudonyms(delete)
        with self._lock:
            if batch_id in self._batches:
                raise _replay()
            _check_conflicts(put, batch, self._addresses)
            self._batches.add(batch_id)
            self._addresses.update(batch)
            for p in delete:
                self._addresses.pop(p, None)

    def batch_committed(self, batch_id: str) -> bool:
        """Whether a subscription batch of this id was committed."""
        with self._lock:
            return batch_id in self._batches

    def put_many(self, entries: Sequence[tuple[bytes, str]]) -> int:
        """Record (pseudonym, address) entries, all or none; return how many were new.

        Re-putting a known pair is a no-op; a different address for a known pseudonym
        raises MALFORMED and writes nothing.
        """
        batch = _check_entries(entries)
        with self._lock:
            _check_conflicts(entries, batch, self._addresses)
            new = {p: a for p, a in batch.items() if p not in self._addresses}
            self._addresses.update(new)
        return len(new)

    def lookup(self, pseudonyms: Sequence[bytes]) -> list[str | None]:
        """Return the address of each pseudonym, in order, None where it is unknown."""
        _check_pseudonyms(pseudonyms)
        with self._lock:
            return [self._addresses.get(p) for p in pseudonyms]

    def __len__(self) -> int:
        """Return the number of pseudonyms in the directory."""
        with self._lock:
            return len(self._addresses)


class SQLiteAddressDirectory(AddressDirectory, SQLiteStore):
    """A directory in an SQLite file (or ":memory:"), safe to share between threads."""

    def __init__(self, path: str) -> None:
        self._open(path)
        with self._transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS directory ("
                " pseudonym BLOB PRIMARY KEY, address TEXT NOT NULL) WITHOUT ROWID"
            )
            conn.execute("CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY) WITHOUT ROWID")

    def commit_batch(self, batch_id: str, put: Sequence[tuple[bytes, str]], delete: Sequence[bytes]) -> None:
        """Apply one subscription batch's changes once (see AddressDirectory)."""
        batch = _check_entries(put)
        _check_pseudonyms(delete)
        with self._transaction() as conn:
            try:
                conn.execute("INSERT INTO batches (batch_id) VALUES (?)", (batch_id,))
            except sqlite3.IntegrityError:
                raise _replay() from None
            _check_conflicts(put, batch, self._lookup(conn, list(batch)))
            conn.executemany(
                "INSERT OR IGNORE INTO directory (pseudonym, address) VALUES (?, ?)", batch.items()
            )
            conn.executemany("DELETE FROM directory WHERE pseudonym = ?", [(p,) for p in set(delete)])

    def batch_committed(self, batch_id: str) -> bool:
        """Whether a subscription batch of this id was committed."""
        with self._lock:
            row = self._conn.execute("SELECT 1 FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
        return row is not None

    @staticmethod
    def _lookup(conn: sqlite3.Connection, pseudonyms: Sequence[bytes]) -> dict[bytes, str]:
        """Return the known addresses of the given distinct pseudonyms, in chunked queries."""
        known: dict[bytes, str] = {}
        for start in range(0, len(pseudonyms), _CHUNK):
            chunk = pseudonyms[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT pseudonym, address FROM directory WHERE pseudonym IN ({marks})", chunk
            )
            known.update((row[0], row[1]) for row in rows)
        return known

    def put_many(self, entries: Sequence[tuple[bytes, str]]) -> int:
        """Record (pseudonym, address) entries, all or none; return how many were new.

        Re-putting a known pair is a no-op; a different address for a known pseudonym
        raises MALFORMED and writes nothing.
        """
        batch = _check_entries(entries)
        with self._transaction() as conn:
            _check_conflicts(entries, batch, self._lookup(conn, list(batch)))
            cursor = conn.executemany(
                "INSERT OR IGNORE INTO directory (pseudonym, address) VALUES (?, ?)",
                batch.items(),
            )
            return max(cursor.rowcount, 0)

    def lookup(self, pseudonyms: Sequence[bytes]) -> list[str | None]:
        """Return the address of each pseudonym, in order, None where it is unknown."""
        _check_pseudonyms(pseudonyms)
        with self._transaction(write=False) as conn:
            known = self._lookup(conn, list(dict.fromkeys(pseudonyms)))
        return [known.get(p) for p in pseudonyms]

    def __len__(self) -> int:
        """Return the number of pseudonyms in the directory."""
        with self._lock:
            (count,) = self._conn.execute("SELECT COUNT(*) FROM directory").fetchone()
        return int(count)
