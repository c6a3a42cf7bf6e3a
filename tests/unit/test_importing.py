"""`dispers import`: CSV and JSON Lines into a host's document store, all or nothing, idempotent."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dispers.core.errors import DispersError, ErrorCode
from dispers.state.documents import DocumentStore, epoch_day
from dispers.state.importing import import_file
from tests.import_data import AS_OF, make_people, write_csv, write_jsonl

VOCABULARY = ("age:25-50", "sex:F", "cohort:study-42", "cohort:pilot")
HEADER = "instance,birth_date,sex,consent,cohorts,kind,date,value\n"


def dump(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, sorted: what a store holds."""
    with sqlite3.connect(path) as conn:
        return {
            t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall())
            for t in ("instances", "measurements", "declared_concepts", "subscribed")
        }


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_file_lands_whole_and_twice_changes_nothing(tmp_path: Path, fmt: str) -> None:
    people = make_people(40)
    write = write_csv if fmt == "csv" else write_jsonl
    source = write(people, tmp_path / f"people.{fmt}")
    db = tmp_path / "pc.sqlite"
    with DocumentStore(db) as store:
        report = import_file(store, source, vocabulary=VOCABULARY)
        assert report.people == 40
        assert report.measurements == sum(len(p.heart_rate) + len(p.steps) for p in people)
        assert report.cohorts == sum(len(p.cohorts) for p in people)
        ids = [p.instance for p in people]
        born, female, consent = store.identity(ids)
        assert born.tolist() == [epoch_day(p.birth_date) for p in people]
        assert female.tolist() == [p.sex == "F" for p in people]
        assert consent.tolist() == [p.consent for p in people]
        pos, day, value = store.read_measurements("heart_rate", ids)
        got = sorted(zip(pos.tolist(), day.tolist(), value.tolist(), strict=True))
        want = sorted((i, epoch_day(d), v) for i, p in enumerate(people) for d, v in p.heart_rate)
        assert got == want
        assert store.declared_concepts(ids) == [[f"cohort:{c}" for c in p.cohorts] for p in people]
    before = dump(db)
    with DocumentStore(db) as store:
        import_file(store, source, vocabulary=VOCABULARY)
    assert dump(db) == before  # idempotent


def test_csv_and_jsonl_of_one_population_give_the_same_store(tmp_path: Path) -> None:
    people = make_people(25, seed=3)
    stores = []
    for fmt, write in (("csv", write_csv), ("jsonl", write_jsonl)):
        db = tmp_path / f"{fmt}.sqlite"
        with DocumentStore(db) as store:
            import_file(store, write(people, tmp_path / f"p.{fmt}"), vocabulary=VOCABULARY)
        stores.append(dump(db))
    assert stores[0] == stores[1]


def test_a_bad_row_is_named_by_line_and_column_and_nothing_is_written(tmp_path: Path) -> None:
    db = tmp_path / "pc.sqlite"
    with DocumentStore(db) as store:
        import_file(store, write_csv(make_people(5), tmp_path / "first.csv"), vocabulary=VOCABULARY)
    before = dump(db)
    bad = tmp_path / "bad.csv"
    bad.write_text(
        HEADER
        + "q1,1980-02-03,F,yes,,,,\n"  # line 2: fine
        + "q2,1981-13-01,F,yes,,,,\n"  # line 3: no such month
        + "q3,1982-01-01,X,yes,,,,\n"  # line 4: sex
        + "q1,,,,,heart_rate,2026-10-20,987654.5\n"  # line 5: out of bounds (the value is personal)
        + "q1,,,,,blood_sugar,2026-10-20,5\n"  # line 6: unknown kind
        + "q1,1980-02-03,F,maybe,,,,\n"  # line 7: consent, and a second person row
        + "q4,1980-02-03,F,yes,,heart_rate,2026-10-20,70\n"  # line 8: both kinds at once
        + "q5,1980-02-03,F,yes,nosuchcohort,,,\n"  # line 9: a cohort outside the vocabulary
    )
    with DocumentStore(db) as store, pytest.raises(DispersError) as info:
        import_file(store, bad, vocabulary=VOCABULARY)
    message = info.value.message
    assert info.value.code is ErrorCode.MALFORMED
    assert "nothing imported" in message
    named = ("line 3, column birth_date", "line 4, column sex", "line 5, column value", "line 6, column kind",
             "line 7, column consent", "line 8:", "line 9, column cohorts")  # fmt: skip
    for where in named:
        assert where in message, where
    assert "line 2:" not in message and "line 2," not in message
    assert "987654" not in message  # a value never appears in an error
    assert "known: pilot, study-42" in message and "blood_sugar" not in message
    assert "heart_rate" in message  # the valid kinds are listed
    assert dump(db) == before  # nothing written


def test_measurements_of_someone_not_in_the_file_nor_on_the_host_are_refused(tmp_path: Path) -> None:
    db = tmp_path / "pc.sqlite"
    path = tmp_path / "m.csv"
    path.write_text(
        HEADER + "a,1990-01-01,M,1,,,,\n" + "a,,,,,steps,2026-10-01,100\n" + "ghost,,,,,steps,2026-10-01,5\n"
    )
    with DocumentStore(db) as store, pytest.raises(DispersError) as info:
        import_file(store, path)
    assert "line 4, column instance" in info.value.message
    assert dump(db)["instances"] == []
    # Once the person is on the host, their measurements alone may come in a later file.
    with DocumentStore(db) as store:
        person = tmp_path / "ghost.csv"
        person.write_text(HEADER + "ghost,1970-05-05,F,no,,,,\n")
        import_file(store, person)
        import_file(store, path)
        assert store.count() == 2


def test_a_second_import_replaces_the_days_it_covers_and_updates_identity(tmp_path: Path) -> None:
    db = tmp_path / "pc.sqlite"
    first = tmp_path / "a.jsonl"
    first.write_text(
        '{"instance": "x", "birth_date": "1990-01-01", "sex": "F", "consent": true}\n'
        '{"instance": "x", "kind": "heart_rate", "date": "2026-10-30", "value": 60}\n'
        '{"instance": "x", "kind": "heart_rate", "date": "2026-10-30", "value": 62}\n'
        '{"instance": "x", "kind": "heart_rate", "date": "2026-10-29", "value": 50}\n'
    )
    second = tmp_path / "b.jsonl"
    second.write_text(
        '{"instance": "x", "birth_date": "1990-01-01", "sex": "F", "consent": false}\n'
        '{"instance": "x", "kind": "heart_rate", "date": "2026-10-30", "value": 70}\n'
    )
    with DocumentStore(db) as store:
        import_file(store, first)
        import_file(store, second)
        _, day, value = store.read_measurements("heart_rate", ["x"])
        assert sorted(zip(day.tolist(), value.tolist(), strict=True)) == [
            (epoch_day(AS_OF) - 3, 50.0),  # a day the second file does not cover stays
            (epoch_day(AS_OF) - 2, 70.0),  # the day it covers holds what it says, once
        ]
        assert store.identity(["x"])[2].tolist() == [False]  # consent withdrawn


def test_files_that_are_not_csv_or_json_lines_are_refused_clearly(tmp_path: Path) -> None:
    with DocumentStore(tmp_path / "pc.sqlite") as store:
        path = tmp_path / "x.jsonl"
        path.write_text(
            '{"instance": "a", "birth_date": "1990-01-01", "sex": "F", "consent": true}\n[1, 2]\nnot json\n'
        )
        with pytest.raises(DispersError, match="line 2: not a JSON object; line 3: not a JSON object"):
            import_file(store, path)
        path = tmp_path / "x.csv"
        path.write_text("instance,colour\na,blue\n")
        with pytest.raises(DispersError, match="line 1, column colour: unknown column"):
            import_file(store, path)
        with pytest.raises(DispersError, match="cannot tell the format"):
            import_file(store, tmp_path / "x.xlsx")
        assert store.count() == 0
