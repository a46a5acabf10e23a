"""The verdict machinery every lesson's check shares: verdicts, the noise rule, roles, formats.

A verdict is `holds`, `fails`, or `inconclusive`. A check that fails on figures measured while
other processes used the server's CPU is *inconclusive* when that noise could account for the
miss: a busy neighbour cannot be told from the model, so the run neither passes nor fails on
noise; the reason says so (`decide_with_noise`). A miss larger than the noise can explain (a
rate 70x short while others took 40 % of the core, which explains at most 1.7x) fails all the
same: a broken model is not excused by a busy machine. A check that holds on noisy figures
holds, and its reason says the machine was busy. A figure the machine could not produce at all
(one core free, the /work calibration drifting under the lesson) is inconclusive with that
reason, whatever it shows. Checks are pure functions over plain dictionaries (the figures as
`lessons.json` stores them), so every verdict can be tested on synthetic figures without
starting a server; each lesson's own check is in its module of `loadtest.lessons.claims`.

Model roles are read from the registry, never listed: the pool is the model with workers; every
other model switches between connections (a thread, a greenlet or a Protocol per connection);
the models with one event loop for every connection (gevent, asyncio: those exporting the loop's
blocked seconds) are the event loops of `blocked-loop`, threaded its preempted OS threads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from services import models

HOLDS, FAILS, INCONCLUSIVE = "holds", "fails", "inconclusive"

POOL = "pool"  # the model whose concurrency is its number of workers
# One loop for every connection: a blocking call blocks them all (gevent's and asyncio's).
EVENT_LOOPS: tuple[str, ...] = tuple(model.name for model in models.MODELS if model.event_loop)
OS_THREADS = "threaded"  # the OS preempts a long request
# CPython's own GIL switch interval (sys.getswitchinterval() unless changed): the threaded
# server's default; blocked-loop and gil-tax derive their figures from it.
CPYTHON_SWITCH_INTERVAL = 0.005
# db-wait and undetected-io: a model that overlaps its queries reaches at least this share of
# what bounds it (the database pool, or the helper threads) / the query time.
DB_IDEAL_SHARE = 0.70


def switching_models(names: Iterable[str] = models.NAMES) -> list[str]:
    """The models that switch between connections: every registered model but the pool."""
    return [name for name in names if name != POOL]


def switching_figures(figures: Mapping[str, Mapping]) -> dict[str, Mapping]:
    """The figures of the models that switch between connections (all but the pool)."""
    return {name: figures[name] for name in switching_models(figures)}


@dataclass(frozen=True)
class Verdict:
    """holds, fails or inconclusive, and why, in one sentence with the deciding figures."""

    verdict: str
    reason: str


def _noisy(figures: Mapping[str, Mapping], names: Iterable[str]) -> list[str]:
    return [name for name in names if figures.get(name, {}).get("noisy")]


# The most CPU share of the server's core(s) that others may be counted to have taken: beyond
# it, a figure is as good as unmeasured, and the noise explains at most 1 / (1 - this).
MOST_NOISE = 0.9


class Problems(list):
    """What failed, each with the models whose figures show it and how far it missed."""

    def __init__(self) -> None:
        super().__init__()
        self.speed_free: list[str] = []

    def add(
        self, text: str, *names: str, miss: float | None = None, speed_free: bool = False
    ) -> None:
        """One failed part of the hypothesis, shown by these models' figures. `miss`: how many
        times short of the mark the figure is (needed / got, >= 1; `math.inf` when noise cannot
        cause it at all, e.g. a rate above a limit); None: any noise could explain it.
        `speed_free`: a figure a core's speed does not move (the cores a server used), so a
        drifting /work calibration cannot excuse it (drift_verdict)."""
        self.append((names, text, miss))
        if speed_free:
            self.speed_free.append(text)


def noise_explains(other_cpu: float) -> float:
    """The factor by which others taking `other_cpu` of the server's core could have slowed
    it: 1 / (1 - their share)."""
    return 1 / (1 - min(max(other_cpu, 0.0), MOST_NOISE))


def _excused(names: tuple[str, ...], miss: float | None, figures: Mapping[str, Mapping]) -> bool:
    """Could the noise in these models' figures account for this miss?"""
    noisy = [name for name in names if figures.get(name, {}).get("noisy")]
    if not noisy:
        return False
    other = max(figures[name].get("other_cpu", 0.0) for name in noisy)
    return miss is None or miss <= noise_explains(other)


def decide_with_noise(
    problems: Problems, ok: str, figures: Mapping[str, Mapping], used: Iterable[str]
) -> Verdict:
    """Holds without problems. With problems it fails, unless the noise in the figures that
    show each problem could account for it: then it is inconclusive (a busy neighbour cannot
    be told from the model)."""
    noisy = set(_noisy(figures, used))
    if not problems:
        busy = _busy(figures, [name for name in used if name in noisy])
        return Verdict(HOLDS, ok + (f"; measured while {busy}" if busy else ""))
    text = "; ".join(problem for _, problem, _ in problems)
    unexcused = [(names, miss) for names, _, miss in problems if not _excused(names, miss, figures)]
    if not unexcused:
        involved = [
            name
            for name in used
            if any(name in names for names, _, _ in problems) and name in noisy
        ]
        return Verdict(
            INCONCLUSIVE,
            f"{text}; but {_busy(figures, involved)}, so this cannot be told from noise",
        )
    if any(noisy.intersection(names) for names, _ in unexcused):
        text += (
            "; more than the noise could explain (others took at most "
            + ", ".join(
                f"{name} {figures[name].get('other_cpu', 0):.0%}"
                for name in used
                if name in noisy and any(name in names for names, _ in unexcused)
            )
            + " of the server's CPU)"
        )
    return Verdict(FAILS, text)


def drift_verdict(setup: Mapping, problems: Problems) -> Verdict | None:
    """Inconclusive when the /work calibration moved past the bound during the lesson (a
    figure in cores' worth of /work cannot decide then) and every problem is such a figure;
    None otherwise (no problems, no drift, or one the core's speed cannot move)."""
    from loadtest.lessons.machine import DRIFT_BOUND

    drift = setup.get("work_drift")
    if not problems or problems.speed_free or drift is None or drift <= DRIFT_BOUND:
        return None
    text = "; ".join(problem for _, problem, _ in problems)
    return Verdict(
        INCONCLUSIVE,
        f"{text}; but the /work calibration moved {drift:.0%} during the lesson (bound "
        f"{DRIFT_BOUND:.0%}): the core's speed changed under it",
    )


def cores_verdict(setup: Mapping, needed: float, text: str) -> Verdict | None:
    """Inconclusive when the machine gave the server fewer free cores than the lesson needs
    (measured before the run: loadtest.lessons.machine); None otherwise."""
    free = setup.get("free_cores")
    if free is None or free >= needed:
        return None
    return Verdict(
        INCONCLUSIVE,
        f"{text}: this machine could give {free:.2f} free cores "
        f"({setup.get('cpus', '?')} CPUs, measured before the run), the lesson needs {needed:g}",
    )


def _busy(figures: Mapping[str, Mapping], names: list[str]) -> str:
    if not names:
        return ""
    shares = ", ".join(f"{name} {figures[name].get('other_cpu', 0):.0%}" for name in names)
    return f"the machine was busy (other processes on the server's CPU: {shares})"


def missing_models(figures: Mapping[str, Mapping], needed: Iterable[str]) -> Verdict | None:
    """Inconclusive when a model the check needs was not measured (narrowed by --models)."""
    absent = [name for name in needed if name not in figures]
    if absent:
        return Verdict(
            INCONCLUSIVE, "not checked: needs " + ", ".join(absent) + " (narrowed by --models)"
        )
    return None


def rate_text(value: float) -> str:
    """`1,000 req/s`."""
    return f"{value:,.0f} req/s"


def ms_text(value: float) -> str:
    """`2.5 ms` below ten milliseconds, `250 ms` above."""
    return f"{value:,.1f} ms" if value < 10 else f"{value:,.0f} ms"


# -- a rate that follows a size (pool-bound, db-pool-bound) ----------------------------------


@dataclass(frozen=True)
class Proportional:
    """A rate that should follow a size: each run's size / its requests' wait (workers / sleep,
    database pool / query time), so that twice the size gives twice the rate."""

    size: str  # each run's key of its size: "workers"
    wait_ms: str  # the setup's key of each request's wait: "sleep_ms"
    label: str  # one run, by its size: "{} workers"
    rule: str  # the expectation in words: "workers / sleep"
    grown: str  # the size, in the problem when the rate does not follow it: "the workers"
    grown_ok: str  # the size, in the reason it holds: "the workers"
    tolerance: float

    def expected(self, run: Mapping, setup: Mapping) -> float:
        """The rate this run's size should give, in requests/s."""
        return run[self.size] / (setup[self.wait_ms] / 1000)


def follows_size(
    problems: Problems,
    name: str,
    runs: list[Mapping],
    rule: Proportional,
    setup: Mapping,
    each: Callable[[Mapping], None] | None = None,
) -> str:
    """Each run's rate within the tolerance of what its size should give, and twice the size
    twice the rate (runs sorted by size); the reason it holds. `each` adds a run's other
    problems, after its rate's."""
    for run in runs:
        expected = rule.expected(run, setup)
        if abs(run["rps"] / expected - 1) > rule.tolerance:
            problems.add(
                f"{rule.label.format(run[rule.size])}: {rate_text(run['rps'])}, "
                f"{run['rps'] / expected:.0%} of {rule.rule} = {rate_text(expected)} "
                f"(needs within {rule.tolerance:.0%})",
                name,
                # Too slow may be others' CPU; too fast never is.
                miss=(1 - rule.tolerance) * expected / run["rps"]
                if run["rps"] < expected
                else math.inf,
            )
        if each is not None:
            each(run)
    ok = ", ".join(
        f"{rule.label.format(run[rule.size])} {rate_text(run['rps'])} "
        f"({run['rps'] / rule.expected(run, setup):.0%} of {rule.rule})"
        for run in runs
    )
    if len(runs) >= 2:
        factor = runs[-1][rule.size] / runs[0][rule.size]
        ratio = runs[-1]["rps"] / max(runs[0]["rps"], 1e-9)
        if abs(ratio / factor - 1) > rule.tolerance:
            problems.add(
                f"{factor:g}x {rule.grown} gave {ratio:.2f}x the rate "
                f"(needs {factor:g}x within {rule.tolerance:.0%})",
                name,
                # Either run may have been slowed: the miss against the nearer bound.
                miss=(1 - rule.tolerance) * factor / max(ratio, 1e-9)
                if ratio < factor
                else ratio / ((1 + rule.tolerance) * factor),
            )
        ok += f"; {factor:g}x {rule.grown_ok}, {ratio:.2f}x the rate"
    return ok


# -- the database lessons --------------------------------------------------------------------


def no_database(setup: Mapping) -> Verdict | None:
    """Inconclusive when the run had no PostgreSQL to query (the reason says how to get one)."""
    problem = setup.get("database_unavailable")
    return Verdict(INCONCLUSIVE, f"not checked: {problem}") if problem else None


def add_errors(problems: Problems, name: str, figure: Mapping, what: str = "") -> None:
    """A /db answered with ERR (backend-busy, backend-unavailable) is a failed request."""
    if figure.get("errors"):
        problems.add(f"{name}{what} answered {figure['errors']:,} requests with an error", name)


def db_bound(setup: Mapping) -> float:
    """What the database pool allows: its connections / the query time, in requests/s."""
    return setup["db_pool"] / (setup["db_ms"] / 1000)


# -- the claims in numbers -------------------------------------------------------------------


def hypothesis_values(setup: Mapping, constants: Mapping[str, object]) -> dict[str, object]:
    """What any claim's template may name: the upper-case `constants` (a lesson module's
    thresholds) and this module's, the setup, and the figures derived from them that more than
    one lesson names."""
    values: dict[str, object] = {
        name: value
        for namespace in (globals(), constants)
        for name, value in namespace.items()
        if name.isupper() and name.isidentifier()
    }
    values.update(setup, event_loops=", ".join(EVENT_LOOPS))
    # Not measured (a setup built by hand): every CPU counts as free.
    values.setdefault("free_cores", float(setup.get("cpus") or setup.get("cores") or 1))
    if setup.get("db_ms") and isinstance(setup.get("db_pool"), int):
        values["db_bound"] = rate_text(db_bound(setup))
    return values
