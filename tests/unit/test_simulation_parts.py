"""The pieces under the simulation: the keyed permutation, clear boxes, scenarios, the CLI's errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dispers.cli.main import main
from dispers.core.errors import DispersError, ErrorCode
from dispers.crypto import Opener, seal
from dispers.crypto.box import crypto_is_real, sealed_size, set_crypto
from dispers.crypto.keys import SealingKeyPair
from dispers.crypto.permute import secure_permutation, shuffled
from dispers.simulation.scenario import load_scenario, parse_scenario
from dispers.simulation.shard import assign_blocks, block_sizes


def test_secure_permutation_is_a_permutation_and_looks_uniform() -> None:
    for n in (0, 1, 2, 1000):
        assert sorted(secure_permutation(n).tolist()) == list(range(n))
    # Where element 0 lands, over many draws of 4: each place about a quarter of the time.
    places = np.bincount(
        [int(np.flatnonzero(secure_permutation(4) == 0)[0]) for _ in range(4000)], minlength=4
    )
    assert places.min() > 850 and places.max() < 1150
    assert sorted(shuffled(list("abcdef"))) == list("abcdef")


def test_clear_boxes_keep_lengths_differ_and_refuse_the_wrong_recipient() -> None:
    alice, bob = SealingKeyPair.generate(), SealingKeyPair.generate()
    assert crypto_is_real()
    set_crypto(False)
    try:
        a, b = seal(alice.public, b"same"), seal(alice.public, b"same")
        assert len(a) == sealed_size(4) and a != b  # two boxes of one plaintext differ, as real ones
        assert Opener("alice", alice).open(a, "x") == b"same"
        with pytest.raises(DispersError) as err:
            Opener("bob", bob).open(a, "x")
        assert err.value.code is ErrorCode.BAD_CIPHERTEXT
    finally:
        set_crypto(True)
    with pytest.raises(DispersError):  # a clear box does not open once crypto is real again
        Opener("alice", alice).open(a, "x")


def test_scenarios_name_their_bad_keys(tmp_path: Path) -> None:
    spec = {
        "query": {"target": "age:12-25"},
        "data": {"function": "mean_heart_rate"},
        "aggregate": {"bounds": [30.0, 220.0]},
    }
    assert parse_scenario(dict(spec)).instances == 10_000
    with pytest.raises(DispersError, match="unknown key simulation.instancez"):
        parse_scenario({**spec, "simulation": {"instancez": 3}})
    with pytest.raises(DispersError, match=r"faults.offline must be a number in \[0, 1\]"):
        parse_scenario({**spec, "faults": {"offline": 1.5}})
    with pytest.raises(DispersError, match="no file"):
        load_scenario(tmp_path / "missing.toml")
    assert load_scenario("simulations/heart_rate.toml").spec.function == "mean_heart_rate"
    assert load_scenario("simulations/heart_rate_offline.toml").faults.offline == 0.3


def test_blocks_depend_on_the_population_only() -> None:
    assert sum(block_sizes(1_000_000)) == 1_000_000 and len(block_sizes(1_000_000)) == 100
    assert sum(block_sizes(20_000)) == 20_000
    assert [len(r) for r in assign_blocks(32, 3)] == [10, 11, 11]
    with pytest.raises(DispersError, match="use 1 to 4 shards"):
        assign_blocks(4, 5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["simulate", "--scenario", "nope.toml"], "error: CONFIG: scenario: no file nope.toml"),
        (["simulate", "--instances", "100", "--shards", "50", "--crypto", "off"], "shards for 1 blocks"),
        (["simulate", "--instances", "100", "--shards", "0"], "--shards must be at least 1"),
        (["simulate", "--scenario", "README.md"], "is not valid TOML"),
    ],
)
def test_simulate_errors_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
