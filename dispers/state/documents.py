"""An SQLite document store holding the documents of every instance a personal-cloud host serves."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt

from dispers.core.errors import DispersError, ErrorCode

logger = logging.getLogger(__name__)

EPOCH = date(1970, 1, 1)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY,
    birth_date INTEGER NOT NULL,  -- days since 1970-01-01
    sex TEXT NOT NULL CHECK (sex IN ('F', 'M')),
    consent INTEGER NOT NULL CHECK (consent IN (0, 1))  -- 1 consents to data requests
);
CREATE TABLE IF NOT EXISTS heart_rate (
    instance_id TEXT NOT NULL,
    day INTEGER NOT NULL,  -- days since 1970-01-01
    bpm REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS heart_rate_by_instance_day ON heart_rate (instance_id, day);
CREATE TABLE IF NOT EXISTS subscribed (  -- instances whose subscription the cluster applied
    instance_id TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS declared_concepts (  -- concepts an owner opts into (a study, a cohort)
    instance_id TEXT NOT NULL,
    concept TEXT NOT NULL,
    PRIMARY KEY (instance_id, concept)
);
"""

# A batch of ids travels as one JSON array parameter expanded by json_each: one query per
# batch whatever its size, no temporary table to fill and clear, no SQLITE_MAX_VARIABLE_NUMBER.
_IDENTITY_SQL = """
SELECT b.key, i.instance_id IS NOT NULL,
       COALESCE(i.birth_date, 0), COALESCE(i.sex = 'F', 0), COALESCE(i.consent, 0)
FROM json_each(?) AS b
LEFT JOIN instances AS i ON i.instance_id = b.value
"""

_HEART_RATE_SQL = """
SELECT b.key, COUNT(h.bpm), TOTAL(h.bpm)
FROM json_each(?) AS b
LEFT JOIN heart_rate AS h ON h.instance_id = b.value AND h.day > ? AND h.day <= ?
GROUP BY b.key
"""


def epoch_day(day: date) -> int:
    """Return ``day`` as a number of days since 1970-01-01, the store's date unit."""
    return (day - EPOCH).days


def _batch_param(ids: Sequence[str]) -> str:
    if isinstance(ids, str) or not all(isinstance(i, str) for i in ids):
        raise DispersError(ErrorCode.MALFORMED, "instance ids must be a sequence of strings")
    return json.dumps(list(ids))


def _check_lengths(what: str, n: int, *others: int) -> None:
    if any(o != n for o in others):
        raise DispersError(ErrorCode.MALFORMED, f"{what}: columns have different lengths")


class DocumentStore:
    """Documents of many instances in one SQLite file, read and written in vectorised batches.

    Every read takes a batch of instance ids and answers with numpy arrays in the same order,
    using one SQL query per batch. One connection is shared behind a lock, so the store may be
    used from several threads.
    """

    def __init__(self, path: str | Path = ":memory:") -> None:
        self._path = str(path)
        self._lock = threading.Lock()
        # Autocommit mode: transactions are opened explicitly, so a bulk load is one transaction.
        self._conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        if self._path != ":memory:":
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        logger.debug("document store opened at %s", self._path)

    def close(self) -> None:
        """Close the connection; the store may not be used afterwards."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> DocumentStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _write(self, what: str, sql: str, rows: Sequence[tuple[object, ...]]) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(sql, rows)
            except sqlite3.IntegrityError:
                self._conn.execute("ROLLBACK")
                raise DispersError(
                    ErrorCode.FAILED_PRECONDITION, f"{what}: rows conflict with stored documents"
                ) from None
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        logger.debug("%s: %d rows written", what, len(rows))

    def add_instances(
        self,
        ids: Sequence[str],
        birth_days: npt.ArrayLike,
        sex: Sequence[str],
        consent: npt.ArrayLike,
    ) -> None:
        """Add instances in one transaction; an id already on this host rejects the whole batch."""
        _batch_param(ids)
        born = np.asarray(birth_days, dtype=np.int64)
        agrees = np.asarray(consent, dtype=bool)
        _check_lengths("add_instances", len(ids), len(born), len(sex), len(agrees))
        if not all(s in ("F", "M") for s in sex):
            raise DispersError(ErrorCode.MALFORMED, "add_instances: sex must be 'F' or 'M'")
        rows = list(zip(ids, born.tolist(), sex, agrees.astype(np.int64).tolist(), strict=True))
        self._write("add_instances", "INSERT INTO instances VALUES (?, ?, ?, ?)", rows)

    def add_heart_rates(self, ids: Sequence[str], days: npt.ArrayLike, bpm: npt.ArrayLike) -> None:
        """Add heart-rate measurements (owner, day, beats per minute) in one transaction."""
        _batch_param(ids)
        day = np.asarray(days, dtype=np.int64)
        rate = np.asarray(bpm, dtype=np.float64)
        _check_lengths("add_heart_rates", len(ids), len(day), len(rate))
        if not np.all(np.isfinite(rate)):
            raise DispersError(ErrorCode.MALFORMED, "add_heart_rates: bpm must be finite")
        rows = list(zip(ids, day.tolist(), rate.tolist(), strict=True))
        self._write("add_heart_rates", "INSERT INTO heart_rate VALUES (?, ?, ?)", rows)

    def declare_concepts(self, ids: Sequence[str], concepts: Sequence[str]) -> None:
        """Record that instance ids[i] opts into concepts[i] (idempotent), in one transaction."""
        _batch_param(ids)
        _check_lengths("declare_concepts", len(ids), len(concepts))
        rows = list(zip(ids, concepts, strict=True))
        self._write("declare_concepts", "INSERT OR IGNORE INTO declared_concepts VALUES (?, ?)", rows)

    def declared_concepts(self, ids: Sequence[str]) -> list[list[str]]:
        """The concepts each of ``ids`` declared, sorted, in the order of ``ids``."""
        batch = _batch_param(ids)
        with self._lock:
            rows = self._conn.execute(
                "SELECT b.key, d.concept FROM json_each(?) AS b "
                "JOIN declared_concepts AS d ON d.instance_id = b.value ORDER BY b.key, d.concept",
                (batch,),
            ).fetchall()
        out: list[list[str]] = [[] for _ in ids]
        for pos, concept in rows:
            out[int(pos)].append(str(concept))
        return out

    def set_subscribed(self, ids: Sequence[str], subscribed: bool) -> None:
        """Record that ``ids`` are (or are no longer) subscribed, in one transaction."""
        _batch_param(ids)
        rows = [(i,) for i in ids]
        if subscribed:
            self._write("set_subscribed", "INSERT OR IGNORE INTO subscribed VALUES (?)", rows)
        else:
            self._write("set_subscribed", "DELETE FROM subscribed WHERE instance_id = ?", rows)

    def subscribed(self, ids: Sequence[str]) -> npt.NDArray[np.bool_]:
        """Whether each of ``ids`` is subscribed (one query for the batch)."""
        batch = _batch_param(ids)
        with self._lock:
            rows = self._conn.execute(
                "SELECT b.key FROM json_each(?) AS b JOIN subscribed AS s ON s.instance_id = b.value",
                (batch,),
            ).fetchall()
        out = np.zeros(len(ids), dtype=bool)
        out[[int(r[0]) for r in rows]] = True
        return out

    def instance_ids(self) -> list[str]:
        """Return the ids of every instance on this host, sorted."""
        with self._lock:
            rows = self._conn.execute("SELECT instance_id FROM instances ORDER BY instance_id").fetchall()
        return [str(r[0]) for r in rows]

    def count(self) -> int:
        """Return the number of instances on this host."""
        with self._lock:
            (n,) = self._conn.execute("SELECT COUNT(*) FROM instances").fetchone()
        return int(n)

    def _identity_rows(self, ids: Sequence[str]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        batch = _batch_param(ids)
        with self._lock:
            rows = self._conn.execute(_IDENTITY_SQL, (batch,)).fetchall()
        table = np.array(rows, dtype=np.int64).reshape(len(rows), 5)
        found = np.zeros(len(ids), dtype=bool)
        found[table[:, 0]] = table[:, 1] != 0
        return table, found

    def known(self, ids: Sequence[str]) -> npt.NDArray[np.bool_]:
        """Whether each of ``ids`` is an instance of this host (one query for the batch)."""
        return self._identity_rows(ids)[1]

    def identity(
        self, ids: Sequence[str]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """Return (birth days, is female, consents) for ``ids``, in the given order.

        An id that is not on this host raises NOT_FOUND; the message gives how many, never
        which, since an id may be personal.
        """
        table, found = self._identity_rows(ids)
        pos = table[:, 0]
        missing = len(ids) - int(np.count_nonzero(found))
        if missing:
            raise DispersError(ErrorCode.NOT_FOUND, f"{missing} instance ids are not on this host")
        birth = np.zeros(len(ids), dtype=np.int64)
        female = np.zeros(len(ids), dtype=bool)
        consent = np.zeros(len(ids), dtype=bool)
        birth[pos] = table[:, 2]
        female[pos] = table[:, 3] != 0
        consent[pos] = table[:, 4] != 0
        return birth, female, consent

    def heart_rate_summary(
        self, ids: Sequence[str], start_day: int, end_day: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Return (count, mean) of heart-rate measurements with start_day < day <= end_day.

        Results follow the order of ``ids``; an instance without measurements in the window
        (or unknown to this host) has count 0 and mean NaN.
        """
        batch = _batch_param(ids)
        with self._lock:
            rows = self._conn.execute(_HEART_RATE_SQL, (batch, int(start_day), int(end_day))).fetchall()
        n = len(ids)
        count = np.zeros(n, dtype=np.int64)
        total = np.zeros(n, dtype=np.float64)
        if rows:
            pos = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            count[pos] = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
            total[pos] = np.fromiter((r[2] for r in rows), dtype=np.float64, count=len(rows))
        mean = np.full(n, np.nan, dtype=np.float64)
        has = count > 0
        mean[has] = total[has] / count[has]
        return count, mean
