"""`dispers import` throughput against the SQLite bulk-insert floor, and `dispers up` to a first answer.

Import: a CSV of N rows (one person per 20 rows, the rest heart-rate measurements) is checked and
written by `dispers.state.importing` into a fresh document store; the floor, measured in the same
run, is one `executemany` of the same rows, already parsed, into the same tables in one
transaction: what no importer writing into SQLite can beat. The ratio import / floor is the cost
of reading, checking and making the write idempotent.

Up: `dispers up` on a cluster with a populated host, then `dispers subscribe` and the heart-rate
query: the seconds from the command to the first answered query.

Run: `python benchmarks/bench_import.py --rows 1000000` (add `--skip-up` for the import alone).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import random
import sqlite3
import tempfile
import time
from pathlib import Path

from dispers.state.documents import DocumentStore, epoch_day
from dispers.state.importing import import_batch, read_import_file

PEOPLE_EVERY = 20


def write_file(
    path: Path, rows: int, seed: int = 1
) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """The CSV, and its rows as the floor inserts them (instances, measurements)."""
    rng = random.Random(seed)
    as_of = dt.date(2026, 11, 1)
    people: list[tuple[object, ...]] = []
    measured: list[tuple[object, ...]] = []
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instance", "birth_date", "sex", "consent", "cohorts", "kind", "date", "value"])
        person = ""
        for i in range(rows):
            if i % PEOPLE_EVERY == 0:
                person = f"p{i // PEOPLE_EVERY:07d}"
                born = as_of - dt.timedelta(days=rng.randint(5000, 30000))
                sex = rng.choice("FM")
                w.writerow([person, born.isoformat(), sex, "yes", "", "", "", ""])
                people.append((person, epoch_day(born), sex, 1))
            else:
                day = as_of - dt.timedelta(days=i % 90)
                value = round(rng.uniform(45, 140), 1)
                w.writerow([person, "", "", "", "", "heart_rate", day.isoformat(), value])
                measured.append((person, "heart_rate", epoch_day(day), value))
    return people, measured


def floor(path: Path, people: list[tuple[object, ...]], measured: list[tuple[object, ...]]) -> float:
    """Seconds for the bare bulk insert of the parsed rows in one transaction."""
    DocumentStore(path).close()  # the same schema and indexes
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    t0 = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO instances VALUES (?, ?, ?, ?)", people)
    conn.executemany("INSERT INTO measurements (instance_id, kind, day, value) VALUES (?, ?, ?, ?)", measured)
    conn.execute("COMMIT")
    seconds = time.perf_counter() - t0
    conn.close()
    return seconds


def bench_import(rows: int, workdir: Path) -> None:
    source = workdir / "rows.csv"
    people, measured = write_file(source, rows)
    floor_s = floor(workdir / "floor.sqlite", people, measured)
    t0 = time.perf_counter()
    batch = read_import_file(source)
    read_s = time.perf_counter() - t0
    with DocumentStore(workdir / "import.sqlite") as store:
        import_batch(store, batch)
    import_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    with DocumentStore(workdir / "import.sqlite") as store:
        import_batch(store, read_import_file(source))
    again_s = time.perf_counter() - t1
    print(f"import of {rows:,} rows ({len(people):,} people, {len(measured):,} measurements)")
    print(f"  floor, bare executemany of parsed rows:   {floor_s:7.2f} s  {rows / floor_s:12,.0f} rows/s")
    print(
        f"  dispers import (read+check {read_s:5.2f} s):  {import_s:7.2f} s  {rows / import_s:12,.0f} rows/s"
    )
    print(f"  the same file again (changes nothing):   {again_s:7.2f} s")
    print(f"  ratio import / floor: {import_s / floor_s:.1f}x")


def bench_up(workdir: Path, instances: int) -> None:
    from dispers.cli.processes import down, up
    from dispers.client import connect
    from dispers.core.cluster_files import ClusterLayout, write_cluster
    from dispers.core.messages import SubscriptionOp
    from dispers.simulation.population import PopulationSpec, generate
    from dispers.transport.grpc_client import PersonalCloudClient, client_for

    spec_path = Path(__file__).resolve().parent.parent / "dispers" / "cli" / "heart_rate.toml"
    config = write_cluster(workdir / "cluster", ClusterLayout(host_as_of=dt.date(2026, 11, 1)))
    documents = config.local_for("pc-1").documents
    assert documents is not None
    with DocumentStore(documents) as store:
        generate(PopulationSpec(n_instances=instances, as_of=dt.date(2026, 11, 1))).write(store)
    t0 = time.perf_counter()
    try:
        up(config)
        healthy_s = time.perf_counter() - t0
        with client_for(config, "pc-1", "pc-1", PersonalCloudClient) as host:
            host.subscribe_all(SubscriptionOp.SUBSCRIBE)
        subscribed_s = time.perf_counter() - t0
        with connect(config.path) as client:
            client.query(spec_path)
        answered_s = time.perf_counter() - t0
    finally:
        down(config)
    print(f"dispers up to a first answered query ({instances:,} instances, 9 processes):")
    print(f"  every actor healthy {healthy_s:.2f} s, subscribed {subscribed_s:.2f} s,", end=" ")
    print(f"first query answered {answered_s:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the imported file")
    parser.add_argument("--instances", type=int, default=10_000, help="instances of the `up` cluster")
    parser.add_argument("--skip-up", action="store_true", help="measure the import only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dispers-bench-import-") as tmp:
        bench_import(args.rows, Path(tmp))
        if not args.skip_up:
            bench_up(Path(tmp), args.instances)


if __name__ == "__main__":
    main()
