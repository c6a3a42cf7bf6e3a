"""Open any role's store from configuration: a kind, a backend ("memory" or "sqlite") and a path."""

from __future__ import annotations

from typing import Literal, overload

from dispers.core.errors import DispersError, ErrorCode
from dispers.state.concepts import ConceptCatalog, MemoryConceptCatalog, SQLiteConceptCatalog
from dispers.state.directory import (
    AddressDirectory,
    MemoryAddressDirectory,
    SQLiteAddressDirectory,
)
from dispers.state.pseudonyms import MemoryPseudonymSets, PseudonymSets, SQLitePseudonymSets
from dispers.state.queries import MemoryQueryStore, QueryStore, SQLiteQueryStore

BACKENDS: tuple[str, ...] = ("memory", "sqlite")
"""The accepted values of a store's backend setting."""

StoreKind = Literal["concepts", "pseudonyms", "directory", "queries"]
Store = ConceptCatalog | PseudonymSets | AddressDirectory | QueryStore


def _sqlite_path(backend: str, path: str | None) -> str | None:
    """Return the SQLite path, or None for the memory backend; CONFIG for anything else."""
    if backend == "memory":
        return None  # a path given with the memory backend is ignored
    if backend != "sqlite":
        raise DispersError(
            ErrorCode.CONFIG, f"unknown state backend {backend!r}; expected 'memory' or 'sqlite'"
        )
    if not path:
        raise DispersError(ErrorCode.CONFIG, "state backend 'sqlite' needs a path")
    return path


def open_concept_catalog(backend: str, path: str | None = None) -> ConceptCatalog:
    """Open the Concept Indexor's catalogue with the given backend."""
    sqlite_path = _sqlite_path(backend, path)
    return MemoryConceptCatalog() if sqlite_path is None else SQLiteConceptCatalog(sqlite_path)


def open_pseudonym_sets(backend: str, path: str | None = None) -> PseudonymSets:
    """Open the Target Finder's token -> pseudonyms sets with the given backend."""
    sqlite_path = _sqlite_path(backend, path)
    return MemoryPseudonymSets() if sqlite_path is None else SQLitePseudonymSets(sqlite_path)


def open_address_directory(backend: str, path: str | None = None) -> AddressDirectory:
    """Open the Target's pseudonym -> address directory with the given backend."""
    sqlite_path = _sqlite_path(backend, path)
    if sqlite_path is None:
        return MemoryAddressDirectory()
    return SQLiteAddressDirectory(sqlite_path)


def open_query_store(backend: str, path: str | None = None) -> QueryStore:
    """Open the Conductor's query store with the given backend."""
    sqlite_path = _sqlite_path(backend, path)
    return MemoryQueryStore() if sqlite_path is None else SQLiteQueryStore(sqlite_path)


@overload
def open_store(kind: Literal["concepts"], backend: str, path: str | None) -> ConceptCatalog: ...
@overload
def open_store(kind: Literal["pseudonyms"], backend: str, path: str | None) -> PseudonymSets: ...
@overload
def open_store(kind: Literal["directory"], backend: str, path: str | None) -> AddressDirectory: ...
@overload
def open_store(kind: Literal["queries"], backend: str, path: str | None) -> QueryStore: ...
def open_store(kind: StoreKind, backend: str, path: str | None) -> Store:
    """Open the store of the given kind; CONFIG names a bad kind or backend."""
    if kind == "concepts":
        return open_concept_catalog(backend, path)
    if kind == "pseudonyms":
        return open_pseudonym_sets(backend, path)
    if kind == "directory":
        return open_address_directory(backend, path)
    if kind == "queries":
        return open_query_store(backend, path)
    raise DispersError(
        ErrorCode.CONFIG,
        f"unknown store kind {kind!r}; expected concepts, pseudonyms, directory or queries",
    )
