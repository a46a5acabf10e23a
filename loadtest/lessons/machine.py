"""What this machine can show, measured before the lessons: the hypotheses are derived from it.

A fixed margin ("the pool reaches 1.6x") means one thing on a quiet 8-core machine and another
on two virtual cores shared with the load generator and the host's other guests. So a run first
measures what the lessons need and each lesson states its expectation from these figures:

- **free cores**: one busy process pinned on each CPU of the run for half a second; the CPU
  time each got is what a server process could get there now (a core another guest keeps busy
  gives a fraction);
- **/work calibration**: the quickest of a few timed `/work` bursts (`rig.calibrate`), taken
  again before and after every lesson that computes: a drift between the two beyond
  `DRIFT_BOUND` makes that lesson's failure inconclusive (the core's speed moved under it);
- **the load generator's ceiling**: echo against its own C epoll server, one core each: the
  fastest rate this rig can show at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass

# How long each CPU is kept busy to see what it gives.
SPIN_S = 0.5
# A /work calibration that moved by more than this between a lesson's start and its end: the
# core's speed changed under the lesson, and a figure in "cores' worth of /work" cannot decide.
DRIFT_BOUND = 0.25
# What a busy process reports: the CPU seconds it got while spinning for SPIN_S of wall time.
_SPIN = (
    "import os, sys, time\n"
    "os.sched_setaffinity(0, {int(sys.argv[1])})\n"
    "end = time.monotonic() + float(sys.argv[2])\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
    "print(time.process_time())\n"
)


@dataclass(frozen=True)
class Machine:
    """The figures the hypotheses are derived from."""

    cpus: int  # CPUs this run may use
    free_cores: float  # the sum of what a busy process got on each of them
    free_by_cpu: dict[int, float]
    loadgen_ceiling_rps: float  # 0 when not measured

    def as_json(self) -> dict:
        """The machine's figures as lessons.json stores them."""
        return {
            **asdict(self),
            "free_by_cpu": {str(cpu): share for cpu, share in self.free_by_cpu.items()},
        }


def free_cores(cpus: Iterable[int], seconds: float = SPIN_S) -> dict[int, float]:
    """Per CPU, the share of it that a busy process pinned there got over `seconds` (all at
    once, so that one CPU's spinner does not borrow the other's idle time)."""
    children = {
        cpu: subprocess.Popen(
            [sys.executable, "-c", _SPIN, str(cpu), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for cpu in sorted(cpus)
    }
    shares = {}
    for cpu, child in children.items():
        out, _ = child.communicate(timeout=seconds + 30)
        # The interpreter's start-up runs before the timed spin and counts in process_time:
        # capped at one core.
        shares[cpu] = round(min(1.0, float(out.strip() or 0) / seconds), 3)
    return shares


def drift(first_ns: float, second_ns: float) -> float:
    """How far two /work calibrations (ns a round) are apart, as a share of the quicker one."""
    quick, slow = sorted((first_ns, second_ns))
    return slow / quick - 1 if quick > 0 else 0.0


def measure(cpus: Iterable[int] | None = None, loadgen_ceiling_rps: float = 0.0) -> Machine:
    """The free cores of the run's CPUs (default: this process's; the load generator's
    ceiling is passed in)."""
    cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    shares = free_cores(cpus)
    return Machine(len(cpus), round(sum(shares.values()), 3), shares, loadgen_ceiling_rps)
