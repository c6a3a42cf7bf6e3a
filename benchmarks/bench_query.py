"""Heart-rate query over N instances through the gRPC services, against the PyNaCl floor.

The floor is measured in the same run: sealing and opening, with plain PyNaCl on one core,
exactly as many boxes (of the same sizes) as the protocol needs. The ratio protocol / floor
says what gRPC, JSON, SQLite, shuffling and orchestration cost on top of the cryptography
that no implementation of the protocol can avoid. Run: `make bench` or
`python benchmarks/bench_query.py --instances 10000`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nacl.public

from dispers.cli.demo import DEFAULT_SPEC, running_cluster
from dispers.core.cluster_files import ClusterLayout, write_cluster
from dispers.core.ids import Role
from dispers.core.messages import SubscriptionOp
from dispers.core.spec import load_query_spec
from dispers.core.wire import ContributionLayout, padded_size
from dispers.crypto.box import sealed_size
from dispers.protocol.common import tokens_bytes
from dispers.protocol.querier import run_query
from dispers.protocol.target_finder import ATTESTATION_BYTES, PSEUDONYM_FRAME
from dispers.simulation.population import PopulationSpec, generate
from dispers.state.documents import DocumentStore
from dispers.state.factory import open_query_store
from dispers.transport.grpc_client import PersonalCloudClient, QuerierClient, client_for


def crypto_floor(boxes: list[tuple[int, int]], sample: int = 50_000) -> float:
    """Seconds to seal then open `count` boxes of `size` bytes for each (count, size), one core.

    At most `sample` boxes of each kind are timed, and the time scaled to `count` (it is
    linear in the count of boxes of one size)."""
    key = nacl.public.PrivateKey.generate()
    sealer = nacl.public.SealedBox(key.public_key)
    opener = nacl.public.SealedBox(key)
    total = 0.0
    for count, size in boxes:
        message = b"x" * size
        timed = min(count, sample)
        start = time.perf_counter()
        for _ in range(timed):
            opener.decrypt(sealer.encrypt(message))
        total += (time.perf_counter() - start) * count / max(1, timed)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3, help="queries to time (best is kept)")
    parser.add_argument(
        "--hosts", type=int, default=1, help="personal-cloud hosts (services), the instances split evenly"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--max-ratio",
        type=float,
        default=3.0,
        help="the subscription target: exit 1 when it takes more than this many times its floor",
    )
    parser.add_argument(
        "--max-query-ratio",
        type=float,
        default=1.5,
        help="the query target: exit 1 when it takes more than this many times its floor",
    )
    args = parser.parse_args()

    spec = load_query_spec(DEFAULT_SPEC)
    workdir = Path(tempfile.mkdtemp(prefix="dispers-bench-"))
    if args.hosts < 1 or args.hosts > args.instances:
        parser.error("--hosts must be between 1 and --instances")
    names = tuple(f"pc-{h + 1}" for h in range(args.hosts))
    config = write_cluster(
        workdir,
        ClusterLayout(
            host_as_of=spec.as_of,
            backend="sqlite",
            hosts=names,
            # The query's age limit and the DAs' state lifetime grow with the instances, as
            # `dispers simulate` sets them (3 ms per instance on top of the defaults).
            extra_settings={
                "max_query_age_s": 600.0 + 0.003 * args.instances,
                "query_timeout_s": 300.0 + 0.003 * args.instances,
            },
        ),
    )
    shares = [args.instances // args.hosts + (h < args.instances % args.hosts) for h in range(args.hosts)]
    start = time.perf_counter()
    for h, (name, share) in enumerate(zip(names, shares, strict=True)):
        population = generate(PopulationSpec(n_instances=share, seed=7 + h, as_of=spec.as_of, host=name))
        documents = config.local_for(name).documents
        assert documents is not None
        with DocumentStore(documents) as store:
            population.write(store)
        del population
    figures: dict[str, float] = {"populate_s": time.perf_counter() - start}
    print(f"populated {args.instances} instances over {args.hosts} host(s) in {figures['populate_s']:.1f} s")

    with running_cluster(config):
        hosts = [client_for(config, name, name, PersonalCloudClient) for name in names]
        researcher = config.roster.by_role(Role.QUERIER)[0].name
        querier = client_for(config, researcher, researcher, QuerierClient)
        start = time.perf_counter()
        # Every host subscribes its instances at once, each with the deadline its work needs.
        with ThreadPoolExecutor(len(hosts)) as pool:
            op = SubscriptionOp.SUBSCRIBE
            asked = [pool.submit(h.subscribe_all, op, n) for h, n in zip(hosts, shares, strict=True)]
            changed = [a.result() for a in asked]
        figures["subscribe_s"] = time.perf_counter() - start
        assert changed == shares, f"subscribed {changed}, expected {shares}"
        print(f"subscribed in {figures['subscribe_s']:.1f} s")
        best = float("inf")
        outcome = None
        for _ in range(args.repeat):
            start = time.perf_counter()
            outcome = run_query(querier, spec, timeout_s=600 + 0.003 * args.instances)
            best = min(best, time.perf_counter() - start)
            assert outcome.record.state == "done", outcome.record
            print(f"query in {time.perf_counter() - start:.1f} s")
        figures["query_s"] = best
        for host in hosts:
            host.close()
        querier.close()
    assert outcome is not None and outcome.result is not None
    n = args.instances
    # The Conductor's operator view (the querier is shown no counts): how many targets answered.
    conductor = config.roster.one(Role.CONDUCTOR).name
    store = open_query_store("sqlite", str(config.local_for(conductor).state_path))
    targets = store.get(outcome.record.query_id).counts["targets"]
    store.close()
    contributed = outcome.result.contributions
    settings = config.settings
    n_das = len(config.roster.by_role(Role.DATA_AGGREGATOR))
    leaves = n_das - 1
    frame = padded_size
    # Subscription: per instance the host seals its padded concept list to CI and its padded
    # address to T; CI and T each open one and seal one padded item to TF; TF opens both.
    figures["subscribe_floor_s"] = crypto_floor(
        [(n, frame(settings.concepts_bytes)), (n, frame(settings.address_bytes)),
         (n, frame(tokens_bytes(settings))), (n, frame(PSEUDONYM_FRAME))]
    )  # fmt: skip
    # Query: every target seals one fixed record (contribution or decline alike) that a DA
    # opens; the target list (44 bytes per pseudonym, base64); the padded control boxes: concepts,
    # expression, data request, a spec per DA, tokens, TF's attestation, a partial per leaf and
    # the result.
    record = ContributionLayout(1).size
    figures["query_floor_s"] = crypto_floor(
        [(targets, record), (1, 44 * targets), (2, frame(settings.concepts_bytes)),
         (1, frame(settings.expression_bytes)), (1, frame(settings.request_bytes)),
         (n_das, frame(settings.spec_bytes)), (1, frame(ATTESTATION_BYTES)),
         (leaves, frame(settings.partial_bytes)), (1, frame(settings.result_bytes))]
    )  # fmt: skip
    figures["subscribe_ratio"] = figures["subscribe_s"] / figures["subscribe_floor_s"]
    figures["query_ratio"] = figures["query_s"] / figures["query_floor_s"]
    figures["instances"] = n
    figures["hosts"] = args.hosts
    figures["targets"] = targets
    figures["contributions"] = contributed
    figures["sealed_bytes_per_item"] = sealed_size(record)

    print(
        f"instances: {n}, targets: {targets}, contributions: {contributed}, "
        f"DAs: {n_das} ({leaves} leaves + root)"
    )
    print(
        f"every target answers one sealed item of {sealed_size(record)} bytes, contribution or decline alike"
    )
    print(f"{'':28}{'dispers (gRPC)':>16}{'PyNaCl floor':>16}{'ratio':>8}")
    for what in ("subscribe", "query"):
        print(
            f"{what + ' (s)':28}{figures[what + '_s']:>16.3f}"
            f"{figures[what + '_floor_s']:>16.3f}{figures[what + '_ratio']:>8.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    limits = {"subscribe": args.max_ratio, "query": args.max_query_ratio}
    over = [w for w, limit in limits.items() if figures[w + "_ratio"] > limit]
    if over:
        print("over the target ratio: " + ", ".join(f"{w} (> {limits[w]})" for w in over))
        return 1
    print(f"within the target ratios (subscribe <= {args.max_ratio}, query <= {args.max_query_ratio})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
