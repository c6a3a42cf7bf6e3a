"""Health: which actor serves on a port, answered to members of the roster (for `up` and `ps`)."""

from __future__ import annotations

from dataclasses import dataclass

from dispers.core.config import Roster
from dispers.core.ids import Role
from dispers.protocol.authz import authorize


@dataclass(frozen=True)
class HealthInfo:
    """Public roster facts about the actor that answered: nothing about its state or data."""

    name: str
    role: Role
    serving: bool
    version: str


class Health:
    """The health operation of one actor's server."""

    def __init__(self, roster: Roster, name: str, version: str) -> None:
        self._roster = roster
        self.name = name
        self._role = roster.get(name).role
        self._version = version

    def check(self, caller: str) -> HealthInfo:
        """Who serves here (any roster member may ask; outsiders are refused)."""
        authorize(self._roster, caller, "health.check", callee=self.name)
        return HealthInfo(self.name, self._role, True, self._version)
