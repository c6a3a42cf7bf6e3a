"""Contract tests for the privacy budget ledger, run once per backend (memory, SQLite file)."""

from __future__ import annotations

import itertools
import math
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispers.core.errors import DispersError, ErrorCode
from dispers.state.budget import (
    REL_TOLERANCE,
    BudgetLedger,
    BudgetStatus,
    MemoryBudgetLedger,
    Spend,
    SQLiteBudgetLedger,
    compose_basic,
    open_budget_ledger,
)

ALICE = "alice"
BOB = "bob"
TOTAL = Spend(1.0, 1e-5)


def qid(n: int) -> str:
    """The n-th query id of a test: 32 lowercase hex digits."""
    return f"{n:032x}"


def _code(excinfo: pytest.ExceptionInfo[DispersError]) -> ErrorCode:
    return excinfo.value.code


# Multiples of 1/16 and of 2**-40: every sum of a few of them is exact in binary floating
# point, so a model with plain + and <= decides exactly as an exact ledger must.
_EPSILONS = st.integers(0, 24).map(lambda n: n / 16)
_DELTAS = st.integers(0, 24).map(lambda n: n * 2.0**-40)
_COSTS = st.builds(Spend, _EPSILONS, _DELTAS)
_TOTALS = st.builds(
    Spend, st.integers(0, 48).map(lambda n: n / 16), st.integers(0, 48).map(lambda n: n * 2.0**-40)
)
# ("charge", n, cost): charge query n (a retry, or a changed cost, if n is charged); ("refund", n, _).
_OPS = st.lists(
    st.tuples(st.sampled_from(["charge", "charge", "refund"]), st.integers(0, 7), _COSTS), max_size=25
)
# Costs that are not exact in binary: the ledger's rounding tolerance is what is tested.
_ROUGH = st.builds(
    Spend,
    st.floats(0, 0.5, allow_nan=False, allow_infinity=False),
    st.floats(0, 1e-6, allow_nan=False, allow_infinity=False),
)


class BudgetLedgerContract(ABC):
    """The behaviour every BudgetLedger must have."""

    tmp_path: Path
    opened: list[BudgetLedger]

    @pytest.fixture(autouse=True)
    def _setup(self, tmp_path: Path) -> Iterator[None]:
        self.tmp_path = tmp_path
        self.opened = []
        yield
        for ledger in self.opened:
            ledger.close()

    @abstractmethod
    def open(self) -> BudgetLedger:
        """Open a new, empty ledger."""

    def make(self) -> BudgetLedger:
        ledger = self.open()
        self.opened.append(ledger)
        return ledger

    # ---------------------------------------------------------------- charging

    def test_unknown_querier_has_spent_nothing(self) -> None:
        ledger = self.make()
        status = ledger.status(ALICE, TOTAL)
        assert status == BudgetStatus(ALICE, TOTAL, Spend(0.0, 0.0), 0)
        assert status.left == TOTAL

    def test_charges_accumulate(self) -> None:
        ledger = self.make()
        first = ledger.charge(ALICE, qid(1), Spend(0.25, 1e-6), TOTAL)
        assert first == BudgetStatus(ALICE, TOTAL, Spend(0.25, 1e-6), 1)
        second = ledger.charge(ALICE, qid(2), Spend(0.5, 2e-6), TOTAL)
        assert second.spent == Spend(0.75, 3e-6)
        assert second.queries == 2
        assert second.left.epsilon == 0.25
        assert second.left.delta == pytest.approx(7e-6)
        assert ledger.status(ALICE, TOTAL) == second

    def test_overspend_is_refused_and_records_nothing(self) -> None:
        ledger = self.make()
        ledger.charge(ALICE, qid(1), Spend(0.75, 0.0), TOTAL)
        with pytest.raises(DispersError) as excinfo:
            ledger.charge(ALICE, qid(2), Spend(0.5, 0.0), TOTAL)
        assert _code(excinfo) is ErrorCode.BUDGET_EXCEEDED
        assert "epsilon 0.25" in excinfo.value.message  # what is left
        assert ledger.status(ALICE, TOTAL) == BudgetStatus(ALICE, TOTAL, Spend(0.75, 0.0), 1)
        # Nothing was recorded under the refused id: a smaller cost for it is a new charge.
        assert ledger.charge(ALICE, qid(2), Spend(0.25, 0.0), TOTAL).spent == Spend(1.0, 0.0)

    def test_delta_alone_can_overspend(self) -> None:
        ledger = self.make()
        ledger.charge(ALICE, qid(1), Spend(0.0, 6e-6), TOTAL)
        with pytest.raises(DispersError) as excinfo:
            ledger.charge(ALICE, qid(2), Spend(0.0, 6e-6), TOTAL)
        assert _code(excinfo) is ErrorCode.BUDGET_EXCEEDED
        assert ledger.status(ALICE, TOTAL).queries == 1

    def test_spending_exactly_the_total_is_allowed(self) -> None:
        ledger = self.make()
        for n in range(4):
            ledger.charge(ALICE, qid(n), Spend(0.25, 2.5e-6), TOTAL)
        status = ledger.status(ALICE, TOTAL)
        assert status.spent.epsilon == 1.0
        assert status.left.epsilon == 0.0
        # A free query still fits an exhausted budget; anything more does not.
        ledger.charge(ALICE, qid(4), Spend(0.0, 0.0), TOTAL)
        with pytest.raises(DispersError) as excinfo:
            ledger.charge(ALICE, qid(5), Spend(1e-6, 0.0), TOTAL)
        assert _code(excinfo) is ErrorCode.BUDGET_EXCEEDED

    def test_decimal_rounding_does_not_refuse_an_exact_split(self) -> None:
        ledger = self.make()
        total = Spend(0.3, 0.0)
        ledger.charge(ALICE, qid(1), Spend(0.1, 0.0), total)
        # 0.1 + 0.2 == 0.30000000000000004 > 0.3 in binary: within REL_TOLERANCE.
        status = ledger.charge(ALICE, qid(2), Spend(0.2, 0.0), total)
        assert status.left == Spend(0.0, 0.0)

    def test_a_zero_total_has_no_tolerance(self) -> None:
        ledger = self.make()
        pure = Spend(1.0, 0.0)
        with pytest.raises(DispersError) as excinfo:
            ledger.charge(ALICE, qid(1), Spend(0.1, 1e-300), pure)
        assert _code(excinfo) is ErrorCode.BUDGET_EXCEEDED
        ledger.charge(ALICE, qid(1), Spend(0.1, 0.0), pure)

    def test_recharging_a_query_charges_once(self) -> None:
        ledger = self.make()
        cost = Spend(0.75, 1e-6)
        first = ledger.charge(ALICE, qid(1), cost, TOTAL)
        # A retry is accepted although the cost would not fit a second time.
        assert ledger.charge(ALICE, qid(1), cost, TOTAL) == first
        assert ledger.charge(ALICE, qid(1), Spend(0.75, 1e-6), TOTAL).queries == 1

    def test_a_different_cost_for_a_charged_query_is_refused(self) -> None:
        ledger = self.make()
        ledger.charge(ALICE, qid(1), Spend(0.25, 1e-6), TOTAL)
        for other in (Spend(0.5, 1e-6), Spend(0.25, 2e-6), Spend(0.125, 1e-6)):
            with pytest.raises(DispersError) as excinfo:
                ledger.charge(ALICE, qid(1), other, TOTAL)
            assert _code(excinfo) is ErrorCode.MALFORMED
        assert ledger.status(ALICE, TOTAL) == BudgetStatus(ALICE, TOTAL, Spend(0.25, 1e-6), 1)

    def test_refund_restores_and_is_idempotent(self) -> None:
        ledger = self.make()
        ledger.charge(ALICE, qid(1), Spend(0.5, 1e-6), TOTAL)
        ledger.charge(ALICE, qid(2), Spend(0.5, 1e-6), TOTAL)
        ledger.refund(ALICE, qid(2))
        ledger.refund(ALICE, qid(2))
        ledger.refund(ALICE, qid(9))  # never charged
        ledger.refund(BOB, qid(1))  # another querier's id
        assert ledger.status(ALICE, TOTAL) == BudgetStatus(ALICE, TOTAL, Spend(0.5, 1e-6), 1)
        # The refunded budget can be spent again, under a new id or the same one.
        ledger.charge(ALICE, qid(3), Spend(0.25, 0.0), TOTAL)
        assert ledger.charge(ALICE, qid(2), Spend(0.25, 0.0), TOTAL).spent.epsilon == 1.0
        ledger.refund(ALICE, qid(1))
        ledger.refund(ALICE, qid(2))
        ledger.refund(ALICE, qid(3))
        assert ledger.status(ALICE, TOTAL) == BudgetStatus(ALICE, TOTAL, Spend(0.0, 0.0), 0)

    def test_status_counts_queries_and_takes_the_total_given(self) -> None:
        ledger = self.make()
        for n in range(5):
            ledger.charge(ALICE, qid(n), Spend(0.125, 0.0), TOTAL)
        assert ledger.status(ALICE, TOTAL).queries == 5
        # A total lowered below what was spent leaves nothing, never a negative amount.
        lowered = ledger.status(ALICE, Spend(0.5, 0.0))
        assert lowered.spent.epsilon == 0.625
        assert lowered.left == Spend(0.0, 0.0)
        with pytest.raises(DispersError) as excinfo:
            ledger.charge(ALICE, qid(9), Spend(0.0, 0.0), Spend(0.5, 0.0))
        assert _code(excinfo) is ErrorCode.BUDGET_EXCEEDED
        # A retry of a recorded charge stays idempotent whatever the total is now.
        assert ledger.charge(ALICE, qid(0), Spend(0.125, 0.0), Spend(0.5, 0.0)).queries == 5

    def test_queriers_are_apart(self) -> None:
        ledger = self.make()
        ledger.charge(BOB, qid(1), Spend(0.875, 3e-6), TOTAL)
        ledger.charge(ALICE, qid(1), Spend(0.5, 1e-6), TOTAL)  # the same id, another querier
        assert ledger.status(ALICE, TOTAL).spent == Spend(0.5, 1e-6)
        assert ledger.status(BOB, TOTAL).spent == Spend(0.875, 3e-6)
        with pytest.raises(DispersError) as excinfo:
            ledger.charge(ALICE, qid(2), Spend(0.75, 0.0), TOTAL)
        # The refusal says what alice has left, and nothing of bob.
        message = str(excinfo.value)
        assert "epsilon 0.5 " in message
        assert BOB not in message
        assert "0.875" not in message and "0.125" not in message and "3e-06" not in message

    # ---------------------------------------------------------------- validation

    @pytest.mark.parametrize(
        ("cost", "named"),
        [
            (Spend(-0.1, 0.0), "cost.epsilon"),
            (Spend(math.nan, 0.0), "cost.epsilon"),
            (Spend(math.inf, 0.0), "cost.epsilon"),
            (Spend(True, 0.0), "cost.epsilon"),
            (Spend("1", 0.0), "cost.epsilon"),  # type: ignore[arg-type]
            (Spend(10**400, 0.0), "cost.epsilon"),
            (Spend(0.1, -1e-9), "cost.delta"),
            (Spend(0.1, 1.0), "cost.delta"),
            (Spend(0.1, math.nan), "cost.delta"),
            (Spend(0.1, None), "cost.delta"),  # type: ignore[arg-type]
            ((0.1, 0.0), "cost"),
        ],
    )
    def test_a_bad_cost_is_refused_naming_it(self, cost: Any, named: str) -> None:
        ledger = self.make()
        with pytest.raises(DispersError) as excinfo:
            ledger.charge(ALICE, qid(1), cost, TOTAL)
        assert _code(excinfo) is ErrorCode.MALFORMED
        assert excinfo.value.message.startswith(named + " ")
        assert ledger.status(ALICE, TOTAL).queries == 0

    @pytest.mark.parametrize(
        ("total", "named"),
        [
            (Spend(-1.0, 0.0), "total.epsilon"),
            (Spend(math.inf, 0.0), "total.epsilon"),
            (Spend(1.0, 1.0), "total.delta"),
            (Spend(1.0, -0.5), "total.delta"),
            (None, "total"),
        ],
    )
    def test_a_bad_total_is_refused_naming_it(self, total: Any, named: str) -> None:
        ledger = self.make()
        calls: list[Callable[[], object]] = [
            lambda: ledger.charge(ALICE, qid(1), Spend(0.1, 0.0), total),
            lambda: ledger.status(ALICE, total),
        ]
        for call in calls:
            with pytest.raises(DispersError) as excinfo:
                call()
            assert _code(excinfo) is ErrorCode.MALFORMED
            assert excinfo.value.message.startswith(named + " ")

    @pytest.mark.parametrize(
        ("querier", "query_id", "named"),
        [
            ("", qid(1), "querier"),
            (None, qid(1), "querier"),
            (ALICE, "", "query id"),
            (ALICE, "ABCDEF" + "0" * 26, "query id"),
            (ALICE, qid(1)[:-1], "query id"),
            (ALICE, 1, "query id"),
        ],
    )
    def test_bad_names_are_refused_naming_them(self, querier: Any, query_id: Any, named: str) -> None:
        ledger = self.make()
        calls: list[Callable[[], object]] = [
            lambda: ledger.charge(querier, query_id, Spend(0.1, 0.0), TOTAL),
            lambda: ledger.refund(querier, query_id),
        ]
        if named == "querier":
            calls.append(lambda: ledger.status(querier, TOTAL))
        for call in calls:
            with pytest.raises(DispersError) as excinfo:
                call()
            assert _code(excinfo) is ErrorCode.MALFORMED
            assert excinfo.value.message.startswith(named + " ")

    # ---------------------------------------------------------------- invariants

    # Each property runs hypothesis on an inner function: one @given method shared by both
    # subclasses would be called from two executors, which hypothesis rightly refuses.

    def test_spent_is_the_sum_of_accepted_charges_and_never_exceeds_the_total(self) -> None:
        @settings(max_examples=60)
        @given(total=_TOTALS, ops=_OPS)
        def check(total: Spend, ops: list[tuple[str, int, Spend]]) -> None:
            self._check_charges_against_a_model(total, ops)

        check()

    def _check_charges_against_a_model(self, total: Spend, ops: list[tuple[str, int, Spend]]) -> None:
        model: dict[str, Spend] = {}  # what must be charged: query id -> cost
        ledger = self.open()
        try:
            for op, n, cost in ops:
                if op == "refund":
                    ledger.refund(ALICE, qid(n))
                    model.pop(qid(n), None)
                    continue
                known = model.get(qid(n))
                eps = sum(s.epsilon for s in model.values())
                dlt = sum(s.delta for s in model.values())
                if known is not None and known != cost:
                    expected: ErrorCode | None = ErrorCode.MALFORMED
                elif known is None and (eps + cost.epsilon > total.epsilon or dlt + cost.delta > total.delta):
                    expected = ErrorCode.BUDGET_EXCEEDED
                else:
                    expected = None
                    model[qid(n)] = cost
                try:
                    ledger.charge(ALICE, qid(n), cost, total)
                    assert expected is None
                except DispersError as error:
                    assert error.code is expected
                status = ledger.status(ALICE, total)
                assert status.spent == Spend(
                    sum(s.epsilon for s in model.values()), sum(s.delta for s in model.values())
                )
                assert status.queries == len(model)
                assert status.spent.epsilon <= total.epsilon
                assert status.spent.delta <= total.delta
        finally:
            ledger.close()

    def test_rounded_costs_never_overspend_beyond_the_tolerance(self) -> None:
        @settings(max_examples=60)
        @given(total=_ROUGH, costs=st.lists(_ROUGH, max_size=20))
        def check(total: Spend, costs: list[Spend]) -> None:
            self._check_rounded_costs(total, costs)

        check()

    def _check_rounded_costs(self, total: Spend, costs: list[Spend]) -> None:
        accepted: list[Spend] = []
        ledger = self.open()
        try:
            for n, cost in enumerate(costs):
                try:
                    ledger.charge(ALICE, qid(n), cost, total)
                    accepted.append(cost)
                except DispersError as error:
                    assert error.code is ErrorCode.BUDGET_EXCEEDED
                    # Refused only if it truly would not fit (beyond the tolerance).
                    would = compose_basic([*accepted, cost])
                    assert would.epsilon > total.epsilon or would.delta > total.delta
                spent = ledger.status(ALICE, total).spent
                assert spent.epsilon == math.fsum(c.epsilon for c in accepted)
                assert spent.delta == math.fsum(c.delta for c in accepted)
                assert spent.epsilon <= total.epsilon * (1 + 2 * REL_TOLERANCE)
                assert spent.delta <= total.delta * (1 + 2 * REL_TOLERANCE)
        finally:
            ledger.close()

    # ---------------------------------------------------------------- concurrency

    def _race(self, ledgers: list[BudgetLedger], rounds: int = 5) -> None:
        """A few rounds of threads charging one querier at once, each with a fresh querier."""
        for r in range(rounds):
            self._race_once(ledgers, f"racer{r}")

    @staticmethod
    def _race_once(ledgers: list[BudgetLedger], querier: str, threads: int = 8, each: int = 10) -> None:
        """Threads charging distinct query ids at once, taking the ledgers in turn.

        The querier has room for exactly 16 of the 80 attempts: any more accepted is a lost
        update (two checks that both saw the same amount spent).
        """
        total = Spend(1.0, 1e-5)
        cost = Spend(1 / 16, 1e-7)
        accepted: list[Spend] = []
        errors: list[BaseException] = []
        start = threading.Barrier(threads)
        guard = threading.Lock()

        def work(t: int) -> None:
            ledger = ledgers[t % len(ledgers)]
            start.wait()
            for i in range(each):
                try:
                    ledger.charge(querier, qid(t * 1000 + i), cost, total)
                except DispersError as error:
                    if error.code is not ErrorCode.BUDGET_EXCEEDED:
                        errors.append(error)
                    continue
                except Exception as error:  # reported by the main thread
                    errors.append(error)
                    continue
                with guard:
                    accepted.append(cost)

        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        # Switch threads as often as the interpreter allows, so that a check and its write
        # done under two locks (not one) would be interleaved and caught.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            for thread in pool:
                thread.start()
            for thread in pool:
                thread.join()
        finally:
            sys.setswitchinterval(interval)
        assert errors == []
        assert len(accepted) == 16
        spent = compose_basic(accepted)
        assert spent.epsilon <= total.epsilon and spent.delta <= total.delta
        for ledger in ledgers:
            assert ledger.status(querier, total) == BudgetStatus(querier, total, spent, 16)

    def test_concurrent_charges_never_overspend(self) -> None:
        self._race([self.make()])


class TestMemoryBudgetLedger(BudgetLedgerContract):
    def open(self) -> BudgetLedger:
        return MemoryBudgetLedger()


class TestSQLiteBudgetLedger(BudgetLedgerContract):
    _names = itertools.count()

    def open(self) -> BudgetLedger:
        return SQLiteBudgetLedger(str(self.tmp_path / f"budget{next(self._names)}.db"))

    def test_persists_across_reopening(self) -> None:
        path = str(self.tmp_path / "budget.db")
        first = SQLiteBudgetLedger(path)
        first.charge(ALICE, qid(1), Spend(0.25, 1e-6), TOTAL)
        first.charge(ALICE, qid(2), Spend(0.5, 2e-6), TOTAL)
        first.charge(BOB, qid(1), Spend(0.125, 0.0), TOTAL)
        first.refund(ALICE, qid(2))
        first.close()
        again = SQLiteBudgetLedger(path)
        self.opened.append(again)
        assert again.status(ALICE, TOTAL) == BudgetStatus(ALICE, TOTAL, Spend(0.25, 1e-6), 1)
        assert again.status(BOB, TOTAL) == BudgetStatus(BOB, TOTAL, Spend(0.125, 0.0), 1)
        # The charges survive with their exact costs: a retry is idempotent, a change refused.
        assert again.charge(ALICE, qid(1), Spend(0.25, 1e-6), TOTAL).queries == 1
        with pytest.raises(DispersError) as excinfo:
            again.charge(ALICE, qid(1), Spend(0.25, 0.0), TOTAL)
        assert _code(excinfo) is ErrorCode.MALFORMED
        with pytest.raises(DispersError) as excinfo:
            again.charge(ALICE, qid(3), Spend(0.875, 0.0), TOTAL)
        assert _code(excinfo) is ErrorCode.BUDGET_EXCEEDED

    def test_two_ledgers_on_one_file_never_overspend(self) -> None:
        path = str(self.tmp_path / "shared.db")
        ledgers: list[BudgetLedger] = [SQLiteBudgetLedger(path), SQLiteBudgetLedger(path)]
        self.opened.extend(ledgers)
        self._race(ledgers)

    def test_a_memory_database_works(self) -> None:
        ledger = SQLiteBudgetLedger(":memory:")
        self.opened.append(ledger)
        assert ledger.charge(ALICE, qid(1), Spend(0.5, 0.0), TOTAL).spent == Spend(0.5, 0.0)


# ------------------------------------------------------------------------------------------
# Pure functions and the opener


def test_compose_basic_sums_each_component() -> None:
    assert compose_basic([]) == Spend(0.0, 0.0)
    assert compose_basic(iter([Spend(0.5, 1e-6), Spend(1, 2e-6)])) == Spend(1.5, 3e-6)
    # Exactly rounded, so the order does not matter.
    spends = [Spend(0.1, 1e-7)] * 10 + [Spend(1e16, 0.0)]
    assert compose_basic(spends) == compose_basic(reversed(spends))
    assert compose_basic([Spend(0.1, 0.0)] * 10).epsilon == 1.0


def test_compose_basic_validates_naming_the_spend() -> None:
    with pytest.raises(DispersError) as excinfo:
        compose_basic([Spend(0.1, 0.0), Spend(0.1, 1.5)])
    assert _code(excinfo) is ErrorCode.MALFORMED
    assert excinfo.value.message.startswith("spend 1.delta ")


@given(st.lists(_COSTS, max_size=20))
def test_compose_basic_is_the_sum(spends: list[Spend]) -> None:
    composed = compose_basic(spends)
    assert composed == Spend(sum(s.epsilon for s in spends), sum(s.delta for s in spends))


def test_left_floors_at_zero() -> None:
    status = BudgetStatus(ALICE, Spend(1.0, 1e-6), Spend(1.5, 5e-7), 3)
    assert status.left == Spend(0.0, 5e-7)


def test_open_budget_ledger(tmp_path: Path) -> None:
    memory = open_budget_ledger("memory", None)
    assert isinstance(memory, MemoryBudgetLedger)
    sqlite = open_budget_ledger("sqlite", str(tmp_path / "b.db"))
    assert isinstance(sqlite, SQLiteBudgetLedger)
    for ledger in (memory, sqlite):
        ledger.charge(ALICE, qid(1), Spend(0.5, 0.0), TOTAL)
        ledger.close()
    for backend, path in (("sqlite", None), ("sqlite", ""), ("postgres", "x.db"), ("", None)):
        with pytest.raises(DispersError) as excinfo:
            open_budget_ledger(backend, path)
        assert _code(excinfo) is ErrorCode.CONFIG
