"""Tests of cluster configuration, generated cluster files, the DA plan and query specs."""

from __future__ import annotations

import copy
import datetime as dt
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from dispers.core.cluster_files import ClusterLayout, write_cluster
from dispers.core.config import DAPlan, load_config, parse_config
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import Role
from dispers.core.spec import GroupBy, QuerySpec, load_query_spec, parse_query_spec
from dispers.crypto.keyfiles import read_key_file
from dispers.crypto.keys import ActorKeys

# --- write_cluster / load_config ----------------------------------------------------------------


def test_write_cluster_produces_a_config_that_loads(tmp_path: Path) -> None:
    written = write_cluster(tmp_path)
    config = load_config(tmp_path / "cluster.toml")
    assert config.roster == written.roster
    roles = {e.name: e.role for e in config.roster}
    assert roles == {
        "researcher": Role.QUERIER,
        "conductor": Role.CONDUCTOR,
        "ci": Role.CONCEPT_INDEXOR,
        "tf": Role.TARGET_FINDER,
        "t": Role.TARGET,
        "da-root": Role.DATA_AGGREGATOR,
        "da-1": Role.DATA_AGGREGATOR,
        "da-2": Role.DATA_AGGREGATOR,
        "pc-1": Role.PERSONAL_CLOUD,
    }
    plan = config.roster.da_plan()
    assert plan.root == "da-root"
    assert plan.leaves == ("da-1", "da-2")
    assert plan.layers() == [("da-1", "da-2"), ("da-root",)]
    assert config.settings.k_min == 10 and config.settings.batch_size == 1000

    endpoints = [e.endpoint for e in config.roster]
    assert len(set(endpoints)) == len(endpoints)
    assert all(ep.startswith("127.0.0.1:") and int(ep.rsplit(":", 1)[1]) > 0 for ep in endpoints)

    for entry in config.roster:
        local = config.local_for(entry.name)
        assert local.key_file == tmp_path / "keys" / f"{entry.name}.key"
        assert stat.S_IMODE(local.key_file.stat().st_mode) == 0o600
        keys = read_key_file(local.key_file)
        assert keys.name == entry.name
        assert keys.sealing.public == entry.sealing_key
        assert keys.signing.verify_key == entry.verify_key
        # the shared config holds public keys only
        text = (tmp_path / "cluster.toml").read_text()
        assert keys.sealing.private_bytes().hex() not in text
        assert keys.signing.seed().hex() not in text
        assert keys.secret.hex() not in text
    for name in ("conductor", "ci", "tf", "t"):
        local = config.local_for(name)
        assert local.backend == "sqlite"
        assert local.state_path == tmp_path / "state" / f"{name}.sqlite"
    assert config.local_for("pc-1").documents == tmp_path / "state" / "pc-1.sqlite"


def test_write_cluster_follows_the_layout(tmp_path: Path) -> None:
    layout = ClusterLayout(
        leaf_aggregators=3,
        hosts=("pc-a", "pc-b"),
        queriers=("q1", "q2"),
        k_min=5,
        batch_size=50,
        backend="memory",
        host_as_of=dt.date(2026, 1, 2),
        extra_settings={"query_timeout_s": 12.5},
    )
    config = write_cluster(tmp_path, layout)
    assert [e.name for e in config.roster.by_role(Role.QUERIER)] == ["q1", "q2"]
    assert [e.name for e in config.roster.by_role(Role.PERSONAL_CLOUD)] == ["pc-a", "pc-b"]
    assert config.roster.da_plan().leaves == ("da-1", "da-2", "da-3")
    assert config.settings.k_min == 5 and config.settings.batch_size == 50
    assert config.settings.query_timeout_s == 12.5
    assert config.local_for("tf").backend == "memory"
    assert config.local_for("tf").state_path is None
    assert config.local_for("pc-b").as_of == dt.date(2026, 1, 2)


def test_missing_or_invalid_config_file_is_config(tmp_path: Path) -> None:
    for path, text in ((tmp_path / "absent.toml", None), (tmp_path / "bad.toml", "[[actor]\n")):
        if text is not None:
            path.write_text(text)
        with pytest.raises(DispersError) as info:
            load_config(path)
        assert info.value.code is ErrorCode.CONFIG
        assert str(path) in info.value.message


# --- bad configs --------------------------------------------------------------------------------


def _actor(name: str, role: str, **extra: Any) -> dict[str, Any]:
    keys = ActorKeys.generate(name)
    return {
        "name": name,
        "role": role,
        "endpoint": f"127.0.0.1:{7000 + len(name)}",
        "sealing_public_key": keys.sealing.public.hex(),
        "verify_key": keys.signing.verify_key.hex(),
        **extra,
    }


BASE: dict[str, Any] = {
    "cluster": {"k_min": 10, "batch_size": 100},
    "actor": [
        _actor("researcher", "querier"),
        _actor("conductor", "conductor", backend="sqlite", state_path="c.sqlite"),
        _actor("ci", "concept_indexor"),
        _actor("tf", "target_finder"),
        _actor("t", "target"),
        _actor("da-root", "data_aggregator"),
        _actor("da-1", "data_aggregator", parent="da-root"),
        _actor("da-2", "data_aggregator", parent="da-root"),
        _actor("pc-1", "personal_cloud", documents="pc.sqlite"),
    ],
}
INDEX = {a["name"]: i for i, a in enumerate(BASE["actor"])}


def _config(change: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    change(data)
    return data


def _actor_of(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for a in data["actor"] if a["name"] == name)


def test_base_config_is_valid(tmp_path: Path) -> None:
    config = parse_config(BASE, tmp_path / "cluster.toml")
    assert config.roster.da_plan().leaves == ("da-1", "da-2")
    assert config.local_for("conductor").state_path == tmp_path / "c.sqlite"
    assert config.local_for("pc-1").documents == tmp_path / "pc.sqlite"
    with pytest.raises(DispersError) as info:
        config.local_for("nobody")
    assert info.value.code is ErrorCode.CONFIG


def _two_roots(d: dict[str, Any]) -> None:
    del _actor_of(d, "da-1")["parent"]


def _cycle(d: dict[str, Any]) -> None:
    _actor_of(d, "da-1")["parent"] = "da-2"
    _actor_of(d, "da-2")["parent"] = "da-1"


def _self_parent(d: dict[str, Any]) -> None:
    _actor_of(d, "da-1")["parent"] = "da-1"


BAD_CONFIGS = {
    "unknown actor key": (lambda d: _actor_of(d, "tf").update(colour="blue"), ["colour", "actor[3]"]),
    "unknown top-level key": (lambda d: d.update(extras={}), ["extras"]),
    "unknown setting": (lambda d: d["cluster"].update(k_max=3), ["k_max"]),
    "missing endpoint": (lambda d: _actor_of(d, "ci").pop("endpoint"), ["endpoint", "actor[2]"]),
    "two conductors": (lambda d: d["actor"].append(_actor("c2", "conductor")), ["conductor"]),
    "no target finder": (lambda d: d["actor"].pop(INDEX["tf"]), ["target_finder"]),
    "two root DAs": (_two_roots, ["data_aggregator", "parent"]),
    "a cycle of DAs": (_cycle, ["cycle"]),
    "a DA its own parent": (_self_parent, ["cycle"]),
    "a dangling parent": (lambda d: _actor_of(d, "da-2").update(parent="da-9"), ["parent"]),
    "a non-DA with a parent": (
        lambda d: _actor_of(d, "t").update(parent="da-root"),
        ["parent", "actor[4]"],
    ),
    "bad hex sealing key": (
        lambda d: _actor_of(d, "ci").update(sealing_public_key="zz" * 32),
        ["sealing", "actor[2]"],
    ),
    "short verify key": (
        lambda d: _actor_of(d, "da-1").update(verify_key="00" * 31),
        ["verify", "actor[6]"],
    ),
    "k_min 1": (lambda d: d["cluster"].update(k_min=1), ["k_min"]),
    "k_min not an integer": (lambda d: d["cluster"].update(k_min=2.5), ["k_min"]),
    "batch_size 0": (lambda d: d["cluster"].update(batch_size=0), ["batch_size"]),
    "negative timeout": (lambda d: d["cluster"].update(query_timeout_s=-1), ["query_timeout_s"]),
    "round time above its cap": (
        lambda d: d["cluster"].update(round_time_s=200.0, max_round_time_s=100.0),
        ["round_time_s", "max_round_time_s"],
    ),
    "round time cap above the transport's": (
        lambda d: d["cluster"].update(max_round_time_s=1000.0),
        ["max_round_time_s", "480"],
    ),
    "backend mongo": (lambda d: _actor_of(d, "tf").update(backend="mongo"), ["backend", "actor[3]"]),
    "sqlite without state_path": (
        lambda d: _actor_of(d, "t").update(backend="sqlite"),
        ["state_path", "actor[4]"],
    ),
    "unknown role": (lambda d: _actor_of(d, "t").update(role="boss"), ["role", "actor[4]"]),
    "bad actor name": (lambda d: _actor_of(d, "t").update(name="Bad Name"), ["name", "actor[4]"]),
    "bad as_of": (lambda d: _actor_of(d, "pc-1").update(as_of="2026-02-30"), ["as_of"]),
    "no querier": (lambda d: d["actor"].pop(INDEX["researcher"]), ["querier"]),
    "no actors": (lambda d: d.update(actor=[]), ["actor"]),
    "cluster not a table": (lambda d: d.update(cluster=3), ["cluster"]),
    "path not a string": (lambda d: _actor_of(d, "pc-1").update(documents=3), ["documents"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_refused_naming_the_bad_thing(case: str) -> None:
    change, expected_words = BAD_CONFIGS[case]
    data = _config(change)
    with pytest.raises(DispersError) as info:
        parse_config(data)
    assert info.value.code is ErrorCode.CONFIG
    for word in expected_words:
        assert word in info.value.message, (case, info.value.message)


def test_duplicate_actor_name_is_config() -> None:
    data = _config(lambda d: d["actor"].append(_actor("ci", "personal_cloud")))
    with pytest.raises(DispersError) as info:
        parse_config(data)
    assert info.value.code is ErrorCode.CONFIG


def test_bad_config_file_on_disk_is_config(tmp_path: Path) -> None:
    write_cluster(tmp_path, ClusterLayout(backend="memory"))
    path = tmp_path / "cluster.toml"
    path.write_text(path.read_text().replace('backend = "memory"', 'backend = "mongo"', 1))
    with pytest.raises(DispersError) as info:
        load_config(path)
    assert info.value.code is ErrorCode.CONFIG
    assert "backend" in info.value.message


# --- the DA plan ---------------------------------------------------------------------------------


THREE_LEVELS = {
    "root": "r",
    "parents": [["m1", "r"], ["m2", "r"], ["l1", "m1"], ["l2", "m1"], ["l3", "m2"]],
}


def test_three_level_plan_layers_are_leaves_first_root_last() -> None:
    plan = DAPlan.from_obj(THREE_LEVELS)
    assert plan.layers() == [("l1", "l2", "l3"), ("m1", "m2"), ("r",)]
    assert plan.leaves == ("l1", "l2", "l3")
    assert plan.members[-1] == "r"
    assert plan.children("m1") == ("l1", "l2") and plan.children("l1") == ()
    assert plan.parent("l3") == "m2" and plan.parent("r") is None
    assert DAPlan.from_obj(json.loads(json.dumps(plan.to_obj()))) == plan


def test_uneven_plan_layers_by_height() -> None:
    # l0 sits right under the root: a leaf, so in the first layer
    plan = DAPlan.from_obj({"root": "r", "parents": [["l0", "r"], ["m", "r"], ["l1", "m"]]})
    assert plan.layers() == [("l0", "l1"), ("m",), ("r",)]
    assert plan.leaves == ("l0", "l1")


def test_a_lone_root_is_its_own_leaf() -> None:
    plan = DAPlan.from_obj({"root": "r", "parents": []})
    assert plan.leaves == ("r",) and plan.layers() == [("r",)]


def test_three_level_plan_from_a_config() -> None:
    def deepen(d: dict[str, Any]) -> None:
        d["actor"].append(_actor("da-mid", "data_aggregator", parent="da-root"))
        d["actor"].append(_actor("da-3", "data_aggregator", parent="da-mid"))
        _actor_of(d, "da-1")["parent"] = "da-mid"

    plan = parse_config(_config(deepen)).roster.da_plan()
    assert plan.layers() == [("da-1", "da-2", "da-3"), ("da-mid",), ("da-root",)]


@pytest.mark.parametrize(
    "obj",
    [
        {"root": "r", "parents": [["a", "b"], ["b", "a"]]},
        {"root": "r", "parents": [["a", "x"]]},
        {"root": "r", "parents": [["a", "r"], ["a", "r"]]},
        {"root": "r", "parents": [["r", "r"]]},
        {"root": "R!", "parents": []},
        {"parents": []},
        {"root": "r", "parents": [["a"]]},
        {"root": "r", "parents": 3},
        None,
    ],
)
def test_malformed_plans_are_refused(obj: Any) -> None:
    with pytest.raises(DispersError) as info:
        DAPlan.from_obj(obj)
    assert info.value.code is ErrorCode.MALFORMED


# --- query specs -----------------------------------------------------------------------------------

HEART_RATE_TOML = """
[query]
target = "age:12-25 OR age:25-50 OR age:50-100"
k = 10

[data]
function = "mean_heart_rate"
as_of = 2026-11-01
params = { window_days = 30 }
group_by = { field = "age", edges = [12, 25, 50, 100] }

[aggregate]
bounds = [30, 220]
stats = ["count", "mean", "std", "min", "max"]
"""


def _heart_rate() -> dict[str, Any]:
    return {
        "query": {"target": "age:12-25 OR age:25-50 OR age:50-100", "k": 10},
        "data": {
            "function": "mean_heart_rate",
            "as_of": "2026-11-01",
            "params": {"window_days": 30},
            "group_by": {"field": "age", "edges": [12, 25, 50, 100]},
        },
        "aggregate": {"bounds": [30, 220], "stats": ["count", "mean", "std", "min", "max"]},
    }


def test_heart_rate_spec_is_accepted(tmp_path: Path) -> None:
    spec = parse_query_spec(_heart_rate())
    assert spec.target == "age:12-25 OR age:25-50 OR age:50-100"
    assert spec.function == "mean_heart_rate"
    assert dict(spec.params) == {"window_days": 30}
    assert spec.as_of == dt.date(2026, 11, 1)
    assert spec.group_by == GroupBy("age", (12, 25, 50, 100))
    assert spec.groups == ("12-25", "25-50", "50-100")
    assert spec.bounds == (30.0, 220.0)
    assert spec.stats == ("count", "mean", "std", "min", "max")
    assert spec.k == 10
    assert spec.compiled() == (("age:12-25", "age:25-50", "age:50-100"), "((#0 | #1) | #2)")

    path = tmp_path / "heart.toml"
    path.write_text(HEART_RATE_TOML)
    assert load_query_spec(path) == spec  # the TOML file (with a native date) reads the same


def test_query_spec_round_trips_through_to_obj() -> None:
    spec = parse_query_spec(_heart_rate())
    assert parse_query_spec(spec.to_obj()) == spec
    assert parse_query_spec(json.loads(json.dumps(spec.to_obj()))) == spec
    plain = QuerySpec(target="sex:f AND NOT city:paris", function="count_documents", k=3)
    again = parse_query_spec(plain.to_obj())
    assert again == plain
    assert again.groups == ("all",)


def test_query_spec_defaults() -> None:
    data = _heart_rate()
    del data["query"]["k"], data["aggregate"]["stats"], data["data"]["as_of"]
    del data["data"]["params"], data["data"]["group_by"]
    spec = parse_query_spec(data)
    assert spec.k == 10 and spec.stats == ("count", "mean", "std") and dict(spec.params) == {}
    assert spec.group_by is None


def _spec_with(path: str, value: Any) -> dict[str, Any]:
    """The heart-rate spec with `table.key` (or `table`) set to value, or deleted if value is DEL."""
    data = _heart_rate()
    parts = path.split(".")
    node: Any = data
    for part in parts[:-1]:
        node = node[part]
    if value is DEL:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return data


DEL = object()

BAD_SPECS = [
    ("filter", {"x": 1}, "[filter]"),
    ("query", [1], "[query]"),
    ("query.colour", "red", "query.colour"),
    ("data.window", 30, "data.window"),
    ("aggregate.noise", 1.0, "aggregate.noise"),
    ("query.target", DEL, "query.target"),
    ("query.target", 42, "query.target"),
    ("data.function", DEL, "data.function"),
    ("aggregate.bounds", DEL, "aggregate.bounds"),
    ("aggregate.bounds", [220, 30], "aggregate.bounds"),
    ("aggregate.bounds", [30, 30], "aggregate.bounds"),
    ("aggregate.bounds", [30], "aggregate.bounds"),
    ("aggregate.bounds", [30, 220, 300], "aggregate.bounds"),
    ("aggregate.bounds", ["30", "220"], "aggregate.bounds"),
    ("aggregate.bounds", [False, True], "aggregate.bounds"),
    ("aggregate.bounds", [float("nan"), 220], "aggregate.bounds"),
    ("aggregate.bounds", "30-220", "aggregate.bounds"),
    ("aggregate.stats", ["mode"], "aggregate.stats"),
    ("aggregate.stats", [], "aggregate.stats"),
    ("aggregate.stats", "mean", "aggregate.stats"),
    ("aggregate.stats", ["mean", 3], "aggregate.stats"),
    ("query.k", 1, "query.k"),
    ("query.k", 0, "query.k"),
    ("query.k", -5, "query.k"),
    ("query.k", True, "query.k"),
    ("query.k", 2.5, "query.k"),
    ("query.k", "10", "query.k"),
    ("data.as_of", "2026-13-01", "data.as_of"),
    ("data.as_of", "yesterday", "data.as_of"),
    ("data.as_of", dt.datetime(2026, 11, 1, 12, 0), "data.as_of"),
    ("data.as_of", 20261101, "data.as_of"),
    ("data.params", [1, 2], "data.params"),
    ("data.group_by", "age", "data.group_by"),
    ("data.group_by.bins", 3, "data.group_by"),
    ("data.group_by.edges", DEL, "data.group_by"),
    ("data.group_by.edges", [12], "data.group_by.edges"),
    ("data.group_by.edges", [], "data.group_by.edges"),
    ("data.group_by.edges", [25, 12, 50], "data.group_by.edges"),
    ("data.group_by.edges", [12, 12, 50], "data.group_by.edges"),
    ("data.group_by.edges", ["a", "b"], "data.group_by.edges"),
    ("data.group_by.edges", [12, float("nan")], "data.group_by.edges"),
    ("data.group_by.edges", [12, float("inf")], "data.group_by.edges"),
    ("data.group_by.field", "age group", "data.group_by.field"),
    ("data.group_by.field", 3, "data.group_by.field"),
]


@pytest.mark.parametrize(("path", "value", "named"), BAD_SPECS, ids=lambda v: repr(v)[:30])
def test_bad_query_spec_is_malformed_naming_the_key(path: str, value: Any, named: str) -> None:
    with pytest.raises(DispersError) as info:
        parse_query_spec(_spec_with(path, value))
    assert info.value.code is ErrorCode.MALFORMED
    assert named in info.value.message, info.value.message


@pytest.mark.parametrize("bounds", [[30, float("inf")], [float("-inf"), 220]])
def test_infinite_bounds_are_malformed(bounds: list[float]) -> None:
    with pytest.raises(DispersError) as info:
        parse_query_spec(_spec_with("aggregate.bounds", bounds))
    assert info.value.code is ErrorCode.MALFORMED
    assert "aggregate.bounds" in info.value.message


@pytest.mark.parametrize("edges", [5, None, 12.5])
def test_non_list_edges_are_malformed(edges: Any) -> None:
    with pytest.raises(DispersError) as info:
        parse_query_spec(_spec_with("data.group_by.edges", edges))
    assert info.value.code is ErrorCode.MALFORMED
    assert "data.group_by.edges" in info.value.message


@pytest.mark.parametrize(
    "target", ["", "age:12-25 OR", "(age:12-25", "age:12-25 & #0", "age:12-25 age:25-50"]
)
def test_unparsable_target_is_malformed_naming_the_key(target: str) -> None:
    with pytest.raises(DispersError) as info:
        parse_query_spec(_spec_with("query.target", target))
    assert info.value.code is ErrorCode.MALFORMED
    assert "query.target" in info.value.message
    assert target.strip() == "" or "age:12-25" not in info.value.message


def test_unparsable_target_is_refused() -> None:
    # whatever its code, an unparsable target never yields a spec and never echoes the concepts
    with pytest.raises(DispersError) as info:
        parse_query_spec(_spec_with("query.target", "age:12-25 OR"))
    assert info.value.code in (ErrorCode.MALFORMED, ErrorCode.INVALID_EXPRESSION)
    assert "age:12-25" not in str(info.value)


def test_missing_or_invalid_spec_file_is_malformed(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[query\n")
    for path in (tmp_path / "absent.toml", bad):
        with pytest.raises(DispersError) as info:
            load_query_spec(path)
        assert info.value.code is ErrorCode.MALFORMED
        assert str(path) in info.value.message
