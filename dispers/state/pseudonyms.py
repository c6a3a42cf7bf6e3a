"""The Target Finder's token -> set of pseudonyms: an ABC, in-memory and SQLite."""

from __future__ import annotations

import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.state._sqlite import SQLiteStore

Pairs = Sequence[tuple[Sequence[bytes], bytes]]
"""(tokens, pseudonym) pairs: the pseudonym joins or leaves each token's set."""


def _memberships(pairs: Pairs) -> list[tuple[bytes, bytes]]:
    """Validate every pair, then flatten them to (token, pseudonym) rows.

    Raises MALFORMED naming the first bad pair (and token) by index.
    """
    rows: list[tuple[bytes, bytes]] = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise malformed(f"pair {i} is not a (tokens, pseudonym) pair")
        tokens, pseudonym = pair
        if not isinstance(pseudonym, bytes) or not pseudonym:
            raise malformed(f"the pseudonym of pair {i} is not non-empty bytes")
        # A lone bytes token is itself a Sequence (of ints): refuse it rather than
        # silently treating each byte as a token.
        if isinstance(tokens, bytes | bytearray | str) or not isinstance(tokens, Sequence):
            raise malformed(f"the tokens of pair {i} are not a sequence of tokens")
        for j, token in enumerate(tokens):
            if not isinstance(token, bytes) or not token:
                raise malformed(f"token {j} of pair {i} is not non-empty bytes")
            rows.append((token, pseudonym))
    return rows


def _check_pseudonyms(pseudonyms: Sequence[bytes]) -> Sequence[bytes]:
    for i, p in enumerate(pseudonyms):
        if not isinstance(p, bytes) or not p:
            raise malformed(f"pseudonym {i} is not non-empty bytes")
    return pseudonyms


def _replay() -> DispersError:
    return DispersError(ErrorCode.REPLAY, "this subscription batch was applied before (replay)")


class PseudonymSets(ABC):
    """For each token, the set of pseudonyms of the instances subscribed to its concept."""

    @abstractmethod
    def add(self, pairs: Pairs) -> int:
        """Add each pseudonym to each of its tokens' sets (all or none; idempotent).

        Returns the number of (token, pseudonym) memberships newly created.
        """

    @abstractmethod
    def remove(self, pairs: Pairs) -> int:
        """Remove each pseudonym from each of its tokens' sets (all or none).

        Removing a pseudonym that is not a member is a no-op. Returns the number of
        memberships removed.
        """

    @abstractmethod
    def subscribe_batch(self, batch_id: str, pairs: Pairs) -> int:
        """Apply a subscription batch once: REPLAY if `batch_id` was applied before, else
        record it and add the pairs, in one step (all or none). Returns memberships added."""

    @abstractmethod
    def unsubscribe_batch(self, batch_id: str, pseudonyms: Sequence[bytes]) -> int:
        """Apply an unsubscription batch once: REPLAY if `batch_id` was applied before, else
        record it and remove each pseudonym from every set it is in, whatever concepts it
        holds today (all or none). Returns memberships removed."""

    @abstractmethod
    def members(self, token: bytes) -> frozenset[bytes]:
        """Return the pseudonyms in a token's set (empty for an unknown token)."""

    @abstractmethod
    def universe(self) -> frozenset[bytes]:
        """Return every pseudonym that is a member of at least one token's set."""

    @abstractmethod
    def token_count(self) -> int:
        """Return the number of tokens whose set is not empty."""

    def close(self) -> None:  # noqa: B027 - deliberately a no-op for stores without resources
        """Release any resources held by the store; the store is unusable afterwards."""


class MemoryPseudonymSets(PseudonymSets):
    """Sets held in Python dicts; lost when the process ends.

    Each token's set is a dict of pseudonym -> None, not a set: a dict holding only bytes
    and None is untracked by the cyclic garbage collector, whereas every collection of the
    oldest generation walks each member of a set. With sets, the cost of a batch grew with the
    number of subscribers (6 ms per 1,000 at first, 49 ms near 10 million, in CPU time); with
    untracked dicts it stays flat (benchmarks/bench_state.py).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sets: dict[bytes, dict[bytes, None]] = {}
        # pseudonym -> number of tokens it belongs to, so universe() needs no union.
        self._refs: dict[bytes, int] = {}
        self._batches: set[str] = set()

    def subscribe_batch(self, batch_id: str, pairs: Pairs) -> int:
        """Apply a subscription batch once (see PseudonymSets)."""
        rows = _memberships(pairs)
        with self._lock:
            if batch_id in self._batches:
                raise _replay()
            self._batches.add(batch_id)
            return self._add_rows(rows)

    def unsubscribe_batch(self, batch_id: str, pseudonyms: Sequence[bytes]) -> int:
        """Apply an unsubscription batch once (see PseudonymSets)."""
        gone = set(_check_pseudonyms(pseudonyms))
        with self._lock:
            if batch_id in self._batches:
                raise _replay()
            self._batches.add(batch_id)
            removed = 0
            for token in list(self._sets):
                members = self._sets[token]
                for p in gone:
                    if p in members:
                        del members[p]
                        removed += 1
                if not members:
                    del self._sets[token]
            for p in gone:
                self._refs.pop(p, None)
        return removed

    def _add_rows(self, rows: list[tuple[bytes, bytes]]) -> int:
        added = 0
        for token, pseudonym in rows:
            members = self._sets.get(token)
            if members is None:
                members = self._sets[token] = {}
            if pseudonym not in members:
                members[pseudonym] = None
                self._refs[pseudonym] = self._refs.get(pseudonym, 0) + 1
                added += 1
        return added

    def add(self, pairs: Pairs) -> int:
        """Add each pseudonym to each of its tokens' sets (all or none; idempotent).

        Returns the number of (token, pseudonym) memberships newly created.
        """
        rows = _memberships(pairs)
        with self._lock:
            return self._add_rows(rows)

    def remove(self, pairs: Pairs) -> int:
        """Remove each pseudonym from each of its tokens' sets (all or none).

        Removing a pseudonym that is not a member is a no-op. Returns the number of
        memberships removed.
        """
        rows = _memberships(pairs)
        removed = 0
        with self._lock:
            for token, pseudonym in rows:
                members = self._sets.get(token)
                if members is None or pseudonym not in members:
                    continue
                del members[pseudonym]
                if not members:
                    del self._sets[token]
                refs = self._refs[pseudonym] - 1
                if refs:
                    self._refs[pseudonym] = refs
                else:
                    del self._refs[pseudonym]
                removed += 1
        return removed

    def members(self, token: bytes) -> frozenset[bytes]:
        """Return the pseudonyms in a token's set (empty for an unknown token)."""
        with self._lock:
            return frozenset(self._sets.get(token, ()))

    def universe(self) -> frozenset[bytes]:
        """Return every pseudonym that is a member of at least one token's set."""
        with self._lock:
            return frozenset(self._refs)

    def token_count(self) -> int:
        """Return the number of tokens whose set is not empty."""
        with self._lock:
            return len(self._sets)


class SQLitePseudonymSets(PseudonymSets, SQLiteStore):
    """Sets in an SQLite file (or ":memory:"), safe to share between threads."""

    def __init__(self, path: str) -> None:
        self._open(path)
        with self._transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS memberships ("
                " token BLOB NOT NULL, pseudonym BLOB NOT NULL,"
                " PRIMARY KEY (token, pseudonym)) WITHOUT ROWID"
            )
            conn.execute("CREATE INDEX IF NOT EXISTS memberships_pseudonym ON memberships (pseudonym)")
            conn.execute("CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY) WITHOUT ROWID")

    @staticmethod
    def _claim(conn: sqlite3.Connection, batch_id: str) -> None:
        try:
            conn.execute("INSERT INTO batches (batch_id) VALUES (?)", (batch_id,))
        except sqlite3.IntegrityError:
            raise _replay() from None

    def subscribe_batch(self, batch_id: str, pairs: Pairs) -> int:
        """Apply a subscription batch once (see PseudonymSets)."""
        rows = _memberships(pairs)
        with self._transaction() as conn:
            self._claim(conn, batch_id)
            cursor = conn.executemany(
                "INSERT OR IGNORE INTO memberships (token, pseudonym) VALUES (?, ?)", rows
            )
            return max(cursor.rowcount, 0)

    def unsubscribe_batch(self, batch_id: str, pseudonyms: Sequence[bytes]) -> int:
        """Apply an unsubscription batch once (see PseudonymSets)."""
        rows = [(p,) for p in set(_check_pseudonyms(pseudonyms))]
        with self._transaction() as conn:
            self._claim(conn, batch_id)
            cursor = conn.executemany("DELETE FROM memberships WHERE pseudonym = ?", rows)
            return max(cursor.rowcount, 0)

    def add(self, pairs: Pairs) -> int:
        """Add each pseudonym to each of its tokens' sets (all or none; idempotent).

        Returns the number of (token, pseudonym) memberships newly created.
        """
        rows = _memberships(pairs)
        with self._transaction() as conn:
            cursor = conn.executemany(
                "INSERT OR IGNORE INTO memberships (token, pseudonym) VALUES (?, ?)", rows
            )
            return max(cursor.rowcount, 0)

    def remove(self, pairs: Pairs) -> int:
        """Remove each pseudonym from each of its tokens' sets (all or none).

        Removing a pseudonym that is not a member is a no-op. Returns the number of
        memberships removed.
        """
        rows = _memberships(pairs)
        with self._transaction() as conn:
            cursor = conn.executemany("DELETE FROM memberships WHERE token = ? AND pseudonym = ?", rows)
            return max(cursor.rowcount, 0)

    def members(self, token: bytes) -> frozenset[bytes]:
        """Return the pseudonyms in a token's set (empty for an unknown token)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT pseudonym FROM memberships WHERE token = ?", (token,)
            ).fetchall()
        return frozenset(row[0] for row in rows)

    def universe(self) -> frozenset[bytes]:
        """Return every pseudonym that is a member of at least one token's set."""
        with self._lock:
            rows = self._conn.execute("SELECT DISTINCT pseudonym FROM memberships").fetchall()
        return frozenset(row[0] for row in rows)

    def token_count(self) -> int:
        """Return the number of tokens whose set is not empty."""
        with self._lock:
            (count,) = self._conn.execute("SELECT COUNT(DISTINCT token) FROM memberships").fetchone()
        return int(count)
