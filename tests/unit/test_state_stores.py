"""Contract tests for every role's store, run once per backend (memory, SQLite file)."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispers.core.errors import DispersError, ErrorCode
from dispers.state.concepts import ConceptCatalog, MemoryConceptCatalog, SQLiteConceptCatalog
from dispers.state.directory import (
    AddressDirectory,
    MemoryAddressDirectory,
    SQLiteAddressDirectory,
)
from dispers.state.factory import (
    Store,
    open_address_directory,
    open_concept_catalog,
    open_pseudonym_sets,
    open_query_store,
    open_store,
)
from dispers.state.pseudonyms import MemoryPseudonymSets, PseudonymSets, SQLitePseudonymSets
from dispers.state.queries import (
    MemoryQueryStore,
    QueryRecord,
    QueryStore,
    SQLiteQueryStore,
)

_S = TypeVar("_S")


def _code(excinfo: pytest.ExceptionInfo[DispersError]) -> ErrorCode:
    return excinfo.value.code


class _Contract(ABC):
    """Gives each test a temporary directory and closes the stores it opened."""

    tmp_path: Path
    opened: list[Any]

    @pytest.fixture(autouse=True)
    def _setup(self, tmp_path: Path) -> Iterator[None]:
        self.tmp_path = tmp_path
        self.opened = []
        yield
        for store in self.opened:
            store.close()

    def track(self, store: _S) -> _S:
        self.opened.append(store)
        return store


# --------------------------------------------------------------------------------------
# Concept catalogue


class ConceptCatalogContract(_Contract):
    """The behaviour every ConceptCatalog must have."""

    @abstractmethod
    def make(self) -> ConceptCatalog: ...

    def test_empty(self) -> None:
        catalog = self.make()
        assert len(catalog) == 0
        assert catalog.unknown(["a", "b"]) == [0, 1]
        assert catalog.unknown([]) == []

    def test_add_counts_new_distinct_concepts(self) -> None:
        catalog = self.make()
        assert catalog.add(["age", "heart_rate", "age"]) == 2
        assert len(catalog) == 2
        assert catalog.add(["age", "steps"]) == 1
        assert catalog.add(["age", "steps"]) == 0
        assert catalog.add([]) == 0
        assert len(catalog) == 3

    def test_add_accepts_any_iterable(self) -> None:
        catalog = self.make()
        assert catalog.add(c for c in ("x", "y")) == 2
        assert catalog.unknown(["x", "y"]) == []

    def test_unknown_returns_indices_in_order(self) -> None:
        catalog = self.make()
        catalog.add(["a", "c"])
        assert catalog.unknown(["a", "b", "c", "d", "b"]) == [1, 3, 4]
        assert catalog.unknown(["", "a"]) == [0]

    def test_unknown_many(self) -> None:
        catalog = self.make()
        catalog.add(f"c{i}" for i in range(0, 3000, 2))
        assert catalog.unknown([f"c{i}" for i in range(3000)]) == list(range(1, 3000, 2))

    def test_failed_add_changes_nothing(self) -> None:
        catalog = self.make()
        catalog.add(["kept"])
        for bad in (["fresh", 3], ["fresh", ""]):
            with pytest.raises(DispersError) as excinfo:
                catalog.add(bad)  # type: ignore[arg-type]
            assert _code(excinfo) is ErrorCode.MALFORMED
            assert "index 1" in excinfo.value.message
            assert "fresh" not in str(excinfo.value)
        assert len(catalog) == 1
        assert catalog.unknown(["kept", "fresh"]) == [1]

    def test_unknown_rejects_non_strings(self) -> None:
        catalog = self.make()
        with pytest.raises(DispersError) as excinfo:
            catalog.unknown(["a", b"b"])  # type: ignore[list-item]
        assert _code(excinfo) is ErrorCode.MALFORMED


class TestMemoryConceptCatalog(ConceptCatalogContract):
    def make(self) -> ConceptCatalog:
        return MemoryConceptCatalog()


class TestSQLiteConceptCatalog(ConceptCatalogContract):
    def make(self) -> ConceptCatalog:
        return self.track(SQLiteConceptCatalog(str(self.tmp_path / "concepts.db")))

    def test_persists_across_reopening(self) -> None:
        path = str(self.tmp_path / "concepts.db")
        first = SQLiteConceptCatalog(path)
        first.add(["a", "b"])
        first.close()
        again = self.track(SQLiteConceptCatalog(path))
        assert len(again) == 2
        assert again.unknown(["a", "z"]) == [1]


# --------------------------------------------------------------------------------------
# Pseudonym sets


class PseudonymSetsContract(_Contract):
    """The behaviour every PseudonymSets must have."""

    @abstractmethod
    def make(self) -> PseudonymSets: ...

    def test_empty(self) -> None:
        sets = self.make()
        assert sets.members(b"t") == frozenset()
        assert sets.universe() == frozenset()
        assert sets.token_count() == 0

    def test_add_creates_memberships(self) -> None:
        sets = self.make()
        assert sets.add([([b"t1", b"t2"], b"p1"), ([b"t2"], b"p2")]) == 3
        assert sets.members(b"t1") == frozenset({b"p1"})
        assert sets.members(b"t2") == frozenset({b"p1", b"p2"})
        assert isinstance(sets.members(b"t2"), frozenset)
        assert sets.members(b"t3") == frozenset()
        assert sets.universe() == frozenset({b"p1", b"p2"})
        assert sets.token_count() == 2

    def test_a_batch_applies_once_and_unsubscribe_leaves_every_set(self) -> None:
        sets = self.make()
        assert sets.subscribe_batch("a" * 32, [([b"t1", b"t2"], b"p1"), ([b"t2"], b"p2")]) == 3
        with pytest.raises(DispersError) as excinfo:
            sets.subscribe_batch("a" * 32, [([b"t3"], b"p3")])
        assert excinfo.value.code is ErrorCode.REPLAY and sets.members(b"t3") == frozenset()
        # Unsubscribing names no token: the pseudonym leaves every set it is in.
        assert sets.unsubscribe_batch("b" * 32, [b"p1"]) == 2
        assert sets.universe() == frozenset({b"p2"}) and sets.members(b"t1") == frozenset()
        with pytest.raises(DispersError) as excinfo:
            sets.unsubscribe_batch("b" * 32, [b"p2"])
        assert excinfo.value.code is ErrorCode.REPLAY and sets.universe() == frozenset({b"p2"})

    def test_add_is_idempotent(self) -> None:
        sets = self.make()
        assert sets.add([([b"t1", b"t1", b"t2"], b"p"), ([b"t1"], b"p")]) == 2
        assert sets.add([([b"t1", b"t2"], b"p")]) == 0
        assert sets.members(b"t1") == frozenset({b"p"})
        assert sets.token_count() == 2

    def test_remove(self) -> None:
        sets = self.make()
        sets.add([([b"t1", b"t2"], b"p1"), ([b"t1"], b"p2")])
        assert sets.remove([([b"t1", b"t3"], b"p1"), ([b"t2"], b"p2")]) == 1
        assert sets.members(b"t1") == frozenset({b"p2"})
        assert sets.members(b"t2") == frozenset({b"p1"})
        assert sets.remove([([b"t1"], b"p1")]) == 0  # no longer a member: a no-op
        assert sets.remove([]) == 0

    def test_remove_last_membership_empties_token_and_universe(self) -> None:
        sets = self.make()
        sets.add([([b"t1", b"t2"], b"p1"), ([b"t2"], b"p2")])
        assert sets.remove([([b"t1", b"t2"], b"p1")]) == 2
        assert sets.universe() == frozenset({b"p2"})
        assert sets.token_count() == 1
        assert sets.remove([([b"t2"], b"p2")]) == 1
        assert sets.universe() == frozenset()
        assert sets.token_count() == 0

    @pytest.mark.parametrize(
        "bad",
        [
            ([b"t-new"], "not bytes"),
            ([b"t-new", b""], b"p-new"),
            ([b"t-new", "t"], b"p-new"),
            (b"t-new", b"p-new"),  # a lone token instead of a sequence of tokens
            ([b"t-new"], b""),
            ([b"t-new"],),
        ],
    )
    def test_failed_add_or_remove_changes_nothing(self, bad: Any) -> None:
        sets = self.make()
        sets.add([([b"t1"], b"p1")])
        for mutate in (sets.add, sets.remove):
            with pytest.raises(DispersError) as excinfo:
                mutate([([b"t-new", b"t1"], b"p-new"), ([b"t1"], b"p1"), bad])
            assert _code(excinfo) is ErrorCode.MALFORMED
            assert "pair 2" in excinfo.value.message
            assert "t-new" not in str(excinfo.value)
            assert "p-new" not in str(excinfo.value)
        assert sets.members(b"t1") == frozenset({b"p1"})
        assert sets.members(b"t-new") == frozenset()
        assert sets.universe() == frozenset({b"p1"})
        assert sets.token_count() == 1

    def test_bulk_add_at_scale(self) -> None:
        sets = self.make()
        tokens = [i.to_bytes(32, "big") for i in range(50)]
        pairs = [([tokens[(i + j * 7) % 50] for j in range(4)], i.to_bytes(32, "big")) for i in range(10_000)]
        assert sets.add(pairs) == 40_000
        assert len(sets.universe()) == 10_000
        assert sets.token_count() == 50
        assert sets.remove(pairs[:5000]) == 20_000

    def test_concurrent_adds(self) -> None:
        sets = self.make()

        def work(n: int) -> None:
            for i in range(50):
                sets.add([([b"shared", bytes([n])], bytes([n, i]))])

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(sets.members(b"shared")) == 400
        assert sets.token_count() == 9


class TestMemoryPseudonymSets(PseudonymSetsContract):
    def make(self) -> PseudonymSets:
        return MemoryPseudonymSets()


class TestSQLitePseudonymSets(PseudonymSetsContract):
    def make(self) -> PseudonymSets:
        return self.track(SQLitePseudonymSets(str(self.tmp_path / "pseudonyms.db")))

    def test_persists_across_reopening(self) -> None:
        path = str(self.tmp_path / "pseudonyms.db")
        first = SQLitePseudonymSets(path)
        first.add([([b"t1", b"t2"], b"p1")])
        first.close()
        again = self.track(SQLitePseudonymSets(path))
        assert again.members(b"t2") == frozenset({b"p1"})
        assert again.add([([b"t1"], b"p1")]) == 0


_TOKENS = st.sampled_from([b"t0", b"t1", b"t2", b"t3"])
_PSEUDONYMS = st.sampled_from([b"p0", b"p1", b"p2", b"p3", b"p4"])
_PAIRS = st.lists(st.tuples(st.lists(_TOKENS, max_size=4), _PSEUDONYMS), max_size=4)
_OPS = st.lists(st.tuples(st.sampled_from(["add", "remove"]), _PAIRS), max_size=12)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS)
def test_pseudonym_sets_agree_with_a_reference_model(
    ops: list[tuple[str, list[tuple[list[bytes], bytes]]]],
) -> None:
    model: dict[bytes, set[bytes]] = {}
    stores = [MemoryPseudonymSets(), SQLitePseudonymSets(":memory:")]
    try:
        for op, pairs in ops:
            changed = 0
            for tokens, pseudonym in pairs:
                for token in tokens:
                    members = model.setdefault(token, set())
                    if (op == "add") != (pseudonym in members):
                        changed += 1
                        if op == "add":
                            members.add(pseudonym)
                        else:
                            members.discard(pseudonym)
            model = {token: members for token, members in model.items() if members}
            for store in stores:
                assert getattr(store, op)(pairs) == changed
                for token in (b"t0", b"t1", b"t2", b"t3"):
                    assert store.members(token) == frozenset(model.get(token, ()))
                assert store.universe() == frozenset().union(*model.values())
                assert store.token_count() == len(model)
    finally:
        for store in stores:
            store.close()


# --------------------------------------------------------------------------------------
# Address directory


class AddressDirectoryContract(_Contract):
    """The behaviour every AddressDirectory must have."""

    @abstractmethod
    def make(self) -> AddressDirectory: ...

    def test_put_and_resolve(self) -> None:
        directory = self.make()
        assert len(directory) == 0
        assert directory.put_many([(b"p1", "https://a"), (b"p2", "https://b")]) == 2
        assert len(directory) == 2
        assert directory.resolve([b"p2", b"p1", b"p2"]) == ["https://b", "https://a", "https://b"]
        assert directory.resolve([]) == []

    def test_a_batch_commits_once(self) -> None:
        directory = self.make()
        assert not directory.batch_committed("a" * 32)
        directory.commit_batch("a" * 32, [(b"p1", "h/1"), (b"p2", "h/2")], [])
        assert directory.batch_committed("a" * 32) and len(directory) == 2
        with pytest.raises(DispersError) as excinfo:
            directory.commit_batch("a" * 32, [(b"p3", "h/3")], [])
        assert excinfo.value.code is ErrorCode.REPLAY and len(directory) == 2
        directory.commit_batch("b" * 32, [], [b"p1", b"unknown"])
        assert directory.lookup([b"p1", b"p2"]) == [None, "h/2"]
        with pytest.raises(DispersError):  # a conflicting address writes nothing, not even the id
            directory.commit_batch("c" * 32, [(b"p2", "h/other")], [])
        assert not directory.batch_committed("c" * 32)

    def test_re_putting_a_pair_is_a_no_op(self) -> None:
        directory = self.make()
        directory.put_many([(b"p1", "https://a")])
        assert directory.put_many([(b"p1", "https://a"), (b"p1", "https://a")]) == 0
        assert directory.put_many([(b"p1", "https://a"), (b"p2", "https://b")]) == 1
        assert len(directory) == 2

    def test_a_different_address_writes_nothing(self) -> None:
        directory = self.make()
        directory.put_many([(b"p1", "https://a")])
        with pytest.raises(DispersError) as excinfo:
            directory.put_many([(b"p-new", "https://new"), (b"p1", "https://changed")])
        assert _code(excinfo) is ErrorCode.MALFORMED
        assert "entry 1" in excinfo.value.message
        for secret in ("p-new", "https://new", "https://changed", "https://a"):
            assert secret not in str(excinfo.value)
        assert len(directory) == 1
        assert directory.resolve([b"p1"]) == ["https://a"]

    @pytest.mark.parametrize(
        "bad",
        [
            (b"p-new", "https://other"),  # a second address for p-new within one batch
            (b"", "https://x"),
            ("p3", "https://x"),
            (b"p3", ""),
            (b"p3", b"https://x"),
            (b"p3",),
        ],
    )
    def test_a_malformed_batch_writes_nothing(self, bad: Any) -> None:
        directory = self.make()
        directory.put_many([(b"p1", "https://a")])
        with pytest.raises(DispersError) as excinfo:
            directory.put_many([(b"p-new", "https://new"), (b"p1", "https://a"), bad])
        assert _code(excinfo) is ErrorCode.MALFORMED
        assert "entry 2" in excinfo.value.message
        assert "https" not in str(excinfo.value)
        assert len(directory) == 1

    def test_resolve_unknown_counts_without_naming(self) -> None:
        directory = self.make()
        directory.put_many([(b"p1", "https://a")])
        with pytest.raises(DispersError) as excinfo:
            directory.resolve([b"p1", b"ghost", b"p1", b"ghost2"])
        assert _code(excinfo) is ErrorCode.NOT_FOUND
        assert excinfo.value.message == "2 of 4 pseudonyms are not in the directory"
        assert "ghost" not in str(excinfo.value)

    def test_resolve_rejects_non_bytes(self) -> None:
        directory = self.make()
        with pytest.raises(DispersError) as excinfo:
            directory.resolve([b"p1", "p2"])  # type: ignore[list-item]
        assert _code(excinfo) is ErrorCode.MALFORMED

    def test_resolve_many_at_scale(self) -> None:
        directory = self.make()
        entries = [(i.to_bytes(32, "big"), f"https://i{i}.example") for i in range(10_000)]
        assert directory.put_many(entries) == 10_000
        wanted = [p for p, _ in reversed(entries)]
        addresses = directory.resolve(wanted)
        assert addresses == [a for _, a in reversed(entries)]


class TestMemoryAddressDirectory(AddressDirectoryContract):
    def make(self) -> AddressDirectory:
        return MemoryAddressDirectory()


class TestSQLiteAddressDirectory(AddressDirectoryContract):
    def make(self) -> AddressDirectory:
        return self.track(SQLiteAddressDirectory(str(self.tmp_path / "directory.db")))

    def test_persists_across_reopening(self) -> None:
        path = str(self.tmp_path / "directory.db")
        first = SQLiteAddressDirectory(path)
        first.put_many([(b"p1", "https://a")])
        first.close()
        again = self.track(SQLiteAddressDirectory(path))
        assert again.resolve([b"p1"]) == ["https://a"]
        with pytest.raises(DispersError):
            again.put_many([(b"p1", "https://b")])


# --------------------------------------------------------------------------------------
# Query store


def _record(query_id: str = "q1", **changes: Any) -> QueryRecord:
    record = QueryRecord(query_id=query_id, querier="lab", created_at=1700000000.5, state="pending", k=5)
    for name, value in changes.items():
        setattr(record, name, value)
    return record


class QueryStoreContract(_Contract):
    """The behaviour every QueryStore must have."""

    @abstractmethod
    def make(self) -> QueryStore: ...

    def test_create_and_get(self) -> None:
        store = self.make()
        record = _record(phases={"tokens": 0.25}, counts={"targets": 12}, sealed_result=b"\x00x")
        store.create(record)
        assert store.get("q1") == record
        assert store.list_ids() == ["q1"]

    def test_create_twice_is_a_replay(self) -> None:
        store = self.make()
        store.create(_record())
        with pytest.raises(DispersError) as excinfo:
            store.create(_record(querier="someone else", k=9))
        assert _code(excinfo) is ErrorCode.REPLAY
        assert store.get("q1") == _record()
        assert store.list_ids() == ["q1"]

    def test_missing_query_is_not_found(self) -> None:
        store = self.make()
        with pytest.raises(DispersError) as excinfo:
            store.get("nope")
        assert _code(excinfo) is ErrorCode.NOT_FOUND
        with pytest.raises(DispersError) as excinfo:
            store.update("nope", state="running")
        assert _code(excinfo) is ErrorCode.NOT_FOUND
        assert store.list_ids() == []

    def test_update_merges_and_keeps_unset_fields(self) -> None:
        store = self.make()
        store.create(_record(phases={"tokens": 0.5}, counts={"targets": 10}))
        updated = store.update("q1", state="running", phases={"targets": 1.5})
        assert updated.phases == {"tokens": 0.5, "targets": 1.5}
        assert updated.counts == {"targets": 10}
        updated = store.update("q1", phases={"tokens": 0.75}, counts={"contributions": 9})
        assert updated.state == "running"
        assert updated.phases == {"tokens": 0.75, "targets": 1.5}
        assert updated.counts == {"targets": 10, "contributions": 9}
        assert updated.sealed_result is None
        updated = store.update(
            "q1", state="failed", error_code="UNAVAILABLE", error_message="2 of 3 DAs failed"
        )
        updated = store.update("q1", sealed_result=b"sealed")
        assert (updated.state, updated.error_code, updated.sealed_result) == (
            "failed",
            "UNAVAILABLE",
            b"sealed",
        )
        assert store.get("q1") == updated

    def test_invalid_update_changes_nothing(self) -> None:
        store = self.make()
        store.create(_record(phases={"tokens": 0.5}))
        bad_updates: list[dict[str, Any]] = [
            {"state": "exploded", "phases": {"targets": 1.0}},
            {"phases": {"targets": 1.0, "neg": -1.0}},
            {"counts": {"targets": 1, "half": 0.5}},
            {"counts": {"targets": True}},
            {"state": "done", "sealed_result": "not bytes"},
        ]
        for changes in bad_updates:
            with pytest.raises(DispersError) as excinfo:
                store.update("q1", **changes)
            assert _code(excinfo) is ErrorCode.MALFORMED
        assert store.get("q1") == _record(phases={"tokens": 0.5})

    @pytest.mark.parametrize(
        "changes",
        [
            {"query_id": ""},
            {"state": "bogus"},
            {"k": 0},
            {"k": True},
            {"created_at": float("nan")},
            {"phases": {"x": "1"}},
            {"counts": {"x": -1}},
            {"sealed_result": bytearray(b"x")},
        ],
    )
    def test_invalid_record_is_refused(self, changes: dict[str, Any]) -> None:
        store = self.make()
        with pytest.raises(DispersError) as excinfo:
            store.create(_record(**changes))
        assert _code(excinfo) is ErrorCode.MALFORMED
        assert store.list_ids() == []

    def test_records_are_copies(self) -> None:
        store = self.make()
        original = _record(phases={"tokens": 0.5}, counts={"targets": 10})
        store.create(original)
        original.phases["tokens"] = 99.0
        original.state = "done"
        fetched = store.get("q1")
        assert fetched.phases == {"tokens": 0.5} and fetched.state == "pending"
        fetched.phases["leak"] = 1.0
        fetched.counts["targets"] = 0
        returned = store.update("q1", counts={"contributions": 3})
        returned.counts.clear()
        again = store.get("q1")
        assert again.phases == {"tokens": 0.5}
        assert again.counts == {"targets": 10, "contributions": 3}
        store.list_ids().append("q-fake")
        assert store.list_ids() == ["q1"]

    def test_list_ids_in_creation_order(self) -> None:
        store = self.make()
        for query_id in ("q3", "q1", "q2"):
            store.create(_record(query_id))
        store.update("q1", state="running")
        assert store.list_ids() == ["q3", "q1", "q2"]


class TestMemoryQueryStore(QueryStoreContract):
    def make(self) -> QueryStore:
        return MemoryQueryStore()


class TestSQLiteQueryStore(QueryStoreContract):
    def make(self) -> QueryStore:
        return self.track(SQLiteQueryStore(str(self.tmp_path / "queries.db")))

    def test_persists_across_reopening(self) -> None:
        path = str(self.tmp_path / "queries.db")
        first = SQLiteQueryStore(path)
        first.create(_record())
        first.update("q1", state="done", phases={"total": 3.0}, sealed_result=b"r")
        first.close()
        again = self.track(SQLiteQueryStore(path))
        assert again.get("q1") == _record(state="done", phases={"total": 3.0}, sealed_result=b"r")
        with pytest.raises(DispersError) as excinfo:
            again.create(_record())
        assert _code(excinfo) is ErrorCode.REPLAY


# --------------------------------------------------------------------------------------
# Factory


def test_factory_opens_each_kind_with_each_backend(tmp_path: Path) -> None:
    memory = [
        open_store("concepts", "memory", None),
        open_store("pseudonyms", "memory", None),
        open_store("directory", "memory", None),
        open_store("queries", "memory", None),
    ]
    expected_memory = [
        MemoryConceptCatalog,
        MemoryPseudonymSets,
        MemoryAddressDirectory,
        MemoryQueryStore,
    ]
    assert [type(s) for s in memory] == expected_memory
    sqlite: list[Store] = [
        open_concept_catalog("sqlite", str(tmp_path / "c.db")),
        open_pseudonym_sets("sqlite", str(tmp_path / "p.db")),
        open_address_directory("sqlite", str(tmp_path / "d.db")),
        open_query_store("sqlite", str(tmp_path / "q.db")),
    ]
    expected_sqlite = [
        SQLiteConceptCatalog,
        SQLitePseudonymSets,
        SQLiteAddressDirectory,
        SQLiteQueryStore,
    ]
    assert [type(s) for s in sqlite] == expected_sqlite
    for store in sqlite:
        store.close()


def test_factory_refuses_bad_configuration() -> None:
    with pytest.raises(DispersError) as excinfo:
        open_store("queries", "postgres", "/tmp/x")
    assert _code(excinfo) is ErrorCode.CONFIG
    assert "postgres" in excinfo.value.message
    with pytest.raises(DispersError) as excinfo:
        open_store("directory", "sqlite", None)
    assert _code(excinfo) is ErrorCode.CONFIG
    with pytest.raises(DispersError) as excinfo:
        open_store("ledger", "memory", None)  # type: ignore[call-overload]
    assert _code(excinfo) is ErrorCode.CONFIG
