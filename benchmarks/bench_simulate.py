"""`dispers simulate` at 10k, 100k and 1M instances, crypto real, beside the crypto floor.

For each size, the heart-rate scenario runs through `dispers.simulation.simulate` (DP off, so
nothing but the protocol is timed) with `--shards` shards (default 2). Its subscription and
query phases are set beside the crypto floor for the same boxes, measured in the same run:
plain PyNaCl sealing then opening, on one core and spread over two processes, exactly the
boxes the protocol needs (per instance, subscribing: the padded concept list and address
sealed by the host and opened by CI and T, CI's padded token list and T's padded pseudonym
sealed to and opened by TF — 4 seals and 4 opens; querying: one 30-byte record per target
sealed by its host and opened by a DA). The floor is timed on a sample of at most `--sample`
instances and scaled to the full size (it is linear in the count of boxes); say so when
quoting it. Also, with `--crypto-off`, the largest size once more with crypto off, beside the
same statistic computed directly with numpy on the generated population.

Prints the ratios, writes `--json` and a plot of time and memory against instances
(`--plot`, default benchmarks/bench_simulate.png). Run: `make bench-sim`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import nacl.public
import numpy as np

from dispers.core.config import ClusterSettings
from dispers.core.wire import ContributionLayout, padded_size
from dispers.protocol.common import tokens_bytes
from dispers.protocol.target_finder import PSEUDONYM_FRAME
from dispers.simulation.driver import simulate
from dispers.simulation.ground_truth import stats_by_group
from dispers.simulation.population import PopulationSpec, concat, generate
from dispers.simulation.scenario import load_scenario
from dispers.simulation.shard import block_seed, block_sizes

SETTINGS = ClusterSettings()
SUBSCRIPTION_BOXES = [
    padded_size(SETTINGS.concepts_bytes),
    padded_size(SETTINGS.address_bytes),
    padded_size(tokens_bytes(SETTINGS)),
    padded_size(PSEUDONYM_FRAME),
]
QUERY_BOXES = [ContributionLayout(1).size]


def _seal_open(sizes: list[int], count: int) -> float:
    """Seconds to seal then open `count` boxes of each size, in this process."""
    key = nacl.public.PrivateKey.generate()
    sealer, opener = nacl.public.SealedBox(key.public_key), nacl.public.SealedBox(key)
    messages = [b"x" * s for s in sizes]
    start = time.perf_counter()
    for message in messages:
        for _ in range(count):
            opener.decrypt(sealer.encrypt(message))
    return time.perf_counter() - start


def floor(sizes: list[int], count: int, sample: int, pool: ProcessPoolExecutor) -> tuple[float, float]:
    """(one core, two processes) seconds for `count` instances' boxes, from a timed sample."""
    m = min(count, sample)
    one = _seal_open(sizes, m)
    start = time.perf_counter()
    list(pool.map(_seal_open, [sizes, sizes], [m // 2, m - m // 2]))
    two = time.perf_counter() - start
    return one * count / m, two * count / m


def direct_numpy(n: int, seed: int, scenario: Any) -> float:
    """Seconds to generate the same population and compute the statistic with numpy directly."""
    spec = scenario.spec
    start = time.perf_counter()
    parts = [
        generate(
            PopulationSpec(n_instances=size, seed=block_seed(seed, b), as_of=spec.as_of, host=f"b{b:05d}")
        )
        for b, size in enumerate(block_sizes(n))
    ]
    stats_by_group(concat(*parts), spec.function, spec.params, spec.as_of,
                   group_field="age", edges=spec.group_by.edges, bounds=spec.bounds)  # fmt: skip
    return time.perf_counter() - start


def plot(rows: list[dict[str, Any]], path: str, shards: int) -> None:
    """Time and peak memory against instances, from the crypto-real rows."""
    real = [r for r in rows if "populate_s" in r]
    if not real:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.array([r["instances"] for r in real])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("subscribe_s", "subscribe"), ("query_s", "query"), ("populate_s", "populate"),
                       ("floor_subscribe_2proc_s", "floor: subscribe, 2 proc"),
                       ("floor_query_2proc_s", "floor: query, 2 proc")):  # fmt: skip
        left.loglog(n, [r[key] for r in real], "o-" if "floor" not in key else "x--", label=label)
    left.set_xlabel("instances")
    left.set_ylabel("seconds")
    left.legend()
    right.loglog(n, [r["peak_bytes"] / 2**30 for r in real], "o-", label="sum of peaks")
    right.loglog(n, [r["driver_peak_bytes"] / 2**30 for r in real], "x--", label="driver")
    right.set_xlabel("instances")
    right.set_ylabel("GiB")
    right.legend()
    fig.suptitle(f"dispers simulate, crypto real, {shards} shards (machine shared: see README)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def _seal_and_open_us(size: int, count: int = 5000) -> tuple[float, float]:
    """Microseconds to seal, and to open, one box of `size` bytes, in this process."""
    key = nacl.public.PrivateKey.generate()
    sealer, opener = nacl.public.SealedBox(key.public_key), nacl.public.SealedBox(key)
    message = b"x" * size
    start = time.perf_counter()
    boxes = [sealer.encrypt(message) for _ in range(count)]
    sealed = time.perf_counter()
    for box in boxes:
        opener.decrypt(box)
    opened = time.perf_counter()
    return (sealed - start) / count * 1e6, (opened - sealed) / count * 1e6


def scaling(n: int, scenario: Any, repeat: int) -> list[dict[str, Any]]:
    """The query phase with one shard and with two, alternated `repeat` times, beside the
    speed-up of runs at their floors: the hosts' seals are spread over the shards, but the DAs'
    opens run on the same two cores. With one shard its seals are the critical path (s per item,
    the DAs opening beside it), with two the cores share seals and opens ((s + o) / 2 per item),
    so runs at those floors differ by 2 s / (s + o). A one-shard run slower than its floor (its
    Python, the driver's) leaves more for the second shard to win: the measured speed-up can
    exceed that figure, which is then no bound."""
    seal_us, open_us = _seal_and_open_us(QUERY_BOXES[0])
    bound = 2 * seal_us / (seal_us + open_us)
    rows = []
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeat):
        for shards in (1, 2):
            report = simulate(scenario.with_overrides(instances=n), shards=shards, crypto="real")
            times[shards].append(report.phases["query: collect"])
            print(f"{n:,} instances, {shards} shard(s): query {report.phases['query']:.2f} s, "
                  f"collect {report.phases['query: collect']:.2f} s", flush=True)  # fmt: skip
    one, two = min(times[1]), min(times[2])
    print(
        f"collect phase, best of {repeat}: 1 shard {one:.2f} s, 2 shards {two:.2f} s: speed-up "
        f"{one / two:.2f}x; runs at their floors would differ by {bound:.2f}x (seal {seal_us:.1f} us, "
        f"open {open_us:.1f} us a record; the one-shard run took {one / n * 1e6:.0f} us an instance)"
    )
    rows.append({
        "instances": n, "scaling": True, "collect_1_shard_s": times[1], "collect_2_shards_s": times[2],
        "speedup": one / two, "bound": bound, "seal_us": seal_us, "open_us": open_us,
        "load_average": os.getloadavg()[0],
    })  # fmt: skip
    return rows


def central(n: int, scenario: Any, repeat: int) -> list[dict[str, Any]]:
    """The central actors alone (what the driver does when the shards run elsewhere): the
    shards build and sign every subscription batch first, then fresh central actors take them
    all, `inflight` batches at once, with their boxes opened and sealed in the driver's threads
    (0 workers) or by a pool of two worker processes; alternated `repeat` times."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from dispers.core.cluster_files import ClusterLayout, write_cluster
    from dispers.core.ids import Role
    from dispers.crypto.pool import CryptoPool, use_pool
    from dispers.simulation.backends import make_backend
    from dispers.simulation.driver import _central_actors, _shard_specs, scaled_settings

    rows = []
    with tempfile.TemporaryDirectory(prefix="dispers-central-") as tmp:
        config = write_cluster(Path(tmp), ClusterLayout(
            leaf_aggregators=scenario.leaf_aggregators, hosts=("pc-0", "pc-1"), k_min=scenario.k_min,
            batch_size=scenario.batch_size, backend="memory", host_as_of=scenario.spec.as_of,
            insecure=True, dp=False, extra_settings=scaled_settings(n, scenario)))  # fmt: skip
        runner = make_backend("local")
        runner.start(_shard_specs(config, scenario.with_overrides(instances=n), 2, True))
        sizes = [int(runner.call(s, "ready").result()) for s in range(2)]
        batch = config.settings.batch_size
        hosts = [e.name for e in config.roster.by_role(Role.PERSONAL_CLOUD)]
        signed = [
            (hosts[s], runner.call(s, "subscription_batch", a, min(size, a + batch)).result())
            for a in range(0, max(sizes), batch)
            for s, size in enumerate(sizes)
            if a < size
        ]
        runner.close()
        pool = CryptoPool(2)
        times: dict[int, list[float]] = {0: [], 2: []}
        try:
            for _ in range(repeat):
                for workers in (0, 2):
                    cluster = _central_actors(config, runner, lambda _n: None)
                    subscribe = cluster.conductor.subscribe
                    with use_pool(pool if workers else None), ThreadPoolExecutor(4) as threads:
                        start = time.perf_counter()
                        done = sum(threads.map(subscribe, *zip(*signed, strict=True)))
                        took = time.perf_counter() - start
                    cluster.close()
                    assert done == n, (done, n)
                    times[workers].append(took)
                    print(f"central actors alone, {n:,} subscriptions, {workers} crypto workers: "
                          f"{took:.2f} s", flush=True)  # fmt: skip
        finally:
            pool.close()
    one, two = min(times[0]), min(times[2])
    sub1, sub2 = _central_floor(n)
    print(f"best of {repeat}: threads {one:.2f} s, 2 crypto workers {two:.2f} s: {one / two:.2f}x; "
          f"the central boxes' floor: 1 core {sub1:.2f} s, 2 processes {sub2:.2f} s "
          f"(threads {one / sub2:.2f}x it, workers {two / sub2:.2f}x)")  # fmt: skip
    rows.append({"instances": n, "central": True, "threads_s": times[0], "workers_s": times[2],
                 "floor_1core_s": sub1, "floor_2proc_s": sub2,
                 "load_average": os.getloadavg()[0]})  # fmt: skip
    return rows


def _central_floor(n: int) -> tuple[float, float]:
    """The central actors' own boxes per subscription (CI and T each open one and seal one, TF
    opens two), for n subscriptions: one core, and two processes, from a sample of 5,000."""
    sizes = [padded_size(SETTINGS.concepts_bytes), padded_size(SETTINGS.address_bytes)]
    opens = [padded_size(tokens_bytes(SETTINGS)), padded_size(PSEUDONYM_FRAME)]
    m = min(n, 5000)
    with ProcessPoolExecutor(2) as pool:
        pool.submit(int).result()
        one = _seal_open(sizes + opens, m)  # a seal and an open of each: the central share
        start = time.perf_counter()
        list(pool.map(_seal_open, [sizes + opens] * 2, [m // 2, m - m // 2]))
        two = time.perf_counter() - start
    # Of the 4 seal+open pairs timed, the central actors do 4 opens and 2 seals.
    seal_us, open_us = _seal_and_open_us(sizes[0])
    share = (4 * open_us + 2 * seal_us) / (4 * (open_us + seal_us))
    return one * n / m * share, two * n / m * share


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--sample", type=int, default=20_000, help="instances timed for the floor")
    parser.add_argument("--scenario", default="simulations/heart_rate.toml")
    parser.add_argument("--crypto-off", action="store_true", help="also the largest size with crypto off")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--plot", default="benchmarks/bench_simulate.png")
    parser.add_argument("--replot", help="only redraw the plot from a --json file of earlier runs")
    parser.add_argument(
        "--scaling", type=int, metavar="N",
        help="only the query phase over N instances with 1 shard and with 2, alternated --repeat times",
    )  # fmt: skip
    parser.add_argument(
        "--central", type=int, metavar="N",
        help="only the central actors on N prebuilt subscriptions: threads against 2 crypto workers",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), args.plot, args.shards)
        return 0
    scenario = load_scenario(args.scenario).with_overrides(dp=False)
    rows: list[dict[str, Any]] = []
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (compare ratios)")
    if args.central:
        rows = central(args.central, scenario, args.repeat)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    if args.scaling:
        rows = scaling(args.scaling, scenario, args.repeat)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    with ProcessPoolExecutor(2) as pool:
        pool.submit(int).result()  # the workers are up before anything is timed
        for n in [int(x) for x in args.sizes.split(",")]:
            report = simulate(scenario.with_overrides(instances=n), shards=args.shards, crypto="real")
            targets = report.counts["conductor: targets"]
            sub1, sub2 = floor(SUBSCRIPTION_BOXES, n, args.sample, pool)
            q1, q2 = floor(QUERY_BOXES, targets, args.sample, pool)
            row = {
                "instances": n, "shards": args.shards, "state": report.state,
                "populate_s": report.phases["populate"], "subscribe_s": report.phases["subscribe"],
                "query_s": report.phases["query"], "floor_subscribe_1core_s": sub1,
                "floor_subscribe_2proc_s": sub2, "floor_query_1core_s": q1, "floor_query_2proc_s": q2,
                "peak_bytes": report.memory["total_peak_bytes"],
                "driver_peak_bytes": report.memory["driver_peak_bytes"],
                "load_average": os.getloadavg()[0],
            }  # fmt: skip
            rows.append(row)
            sub, query, gib = row["subscribe_s"], row["query_s"], 2**30
            print(
                f"{n:>9,}: populate {row['populate_s']:.1f} s; subscribe {sub:.1f} s = "
                f"{sub / sub1:.2f} x floor(1 core {sub1:.1f} s) = "
                f"{sub / sub2:.2f} x floor(2 proc {sub2:.1f} s); "
                f"query {query:.1f} s = {query / q1:.2f} x floor(1 core {q1:.1f} s) = "
                f"{query / q2:.2f} x floor(2 proc {q2:.1f} s); peak memory {row['peak_bytes'] / gib:.2f} GiB "
                f"(driver {row['driver_peak_bytes'] / gib:.2f})",
                flush=True,
            )
    if args.crypto_off and rows:
        n = rows[-1]["instances"]
        report = simulate(scenario.with_overrides(instances=n), shards=args.shards, crypto="off")
        total = sum(report.phases[p] for p in ("populate", "subscribe", "query"))
        direct = direct_numpy(n, scenario.seed, scenario)
        print(
            f"crypto off, {n:,}: whole run {total:.1f} s vs numpy directly {direct:.1f} s "
            f"= {total / direct:.2f} x"
        )
        rows.append({"instances": n, "crypto": "off", "total_s": total, "numpy_direct_s": direct})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot, args.shards)
    return 0


if __name__ == "__main__":
    sys.exit(main())
