"""The root DA's privacy budget ledger per querier: an ABC, in-memory and SQLite.

The ledger records each query's declared (epsilon, delta) as one charge keyed by
(querier, query id) and refuses a charge that would overspend the querier's total.

Composition is basic (sequential) composition: a querier who ran queries that were
(epsilon_i, delta_i)-DP has spent (sum epsilon_i, sum delta_i), whatever the queries
were and in whatever order they ran. It holds for any mix of mechanisms (Laplace and
Gaussian alike) and needs no assumption about them; tighter accounting (zCDP, RDP)
would spend less for the same queries but needs each mechanism's own curve.

Totals are not stored: they come from the cluster's configuration at each call, so
raising or lowering a querier's total takes effect at once. The ledger holds no
personal data, only querier names, query ids and costs.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.ids import check_query_id
from dispers.state._sqlite import SQLiteStore

REL_TOLERANCE = 1e-9
"""How far, relative to the total, a charge may overshoot it and still be accepted.

Spent amounts are summed exactly (math.fsum), but the costs themselves are decimal
fractions rounded to binary: 0.1 + 0.2 spent against a total of 0.3 overshoots it by
one unit in the last place. The tolerance accepts such rounding and nothing a
mechanism could notice; it is relative, so a total of 0 (say delta = 0 for pure DP)
has none and refuses any positive cost.
"""

BACKENDS: tuple[str, ...] = ("memory", "sqlite")
"""The accepted values of the ledger's backend setting."""


@dataclass(frozen=True)
class Spend:
    """An amount of privacy budget: an (epsilon, delta) pair."""

    epsilon: float
    delta: float


@dataclass(frozen=True)
class BudgetStatus:
    """One querier's budget: the total, what is spent and over how many queries."""

    querier: str
    total: Spend
    spent: Spend
    queries: int

    @property
    def left(self) -> Spend:
        """What is left to spend: total - spent, each component floored at 0.

        Spent may exceed total when the total was lowered after the charges, or by the
        rounding that REL_TOLERANCE allows; nothing is left then, never a negative amount.
        """
        return Spend(
            epsilon=max(0.0, self.total.epsilon - self.spent.epsilon),
            delta=max(0.0, self.total.delta - self.spent.delta),
        )


def _check_number(value: object, name: str, *, below_one: bool = False) -> float:
    """Return value as a float if it is a finite number >= 0 (and < 1 if asked); else MALFORMED."""
    bound = "in [0, 1)" if below_one else ">= 0"
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise malformed(f"{name} must be a finite number {bound}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise malformed(f"{name} must be a finite number {bound}") from None
    if not math.isfinite(number) or number < 0 or (below_one and number >= 1):
        raise malformed(f"{name} must be a finite number {bound}")
    return number


def _check_spend(spend: object, name: str) -> Spend:
    """Validate a Spend and return it with float components; MALFORMED names the bad part."""
    if not isinstance(spend, Spend):
        raise malformed(f"{name} must be a Spend")
    return Spend(
        epsilon=_check_number(spend.epsilon, f"{name}.epsilon"),
        delta=_check_number(spend.delta, f"{name}.delta", below_one=True),
    )


def _check_querier(querier: object) -> str:
    if not isinstance(querier, str) or not querier:
        raise malformed("querier must be a non-empty string")
    return querier


def _fsum(values: Iterable[float]) -> float:
    """The exactly rounded sum; inf if it overflows (which then fits no total)."""
    try:
        return math.fsum(values)
    except OverflowError:
        return math.inf


def _sum(spends: Iterable[Spend]) -> Spend:
    spends = list(spends)
    return Spend(epsilon=_fsum(s.epsilon for s in spends), delta=_fsum(s.delta for s in spends))


def compose_basic(spends: Iterable[Spend]) -> Spend:
    """Basic (sequential) composition: the sum of the epsilons and the sum of the deltas.

    Each spend is validated (MALFORMED names it by index); the sums are exactly rounded,
    so the result does not depend on the order of the spends. An empty iterable spends
    nothing.
    """
    return _sum(_check_spend(spend, f"spend {i}") for i, spend in enumerate(spends))


def _fits(spent: float, cost: float, total: float) -> bool:
    """Whether spent + cost <= total, up to REL_TOLERANCE (see there)."""
    return _fsum((spent, cost)) - total <= total * REL_TOLERANCE


def _exceeded(left: Spend, cost: Spend) -> DispersError:
    """The refusal of an overspending charge: says what this querier has left, nothing else."""
    return DispersError(
        ErrorCode.BUDGET_EXCEEDED,
        f"this query's cost (epsilon {cost.epsilon:g}, delta {cost.delta:g}) would overspend"
        f" the privacy budget: epsilon {left.epsilon:g} and delta {left.delta:g} left",
    )


def _other_cost() -> DispersError:
    return malformed("this query id was charged before with a different cost")


def _admit(querier: str, query_id: str, cost: Spend, total: Spend, charges: Mapping[str, Spend]) -> bool:
    """Decide a charge against the querier's recorded charges (query id -> cost).

    Returns True if it must be recorded, False if it already is (a retry: idempotent);
    MALFORMED if the query id was charged with another cost, BUDGET_EXCEEDED if it would
    overspend the total.
    """
    previous = charges.get(query_id)
    if previous is not None:
        if previous != cost:
            raise _other_cost()
        return False
    spent = _sum(charges.values())
    if not (
        _fits(spent.epsilon, cost.epsilon, total.epsilon) and _fits(spent.delta, cost.delta, total.delta)
    ):
        raise _exceeded(BudgetStatus(querier, total, spent, len(charges)).left, cost)
    return True


class BudgetLedger(ABC):
    """Each querier's charges, composed by basic composition and checked against a total.

    Every method validates its arguments first (MALFORMED naming the bad one) and sees
    only the given querier's charges: nothing any method returns or raises carries
    another querier's data.
    """

    @abstractmethod
    def charge(self, querier: str, query_id: str, cost: Spend, total: Spend) -> BudgetStatus:
        """Charge a query's cost to the querier, atomically, and return the querier's status.

        Refuses with BUDGET_EXCEEDED, recording nothing, if spent + cost would exceed total
        in epsilon or in delta (beyond REL_TOLERANCE). Charging a (querier, query id) that
        is already charged, with the same cost, charges nothing again and returns the
        current status (a retried query is charged once); with a different cost it is
        MALFORMED.
        """

    @abstractmethod
    def refund(self, querier: str, query_id: str) -> None:
        """Remove a query's charge, for a query refused before anything was released.

        Refunding a query that is not charged is a no-op.
        """

    @abstractmethod
    def status(self, querier: str, total: Spend) -> BudgetStatus:
        """Return the querier's status against the given total (zero spent if unknown)."""

    def close(self) -> None:  # noqa: B027 - deliberately a no-op for stores without resources
        """Release any resources held by the ledger; the ledger is unusable afterwards."""


class MemoryBudgetLedger(BudgetLedger):
    """Charges held in Python dicts; lost when the process ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._charges: dict[str, dict[str, Spend]] = {}  # querier -> query id -> cost

    def charge(self, querier: str, query_id: str, cost: Spend, total: Spend) -> BudgetStatus:
        """Charge a query's cost to the querier, atomically (see BudgetLedger)."""
        querier = _check_querier(querier)
        query_id = check_query_id(query_id)
        cost = _check_spend(cost, "cost")
        total = _check_spend(total, "total")
        with self._lock:
            charges = self._charges.get(querier, {})
            if _admit(querier, query_id, cost, total, charges):
                charges = self._charges.setdefault(querier, {})
                charges[query_id] = cost
            return BudgetStatus(querier, total, _sum(charges.values()), len(charges))

    def refund(self, querier: str, query_id: str) -> None:
        """Remove a query's charge; a no-op if it is not charged (see BudgetLedger)."""
        querier = _check_querier(querier)
        query_id = check_query_id(query_id)
        with self._lock:
            charges = self._charges.get(querier)
            if charges is not None:
                charges.pop(query_id, None)
                if not charges:
                    del self._charges[querier]

    def status(self, querier: str, total: Spend) -> BudgetStatus:
        """Return the querier's status against the given total (see BudgetLedger)."""
        querier = _check_querier(querier)
        total = _check_spend(total, "total")
        with self._lock:
            charges = list(self._charges.get(querier, {}).values())
        return BudgetStatus(querier, total, _sum(charges), len(charges))


class SQLiteBudgetLedger(BudgetLedger, SQLiteStore):
    """Charges in an SQLite file (or ":memory:"), safe to share between threads and processes.

    Each charge runs in one BEGIN IMMEDIATE transaction, which holds the database's write
    lock from the read of the spent amount to the insert: two ledgers open on the same
    file (two processes, say) cannot both spend the last of a budget.
    """

    def __init__(self, path: str) -> None:
        self._open(path)
        with self._transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS charges ("
                " querier TEXT NOT NULL, query_id TEXT NOT NULL,"
                " epsilon REAL NOT NULL CHECK (epsilon >= 0),"
                " delta REAL NOT NULL CHECK (delta >= 0 AND delta < 1),"
                " at REAL NOT NULL,"
                " PRIMARY KEY (querier, query_id)) WITHOUT ROWID"
            )

    @staticmethod
    def _charges(conn: sqlite3.Connection, querier: str) -> dict[str, Spend]:
        rows = conn.execute(
            "SELECT query_id, epsilon, delta FROM charges WHERE querier = ?", (querier,)
        ).fetchall()
        return {row[0]: Spend(float(row[1]), float(row[2])) for row in rows}

    def charge(self, querier: str, query_id: str, cost: Spend, total: Spend) -> BudgetStatus:
        """Charge a query's cost to the querier, atomically (see BudgetLedger)."""
        querier = _check_querier(querier)
        query_id = check_query_id(query_id)
        cost = _check_spend(cost, "cost")
        total = _check_spend(total, "total")
        with self._transaction() as conn:
            charges = self._charges(conn, querier)
            if _admit(querier, query_id, cost, total, charges):
                conn.execute(
                    "INSERT INTO charges (querier, query_id, epsilon, delta, at) VALUES (?, ?, ?, ?, ?)",
                    (querier, query_id, cost.epsilon, cost.delta, time.time()),
                )
                charges[query_id] = cost
            return BudgetStatus(querier, total, _sum(charges.values()), len(charges))

    def refund(self, querier: str, query_id: str) -> None:
        """Remove a query's charge; a no-op if it is not charged (see BudgetLedger)."""
        querier = _check_querier(querier)
        query_id = check_query_id(query_id)
        with self._transaction() as conn:
            conn.execute("DELETE FROM charges WHERE querier = ? AND query_id = ?", (querier, query_id))

    def status(self, querier: str, total: Spend) -> BudgetStatus:
        """Return the querier's status against the given total (see BudgetLedger)."""
        querier = _check_querier(querier)
        total = _check_spend(total, "total")
        with self._lock:
            charges = self._charges(self._conn, querier)
        return BudgetStatus(querier, total, _sum(charges.values()), len(charges))


def open_budget_ledger(backend: str, path: str | None = None) -> BudgetLedger:
    """Open the root DA's budget ledger with the given backend ("memory" or "sqlite").

    CONFIG for an unknown backend, or for "sqlite" without a path; a path given with the
    memory backend is ignored.
    """
    # Not in factory.py's helpers: the factory may come to import this module.
    if backend == "memory":
        return MemoryBudgetLedger()
    if backend != "sqlite":
        raise DispersError(
            ErrorCode.CONFIG, f"unknown state backend {backend!r}; expected 'memory' or 'sqlite'"
        )
    if not path:
        raise DispersError(ErrorCode.CONFIG, "state backend 'sqlite' needs a path")
    return SQLiteBudgetLedger(path)
