"""A small population written by the tests themselves as CSV and JSON Lines, with the answers a
query must give computed directly from those rows (independently of dispers' store and registry)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

AS_OF = dt.date(2026, 11, 1)


@dataclass
class Person:
    instance: str
    birth_date: dt.date
    sex: str
    consent: bool
    cohorts: list[str] = field(default_factory=list)
    heart_rate: list[tuple[dt.date, float]] = field(default_factory=list)
    steps: list[tuple[dt.date, float]] = field(default_factory=list)


def make_people(n: int, seed: int = 1, cohort: str = "study-42") -> list[Person]:
    """`n` people aged 13 to 90 on AS_OF, most consenting, with heart rates inside and outside
    the last 30 days (several a day for some), steps, and a cohort for every third."""
    rng = random.Random(seed)
    people = []
    for i in range(n):
        age_days = rng.randint(13 * 366, 90 * 365)
        person = Person(
            instance=f"p{i:04d}",
            birth_date=AS_OF - dt.timedelta(days=age_days),
            sex=rng.choice("FM"),
            consent=rng.random() < 0.85,
            cohorts=[cohort] if i % 3 == 0 else [],
        )
        for _ in range(rng.randint(0, 6)):
            day = AS_OF - dt.timedelta(days=rng.randint(0, 60))  # half of them outside the window
            person.heart_rate.append((day, round(rng.uniform(45, 140), 2)))
        for _ in range(rng.randint(0, 3)):
            person.steps.append((AS_OF - dt.timedelta(days=rng.randint(0, 20)), float(rng.randint(0, 20000))))
        people.append(person)
    return people


def age_on(born: dt.date, day: dt.date) -> int:
    return day.year - born.year - ((day.month, day.day) < (born.month, born.day))


def expected_mean_heart_rate_by_age(
    people: list[Person], edges: list[int], *, window_days: int = 30, cohort: str | None = None
) -> dict[str, tuple[int, float]]:
    """Per bracket lo-hi: (count, mean) of each consenting person's mean heart rate over the
    last `window_days` days up to AS_OF (those with at least one value), as computed by hand."""
    out = {}
    start = AS_OF - dt.timedelta(days=window_days)
    for lo, hi in zip(edges, edges[1:], strict=False):
        means = []
        for p in people:
            if not p.consent or not lo <= age_on(p.birth_date, AS_OF) < hi:
                continue
            if cohort is not None and cohort not in p.cohorts:
                continue
            values = [v for d, v in p.heart_rate if start < d <= AS_OF]
            if values:
                means.append(sum(values) / len(values))
        out[f"{lo}-{hi}"] = (len(means), statistics.fmean(means) if means else float("nan"))
    return out


def write_csv(people: list[Person], path: Path) -> Path:
    """People first, then their measurements, one row each."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instance", "birth_date", "sex", "consent", "cohorts", "kind", "date", "value"])
        for p in people:
            w.writerow([p.instance, p.birth_date.isoformat(), p.sex, "yes" if p.consent else "no",
                        ";".join(p.cohorts), "", "", ""])  # fmt: skip
        for p in people:
            for kind, series in (("heart_rate", p.heart_rate), ("steps", p.steps)):
                for day, value in series:
                    w.writerow([p.instance, "", "", "", "", kind, day.isoformat(), value])
    return path


def write_jsonl(people: list[Person], path: Path) -> Path:
    """Each person's line followed by their measurements' lines."""
    with open(path, "w") as f:
        for p in people:
            f.write(json.dumps({"instance": p.instance, "birth_date": p.birth_date.isoformat(), "sex": p.sex,
                                "consent": p.consent, "cohorts": p.cohorts}) + "\n")  # fmt: skip
            for kind, series in (("heart_rate", p.heart_rate), ("steps", p.steps)):
                for day, value in series:
                    f.write(json.dumps({"instance": p.instance, "kind": kind, "date": day.isoformat(),
                                        "value": value}) + "\n")  # fmt: skip
    return path


def heart_rate_spec(*, k: int, target: str = "age:12-25 OR age:25-50 OR age:50-100") -> str:
    """The demo's query, exact (the cluster's policy has DP off), as TOML text."""
    return f"""
[query]
target = "{target}"
k = {k}
[data]
function = "mean_heart_rate"
as_of = {AS_OF.isoformat()}
params = {{ window_days = 30 }}
group_by = {{ field = "age", edges = [12, 25, 50, 100] }}
[aggregate]
bounds = [30.0, 220.0]
stats = ["count", "mean", "std"]
"""
