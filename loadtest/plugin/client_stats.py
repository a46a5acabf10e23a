"""Client-side statistics per target and command, in microseconds.

Locust rounds response times to whole milliseconds, and loopback replies take tens of
microseconds, so every request event is also recorded here, per target and command, in two
histograms (for the latency from the intended start and, beside it, for the service time; see
``loadtest.plugin.client``): Prometheus buckets from 50 µs and a fine one (1 µs steps below
1 ms, three
significant digits above) for p50/p99/p99.9 in microseconds. A worker ships what it recorded
since its last report as a msgpack-friendly message; the master merges the messages.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from loadtest.plugin.client import CONNECT
from loadtest.plugin.workload import COMMANDS, TARGETS
from services.buckets import DURATION_BUCKETS

# The servers' bounds (services/buckets.py) from 50 µs: below that Locust's own timing is noise.
BUCKETS_SECONDS = DURATION_BUCKETS[DURATION_BUCKETS.index(0.00005) :]
PERCENTILES = ((0.5, "p50_us"), (0.99, "p99_us"), (0.999, "p999_us"))


def fine_key(microseconds: int) -> int:
    """Bucket a duration: exact below 1000 µs, three significant digits (under 1 % error) above."""
    scale = 1
    while microseconds >= 1000 * scale:
        scale *= 10
    return microseconds // scale * scale


@dataclass
class Timing:
    """Durations of successful requests: a sum, Prometheus buckets and the fine histogram."""

    total: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_SECONDS) + 1))
    fine: dict[int, int] = field(default_factory=dict)

    def record(self, seconds: float) -> None:
        """Count one duration."""
        self.total += seconds
        self.buckets[bisect.bisect_left(BUCKETS_SECONDS, seconds)] += 1
        key = fine_key(max(0, round(seconds * 1_000_000)))
        self.fine[key] = self.fine.get(key, 0) + 1

    @property
    def count(self) -> int:
        """How many durations were recorded."""
        return sum(self.fine.values())

    def percentile_us(self, fraction: float) -> int | None:
        """The smallest recorded bucket that covers `fraction` of the durations."""
        count = self.count
        if not count:
            return None
        rank = max(1, math.ceil(fraction * count))
        seen = 0
        for key in sorted(self.fine):
            seen += self.fine[key]
            if seen >= rank:
                return key
        return max(self.fine)

    def merge(self, other: Timing) -> None:
        """Add another timing's counts to this one."""
        self.total += other.total
        for index, count in enumerate(other.buckets):
            self.buckets[index] += count
        for key, count in other.fine.items():
            self.fine[key] = self.fine.get(key, 0) + count

    def to_message(self) -> list[Any]:
        """A msgpack-friendly copy."""
        return [self.total, list(self.buckets), [[key, count] for key, count in self.fine.items()]]

    @classmethod
    def from_message(cls, message: list[Any]) -> Timing:
        """The inverse of :meth:`to_message`."""
        total, buckets, fine = message
        return cls(float(total), list(buckets), {int(key): int(count) for key, count in fine})


@dataclass
class Series:
    """Counts for one (target, command). Durations are of successful requests only.

    ``latency`` runs from the request's intended start (in arrival-rate mode the instant it was
    due; otherwise when it was sent), ``service`` from sending to the answer: the two are equal
    in the closed loop. ``late`` counts arrival-rate starts that found no free connection.
    """

    requests: int = 0
    failures: int = 0
    late: int = 0
    latency: Timing = field(default_factory=Timing)
    service: Timing = field(default_factory=Timing)

    def record(
        self, seconds: float, failed: bool, service: float | None = None, late: bool = False
    ) -> None:
        """Count one request; time it only if it succeeded."""
        self.requests += 1
        self.late += late
        if failed:
            self.failures += 1
            return
        self.latency.record(seconds)
        self.service.record(seconds if service is None else service)

    @property
    def timed(self) -> int:
        """How many durations were recorded (the successful requests)."""
        return self.requests - self.failures

    def percentile_us(self, fraction: float) -> int | None:
        """The latency percentile in microseconds (None before any success)."""
        return self.latency.percentile_us(fraction)

    def merge(self, other: Series) -> None:
        """Add another series' counts to this one."""
        self.requests += other.requests
        self.failures += other.failures
        self.late += other.late
        self.latency.merge(other.latency)
        self.service.merge(other.service)


class ClientStats:
    """All series of one process (a worker's since its last report; the master's in total)."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], Series] = {}

    def record(
        self,
        target: str,
        command: str,
        seconds: float,
        failed: bool,
        service: float | None = None,
        late: bool = False,
    ) -> None:
        """Count one request event (`seconds` from its intended start, `service` from sending)."""
        key = (target, command)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = Series()
        series.record(seconds, failed, service, late)

    def reset(self) -> None:
        """Forget everything (Locust reset its statistics)."""
        self.series.clear()

    def to_message(self) -> list[list[Any]]:
        """A msgpack-friendly copy (only str keys and lists) for a worker report."""
        return [
            [
                target,
                command,
                s.requests,
                s.failures,
                s.late,
                s.latency.to_message(),
                s.service.to_message(),
            ]
            for (target, command), s in self.series.items()
        ]

    def merge_message(self, message: Iterable[list[Any]]) -> None:
        """Add a worker's report."""
        for target, command, requests, failures, late, latency, service in message:
            incoming = Series(
                int(requests),
                int(failures),
                int(late),
                Timing.from_message(latency),
                Timing.from_message(service),
            )
            key = (str(target), str(command))
            if key in self.series:
                self.series[key].merge(incoming)
            else:
                self.series[key] = incoming

    def drain(self) -> list[list[Any]]:
        """The message for the master, and start over."""
        message = self.to_message()
        self.reset()
        return message

    def connect_errors(self, target: str) -> int:
        """Failed connection attempts to a target."""
        series = self.series.get((target, CONNECT))
        return series.failures if series else 0

    def late_starts(self, target: str) -> int:
        """Arrival-rate starts to a target that found no free connection when due."""
        return sum(s.late for (t, _), s in self.series.items() if t == target)


def latency_rows(stats: ClientStats) -> list[dict[str, Any]]:
    """One row per (target, command): counts and p50/p99/p99.9/max in microseconds."""
    rows = []
    for (target, command), series in sorted(stats.series.items(), key=_series_order):
        row: dict[str, Any] = {
            "target": target,
            "command": command,
            "requests": series.requests,
            "failures": series.failures,
        }
        for fraction, name in PERCENTILES:
            row[name] = series.percentile_us(fraction)
        row["max_us"] = max(series.latency.fine) if series.latency.fine else None
        # Beside the latency from the intended start: the time from sending to the answer.
        row["service_p50_us"] = series.service.percentile_us(0.5)
        row["service_p99_us"] = series.service.percentile_us(0.99)
        row["late_starts"] = series.late
        rows.append(row)
    return rows


def _series_order(item: tuple[tuple[str, str], Series]) -> tuple[int, int, str, str]:
    target, command = item[0]
    commands = (*COMMANDS, CONNECT)
    return (
        TARGETS.index(target) if target in TARGETS else len(TARGETS),
        commands.index(command) if command in commands else len(commands),
        target,
        command,
    )


def latency_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table (printed at the end of a run, served at /latency)."""
    header = (
        *("target", "command", "requests", "failures", "p50 µs", "p99 µs", "p99.9 µs", "max µs"),
        *("svc p50 µs", "svc p99 µs", "late starts"),
    )
    keys = (
        *("target", "command", "requests", "failures", "p50_us", "p99_us", "p999_us", "max_us"),
        *("service_p50_us", "service_p99_us", "late_starts"),
    )
    lines = [f"{header[0]:<10}{header[1]:<9}" + "".join(f"{h:>12}" for h in header[2:])]
    for row in rows:
        cells = ["-" if row[k] is None else str(row[k]) for k in keys]
        lines.append(f"{cells[0]:<10}{cells[1]:<9}" + "".join(f"{c:>12}" for c in cells[2:]))
    return "\n".join(lines)
