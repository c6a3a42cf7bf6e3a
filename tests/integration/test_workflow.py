"""The researcher's workflow over real processes: up, import, subscribe, query to files, ps, down;
and the CLI's friction fixed (one clear line for every error, no traceback)."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dispers
from dispers.cli.demo import run_demo
from dispers.cli.main import main
from dispers.cli.processes import Started, down, is_ours, process_start_id, read_state
from dispers.core.cluster_files import ClusterLayout, write_cluster
from dispers.core.config import load_config
from dispers.simulation.population import PopulationSpec, generate
from dispers.state.documents import DocumentStore
from tests.import_data import AS_OF, expected_mean_heart_rate_by_age, heart_rate_spec, make_people, write_csv


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No default cluster but what the test makes: its own state dir, no DISPERS_CONFIG, an empty cwd."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state-home"))
    monkeypatch.delenv("DISPERS_CONFIG", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _gone(record: Started, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process_start_id(record.pid) != record.start_id:
            return True
        time.sleep(0.05)
    return False


def test_up_import_query_ps_down_over_real_processes(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "cluster"
    write_cluster(directory, ClusterLayout(k_min=5, host_as_of=AS_OF, dp=False, cohorts=("cohort:study-42",)))
    people = make_people(150)
    source = write_csv(people, tmp_path / "people.csv")
    spec = tmp_path / "study.toml"
    spec.write_text(heart_rate_spec(k=5))
    t0 = time.perf_counter()
    assert main(["up", str(directory)]) == 0
    records = read_state(directory)
    try:
        assert len(records) == 9 and all(is_ours(r) for r in records)
        assert main(["up", str(directory)]) == 2  # already up: refused, nothing started twice
        assert "already up" in capsys.readouterr().err
        assert main(["init", str(directory), "--force"]) == 2  # never new keys under a live cluster
        assert "is up" in capsys.readouterr().err
        # From here on no --config: the cluster `up` started is the default.
        assert main(["import", "--host", "pc-1", str(source), "--dry-run"]) == 0
        assert "is valid: " in capsys.readouterr().out
        assert main(["import", "--host", "pc-1", str(source)]) == 0
        assert main(["subscribe"]) == 0
        quiet = capsys.readouterr()
        assert quiet.err == ""  # no progress bar when not on a terminal
        assert "imported people.csv into pc-1: 150 people" in quiet.out
        out_dir = tmp_path / "results"
        assert main(["query", str(spec), "--output", str(out_dir), "--format", "json"]) == 0
        first_query_s = time.perf_counter() - t0
        printed = json.loads(capsys.readouterr().out)
        expected = expected_mean_heart_rate_by_age(people, [12, 25, 50, 100])
        assert {g["label"] for g in printed["result"]["groups"]} == set(expected)
        for group in printed["result"]["groups"]:
            count, mean = expected[group["label"]]
            assert group["values"]["count"] == count
            assert math.isclose(group["values"]["mean"], mean, rel_tol=1e-9)
        # The files: JSON, CSV with the same numbers, a PNG per statistic.
        names = sorted(p.name for p in out_dir.iterdir())
        assert names == ["count.png", "mean.png", "result.csv", "result.json", "std.png"]
        with open(out_dir / "result.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            if row["statistic"] == "mean":
                assert math.isclose(float(row["value"]), expected[row["group"]][1], rel_tol=1e-9)
        # The Python API, on the same default cluster: a result, and a clear exception.
        with dispers.connect(directory) as client:
            result = client.query(spec)
            assert result.value("25-50", "count") == expected["25-50"][0]
            # A declared cohort, imported from the file's cohorts column, as the target.
            study = tmp_path / "cohort.toml"
            study.write_text(heart_rate_spec(k=5, target="cohort:study-42"))
            in_cohort = expected_mean_heart_rate_by_age(people, [12, 25, 50, 100], cohort="study-42")
            by_cohort = client.query(study)
            for label, (count, mean) in in_cohort.items():
                if count < 5:
                    assert by_cohort.value(label, "count") is None  # suppressed: exact, under k
                else:
                    assert by_cohort.value(label, "count") == count
                    assert math.isclose(by_cohort.value(label, "mean") or 0.0, mean, rel_tol=1e-9)
            assert sum(c for c, _ in in_cohort.values()) < sum(c for c, _ in expected.values())
            tiny = tmp_path / "tiny.toml"
            tiny.write_text(heart_rate_spec(k=5, target="age:100-150"))  # nobody is that old
            with pytest.raises(dispers.QueryFailed) as info:
                client.query(tiny)
            assert info.value.state == "refused" and info.value.code.value == "TOO_FEW_TARGETS"
        capsys.readouterr()
        assert main(["ps"]) == 0
        table = capsys.readouterr().out
        assert table.count("healthy") == 9 and table.count("running") == 9
    finally:
        assert main(["down"]) == 0
    assert "stopped 9 actors" in capsys.readouterr().out
    assert all(_gone(r) for r in records), "a process `up` started survived `down`"
    assert not (directory / "run" / "processes.json").exists()
    assert main(["ps"]) == 1
    assert capsys.readouterr().out.count("not started") == 9
    assert first_query_s < 60
    logs = sorted((directory / "logs").glob("*.log"))
    assert len(logs) == 9 and not [p.name for p in logs if "Traceback" in p.read_text()]


def test_down_stops_only_processes_that_are_still_ours(tmp_path: Path) -> None:
    write_cluster(tmp_path / "c", ClusterLayout(leaf_aggregators=1, insecure=True))
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start_id(ours.pid)
        assert start is not None
        state = tmp_path / "c" / "run" / "processes.json"
        state.parent.mkdir()
        state.write_text(json.dumps({"processes": [
            {"name": "conductor", "role": "conductor", "pid": ours.pid, "start_id": start, "log": "x"},
            # The PID of a process `up` recorded, now taken by another one (another start time).
            {"name": "t", "role": "target", "pid": other.pid, "start_id": "proc:1", "log": "y"},
        ]}))  # fmt: skip
        stopped, skipped = down(load_config(tmp_path / "c" / "cluster.toml"), grace_s=5)
        assert [s.name for s in stopped] == ["conductor"] and [s.name for s in skipped] == ["t"]
        assert process_start_id(ours.pid) is None  # stopped (and reaped: `down` waits for it)
        assert other.poll() is None  # left alone
        assert not state.exists()
    finally:
        for proc in (ours, other):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_init_refuses_to_overwrite_a_cluster_without_force(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = str(tmp_path / "c")
    assert main(["init", target, "--insecure", "--backend", "memory"]) == 0
    before = (tmp_path / "c" / "cluster.toml").read_text()
    assert main(["init", target, "--insecure"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and "Traceback" not in err
    assert (tmp_path / "c" / "cluster.toml").read_text() == before
    assert main(["init", target, "--insecure", "--force"]) == 0
    assert (tmp_path / "c" / "cluster.toml").read_text() != before  # new keys and ports


def test_errors_are_one_line_and_name_the_valid_choices(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text(heart_rate_spec(k=10).replace('field = "age"', 'field = "agee"'))
    assert main(["query", str(spec)]) == 2  # refused before any cluster is needed
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown group-by field 'agee' (the fields are: age, sex)" in err
    spec.write_text(heart_rate_spec(k=10).replace("mean_heart_rate", "mean_hart_rate"))
    assert main(["query", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "unknown local function 'mean_hart_rate'" in err and "mean_heart_rate" in err
    assert main(["ps"]) == 2  # no cluster anywhere: says how to name one
    assert "dispers up DIR" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "missing.csv"), "--config", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: CONFIG: --config: no cluster config")


def test_version_functions_fields_and_help_on_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("dispers ")
    assert main(["functions", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    mean = next(f for f in listed["functions"] if f["name"] == "mean_heart_rate")
    assert mean["params"]["window_days"] == {"default": 30, "min": 1, "max": 3650}
    assert mean["bounds"] == [20.0, 250.0]
    assert {f["name"] for f in listed["group_by_fields"]} == {"age", "sex"}
    assert main(["fields"]) == 0 and "F, M" in capsys.readouterr().out
    from dispers.cli.main import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():  # type: ignore[attr-defined]
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"dispers {name}: {action.dest} has no help text"


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispers.cli.main", "functions"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # as `| head` does once it has read enough
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=30) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_demo_spec_ground_truth_applies_the_target_and_the_demo_runs_again(tmp_path: Path) -> None:
    spec = tmp_path / "adults.toml"
    spec.write_text(
        heart_rate_spec(k=10, target="age:25-50").replace(
            "[aggregate]", "[privacy]\nepsilon = 1.0\n[aggregate]"
        )
    )
    workdir = tmp_path / "demo"
    # What an earlier demo leaves in its workdir (cluster, a populated host, stores, logs), made
    # without starting one: the demo must run again over it.
    earlier = write_cluster(workdir, ClusterLayout(host_as_of=AS_OF))
    documents = earlier.local_for("pc-1").documents
    assert documents is not None
    with DocumentStore(documents) as store:
        generate(PopulationSpec(n_instances=600, as_of=AS_OF)).write(store)
    (workdir / "logs").mkdir()
    (workdir / "logs" / "conductor.log").write_text("an earlier run\n")
    report = run_demo(instances=600, workdir=workdir, spec_path=spec, out=io.StringIO())
    assert report.outcome.record.state == "done" and report.truth is not None
    # Only the target's bracket has anyone in the truth, as in the cluster.
    assert report.truth["12-25"].count == 0 and report.truth["50-100"].count == 0
    assert report.truth["25-50"].count > 50
    assert report.outcome.result is not None
    released = report.outcome.result.group("25-50")
    lo, hi = released.intervals["count"]
    assert abs(released.values["count"] - report.truth["25-50"].count) <= 2 * (hi - lo)  # type: ignore[operator]
    assert "an earlier run" not in (workdir / "logs" / "conductor.log").read_text()


def test_a_request_every_host_refuses_fails_the_query_with_the_hosts_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dispers.client import result_of
    from dispers.core.errors import DispersError, ErrorCode
    from dispers.protocol.instance.host import PersonalCloudHost
    from dispers.protocol.querier import run_query as run_query_outcome
    from tests.integration.conftest import local_world
    from tests.integration.world import heart_rate_spec as world_spec
    from tests.integration.world import make_setup

    world = local_world(make_setup(tmp_path / "c", n=120))
    try:
        world.subscribe()

        def refuse(self: PersonalCloudHost, caller: str, request: object) -> object:
            raise DispersError(ErrorCode.MALFORMED, "data request: secret-detail-of-the-host")

        monkeypatch.setattr(PersonalCloudHost, "contribute", refuse)
        outcome = run_query_outcome(world.querier, world_spec(), timeout_s=60)
        record = outcome.record
        assert record.state == "failed" and record.error_code == "MALFORMED"
        assert "every host refused the data request" in (record.error_message or "")
        assert "secret-detail" not in (record.error_message or "")  # a host's message stays with it
        with pytest.raises(dispers.QueryFailed, match="every host refused"):
            result_of(outcome)
    finally:
        world.close()


def test_a_json_lines_file_gives_the_numbers_computed_from_its_rows(tmp_path: Path) -> None:
    from dispers.client import run_query
    from dispers.core.messages import SubscriptionOp
    from dispers.core.spec import load_query_spec
    from dispers.state.importing import import_file
    from dispers.transport.local import LocalCluster
    from tests.import_data import write_jsonl

    config = write_cluster(
        tmp_path / "c", ClusterLayout(k_min=5, host_as_of=AS_OF, dp=False, cohorts=("cohort:study-42",))
    )
    people = make_people(90, seed=5)
    documents = config.local_for("pc-1").documents
    assert documents is not None
    with DocumentStore(documents) as store:
        import_file(
            store, write_jsonl(people, tmp_path / "people.jsonl"), vocabulary=config.settings.vocabulary
        )
    spec = tmp_path / "s.toml"
    spec.write_text(heart_rate_spec(k=5))
    cluster = LocalCluster.from_config(config)
    try:
        cluster.host_admin("pc-1").subscribe_all(SubscriptionOp.SUBSCRIBE)
        result = run_query(cluster.querier(), load_query_spec(spec), timeout_s=60)
    finally:
        cluster.close()
    expected = expected_mean_heart_rate_by_age(people, [12, 25, 50, 100])
    for group in result.groups:
        count, mean = expected[group.label]
        assert group.values["count"] == count
        assert math.isclose(group.values["mean"] or 0.0, mean, rel_tol=1e-9)
