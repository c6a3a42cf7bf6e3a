"""An in-memory column store of a host's instances: numpy arrays, read in vectorised batches.

The simulation's host reads its population through this store instead of SQLite: the same
reads as :class:`dispers.state.documents.DocumentStore` (the :class:`Documents` protocol), so
the host and the local functions run unchanged. Instances are rows of parallel arrays; each
measurement kind is held in CSR form (``indptr`` per instance, then day and value sorted by
instance and day). A batch of ids is resolved to rows once (a binary search over the sorted
ids), and the last resolution is kept, so the several reads a host makes for one batch share
one lookup.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from dispers.core.errors import DispersError, ErrorCode
from dispers.state.documents import MEASUREMENT_KINDS, NO_DAY, MeasurementSummary, measurement_kind

if TYPE_CHECKING:
    from dispers.simulation.population import Population

Column = tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[np.float64]]
"""A measurement kind's (owner row, epoch day, value) arrays (owner and day of any integer type)."""


@dataclass(frozen=True)
class _Kind:
    """One measurement kind in CSR form: rows' values are value[indptr[r]:indptr[r + 1]]."""

    indptr: npt.NDArray[np.int64]
    day: npt.NDArray[np.int32]
    value: npt.NDArray[np.float64]


def _csr(n: int, owner: npt.NDArray[Any], day: npt.NDArray[Any], value: npt.NDArray[np.float64]) -> _Kind:
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=n), out=indptr[1:])
    if len(owner) < 2 or bool(np.all(owner[1:] >= owner[:-1])):  # already grouped by owner (generated so)
        return _Kind(indptr, day.astype(np.int32, copy=False), np.asarray(value, dtype=np.float64))
    order = np.argsort(owner, kind="stable")
    return _Kind(indptr, day[order].astype(np.int32), value[order].astype(np.float64))


def _ascii(ids: Sequence[str] | npt.NDArray[Any]) -> npt.NDArray[np.bytes_]:
    """Ids as one byte string each (a quarter of numpy's unicode width); an id that is not
    ASCII becomes "", which no id of a store is."""
    if isinstance(ids, np.ndarray) and ids.dtype.kind == "S":
        return ids
    text = np.asarray(list(ids), dtype=str)
    try:
        return text.astype(np.bytes_) if len(text) else np.zeros(0, dtype="S1")
    except UnicodeEncodeError:
        return np.asarray([i.encode() if i.isascii() else b"" for i in text.tolist()], dtype=np.bytes_)


def _check_ids(ids: Sequence[str]) -> None:
    if isinstance(ids, str) or not all(isinstance(i, str) for i in ids):
        raise DispersError(ErrorCode.MALFORMED, "instance ids must be a sequence of strings")


class ColumnStore:
    """A host's instances as numpy columns; implements :class:`dispers.state.documents.Documents`.

    ``kinds`` limits the measurement kinds kept (memory: a simulation keeps only what its
    query and the concepts need); reading a kind not kept raises NOT_FOUND like an unknown one.
    """

    def __init__(
        self,
        instance_ids: Sequence[str] | npt.NDArray[np.bytes_],
        birth_days: npt.ArrayLike,
        female: npt.ArrayLike,
        consent: npt.ArrayLike,
        measurements: Mapping[str, Column],
    ) -> None:
        ids = _ascii(instance_ids)
        n = len(ids)
        self._order = np.argsort(ids, kind="stable").astype(np.int64)
        self._sorted = ids[self._order]
        if n > 1 and bool((self._sorted[1:] == self._sorted[:-1]).any()):
            raise DispersError(ErrorCode.MALFORMED, "instance ids must be unique")
        self._birth = np.asarray(birth_days, dtype=np.int64)
        self._female = np.asarray(female, dtype=bool)
        self._consent = np.asarray(consent, dtype=bool)
        if not len(self._birth) == len(self._female) == len(self._consent) == n:
            raise DispersError(ErrorCode.MALFORMED, "instance columns have different lengths")
        self._subscribed = np.zeros(n, dtype=bool)
        self._offline = np.zeros(n, dtype=bool)
        self._kinds: dict[str, _Kind] = {}
        for kind, (owner, day, value) in measurements.items():
            measurement_kind(kind)
            if not len(owner) == len(day) == len(value):
                raise DispersError(ErrorCode.MALFORMED, f"{kind}: columns have different lengths")
            if len(owner) and (int(owner.min()) < 0 or int(owner.max()) >= n):
                raise DispersError(ErrorCode.MALFORMED, f"{kind}: owners point outside the instances")
            self._kinds[kind] = _csr(n, owner, day, value)
        self._lock = threading.Lock()
        self._last: tuple[Sequence[str], npt.NDArray[np.int64], npt.NDArray[np.bool_]] | None = None

    @classmethod
    def from_population(cls, population: Population, kinds: Iterable[str] = MEASUREMENT_KINDS) -> ColumnStore:
        """The store of a generated population, keeping the measurement ``kinds`` given."""
        columns = {}
        for kind in dict.fromkeys(kinds):
            series = population.series(kind)
            columns[kind] = (series.owner, series.day, series.value)
        return cls(
            population.instance_ids, population.birth_days, population.female, population.consent, columns
        )

    # --- ids ------------------------------------------------------------------------------
    def _rows(self, ids: Sequence[str]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """(row, found) per id; rows of unknown ids are 0. The last batch's answer is reused."""
        last = self._last
        if last is not None and last[0] is ids:
            return last[1], last[2]
        _check_ids(ids)
        n = len(ids)
        if n == 0 or len(self._sorted) == 0:
            return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
        keys = _ascii(ids)  # an id that is not ASCII matches nothing (it became "")
        too_long = keys.dtype.itemsize > self._sorted.dtype.itemsize  # could not be an id here
        pos = np.searchsorted(self._sorted, keys).clip(0, len(self._sorted) - 1)
        found = self._sorted[pos] == keys
        if too_long:
            found &= np.char.str_len(keys) <= self._sorted.dtype.itemsize
        found &= np.char.str_len(keys) > 0
        rows = np.where(found, self._order[pos], 0)
        self._last = (ids, rows, found)
        return rows, found

    def close(self) -> None:
        """Nothing to release."""

    def instance_ids(self) -> list[str]:
        """Every instance id, sorted."""
        return [i.decode() for i in self._sorted.tolist()]

    def count(self) -> int:
        """The number of instances."""
        return len(self._sorted)

    def known(self, ids: Sequence[str]) -> npt.NDArray[np.bool_]:
        """Whether each id is an instance of this store that its host can reach now."""
        rows, found = self._rows(ids)
        return found & ~self._offline[rows]

    def set_offline(self, offline: npt.NDArray[np.bool_]) -> None:
        """Per row (in the order the store was built), whether the instance is out of reach: a
        simulated fault; its host, not finding it, answers a decline for it."""
        if offline.shape != self._offline.shape:
            raise DispersError(ErrorCode.MALFORMED, "one offline flag per instance")
        self._offline = offline.astype(bool)

    def subscribed(self, ids: Sequence[str]) -> npt.NDArray[np.bool_]:
        """Whether each id is subscribed (False for unknown ids)."""
        rows, found = self._rows(ids)
        with self._lock:
            return self._subscribed[rows] & found

    def set_subscribed(self, ids: Sequence[str], subscribed: bool) -> None:
        """Mark known ids (un)subscribed; unknown ids are refused, nothing changes."""
        rows, found = self._rows(ids)
        if not found.all():
            raise DispersError(
                ErrorCode.NOT_FOUND, f"{int((~found).sum())} instance ids are not on this host"
            )
        with self._lock:
            self._subscribed[rows] = subscribed

    def declared_concepts(self, ids: Sequence[str]) -> list[list[str]]:
        """A column store holds no declared cohorts: an empty list per id."""
        _check_ids(ids)
        return [[] for _ in ids]

    def identity(
        self, ids: Sequence[str]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """(birth days, is female, consents) per id; NOT_FOUND (a count, never an id) if any is unknown."""
        rows, found = self._rows(ids)
        missing = len(ids) - int(found.sum())
        if missing:
            raise DispersError(ErrorCode.NOT_FOUND, f"{missing} instance ids are not on this host")
        return self._birth[rows], self._female[rows], self._consent[rows]

    # --- measurements ---------------------------------------------------------------------
    def _window(
        self, kind: str, ids: Sequence[str], start_day: int, end_day: int
    ) -> tuple[int, npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """(n, position in ids, day, value) of every value with start_day < day <= end_day."""
        spec = measurement_kind(kind)
        data = self._kinds.get(spec.name)
        if data is None:
            raise DispersError(ErrorCode.NOT_FOUND, f"this store keeps no {spec.name} measurements")
        rows, found = self._rows(ids)
        lo = data.indptr[rows]
        lengths = np.where(found, data.indptr[rows + 1] - lo, 0)
        total = int(lengths.sum())
        pos = np.repeat(np.arange(len(ids), dtype=np.int64), lengths)
        starts = np.repeat(lo - np.cumsum(lengths) + lengths, lengths)
        flat = starts + np.arange(total, dtype=np.int64)
        day = data.day[flat].astype(np.int64)
        inside = (day > start_day) & (day <= end_day)
        return len(ids), pos[inside], day[inside], data.value[flat][inside]

    def measurement_totals(
        self, kind: str, ids: Sequence[str], start_day: int, end_day: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """(count, sum) of ``kind`` with start_day < day <= end_day, per id."""
        n, pos, _, value = self._window(kind, ids, start_day, end_day)
        count = np.bincount(pos, minlength=n).astype(np.int64)
        total = np.bincount(pos, weights=value, minlength=n).astype(np.float64)
        return count, total

    def measurement_summary(
        self, kind: str, ids: Sequence[str], start_day: int, end_day: int
    ) -> MeasurementSummary:
        """Count, sum and latest value (mean of the latest day's values) per id."""
        n, pos, day, value = self._window(kind, ids, start_day, end_day)
        count = np.bincount(pos, minlength=n).astype(np.int64)
        total = np.bincount(pos, weights=value, minlength=n).astype(np.float64)
        latest_day = np.full(n, NO_DAY, dtype=np.int64)
        np.maximum.at(latest_day, pos, day)
        on_last = day == latest_day[pos]
        last_n = np.bincount(pos[on_last], minlength=n)
        last_sum = np.bincount(pos[on_last], weights=value[on_last], minlength=n)
        latest = np.divide(last_sum, last_n, out=np.full(n, np.nan), where=last_n > 0)
        return MeasurementSummary(count=count, sum=total, latest=latest, latest_day=latest_day)

    def heart_rate_summary(
        self, ids: Sequence[str], start_day: int, end_day: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """(count, mean) of heart-rate measurements with start_day < day <= end_day, per id."""
        count, total = self.measurement_totals("heart_rate", ids, start_day, end_day)
        return count, np.divide(total, count, out=np.full(len(count), np.nan), where=count > 0)
