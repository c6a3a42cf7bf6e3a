"""Read a host's documents from a CSV or JSON Lines file: people, their measurements, cohorts.

One row (a CSV line or a JSON object per line) is either a **person** or a **measurement**:

- person: ``instance``, ``birth_date`` (YYYY-MM-DD), ``sex`` (F or M), ``consent`` (yes/no,
  true/false or 1/0), and optionally ``cohorts`` (names separated by ``;`` in CSV, a list or
  a string in JSON; each becomes the concept ``cohort:<name>``, which must be in the
  cluster's vocabulary);
- measurement: ``instance``, ``kind`` (a registered measurement kind), ``date`` (YYYY-MM-DD),
  ``value`` (a number within the kind's bounds, in its unit).

The file is checked whole before anything is written; every bad row is named by its line and
column (never by its value: values are personal data), and one bad row refuses the file.
Writing is one transaction (:meth:`DocumentStore.import_documents`) and idempotent: a person
row sets that instance's identity and consent, a cohort is added once, and the measurements of
the file replace those stored for the same (instance, kind, day).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from dispers.core.errors import DispersError, ErrorCode
from dispers.core.vocabulary import validate_concept
from dispers.state.documents import MEASUREMENT_KINDS, DocumentStore, epoch_day

PERSON_COLUMNS = ("birth_date", "sex", "consent", "cohorts")
MEASUREMENT_COLUMNS = ("kind", "date", "value")
COLUMNS = ("instance", *PERSON_COLUMNS, *MEASUREMENT_COLUMNS)
MAX_ERRORS_SHOWN = 10
INSTANCE_ID = re.compile(r"[A-Za-z0-9_.@:-]{1,128}\Z")
"""What an instance id may hold: its address (``<host>/<id>``) must fit T's frame."""

_YES = {"yes": True, "y": True, "true": True, "1": True, "no": False, "n": False, "false": False, "0": False}


@dataclass
class ImportBatch:
    """A whole file, checked: what it will write, column by column."""

    person_ids: list[str] = field(default_factory=list)
    birth_days: list[int] = field(default_factory=list)
    sex: list[str] = field(default_factory=list)
    consent: list[bool] = field(default_factory=list)
    cohort_ids: list[str] = field(default_factory=list)
    cohorts: list[str] = field(default_factory=list)  # full concepts, cohort:<name>
    measurements: dict[str, tuple[list[str], list[int], list[float]]] = field(default_factory=dict)
    rows: int = 0
    first_line: dict[str, int] = field(default_factory=dict)  # instance -> first line naming it

    @property
    def n_measurements(self) -> int:
        """How many measurement rows the file holds."""
        return sum(len(ids) for ids, _, _ in self.measurements.values())


@dataclass(frozen=True)
class ImportReport:
    """What an import wrote."""

    rows: int
    people: int
    measurements: int
    cohorts: int


class _Errors:
    """Bad rows by line and column; the message lists the first few and counts the rest."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []
        self.count = 0

    def add(self, line: int, column: str | None, message: str) -> None:
        self.count += 1
        if len(self.items) < MAX_ERRORS_SHOWN:
            where = f"line {line}" + (f", column {column}" if column else "")
            self.items.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if not self.count:
            return
        more = f"; and {self.count - len(self.items)} more" if self.count > len(self.items) else ""
        rows = "1 bad row" if self.count == 1 else f"{self.count} bad rows"
        raise DispersError(
            ErrorCode.MALFORMED,
            f"{self.source}: {rows}, nothing imported: " + "; ".join(self.items) + more,
        )


def _text(value: Any) -> str | None:
    """A cell as stripped text (None if empty); JSON numbers and booleans as their text."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return "?"  # a list or an object where text belongs: refused by the check of its column


class Row(NamedTuple):
    """One row, whatever the format: each column as text (None when empty); cohorts as given."""

    line: int
    instance: str | None
    birth_date: str | None
    sex: str | None
    consent: str | None
    cohorts: Any
    kind: str | None
    date: str | None
    value: Any  # text, or a JSON number


class _Checker:
    """Checks rows one by one into an ImportBatch, recording every problem."""

    def __init__(self, source: str, vocabulary: Iterable[str] | None) -> None:
        self.batch = ImportBatch()
        self.errors = _Errors(source)
        self._vocabulary = None if vocabulary is None else frozenset(vocabulary)
        self._people: dict[str, int] = {}  # instance -> line of its person row
        self._days: dict[str, int | None] = {}  # date text -> epoch day (None: not a date)
        self._ids: dict[str, str] = {}

    def _cohort_names(self) -> str:
        names = sorted(c.partition(":")[2] for c in self._vocabulary or () if c.startswith("cohort:"))
        return ", ".join(names) if names else "none: add cohort:<name> to [cluster] vocabulary"

    def _day(self, text: str) -> int | None:
        day = self._days.get(text, -1)
        if day == -1:
            try:
                day = epoch_day(dt.date.fromisoformat(text))
            except ValueError:
                day = None
            if len(self._days) < 100_000:
                self._days[text] = day
        return day

    def row(self, r: Row) -> None:
        errors = self.errors
        before = errors.count
        line, instance = r.line, r.instance
        if instance is None:
            errors.add(line, "instance", "missing")
        elif not INSTANCE_ID.match(instance):
            errors.add(line, "instance", "must be 1 to 128 of A-Z a-z 0-9 _ . @ : -")
        person = r.birth_date is not None or r.sex is not None or r.consent is not None or bool(r.cohorts)
        measured = r.kind is not None or r.date is not None or _text(r.value) is not None
        if person and measured:
            errors.add(line, None, "a row is a person or a measurement, not both")
            return
        if not person and not measured:
            errors.add(line, None, "neither a person (birth_date, sex, consent) nor a measurement "
                                   "(kind, date, value)")  # fmt: skip
            return
        if person:
            self._person(r)
        else:
            self._measurement(r)
        if instance is not None and errors.count == before:
            self.batch.first_line.setdefault(instance, line)
        self.batch.rows += 1

    def _person(self, r: Row) -> None:
        errors = self.errors
        before = errors.count
        line, instance = r.line, r.instance
        born = None if r.birth_date is None else self._day(r.birth_date)
        if r.birth_date is None:
            errors.add(line, "birth_date", "missing")
        elif born is None:
            errors.add(line, "birth_date", "not a date YYYY-MM-DD")
        sex = r.sex.upper() if r.sex is not None else None
        if sex is None:
            errors.add(line, "sex", "missing")
        elif sex not in ("F", "M"):
            errors.add(line, "sex", "must be F or M")
        consent = None if r.consent is None else _YES.get(r.consent.lower())
        if r.consent is None:
            errors.add(line, "consent", "missing")
        elif consent is None:
            errors.add(line, "consent", "must be yes or no (true/false, 1/0)")
        raw = r.cohorts
        if raw in (None, ""):
            names: list[str] = []
        elif isinstance(raw, str):
            names = [n.strip() for n in raw.split(";") if n.strip()]
        elif isinstance(raw, list) and all(isinstance(n, str) for n in raw):
            names = [n.strip() for n in raw if n.strip()]
        else:
            names = []
            errors.add(line, "cohorts", "must be names separated by ';' (a list of strings in JSON)")
        concepts = []
        for name in names:
            concept = name if name.startswith("cohort:") else f"cohort:{name}"
            try:
                validate_concept(concept)
            except DispersError:
                errors.add(line, "cohorts", "a cohort name is 1 to 57 of A-Z a-z 0-9 _ . -")
                continue
            if self._vocabulary is not None and concept not in self._vocabulary:
                errors.add(line, "cohorts", f"a cohort not in the vocabulary (known: {self._cohort_names()})")
                continue
            concepts.append(concept)
        if instance is not None and instance in self._people:
            errors.add(line, "instance", f"a second person row for this instance (first on line "
                                         f"{self._people[instance]})")  # fmt: skip
        if errors.count != before or instance is None:
            return
        assert born is not None and sex is not None and consent is not None
        self._people[instance] = line
        b = self.batch
        b.person_ids.append(instance)
        b.birth_days.append(born)
        b.sex.append(sex)
        b.consent.append(consent)
        for concept in dict.fromkeys(concepts):
            b.cohort_ids.append(instance)
            b.cohorts.append(concept)

    def _measurement(self, r: Row) -> None:
        errors = self.errors
        before = errors.count
        line = r.line
        kind = MEASUREMENT_KINDS.get(r.kind or "")
        if r.kind is None:
            errors.add(line, "kind", "missing")
        elif kind is None:
            errors.add(
                line, "kind", f"unknown measurement kind (known: {', '.join(sorted(MEASUREMENT_KINDS))})"
            )
        day = None if r.date is None else self._day(r.date)
        if r.date is None:
            errors.add(line, "date", "missing")
        elif day is None:
            errors.add(line, "date", "not a date YYYY-MM-DD")
        raw = r.value
        value: float | None = None
        if isinstance(raw, str) and raw.strip():
            try:
                value = float(raw)
            except ValueError:
                value = None
        elif isinstance(raw, int | float) and not isinstance(raw, bool):
            value = float(raw)
        if _text(raw) is None:
            errors.add(line, "value", "missing")
        elif value is None or not math.isfinite(value):
            errors.add(line, "value", "not a finite number")
        elif kind is not None and not kind.lo <= value <= kind.hi:
            errors.add(line, "value", f"outside [{kind.lo:g}, {kind.hi:g}] {kind.unit} for {kind.name}")
        if errors.count != before or r.instance is None:
            return
        assert kind is not None and day is not None and value is not None
        ids, days, values = self.batch.measurements.setdefault(kind.name, ([], [], []))
        # One string per person, not per row: a million rows of a few thousand people stay small.
        ids.append(self._ids.setdefault(r.instance, r.instance))
        days.append(day)
        values.append(value)


def _csv_rows(handle: Iterable[str], errors: _Errors) -> Iterator[Row]:
    reader = csv.reader(handle)
    header = next(reader, None)
    if not header:
        errors.add(1, None, "an empty file: the first line names the columns")
        return
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        errors.add(1, None, "a column is named twice")
        return
    unknown = [h for h in header if h not in COLUMNS]
    for name in unknown:
        errors.add(1, name[:40], f"unknown column (known: {', '.join(COLUMNS)})")
    if unknown:
        return
    width = len(header)
    # Where each column of Row is in a line (a column the header lacks reads an empty cell).
    at = [header.index(name) if name in header else width for name in COLUMNS]
    for cells in reader:
        line = reader.line_num
        if len(cells) != width:
            if not any(c.strip() for c in cells):
                continue  # a blank line
            errors.add(line, None, f"{len(cells)} cells where the header names {width} columns")
            continue
        cells.append("")
        values = [cells[i].strip() or None for i in at]
        yield Row(line, *values)


def _jsonl_rows(handle: Iterable[str], errors: _Errors) -> Iterator[Row]:
    for line, text in enumerate(handle, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            errors.add(line, None, "not a JSON object")
            continue
        if not isinstance(obj, dict):
            errors.add(line, None, "not a JSON object")
            continue
        unknown = sorted(str(k) for k in obj if k not in COLUMNS)
        for key in unknown:
            errors.add(line, key[:40], f"unknown column (known: {', '.join(COLUMNS)})")
        if unknown:
            continue
        get = obj.get
        yield Row(line, _text(get("instance")), _text(get("birth_date")), _text(get("sex")),
                  _text(get("consent")), get("cohorts"), _text(get("kind")), _text(get("date")),
                  get("value"))  # fmt: skip


def file_format(path: Path, declared: str | None = None) -> str:
    """csv or jsonl: as declared, else from the file's suffix."""
    if declared:
        return declared
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise DispersError(
        ErrorCode.MALFORMED, f"{path.name}: cannot tell the format from the suffix; pass --format csv|jsonl"
    )


def read_import_file(
    path: str | Path,
    *,
    file_format_name: str | None = None,
    vocabulary: Iterable[str] | None = None,
    wrap: Callable[[IO[str]], Iterable[str]] | None = None,
) -> ImportBatch:
    """Read and check a whole file; MALFORMED naming every bad row (line, column) if any.

    ``vocabulary``: the cluster's concepts, which cohorts must be part of (None: not checked).
    ``wrap`` may turn the open file into the lines to read (a progress bar counting them).
    """
    path = Path(path)
    fmt = file_format(path, file_format_name)
    checker = _Checker(path.name, vocabulary)
    try:
        with open(path, encoding="utf-8-sig", newline="") as raw:
            handle: Iterable[str] = wrap(raw) if wrap is not None else raw
            rows = _csv_rows(handle, checker.errors) if fmt == "csv" else _jsonl_rows(handle, checker.errors)
            for row in rows:
                checker.row(row)
    except UnicodeDecodeError:
        raise DispersError(ErrorCode.MALFORMED, f"{path.name}: not UTF-8 text") from None
    except csv.Error as exc:
        raise DispersError(ErrorCode.MALFORMED, f"{path.name}: not CSV ({exc})") from None
    except OSError as exc:
        raise DispersError(ErrorCode.NOT_FOUND, f"cannot read {path}: {exc.strerror}") from None
    checker.errors.raise_if_any()
    return checker.batch


def import_batch(store: DocumentStore, batch: ImportBatch, source: str = "import") -> ImportReport:
    """Write a checked batch in one transaction; an instance that is neither a person of the
    file nor already on the host refuses the whole batch, naming its first line."""
    people = set(batch.person_ids)
    owners = list(dict.fromkeys(
        [i for ids, _, _ in batch.measurements.values() for i in ids] + batch.cohort_ids
    ))  # fmt: skip
    others = [i for i in owners if i not in people]
    if others:
        known = store.known(others)
        unknown = [i for i, k in zip(others, known.tolist(), strict=True) if not k]
        if unknown:
            errors = _Errors(source)
            for instance in sorted(unknown, key=lambda i: batch.first_line.get(i, 0)):
                errors.add(batch.first_line.get(instance, 0), "instance",
                           "no person row for this instance in the file or on the host")  # fmt: skip
            errors.raise_if_any()
    store.import_documents(
        people=(batch.person_ids, batch.birth_days, batch.sex, batch.consent),
        measurements=batch.measurements,
        declared=(batch.cohort_ids, batch.cohorts),
    )
    return ImportReport(batch.rows, len(batch.person_ids), batch.n_measurements, len(batch.cohorts))


def import_file(
    store: DocumentStore,
    path: str | Path,
    *,
    file_format_name: str | None = None,
    vocabulary: Sequence[str] | None = None,
    wrap: Callable[[IO[str]], Iterable[str]] | None = None,
) -> ImportReport:
    """Check a whole file, then write it in one transaction (see the module docstring)."""
    batch = read_import_file(path, file_format_name=file_format_name, vocabulary=vocabulary, wrap=wrap)
    return import_batch(store, batch, Path(path).name)
