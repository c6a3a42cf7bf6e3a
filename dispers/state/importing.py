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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

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


def _text(row: Mapping[str, Any], key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return None


def _date(text: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        return None


class _Checker:
    """Checks rows one by one into an ImportBatch, recording every problem."""

    def __init__(self, source: str, vocabulary: Iterable[str] | None) -> None:
        self.batch = ImportBatch()
        self.errors = _Errors(source)
        self._vocabulary = None if vocabulary is None else frozenset(vocabulary)
        self._people: dict[str, int] = {}  # instance -> line of its person row

    def _cohort_names(self) -> str:
        names = sorted(c.partition(":")[2] for c in self._vocabulary or () if c.startswith("cohort:"))
        return ", ".join(names) if names else "none: add cohort:<name> to [cluster] vocabulary"

    def row(self, line: int, row: Mapping[str, Any]) -> None:
        errors = self.errors
        before = errors.count
        unknown = sorted(str(k) for k in row if k not in COLUMNS)
        for key in unknown:
            errors.add(line, key[:40], f"unknown column (known: {', '.join(COLUMNS)})")
        instance = _text(row, "instance")
        if instance is None:
            errors.add(line, "instance", "missing")
        elif not INSTANCE_ID.match(instance):
            errors.add(line, "instance", "must be 1 to 128 of A-Z a-z 0-9 _ . @ : -")
        person = [c for c in PERSON_COLUMNS if row.get(c) not in (None, "", [])]
        measured = [c for c in MEASUREMENT_COLUMNS if _text(row, c) is not None]
        if person and measured:
            errors.add(line, None, "a row is a person or a measurement, not both")
            return
        if not person and not measured:
            if errors.count == before:
                errors.add(line, None, "neither a person (birth_date, sex, consent) nor a measurement "
                                       "(kind, date, value)")  # fmt: skip
            return
        if person:
            self._person(line, instance, row)
        else:
            self._measurement(line, instance, row)
        if instance is not None and errors.count == before:
            self.batch.first_line.setdefault(instance, line)
        self.batch.rows += 1

    def _person(self, line: int, instance: str | None, row: Mapping[str, Any]) -> None:
        errors = self.errors
        before = errors.count
        born_text = _text(row, "birth_date")
        born = None if born_text is None else _date(born_text)
        if born_text is None:
            errors.add(line, "birth_date", "missing")
        elif born is None:
            errors.add(line, "birth_date", "not a date YYYY-MM-DD")
        sex = _text(row, "sex")
        if sex is None:
            errors.add(line, "sex", "missing")
        elif sex.upper() not in ("F", "M"):
            errors.add(line, "sex", "must be F or M")
        consent_text = _text(row, "consent")
        consent = None if consent_text is None else _YES.get(consent_text.lower())
        if consent_text is None:
            errors.add(line, "consent", "missing")
        elif consent is None:
            errors.add(line, "consent", "must be yes or no (true/false, 1/0)")
        raw = row.get("cohorts")
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
        b.birth_days.append(epoch_day(born))
        b.sex.append(sex.upper())
        b.consent.append(consent)
        for concept in dict.fromkeys(concepts):
            b.cohort_ids.append(instance)
            b.cohorts.append(concept)

    def _measurement(self, line: int, instance: str | None, row: Mapping[str, Any]) -> None:
        errors = self.errors
        before = errors.count
        kind_name = _text(row, "kind")
        kind = MEASUREMENT_KINDS.get(kind_name or "")
        if kind_name is None:
            errors.add(line, "kind", "missing")
        elif kind is None:
            errors.add(
                line, "kind", f"unknown measurement kind (known: {', '.join(sorted(MEASUREMENT_KINDS))})"
            )
        day_text = _text(row, "date")
        day = None if day_text is None else _date(day_text)
        if day_text is None:
            errors.add(line, "date", "missing")
        elif day is None:
            errors.add(line, "date", "not a date YYYY-MM-DD")
        raw = row.get("value")
        value: float | None = None
        if isinstance(raw, bool):
            value = None
        elif isinstance(raw, int | float):
            value = float(raw)
        elif isinstance(raw, str) and raw.strip():
            try:
                value = float(raw)
            except ValueError:
                value = None
        if _text(row, "value") is None:
            errors.add(line, "value", "missing")
        elif value is None or not math.isfinite(value):
            errors.add(line, "value", "not a finite number")
        elif kind is not None and not kind.lo <= value <= kind.hi:
            errors.add(line, "value", f"outside [{kind.lo:g}, {kind.hi:g}] {kind.unit} for {kind.name}")
        if errors.count != before or instance is None:
            return
        assert kind is not None and day is not None and value is not None
        ids, days, values = self.batch.measurements.setdefault(kind.name, ([], [], []))
        ids.append(instance)
        days.append(epoch_day(day))
        values.append(value)


def _csv_rows(handle: Iterable[str], errors: _Errors) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(handle)
    header = reader.fieldnames
    if not header:
        errors.add(1, None, "an empty file: the first line names the columns")
        return
    if len(set(header)) != len(header):
        errors.add(1, None, "a column is named twice")
        return
    for row in reader:
        extra = row.pop(None, None)
        if extra:
            errors.add(reader.line_num, None, "more cells than the header has columns")
            continue
        yield reader.line_num, row


def _jsonl_rows(handle: Iterable[str], errors: _Errors) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, text in enumerate(handle, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            errors.add(number, None, "not a JSON object")
            continue
        if not isinstance(obj, dict):
            errors.add(number, None, "not a JSON object")
            continue
        yield number, obj


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
            for line, row in rows:
                checker.row(line, row)
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
