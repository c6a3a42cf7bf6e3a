"""User-level privacy accounting of DP-FedAvg with Opacus' accountants (RDP or PRV).

Each round Poisson-samples its cohort: every one of `population` instances (TF's attested count
of targets) independently with probability q = cohort / population, so the cohort's size varies
around `cohort` (T draws it so, and so does the simulation engine); the accountants assume exactly
this sampling. It clips each update to norm C (a DA accepts C (1 + 1e-6) for float rounding, and
the noise is calibrated to that) and adds Gaussian noise of standard deviation z * C to their sum,
divided by the expected cohort size: one step of the subsampled Gaussian mechanism with noise
multiplier z. Instances drawn but lost (no address, a host down) only lower the sensitivity.
After r rounds the spend is the accountant's epsilon at the run's delta.

The budget ledger composes spends by adding them, so the root DA charges round r the increment
eps(r) - eps(r - 1) (and the run's delta on its first round): the charges of a run add up to its
accounted epsilon, tighter than charging each round on its own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from dispers.core.errors import DispersError, ErrorCode

ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class UserLevelDP:
    """The public privacy parameters of a training run."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise DispersError(ErrorCode.MALFORMED, f"unknown accountant {self.accountant!r} (rdp or prv)")
        if not self.noise_multiplier > 0:
            raise DispersError(ErrorCode.MALFORMED, "the noise multiplier must be positive")
        if not 0 < self.sample_rate <= 1:
            raise DispersError(ErrorCode.MALFORMED, "the cohort's sampling rate must be in (0, 1]")
        if not 0 < self.delta < 1:
            raise DispersError(ErrorCode.MALFORMED, "delta must be in (0, 1)")


@functools.lru_cache(maxsize=256)
def epsilon_after(params: UserLevelDP, rounds: int) -> float:
    """The epsilon of `rounds` rounds at the run's delta, by Opacus' accountant.

    Cached: a round asks for its own and the previous round's epsilon (tens of ms each).
    """
    if rounds <= 0:
        return 0.0
    from opacus.accountants import PRVAccountant, RDPAccountant

    accountant = RDPAccountant() if params.accountant == "rdp" else PRVAccountant()
    accountant.history = [(params.noise_multiplier, params.sample_rate, rounds)]
    return float(accountant.get_epsilon(delta=params.delta))


def round_charge(params: UserLevelDP, round_: int) -> tuple[float, float]:
    """(epsilon, delta) to charge for round `round_` (0-based): the accountant's increment."""
    eps = epsilon_after(params, round_ + 1) - epsilon_after(params, round_)
    return max(0.0, eps), params.delta if round_ == 0 else 0.0
