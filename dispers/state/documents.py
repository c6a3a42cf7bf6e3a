"""An SQLite document store holding the documents of every instance a personal-cloud host serves."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Protocol

import numpy as np
import numpy.typing as npt

from dispers.core.errors import DispersError, ErrorCode

logger = logging.getLogger(__name__)

EPOCH = date(1970, 1, 1)

# The day of an instance without measurement in a window (no real day is this far back).
NO_DAY = int(np.iinfo(np.int64).min)

_MAX_NAME_IN_ERROR = 64


@dataclass(frozen=True)
class MeasurementKind:
    """A kind of time-series measurement: its unit and the physically possible values.

    ``lo`` and ``hi`` bound one value (inclusive); the store refuses anything outside.
    ``max_per_day`` is how many values a day plausibly holds (a daily total is one, a
    wearable's heart rate one a minute): it is declared, not enforced, and bounds the counts
    and sums that local functions compute over a window.
    """

    name: str
    unit: str
    lo: float
    hi: float
    max_per_day: int
    summary: str


MEASUREMENT_KINDS: Mapping[str, MeasurementKind] = MappingProxyType(
    {
        k.name: k
        for k in (
            MeasurementKind("heart_rate", "bpm", 20.0, 250.0, 1440, "heart rate in beats per minute"),
            MeasurementKind("steps", "steps", 0.0, 100_000.0, 1, "steps walked in a day"),
            MeasurementKind("sleep_hours", "h", 0.0, 24.0, 1, "hours slept in a night"),
            MeasurementKind("weight_kg", "kg", 2.0, 400.0, 1, "body weight in kilograms"),
        )
    }
)


def measurement_kind(name: str) -> MeasurementKind:
    """Return the registered measurement kind ``name``, or raise NOT_FOUND."""
    try:
        return MEASUREMENT_KINDS[name]
    except (KeyError, TypeError):
        shown = repr(str(name)[:_MAX_NAME_IN_ERROR])
        raise DispersError(ErrorCode.NOT_FOUND, f"unknown measurement kind {shown}") from None


# Schema version 1 keeps every kind of measurement in one table; version 0 (no user_version)
# had a heart_rate table, moved into it on open. heart_rate stays readable as a view.
_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY,
    birth_date INTEGER NOT NULL,  -- days since 1970-01-01
    sex TEXT NOT NULL CHECK (sex IN ('F', 'M')),
    consent INTEGER NOT NULL CHECK (consent IN (0, 1))  -- 1 consents to data requests
);
CREATE TABLE IF NOT EXISTS measurements (  -- one row per value: several a day are allowed
    instance_id TEXT NOT NULL,
    kind TEXT NOT NULL,  -- a key of MEASUREMENT_KINDS, checked on write
    day INTEGER NOT NULL,  -- days since 1970-01-01
    value REAL NOT NULL  -- in the kind's unit, within its bounds
);
-- Covering: a window summary reads the index alone, never the table.
CREATE INDEX IF NOT EXISTS measurements_by_instance_kind_day
    ON measurements (instance_id, kind, day, value);
CREATE TABLE IF NOT EXISTS subscribed (  -- instances whose subscription the cluster applied
    instance_id TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS declared_concepts (  -- concepts an owner opts into (a study, a cohort)
    instance_id TEXT NOT NULL,
    concept TEXT NOT NULL,
    PRIMARY KEY (instance_id, concept)
);
CREATE TABLE IF NOT EXISTS training_records (  -- labelled records of a registered dataset
    instance_id TEXT NOT NULL,
    dataset TEXT NOT NULL,  -- a name of dispers.learn.data's registry (digits)
    idx INTEGER NOT NULL,  -- the record's position among its owner's records of the dataset
    features BLOB NOT NULL,  -- little-endian float32, the dataset's number of features
    label INTEGER NOT NULL,
    PRIMARY KEY (instance_id, dataset, idx)
);
"""

_MIGRATE_HEART_RATE = (
    """INSERT INTO measurements (instance_id, kind, day, value)
    SELECT instance_id, 'heart_rate', day, bpm FROM heart_rate ORDER BY rowid""",
    "DROP TABLE heart_rate",
)

# The heart_rate table of schema 0 as a view, which SQL written for it can still read, insert
# into and delete from. Rows alike in all three columns cannot be told apart by a WHERE clause,
# so deleting every row alike is what a DELETE on the old table did. No UPDATE: a per-row
# trigger could not tell which of two alike rows it had already changed.
_HEART_RATE_VIEW = (
    """CREATE VIEW IF NOT EXISTS heart_rate (instance_id, day, bpm) AS
    SELECT instance_id, day, value FROM measurements WHERE kind = 'heart_rate'""",
    """CREATE TRIGGER IF NOT EXISTS heart_rate_insert INSTEAD OF INSERT ON heart_rate BEGIN
    INSERT INTO measurements (instance_id, kind, day, value)
        VALUES (NEW.instance_id, 'heart_rate', NEW.day, NEW.bpm);
END""",
    """CREATE TRIGGER IF NOT EXISTS heart_rate_delete INSTEAD OF DELETE ON heart_rate BEGIN
    DELETE FROM measurements WHERE kind = 'heart_rate'
        AND instance_id = OLD.instance_id AND day = OLD.day AND value = OLD.bpm;
END""",
)

# A batch of ids travels as one JSON array parameter expanded by json_each: one query per
# batch whatever its size, no temporary table to fill and clear, no SQLITE_MAX_VARIABLE_NUMBER.
_IDENTITY_SQL = """
SELECT b.key, i.instance_id IS NOT NULL,
       COALESCE(i.birth_date, 0), COALESCE(i.sex = 'F', 0), COALESCE(i.consent, 0)
FROM json_each(?) AS b
LEFT JOIN instances AS i ON i.instance_id = b.value
"""

# Per instance and day first, then per instance: MAX(day) in the outer query makes SQLite
# take the bare columns n and s from the row holding the latest day (a documented SQLite
# rule for a lone max()), so the latest value is the mean of that day's values.
_SUMMARY_SQL = """
SELECT key, SUM(n), SUM(s), MAX(day), n, s
FROM (
    SELECT b.key AS key, m.day AS day, COUNT(*) AS n, TOTAL(m.value) AS s
    FROM json_each(?) AS b
    JOIN measurements AS m
      ON m.instance_id = b.value AND m.kind = ? AND m.day > ? AND m.day <= ?
    GROUP BY b.key, m.day
)
GROUP BY key
"""

_TOTALS_SQL = """
SELECT b.key, COUNT(*), TOTAL(m.value)
FROM json_each(?) AS b
JOIN measurements AS m ON m.instance_id = b.value AND m.kind = ? AND m.day > ? AND m.day <= ?
GROUP BY b.key
"""

_ROWS_SQL = """
SELECT b.key, m.day, m.value
FROM json_each(?) AS b
JOIN measurements AS m ON m.instance_id = b.value AND m.kind = ? AND m.day > ? AND m.day <= ?
ORDER BY b.key, m.day, m.rowid
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


def _first(bad: npt.NDArray[np.bool_]) -> int | None:
    rows = np.flatnonzero(bad)
    return int(rows[0]) if len(rows) else None


def _measurement_columns(
    kind: MeasurementKind, n: int, days: npt.ArrayLike, values: npt.ArrayLike
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Check days and values of ``n`` rows of ``kind``; an error names the first bad row.

    Values themselves never appear in an error: they are personal data.
    """
    what = f"add_measurements: {kind.name}"
    try:
        raw_days = np.asarray(days)
        value = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise DispersError(ErrorCode.MALFORMED, f"{what}: days and values must be numbers") from None
    if raw_days.ndim != 1 or value.ndim != 1:
        raise DispersError(ErrorCode.MALFORMED, f"{what}: days and values must be flat columns")
    _check_lengths(what, n, len(raw_days), len(value))
    if raw_days.dtype.kind in "iu":
        day = raw_days.astype(np.int64)
    elif raw_days.dtype.kind == "f":
        row = _first(~np.isfinite(raw_days) | (raw_days != np.floor(raw_days)))
        if row is not None:
            raise DispersError(ErrorCode.MALFORMED, f"{what} row {row}: day is not a whole number")
        day = raw_days.astype(np.int64)
    elif n == 0:
        day = np.zeros(0, dtype=np.int64)
    else:
        raise DispersError(ErrorCode.MALFORMED, f"{what}: days must be whole numbers")
    row = _first(~np.isfinite(value))
    if row is not None:
        raise DispersError(ErrorCode.MALFORMED, f"{what} row {row}: value is not finite")
    row = _first((value < kind.lo) | (value > kind.hi))
    if row is not None:
        raise DispersError(
            ErrorCode.MALFORMED,
            f"{what} row {row}: value outside [{kind.lo:g}, {kind.hi:g}] {kind.unit}",
        )
    return day, value


@dataclass(frozen=True)
class MeasurementSummary:
    """One window's measurements of one kind, per instance of a batch, in the batch's order.

    ``latest`` is the mean of the values of ``latest_day``, the most recent day in the window
    with a measurement. Where ``count`` is 0 (or the instance is unknown) ``sum`` is 0,
    ``latest`` NaN and ``latest_day`` NO_DAY.
    """

    count: npt.NDArray[np.int64]
    sum: npt.NDArray[np.float64]
    latest: npt.NDArray[np.float64]
    latest_day: npt.NDArray[np.int64]

    @property
    def mean(self) -> npt.NDArray[np.float64]:
        """Mean of the window's values; NaN where there is none."""
        has = self.count > 0
        out: npt.NDArray[np.float64] = np.divide(
            self.sum, self.count, out=np.full(len(self.count), np.nan), where=has
        )
        return out


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
        self._migrate()
        logger.debug("document store opened at %s", self._path)

    def _migrate(self) -> None:
        """Bring a store written by an older version to the current schema, in one transaction."""
        (version,) = self._conn.execute("PRAGMA user_version").fetchone()
        if version >= _SCHEMA_VERSION:
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = self._conn.execute("PRAGMA user_version").fetchone()  # another opener?
            if version < _SCHEMA_VERSION:
                old = self._conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'heart_rate'"
                ).fetchone()
                if old is not None:
                    for statement in _MIGRATE_HEART_RATE:
                        self._conn.execute(statement)
                    logger.info("document store %s: heart_rate moved into measurements", self._path)
                for statement in _HEART_RATE_VIEW:
                    self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

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

    def _write(
        self,
        what: str,
        sql: str,
        rows: Sequence[tuple[object, ...]],
        check: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        """Write ``rows`` in one transaction, after ``check`` (inside it) raised nothing."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                if check is not None:
                    check(self._conn)
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

    def add_measurements(
        self, kind: str, ids: Sequence[str], days: npt.ArrayLike, values: npt.ArrayLike
    ) -> None:
        """Add measurements of ``kind`` (owner ids[i], epoch day days[i], values[i]) in one transaction.

        Refused whole, with the first bad row named (0-based) and nothing written: an unknown
        kind or an owner not on this host (NOT_FOUND), a day that is not a whole number, or a
        value that is not finite or outside the kind's bounds (MALFORMED).
        """
        spec = measurement_kind(kind)
        _batch_param(ids)
        day, value = _measurement_columns(spec, len(ids), days, values)
        what = f"add_measurements: {spec.name}"

        def owners_known(conn: sqlite3.Connection) -> None:
            unique = list(dict.fromkeys(ids))
            missing = conn.execute(
                "SELECT b.value FROM json_each(?) AS b WHERE NOT EXISTS "
                "(SELECT 1 FROM instances AS i WHERE i.instance_id = b.value)",
                (json.dumps(unique),),
            ).fetchall()
            if missing:
                absent = {str(r[0]) for r in missing}
                row = next(k for k, i in enumerate(ids) if i in absent)
                raise DispersError(ErrorCode.NOT_FOUND, f"{what} row {row}: instance is not on this host")

        rows = list(zip(ids, [spec.name] * len(ids), day.tolist(), value.tolist(), strict=True))
        sql = "INSERT INTO measurements (instance_id, kind, day, value) VALUES (?, ?, ?, ?)"
        self._write(what, sql, rows, check=owners_known)

    def add_heart_rates(self, ids: Sequence[str], days: npt.ArrayLike, bpm: npt.ArrayLike) -> None:
        """Add heart-rate measurements (owner, day, beats per minute) in one transaction.

        The same as ``add_measurements("heart_rate", ids, days, bpm)``.
        """
        self.add_measurements("heart_rate", ids, days, bpm)

    def import_documents(
        self,
        *,
        people: tuple[Sequence[str], Sequence[int], Sequence[str], Sequence[bool]],
        measurements: Mapping[str, tuple[Sequence[str], Sequence[int], Sequence[float]]],
        declared: tuple[Sequence[str], Sequence[str]],
    ) -> None:
        """Write checked documents in one transaction, idempotently (``dispers import``).

        ``people`` (ids, birth epoch days, sex, consent) are inserted or have their identity and
        consent set; ``measurements`` (per kind: owner ids, epoch days, values) replace what is
        stored for the same (instance, kind, day); ``declared`` (ids, concepts) are added once.
        Columns are checked as by add_instances and add_measurements; any error, or an owner
        that is not on this host after the people are written, writes nothing.
        """
        ids, born, sex, consent = people
        _batch_param(ids)
        _check_lengths("import_documents: people", len(ids), len(born), len(sex), len(consent))
        if not all(s in ("F", "M") for s in sex):
            raise DispersError(ErrorCode.MALFORMED, "import_documents: sex must be 'F' or 'M'")
        person_rows = list(
            zip(ids, [int(b) for b in born], sex, [int(bool(c)) for c in consent], strict=True)
        )
        measured: list[tuple[str, str, int, float]] = []
        keys: dict[tuple[str, str, int], None] = {}
        for kind, (owners, days, values) in measurements.items():
            spec = measurement_kind(kind)
            _batch_param(owners)
            day, value = _measurement_columns(spec, len(owners), days, values)
            for owner, d, v in zip(owners, day.tolist(), value.tolist(), strict=True):
                measured.append((owner, spec.name, d, v))
                keys[(owner, spec.name, d)] = None
        declared_ids, concepts = declared
        _batch_param(declared_ids)
        _check_lengths("import_documents: declared", len(declared_ids), len(concepts))
        owners_all = list(dict.fromkeys([m[0] for m in measured] + list(declared_ids)))
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT INTO instances VALUES (?, ?, ?, ?) ON CONFLICT (instance_id) DO UPDATE SET "
                    "birth_date = excluded.birth_date, sex = excluded.sex, consent = excluded.consent",
                    person_rows,
                )
                (missing,) = self._conn.execute(
                    "SELECT COUNT(*) FROM json_each(?) AS b WHERE NOT EXISTS "
                    "(SELECT 1 FROM instances AS i WHERE i.instance_id = b.value)",
                    (json.dumps(owners_all),),
                ).fetchone()
                if missing:
                    raise DispersError(
                        ErrorCode.NOT_FOUND, f"import_documents: {missing} owners are not on this host"
                    )
                held = self._conn.execute(
                    "SELECT 1 FROM json_each(?) AS b WHERE EXISTS "
                    "(SELECT 1 FROM measurements AS m WHERE m.instance_id = b.value) LIMIT 1",
                    (json.dumps(list(dict.fromkeys(m[0] for m in measured))),),
                ).fetchone()
                if held is not None:  # nothing to replace for people without measurements yet
                    self._conn.executemany(
                        "DELETE FROM measurements WHERE instance_id = ? AND kind = ? AND day = ?", list(keys)
                    )
                self._conn.executemany(
                    "INSERT INTO measurements (instance_id, kind, day, value) VALUES (?, ?, ?, ?)", measured
                )
                self._conn.executemany(
                    "INSERT OR IGNORE INTO declared_concepts VALUES (?, ?)",
                    list(zip(declared_ids, concepts, strict=True)),
                )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        logger.debug("import: %d people, %d measurements", len(person_rows), len(measured))

    def import_training_records(
        self,
        dataset: str,
        ids: Sequence[str],
        offsets: npt.ArrayLike,
        features: npt.ArrayLike,
        labels: npt.ArrayLike,
    ) -> None:
        """Set the records of `dataset` each of `ids` holds, in one transaction: instance ids[i]
        holds rows offsets[i]:offsets[i+1] of `features` (float32) and `labels`, replacing what it
        held of that dataset (importing again changes nothing). Every owner must be on this host."""
        _batch_param(ids)
        off = np.asarray(offsets, dtype=np.int64)
        x = np.ascontiguousarray(features, dtype="<f4")
        y = np.asarray(labels, dtype=np.int64)
        _check_lengths("import_training_records: offsets", len(ids) + 1, len(off))
        if x.ndim != 2 or len(x) != len(y) or off[0] != 0 or off[-1] != len(y) or (np.diff(off) < 0).any():
            raise DispersError(ErrorCode.MALFORMED, "import_training_records: rows do not match the offsets")
        if not np.isfinite(x).all() or (y < 0).any():
            raise DispersError(ErrorCode.MALFORMED, "import_training_records: non-finite features or labels")
        rows = [
            (ids[i], dataset, j - int(off[i]), x[j].tobytes(), int(y[j]))
            for i in range(len(ids))
            for j in range(int(off[i]), int(off[i + 1]))
        ]
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                (missing,) = self._conn.execute(
                    "SELECT COUNT(*) FROM json_each(?) AS b WHERE NOT EXISTS "
                    "(SELECT 1 FROM instances AS i WHERE i.instance_id = b.value)",
                    (json.dumps(list(ids)),),
                ).fetchone()
                if missing:
                    raise DispersError(
                        ErrorCode.NOT_FOUND, f"import_training_records: {missing} owners are not on this host"
                    )
                self._conn.executemany(
                    "DELETE FROM training_records WHERE instance_id = ? AND dataset = ?",
                    [(i, dataset) for i in ids],
                )
                self._conn.executemany("INSERT INTO training_records VALUES (?, ?, ?, ?, ?)", rows)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        logger.debug("import: %d training records of %d instances", len(rows), len(ids))

    def training_records(
        self, dataset: str, ids: Sequence[str], n_features: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """(offsets, features, labels) of the `dataset` records each of `ids` holds, in the order
        of `ids` (an instance without any holds none); one query per batch."""
        batch = _batch_param(ids)
        with self._lock:
            rows = self._conn.execute(
                "SELECT b.key, r.features, r.label FROM json_each(?) AS b "
                "JOIN training_records AS r ON r.instance_id = b.value AND r.dataset = ? "
                "ORDER BY b.key, r.idx",
                (batch, dataset),
            ).fetchall()
        pos = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        counts = np.bincount(pos, minlength=len(ids)) if len(rows) else np.zeros(len(ids), dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        width = 4 * n_features
        if any(len(r[1]) != width for r in rows):
            raise DispersError(ErrorCode.MALFORMED, f"a {dataset} record does not hold {n_features} features")
        x = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), n_features)
        y = np.fromiter((r[2] for r in rows), dtype=np.int64, count=len(rows))
        return offsets, x.astype(np.float32), y

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

    def count_subscribed(self) -> int:
        """How many of this host's instances are subscribed (what `dispers subscribe` shows)."""
        with self._lock:
            (n,) = self._conn.execute("SELECT COUNT(*) FROM subscribed").fetchone()
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

    def measurement_summary(
        self, kind: str, ids: Sequence[str], start_day: int, end_day: int
    ) -> MeasurementSummary:
        """Count, sum and latest value of ``kind`` with start_day < day <= end_day, per id.

        One SQL query for the batch, whatever its size; results follow the order of ``ids``
        (an id may repeat). An unknown kind raises NOT_FOUND.
        """
        spec = measurement_kind(kind)
        batch = _batch_param(ids)
        with self._lock:
            rows = self._conn.execute(
                _SUMMARY_SQL, (batch, spec.name, int(start_day), int(end_day))
            ).fetchall()
        n = len(ids)
        count = np.zeros(n, dtype=np.int64)
        total = np.zeros(n, dtype=np.float64)
        latest = np.full(n, np.nan, dtype=np.float64)
        latest_day = np.full(n, NO_DAY, dtype=np.int64)
        if rows:
            table = np.array(rows, dtype=np.float64)  # exact: counts and days are far below 2**53
            pos = table[:, 0].astype(np.int64)
            count[pos] = table[:, 1].astype(np.int64)
            total[pos] = table[:, 2]
            latest_day[pos] = table[:, 3].astype(np.int64)
            latest[pos] = table[:, 5] / table[:, 4]
        return MeasurementSummary(count=count, sum=total, latest=latest, latest_day=latest_day)

    def measurement_totals(
        self, kind: str, ids: Sequence[str], start_day: int, end_day: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """(count, sum) of ``kind`` with start_day < day <= end_day, per id, in the order of ``ids``.

        The part of :meth:`measurement_summary` that a mean, a count or a sum needs, from a
        cheaper query (one per batch).
        """
        spec = measurement_kind(kind)
        batch = _batch_param(ids)
        with self._lock:
            rows = self._conn.execute(
                _TOTALS_SQL, (batch, spec.name, int(start_day), int(end_day))
            ).fetchall()
        count = np.zeros(len(ids), dtype=np.int64)
        total = np.zeros(len(ids), dtype=np.float64)
        if rows:
            pos = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            count[pos] = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
            total[pos] = np.fromiter((r[2] for r in rows), dtype=np.float64, count=len(rows))
        return count, total

    def read_measurements(
        self,
        kind: str,
        ids: Sequence[str],
        start_day: int = NO_DAY,
        end_day: int = int(np.iinfo(np.int64).max),
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Return (position in ``ids``, day, value) of every ``kind`` row with start_day < day <= end_day.

        Sorted by position, then day, then the order they were written; one query per batch.
        """
        spec = measurement_kind(kind)
        batch = _batch_param(ids)
        with self._lock:
            rows = self._conn.execute(_ROWS_SQL, (batch, spec.name, int(start_day), int(end_day))).fetchall()
        pos = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        day = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
        value = np.fromiter((r[2] for r in rows), dtype=np.float64, count=len(rows))
        return pos, day, value

    def heart_rate_summary(
        self, ids: Sequence[str], start_day: int, end_day: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Return (count, mean) of heart-rate measurements with start_day < day <= end_day.

        Results follow the order of ``ids``; an instance without measurements in the window
        (or unknown to this host) has count 0 and mean NaN.
        """
        count, total = self.measurement_totals("heart_rate", ids, start_day, end_day)
        mean = np.divide(total, count, out=np.full(len(ids), np.nan), where=count > 0)
        return count, mean


class Documents(Protocol):
    """What a host and the local functions read and write of its instances' documents.

    Two implementations: :class:`DocumentStore` (SQLite, for a real host) and
    :class:`dispers.state.columns.ColumnStore` (numpy columns, for simulations). Every read
    takes a batch of ids and answers arrays in the same order.
    """

    def close(self) -> None: ...
    def instance_ids(self) -> list[str]: ...
    def count(self) -> int: ...
    def known(self, ids: Sequence[str]) -> npt.NDArray[np.bool_]: ...
    def subscribed(self, ids: Sequence[str]) -> npt.NDArray[np.bool_]: ...
    def set_subscribed(self, ids: Sequence[str], subscribed: bool) -> None: ...
    def declared_concepts(self, ids: Sequence[str]) -> list[list[str]]: ...
    def identity(
        self, ids: Sequence[str]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]: ...
    def measurement_summary(
        self, kind: str, ids: Sequence[str], start_day: int, end_day: int
    ) -> MeasurementSummary: ...
    def measurement_totals(
        self, kind: str, ids: Sequence[str], start_day: int, end_day: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]: ...
    def heart_rate_summary(
        self, ids: Sequence[str], start_day: int, end_day: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]: ...
