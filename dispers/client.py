"""The researcher's Python API: a client of a running cluster, built from its cluster.toml.

    import dispers
    with dispers.connect("mycluster/cluster.toml") as client:
        result = client.query("study.toml")      # raises dispers.QueryFailed if refused
    result.to_dataframe()                         # or result.rows(); shows as a table in a notebook

The client calls the cluster's Querier service as that querier (its TLS certificate), as the
`dispers` command does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from dispers.core.config import ClusterConfig, load_config
from dispers.core.defaults import resolve_config
from dispers.core.errors import DispersError, ErrorCode, QueryFailed
from dispers.core.ids import Role
from dispers.core.spec import QueryResult, QuerySpec, load_query_spec, parse_query_spec
from dispers.protocol.api import QuerierAPI, QueryOutcome
from dispers.protocol.instance.functions import FieldInfo, FunctionInfo, describe_fields, describe_functions
from dispers.protocol.querier import check_spec_names
from dispers.results import Result
from dispers.state.budget import BudgetStatus

FINAL_STATES = ("done", "refused", "failed")


def _error_code(value: str | None) -> ErrorCode:
    try:
        return ErrorCode(value) if value else ErrorCode.INTERNAL
    except ValueError:
        return ErrorCode.INTERNAL


def result_of(outcome: QueryOutcome) -> QueryResult:
    """The outcome's result, or QueryFailed saying why there is none."""
    record = outcome.record
    if record.state == "done" and outcome.result is not None:
        return outcome.result
    if record.state in ("refused", "failed"):
        raise QueryFailed(
            _error_code(record.error_code),
            f"query {record.query_id} {record.state}: {record.error_message or 'no reason given'}",
            query_id=record.query_id,
            state=record.state,
            reason=record.error_message or "",
        )
    raise QueryFailed(
        ErrorCode.UNAVAILABLE,
        f"query {record.query_id} did not finish in time (still {record.state}); "
        f"`dispers status {record.query_id}` follows it",
        query_id=record.query_id,
        state=record.state,
    )


def run_query(
    querier: QuerierAPI,
    spec: QuerySpec,
    *,
    timeout_s: float = 600.0,
    on_state: Callable[[str], None] | None = None,
) -> QueryResult:
    """Submit through any Querier (object or gRPC client), wait, and return the opened result.

    Raises QueryFailed (a DispersError) when the query is refused, fails or does not finish in
    `timeout_s`; `on_state` is told each state the query passes through.
    """
    query_id = querier.submit(spec)
    deadline = time.monotonic() + timeout_s
    pause = 0.05
    seen = ""
    while True:
        asked = time.monotonic()
        outcome = querier.outcome(query_id, wait_s=min(2.0, max(0.0, deadline - asked)))
        if on_state is not None and outcome.record.state != seen:
            seen = outcome.record.state
            on_state(seen)
        if outcome.record.state in FINAL_STATES or time.monotonic() >= deadline:
            return result_of(outcome)
        if time.monotonic() - asked < pause:  # answered at once (too many waiters): back off
            time.sleep(pause)
            pause = min(2.0, pause * 2)


def as_spec(spec: QuerySpec | str | Path | Mapping[str, Any]) -> QuerySpec:
    """A QuerySpec from itself, a TOML file's path, or the mapping such a file holds."""
    if isinstance(spec, QuerySpec):
        return spec
    if isinstance(spec, str | Path):
        return load_query_spec(spec)
    return parse_query_spec(spec)


class Client:
    """A researcher's connection to a running cluster (its Querier service)."""

    def __init__(self, config: ClusterConfig, *, querier: str | None = None) -> None:
        from dispers.transport.grpc_client import QuerierClient, client_for

        self.config = config
        if querier is None:
            queriers = config.roster.by_role(Role.QUERIER)
            if not queriers:
                raise DispersError(ErrorCode.CONFIG, "the cluster has no querier")
            querier = queriers[0].name
        self.querier = config.roster.require(querier, Role.QUERIER).name
        self._client = client_for(config, self.querier, self.querier, QuerierClient)

    @classmethod
    def from_config(cls, path: str | Path | None = None, *, querier: str | None = None) -> Client:
        """A client of the cluster whose cluster.toml (or directory) is `path`; without it, the
        default cluster (DISPERS_CONFIG, ./cluster.toml, or the one `dispers up` started)."""
        return cls(load_config(resolve_config(path)), querier=querier)

    def query(
        self,
        spec: QuerySpec | str | Path | Mapping[str, Any],
        *,
        timeout_s: float = 600.0,
        on_state: Callable[[str], None] | None = None,
    ) -> Result:
        """Run a query and return its result; QueryFailed if it is refused or fails.

        `spec` is a QuerySpec, the path of a TOML spec, or the mapping such a file holds.
        """
        parsed = as_spec(spec)
        check_spec_names(parsed)
        return Result(run_query(self._client, parsed, timeout_s=timeout_s, on_state=on_state), parsed)

    def result(self, query_id: str, *, wait_s: float = 0.0) -> Result:
        """The result of a query submitted earlier; QueryFailed if it has none (yet)."""
        return Result(result_of(self._client.outcome(query_id, wait_s=wait_s)))

    def concepts(self) -> tuple[str, ...]:
        """The cluster's public concept vocabulary (what a target may name), from the Conductor."""
        from dispers.transport.grpc_client import ConductorClient, client_for

        conductor = self.config.roster.one(Role.CONDUCTOR).name
        with client_for(self.config, self.querier, conductor, ConductorClient) as client:
            return client.get_vocabulary()

    @staticmethod
    def functions() -> list[FunctionInfo]:
        """The local functions a query may ask for, with parameters and natural bounds."""
        return describe_functions()

    @staticmethod
    def fields() -> list[FieldInfo]:
        """The fields a query may group by."""
        return describe_fields()

    def budget(self) -> BudgetStatus:
        """This querier's privacy budget: spent and left (from the root DA)."""
        from dispers.transport.grpc_client import DataAggregatorClient, client_for

        root = self.config.roster.da_plan().root
        with client_for(self.config, self.querier, root, DataAggregatorClient) as client:
            return client.budget(self.querier)

    def close(self) -> None:
        """Close the connection."""
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<dispers.Client querier={self.querier!r} config={str(self.config.path)!r}>"


def connect(config: str | Path | None = None, *, querier: str | None = None) -> Client:
    """A client of a running cluster: `config` is its cluster.toml or directory (default: see
    Client.from_config); `querier` which of its queriers to act as (default: the first)."""
    return Client.from_config(config, querier=querier)
