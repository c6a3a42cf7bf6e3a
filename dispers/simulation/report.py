"""What a simulation reports: on the terminal, as report.json and as PNG plots.

The report holds the released result beside two ground truths computed from the generated
arrays — over every eligible instance ("everyone": consenting targets with a value, had nobody
failed) and over those that could answer ("answering": without the offline, declining and
out-of-bounds ones) — so that the error splits into the part due to DP noise (released minus
answering) and the part due to dropouts (answering minus everyone).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispers.cli.render import table
from dispers.core.spec import QueryResult
from dispers.simulation.ground_truth import GroupTruth
from dispers.simulation.scenario import Faults

CRYPTO_OFF_BANNER = (
    "CRYPTO OFF: no box was sealed or opened with libsodium (payloads travelled in clear, of the "
    "sealed length); timings say nothing of the real protocol's cost"
)
_COMPARED = ("count", "mean", "std")


def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def group_errors(
    result: QueryResult, truth: Mapping[str, Mapping[str, GroupTruth]], field: str | None = None
) -> dict[str, Any]:
    """Per group and statistic: released, both truths, the DP error and the dropout error.

    With several fields, the first one's (`field`: its name; the result names its statistics
    ``<field>.mean``; the count is the group's).
    """
    out: dict[str, Any] = {}
    for group in result.groups:
        t = truth.get(group.label)
        if t is None:
            continue
        per: dict[str, Any] = {}
        for stat in _COMPARED:
            everyone = _num(getattr(t["everyone"], stat))
            answering = _num(getattr(t["answering"], stat))
            key = stat if field is None or stat == "count" else f"{field}.{stat}"
            released = None if group.suppressed else _num(group.values.get(key))
            per[stat] = {
                "released": released,
                "answering": answering,
                "everyone": everyone,
                "dp_error": None if released is None or answering is None else released - answering,
                "dropout_error": None if answering is None or everyone is None else answering - everyone,
                "noise_sd": group.noise.get(stat),
            }
        out[group.label] = per
    return out


@dataclass
class SimulationReport:
    """Everything one `dispers simulate` run measured."""

    scenario: str
    instances: int
    shards: int
    backend: str
    crypto: str
    dp: bool
    seed: int
    faults: Faults
    phases: dict[str, float]
    state: str
    error: str | None
    result: QueryResult | None
    truth: dict[str, Any]
    errors: dict[str, Any]
    counts: dict[str, int]
    messages: dict[str, dict[str, int]]
    busy: dict[str, float]
    driver_cpu: dict[str, float]  # the driver process's CPU seconds per phase
    shard_cpu: list[float]  # each shard worker's CPU seconds, in all
    memory: dict[str, Any]
    learned: dict[str, dict[str, Any]]
    querier: str
    crypto_workers: int = 0  # processes sealing and opening the central actors' batches
    pool_cpu: list[float] = dataclasses.field(default_factory=list)  # each one's CPU seconds

    def to_obj(self) -> dict[str, Any]:
        """JSON-able form (report.json)."""
        return {
            "scenario": self.scenario,
            "instances": self.instances,
            "shards": self.shards,
            "backend": self.backend,
            "crypto": self.crypto,
            "crypto_note": CRYPTO_OFF_BANNER if self.crypto == "off" else "real: libsodium sealed boxes",
            "dp": self.dp,
            "seed": self.seed,
            "faults": dataclasses.asdict(self.faults),
            "phases_s": self.phases,
            "state": self.state,
            "error": self.error,
            "result": None if self.result is None else self.result.to_obj(),
            "truth": {
                label: {which: dataclasses.asdict(t) for which, t in both.items()}
                for label, both in self.truth.items()
            },
            "errors": self.errors,
            "counts": self.counts,
            "messages": self.messages,
            "busy_s": self.busy,
            "driver_cpu_s": self.driver_cpu,
            "shard_cpu_s": self.shard_cpu,
            "crypto_workers": self.crypto_workers,
            "crypto_worker_cpu_s": self.pool_cpu,
            "memory": self.memory,
            "learned": self.learned,
        }

    def write_json(self, path: Path) -> None:
        """Write report.json (NaN written as null)."""

        def clean(x: Any) -> Any:
            if isinstance(x, float) and not math.isfinite(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list | tuple):
                return [clean(v) for v in x]
            return x

        path.write_text(json.dumps(clean(self.to_obj()), indent=2) + "\n")

    def render(self) -> str:
        """The terminal report."""
        lines = [
            f"dispers simulate: {self.scenario}, {self.instances:,} instances in {self.shards} shard(s) "
            f"({self.backend}), crypto {self.crypto.upper()}, DP {'on' if self.dp else 'off'}, "
            f"seed {self.seed}"
        ]
        if self.crypto == "off":
            lines.append("*** " + CRYPTO_OFF_BANNER + " ***")
        if self.faults.any:
            f = self.faults
            lines.append(
                f"faults: offline {f.offline:.0%}, declining {f.declining:.0%}, "
                f"out of bounds {f.out_of_bounds:.0%}, slow answers {f.slow:.0%}"
            )
        lines.append("")
        if self.result is None:
            lines.append(f"query {self.state}: {self.error or 'no result'} (nothing was released)")
        else:
            rows = []
            for label, per in self.errors.items():
                count, mean = per["count"], per["mean"]
                rows.append(
                    [
                        label,
                        _fmt(count["released"]),
                        _fmt(count["answering"]),
                        _fmt(count["everyone"]),
                        _fmt(mean["released"]),
                        _fmt(mean["answering"]),
                        _fmt(mean["everyone"]),
                        _fmt(mean["dp_error"], sci=True),
                        _fmt(mean["dropout_error"], sci=True),
                    ]
                )
            lines.append(
                table(
                    [
                        "group",
                        "count",
                        "true count (answering)",
                        "(everyone)",
                        "mean",
                        "true mean (answering)",
                        "(everyone)",
                        "DP error",
                        "dropout error",
                    ],
                    rows,
                )  # fmt: skip
            )
            r = self.result
            how = (
                f"DP {r.privacy.mechanism}, epsilon {r.privacy.epsilon:g}"
                if r.privacy.noised
                else "exact (dp off)"
            )
            lines.append(
                f"released: {how}; declined {r.declined if r.declined is not None else '< k'}; "
                + ", ".join(
                    f"{k.replace('_', ' ')} {v if v is not None else '< k'}"
                    for k, v in sorted(r.dropped.items())
                )
            )
        c = self.counts
        missing = c.get("truth: eligible", 0) - c.get("truth: answering", 0)
        lines.append(
            f"missing from the result: {missing:,} of {c.get('truth: eligible', 0):,} eligible instances "
            f"(offline {c.get('truth: offline', 0):,}, declining {c.get('truth: declining', 0):,}, "
            f"out of bounds {c.get('truth: out_of_bounds', 0):,})"
        )
        rows = [
            [k, f"{v:.3f}", f"{self.driver_cpu[k]:.3f}" if k in self.driver_cpu else ""]
            for k, v in self.phases.items()
        ]
        lines += ["", table(["phase", "seconds", "driver CPU s"], rows)]
        lines.append("shard workers' CPU seconds: " + ", ".join(f"{c:.1f}" for c in self.shard_cpu))
        if self.pool_cpu:
            lines.append(
                f"crypto workers' CPU seconds ({self.crypto_workers}, sealing and opening the central "
                "actors' batches): " + ", ".join(f"{c:.1f}" for c in self.pool_cpu)
            )
        lines += ["", table(["count", "value"], [[k, f"{v:,}"] for k, v in self.counts.items()])]
        rows = [
            [
                a,
                f"{m['messages_received']:,}",
                _bytes(m["bytes_received"]),
                f"{m['messages_sent']:,}",
                _bytes(m["bytes_sent"]),
            ]
            for a, m in self.messages.items()
        ]
        lines += ["", table(["actor", "messages in", "bytes in", "messages out", "bytes out"], rows)]
        rows = [[op, f"{sec:.3f}"] for op, sec in self.busy.items()]
        lines += ["", table(["operation (summed over calls, nested ones included)", "seconds"], rows)]
        rows = []
        for actor, info in self.learned.items():
            opened = info["opened"]
            what = ", ".join(f"{k} {v:,}" for k, v in opened.items()) if opened else "nothing"
            rows.append([actor, info["role"], what])
        lines += [
            "",
            "plaintexts each actor opened (observer hook), by kind:",
            table(["actor", "role", "opened"], rows),
        ]
        m = self.memory
        lines.append(
            f"\npeak memory: driver {_bytes(m['driver_peak_bytes'])}, shards "
            + ", ".join(_bytes(b) for b in m["shard_peak_bytes"])
            + f"; sum of peaks {_bytes(m.get('sum_of_peaks_bytes', m['total_peak_bytes']))}"
            + (
                f"; whole simulation at its peak {_bytes(m['total_peak_bytes'])} (sampled)"
                if m.get("total_peak_sampled")
                else ""
            )
        )
        return "\n".join(lines)

    def plot(self, directory: Path) -> list[Path]:
        """PNG plots: result vs truth per group, time per phase, bytes per actor, learned items."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        written = []
        tag = f"{self.instances:,} instances, crypto {self.crypto}" + (
            " (NOT REAL)" if self.crypto == "off" else ""
        )
        if self.errors:
            fig, ax = plt.subplots(figsize=(7, 4))
            labels = list(self.errors)
            xs = range(len(labels))
            released = [self.errors[g]["mean"]["released"] for g in labels]
            sd = [self.errors[g]["mean"]["noise_sd"] or 0.0 for g in labels]
            ax.errorbar(xs, [v if v is not None else math.nan for v in released], yerr=[1.96 * s for s in sd],
                        fmt="o", label="released (± 1.96 noise sd)")  # fmt: skip
            ax.plot(xs, [self.errors[g]["mean"]["answering"] for g in labels], "x", label="truth: answering")
            ax.plot(xs, [self.errors[g]["mean"]["everyone"] for g in labels], "+", label="truth: everyone")
            ax.set_xticks(list(xs), labels)
            ax.set_ylabel("mean")
            ax.set_title(f"{self.scenario}: result vs ground truth ({tag})")
            ax.legend()
            written.append(_save(fig, directory / "result.png"))
        fig, ax = plt.subplots(figsize=(7, 4))
        names = list(self.phases)
        ax.barh(names, [self.phases[n] for n in names])
        ax.set_xlabel("seconds")
        ax.set_title(f"time per phase ({tag})")
        written.append(_save(fig, directory / "phases.png"))
        fig, ax = plt.subplots(figsize=(7, 4))
        actors = list(self.messages)
        received = [self.messages[a]["bytes_received"] / 1e6 for a in actors]
        ax.barh(actors, received, label="received")
        ax.barh(actors, [self.messages[a]["bytes_sent"] / 1e6 for a in actors], left=received, label="sent")
        ax.set_xlabel("MB")
        ax.set_title(f"bytes per actor ({tag})")
        ax.legend()
        written.append(_save(fig, directory / "bytes.png"))
        fig, ax = plt.subplots(figsize=(7, 4))
        actors = list(self.learned)
        ax.barh(actors, [sum(self.learned[a]["opened"].values()) for a in actors])
        ax.set_xscale("symlog")
        ax.set_xlabel("plaintexts opened")
        ax.set_title(f"what each actor opened (observer hook; {tag})")
        written.append(_save(fig, directory / "learned.png"))
        plt.close("all")
        return written

    def write(self, directory: Path) -> list[Path]:
        """report.json and the plots in `directory` (created)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.write_json(directory / "report.json")
        return [directory / "report.json", *self.plot(directory)]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _fmt(x: float | None, *, sci: bool = False) -> str:
    if x is None:
        return "-"
    if sci:
        return f"{x:+.2e}"
    if float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:.3f}"


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
