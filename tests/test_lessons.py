"""python -m loadtest.lessons: arguments, verdicts on synthetic figures, the report, a real run."""

from __future__ import annotations

import json
import os
import re
import types
from pathlib import Path

import pytest

from loadtest.lessons import __main__ as cli
from loadtest.lessons import catalog, claims, report, rig
from loadtest.lessons.claims import (
    blocked_loop,
    closed_loop,
    cores,
    cpu_work,
    db_pool_bound,
    db_wait,
    io_wait,
    many_clients,
    pool_bound,
    undetected_io,
)
from loadtest.lessons.verdict import (
    EVENT_LOOPS,
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    OS_THREADS,
    POOL,
    switching_models,
)
from loadtest.tools import docfigures, postgres
from services import models
from tests.conftest import run_module

THREADS = OS_THREADS
LOOP = EVENT_LOOPS[0]
SWITCHING = switching_models()


# -- arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lessons", "no-such-lesson"], "unknown lesson no-such-lesson; choose from io-wait"),
        (["--lessons", "steady"], "unknown lesson steady"),  # a Locust scenario without a verdict
        (["--lessons", ","], "unknown lesson (none given)"),
        (
            ["--models", "no-such-model"],
            "unknown model no-such-model; choose from " + ", ".join(models.NAMES),
        ),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_narrowed_lessons_and_models_keep_the_canonical_order():
    args = cli.build_parser().parse_args(
        ["--lessons", "cores,io-wait", "--models", ",".join(reversed(models.NAMES))]
    )
    assert args.lessons == ["io-wait", "cores"]
    assert args.models == list(models.NAMES)


def test_every_checked_lesson_has_a_claim_a_check_and_a_chart():
    for lesson_id in claims.CHECKED_IDS:
        entry = claims.lesson(lesson_id)
        assert entry.claim and entry.title.startswith(lesson_id)
        lesson = claims.get(lesson_id)
        assert lesson_id == lesson.ID and all(hasattr(lesson, part) for part in claims.REQUIRED)
    # The check-only lessons stay out of the Locust scenario select.
    assert "cores" not in catalog.LESSONS_BY_ID and "closed-loop" not in catalog.LESSONS_BY_ID
    # The database lessons are checked too; Locust's presets of them are plugin/scenarios.py's.
    assert set(claims.DATABASE_IDS) == {"db-wait", "db-pool-bound", "undetected-io"}
    assert set(claims.DATABASE_IDS) <= set(claims.CHECKED_IDS)
    assert not set(claims.DATABASE_IDS) & set(catalog.LESSONS_BY_ID)


def test_a_lesson_module_without_a_part_of_the_interface_is_refused():
    incomplete = types.SimpleNamespace(
        **{part: getattr(io_wait, part) for part in claims.REQUIRED if part != "chart"}
    )
    with pytest.raises(TypeError, match="lacks chart"):
        claims._checked(incomplete)
    with pytest.raises(TypeError, match="share an id"):
        claims._checked(io_wait, io_wait)


@pytest.mark.parametrize(("interval", "extra_runs"), [(0.05, 2), (0.005, 0), (None, 0)])
def test_blocked_loop_measures_threads_at_cpythons_interval_only_if_the_server_sets_another(
    monkeypatch, interval, extra_runs
):
    monkeypatch.setattr(rig, "server_switch_interval", lambda: interval)
    work = rig.Work(10_000, 1_000_000, 100.0)
    plan = claims.plan("blocked-loop", list(models.NAMES), work, 2)
    assert len(plan.runs) == 2 * len(models.NAMES) + extra_runs
    flagged = [run for run in plan.runs if "--switch-interval" in run.server_args]
    assert len(flagged) == extra_runs
    assert all(run.model == THREADS for run in flagged)


# -- verdicts on synthetic figures -----------------------------------------------------------


def _quiet(**figures) -> dict:
    return {"noisy": False, "other_cpu": 0.02, **figures}


def _noisy(figure: dict) -> dict:
    return {**figure, "noisy": True, "other_cpu": 0.6}


IO_SETUP = {"connections": 100, "sleep_ms": 20, "pool_workers": 2}


def _io(switching_rps: float, pool_rps: float) -> dict:
    return {name: _quiet(rps=pool_rps if name == POOL else switching_rps) for name in models.NAMES}


def test_io_wait_holds_when_switching_overlaps_the_waits():
    verdict = io_wait.check(_io(4800, 99), IO_SETUP)
    assert verdict.verdict == HOLDS, verdict.reason
    assert "96% of the ideal" in verdict.reason


@pytest.mark.parametrize(
    ("switching_rps", "pool_rps", "why"),
    [
        (3000, 99, "60% of the ideal"),  # below 70 % of connections / sleep
        (4800, 600, "8.0x the pool"),  # not 10x the pool
    ],
)
def test_io_wait_fails(switching_rps, pool_rps, why):
    verdict = io_wait.check(_io(switching_rps, pool_rps), IO_SETUP)
    assert verdict.verdict == FAILS
    assert why in verdict.reason


def test_a_failure_on_noisy_figures_is_inconclusive_and_says_why():
    figures = _io(4800, 99)
    figures[SWITCHING[0]] = _noisy({**figures[SWITCHING[0]], "rps": 3000})
    verdict = io_wait.check(figures, IO_SETUP)
    assert verdict.verdict == INCONCLUSIVE
    assert "machine was busy" in verdict.reason and "60%" in verdict.reason


def test_a_failure_on_quiet_figures_fails_whatever_the_other_models_noise():
    figures = _io(4800, 99)
    figures[SWITCHING[0]]["rps"] = 3000
    figures[POOL] = _noisy(figures[POOL])  # noisy, but the 60 % is the quiet model's own
    assert io_wait.check(figures, IO_SETUP).verdict == FAILS


def test_a_pass_on_noisy_figures_holds_and_says_the_machine_was_busy():
    figures = _io(4800, 99)
    figures[POOL] = _noisy(figures[POOL])
    verdict = io_wait.check(figures, IO_SETUP)
    assert verdict.verdict == HOLDS
    assert "busy" in verdict.reason


def test_a_lesson_without_the_model_it_needs_is_not_checked():
    figures = {name: f for name, f in _io(4800, 99).items() if name != POOL}
    verdict = io_wait.check(figures, IO_SETUP)
    assert verdict.verdict == INCONCLUSIVE
    assert "needs pool" in verdict.reason


CPU_SETUP = {"connections": 100, "work_ms": 1.0}


def _cpu(rates: dict[str, float]) -> dict:
    return {name: _quiet(rps=rate) for name, rate in rates.items()}


def test_cpu_work_holds_at_one_cores_worth_each():
    rates = {name: 950 - 30 * index for index, name in enumerate(models.NAMES)}
    assert cpu_work.check(_cpu(rates), CPU_SETUP).verdict == HOLDS


def test_cpu_work_fails_when_switching_models_differ_or_pass_one_core():
    spread = {name: 950 for name in models.NAMES}
    spread[SWITCHING[0]] = 500
    verdict = cpu_work.check(_cpu(spread), CPU_SETUP)
    assert verdict.verdict == FAILS and "differ by 90%" in verdict.reason
    above = {name: 950 for name in models.NAMES}
    above[POOL] = 1900
    verdict = cpu_work.check(_cpu(above), CPU_SETUP)
    assert verdict.verdict == FAILS and "1.90 cores' worth" in verdict.reason


POOL_SETUP = {"connections": 20, "sleep_ms": 50, "pool_workers": [2, 4]}


def _pool_bound(rates: dict[int, float]) -> dict:
    runs = [_quiet(workers=workers, rps=rate) for workers, rate in rates.items()]
    return {
        POOL: {"runs": runs, "noisy": False, "other_cpu": 0.0},
        **{name: _quiet(rps=395, expected_rps=400) for name in SWITCHING},
    }


def test_pool_bound_holds_at_workers_over_sleep():
    verdict = pool_bound.check(_pool_bound({2: 39, 4: 78}), POOL_SETUP)
    assert verdict.verdict == HOLDS, verdict.reason
    assert "2x the workers, 2.00x the rate" in verdict.reason


@pytest.mark.parametrize(
    ("rates", "why"),
    [
        ({2: 39, 4: 40}, "2x the workers gave 1.03x the rate"),
        ({2: 20, 4: 40}, "50% of workers / sleep"),
    ],
)
def test_pool_bound_fails(rates, why):
    verdict = pool_bound.check(_pool_bound(rates), POOL_SETUP)
    assert verdict.verdict == FAILS
    assert why in verdict.reason


CORES_SETUP = {"connections": 100, "work_ms": 1.0, "pool_workers": 2, "cpus": 2, "cores": 2}


def _cores(pool_rps: float, pool_other: float = 0.05, threaded_other: float = 0.05) -> dict:
    figures = {
        name: _quiet(rps=950, server_cores=1.0, loadgen_cores=0.02, other_cores=0.05)
        for name in models.NAMES
    }
    figures[POOL] = _quiet(
        rps=pool_rps, server_cores=pool_rps / 1000, loadgen_cores=0.03, other_cores=pool_other
    )
    figures[THREADS]["other_cores"] = threaded_other
    return figures


def test_cores_holds_when_the_process_pool_uses_both_cores():
    verdict = cores.check(_cores(1800), CORES_SETUP)
    assert verdict.verdict == HOLDS
    assert "1.89x" in verdict.reason and "load generator" in verdict.reason


def test_cores_fails_when_two_quiet_cores_were_not_used():
    verdict = cores.check(_cores(1100), CORES_SETUP)
    assert verdict.verdict == FAILS and "needs 1.6x" in verdict.reason


def test_cores_says_when_the_machine_cannot_give_two_quiet_cores():
    verdict = cores.check(_cores(1100, pool_other=0.8), CORES_SETUP)
    assert verdict.verdict == INCONCLUSIVE
    assert "could not give 2 quiet cores" in verdict.reason
    busy_threaded = cores.check(_cores(1800, threaded_other=1.3), CORES_SETUP)
    assert busy_threaded.verdict == INCONCLUSIVE
    one_cpu = cores.check(_cores(1800), {**CORES_SETUP, "cpus": 1})
    assert one_cpu.verdict == INCONCLUSIVE and "needs 2" in one_cpu.reason


MANY_SETUP = {"connections": 1000, "window_s": 3.0}


def _many(answered: int) -> dict:
    return {
        name: _quiet(
            connections=1000,
            answered=1000,
            starved=False,
            longest_wait_s=0.35,
            longest_wait_unanswered=False,
        )
        for name in models.NAMES
    } | {
        THREADS: _quiet(
            connections=1000,
            answered=answered,
            starved=answered < 1000,
            longest_wait_s=3.4,
            longest_wait_unanswered=answered < 1000,
        )
    }


def test_many_clients_holds_when_every_connection_is_answered():
    verdict = many_clients.check(_many(1000), MANY_SETUP)
    assert verdict.verdict == HOLDS
    assert f"{THREADS} 3,400 ms" in verdict.reason


def test_many_clients_fails_on_a_starved_connection():
    verdict = many_clients.check(_many(352), MANY_SETUP)
    assert verdict.verdict == FAILS
    assert "answered 352/1000" in verdict.reason and "still waiting after 3.4 s" in verdict.reason


BLOCKED_SETUP = {
    "connections": 4,
    "work_ms": 100.0,
    "work_share": 0.02,
    "window_s": 3.0,
    "pool_workers": 2,
}


def _blocked(
    loop_p99: float = 250,
    threads_p99: float = 30,
    blocked: float | None = 2.5,
    alone: float = 0.5,
    cpython_p99: float | None = None,
) -> dict:
    figures = {name: _quiet(echo_p99_ms=400, echo_p99_alone_ms=1) for name in models.NAMES}
    for loop in EVENT_LOOPS:  # gevent, asyncio: each must show the blocked loop
        figures[loop] = _quiet(echo_p99_ms=loop_p99, echo_p99_alone_ms=alone)
        if blocked is not None:
            figures[loop].update(blocked_s=blocked, blocked_span_s=3.8)
    figures[THREADS] = _quiet(
        echo_p99_ms=threads_p99, echo_p99_alone_ms=0.4, switch_interval_s=0.05
    )
    if cpython_p99 is not None:
        figures[THREADS]["at_cpython_interval"] = _quiet(
            echo_p99_ms=cpython_p99, echo_p99_alone_ms=0.3, switch_interval_s=0.005
        )
    return figures


def test_blocked_loop_holds_when_the_loop_waits_and_threads_are_preempted():
    verdict = blocked_loop.check(_blocked(), BLOCKED_SETUP)
    assert verdict.verdict == HOLDS, verdict.reason
    assert "stays below it (switch interval 50 ms)" in verdict.reason


def test_blocked_loop_shows_the_trade_off_of_a_longer_switch_interval():
    verdict = blocked_loop.check(_blocked(threads_p99=160, cpython_p99=40), BLOCKED_SETUP)
    assert verdict.verdict == HOLDS, verdict.reason
    assert (
        "at CPython's 5 ms switch interval (40 ms), not at the server's 50 ms (160 ms)"
        in verdict.reason
        and "trade-off" in verdict.reason
    )


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"loop_p99": 60}, "below the /work time"),
        ({"alone": 40}, "only 6.2x its p99 without /work"),
        ({"threads_p99": 180}, "echo p99 180 ms (switch interval 50 ms) is not below"),
        (
            {"threads_p99": 180, "cpython_p99": 120},
            "180 ms (switch interval 50 ms), 120 ms at CPython's 5 ms is not below",
        ),
        ({"blocked": 0.0}, "did not rise"),
        ({"blocked": None}, "gave no arena_event_loop_blocked_seconds_total"),
    ],
)
def test_blocked_loop_fails(kwargs, why):
    verdict = blocked_loop.check(_blocked(**kwargs), BLOCKED_SETUP)
    assert verdict.verdict == FAILS
    assert why in verdict.reason


STALL_SETUP = {"connections": 10, "rate": 1000, "stall_ms": 500.0, "echo_bytes": 64}


def _stall(open_p99: float = 470, closed_p99: float = 2.5) -> dict:
    return {
        name: _quiet(
            open_p99_ms=open_p99,
            open_p50_ms=0.3,
            open_max_ms=510,
            open_rps=1000,
            offered_rps=1000,
            closed_p99_ms=closed_p99,
            closed_p50_ms=0.4,
            closed_max_ms=505,
            closed_rps=9000,
        )
        for name in models.NAMES
    }


def test_closed_loop_holds_when_only_the_open_loop_p99_shows_the_stall():
    verdict = closed_loop.check(_stall(), STALL_SETUP)
    assert verdict.verdict == HOLDS, verdict.reason
    assert "p99 470 ms open loop, 2.5 ms closed loop (its max 505 ms)" in verdict.reason
    assert "1,000 requests/s" in claims.hypothesis("closed-loop", STALL_SETUP)


@pytest.mark.parametrize(
    ("open_p99", "closed_p99", "why"),
    [(40, 2.5, "open-loop p99 40 ms is below 25%"), (470, 80, "closed-loop p99 80 ms is above")],
)
def test_closed_loop_fails(open_p99, closed_p99, why):
    verdict = closed_loop.check(_stall(open_p99, closed_p99), STALL_SETUP)
    assert verdict.verdict == FAILS and why in verdict.reason


def test_closed_loop_runs_each_model_open_and_closed_with_a_stall():
    work = rig.Work(10_000, 1_000_000, 100.0)
    plan = claims.plan("closed-loop", list(models.NAMES), work, cpus=2)
    assert [(run.model, run.variant) for run in plan.runs] == [
        (name, mode)
        for name in models.NAMES
        for mode in (closed_loop.OPEN_LOOP, closed_loop.CLOSED_LOOP)
    ]
    assert all(run.stall_s == closed_loop.STALL_S for run in plan.runs)
    assert [run.rate for run in plan.runs[:2]] == [closed_loop.STALL_RATE, 0.0]


# -- the database lessons --------------------------------------------------------------------

DB_SETUP = {"connections": 100, "db_ms": 20, "db_pool": 20, "pool_workers": 2}


def _db_wait(switching_rps: float = 960, pool_rps: float = 98) -> dict:
    return {
        name: _quiet(rps=pool_rps if name == POOL else switching_rps, errors=0)
        for name in models.NAMES
    }


def test_db_wait_holds_when_switching_reaches_the_database_pool():
    verdict = db_wait.check(_db_wait(), DB_SETUP)
    assert verdict.verdict == HOLDS, verdict.reason
    assert "of database pool / query time 1,000 req/s" in verdict.reason
    assert "the pool 98 req/s with 2 workers" in verdict.reason
    assert "(1,000 req/s)" in claims.hypothesis("db-wait", DB_SETUP)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"switching_rps": 600}, "60% of database pool / query time"),
        ({"pool_rps": 150}, "the pool's 150 req/s is above workers / query time 100 req/s"),
    ],
)
def test_db_wait_fails(kwargs, why):
    verdict = db_wait.check(_db_wait(**kwargs), DB_SETUP)
    assert verdict.verdict == FAILS
    assert why in verdict.reason


def test_db_wait_fails_on_database_errors_and_is_inconclusive_on_noise():
    figures = _db_wait()
    figures[SWITCHING[0]]["errors"] = 12
    verdict = db_wait.check(figures, DB_SETUP)
    assert verdict.verdict == FAILS and "12 requests with an error" in verdict.reason
    figures = _db_wait()
    figures[SWITCHING[0]] = _noisy({**figures[SWITCHING[0]], "rps": 500})
    assert db_wait.check(figures, DB_SETUP).verdict == INCONCLUSIVE


@pytest.mark.parametrize("lesson_id", ["db-wait", "db-pool-bound", "undetected-io"])
def test_a_database_lesson_without_postgresql_is_not_checked_and_says_how_to_get_one(lesson_id):
    setup = {**DB_SETUP, "database_unavailable": f"no PostgreSQL here: {postgres.INSTALL_HINT}"}
    verdict = claims.decide(lesson_id, {}, setup)
    assert verdict.verdict == INCONCLUSIVE
    assert "apt-get install postgresql" in verdict.reason


DB_POOL_SETUP = {"connections": 50, "db_ms": 20, "db_pool": [5, 10], "db_model": THREADS}


def _db_pool_bound(rates: dict[int, float]) -> dict:
    runs = [_quiet(db_pool=size, rps=rate, errors=0) for size, rate in rates.items()]
    return {THREADS: {"runs": runs, "noisy": False, "other_cpu": 0.0}}


def test_db_pool_bound_holds_at_pool_over_query_time():
    verdict = db_pool_bound.check(_db_pool_bound({5: 245, 10: 490}), DB_POOL_SETUP)
    assert verdict.verdict == HOLDS, verdict.reason
    assert "2x the pool, 2.00x the rate" in verdict.reason
    assert "pool of 5 and 10 connections" in claims.hypothesis("db-pool-bound", DB_POOL_SETUP)


@pytest.mark.parametrize(
    ("rates", "why"),
    [
        ({5: 245, 10: 260}, "2x the database pool gave 1.06x the rate"),
        ({5: 120, 10: 490}, "pool of 5: 120 req/s, 48% of pool / query time"),
    ],
)
def test_db_pool_bound_fails(rates, why):
    verdict = db_pool_bound.check(_db_pool_bound(rates), DB_POOL_SETUP)
    assert verdict.verdict == FAILS
    assert why in verdict.reason


UNDETECTED_SETUP = {
    "connections": 40,
    "db_ms": 20,
    "db_pool": 20,
    "db_share": 0.5,
    "helper_threads": {"asyncio": 6},
    "work_ms": 20.0,
}


def _driver_run(driver: str, rate: float, bound: float, p99: float, cpu: float, by: str) -> dict:
    key = "work_rps" if driver == undetected_io.WORK_REFERENCE else "db_rps"
    return _quiet(
        driver=driver,
        **{key: rate},
        bound_rps=bound,
        bound_by=by,
        of_bound=rate / bound,
        echo_p99_ms=p99,
        server_cores=cpu,
        errors=0,
    )


def _undetected(
    blocking_rps: float = 49,
    blocking_p99: float = 400,
    blocking_cpu: float = 0.03,
    fixed_rps: float = 280,
    default_rps: float = 900,
    fast_p99: float = 3.0,
) -> dict:
    figures = {}
    for name in EVENT_LOOPS:
        fixed_bound = 300 if name == "asyncio" else 1000
        runs = [
            _driver_run("blocking", blocking_rps, 50, blocking_p99, blocking_cpu, "one at a time"),
            _driver_run(
                "blocking-fixed", fixed_rps * fixed_bound / 300, fixed_bound, fast_p99, 0.2, "x"
            ),
            _driver_run("default", default_rps, 1000, fast_p99, 0.3, "database pool"),
            _driver_run(undetected_io.WORK_REFERENCE, 48, 50, 450, 0.97, "one core"),
        ]
        figures[name] = {"runs": runs, "noisy": False, "other_cpu": 0.02}
    return figures


def test_undetected_io_holds_when_the_blocking_driver_serialises_without_cpu():
    verdict = undetected_io.check(_undetected(), UNDETECTED_SETUP)
    assert verdict.verdict == HOLDS, verdict.reason
    assert "CPU 0.03 cores vs 0.97 blocked by /work" in verdict.reason
    claim = claims.hypothesis("undetected-io", UNDETECTED_SETUP)
    assert "asyncio 6 threads / 20 ms = 300 req/s" in claim
    assert "gevent 20 connections / 20 ms = 1,000 req/s" in claim


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"blocking_rps": 200}, "above 1.2x one query at a time (50 req/s)"),
        ({"blocking_p99": 5}, "with the blocking driver 5.0 ms is below the query time"),
        ({"blocking_cpu": 0.8}, "0.80 cores is not below 50% of its CPU blocked by /work"),
        ({"fixed_rps": 100}, "with the blocking-fixed driver answered 100 req/s /db, 33%"),
        ({"default_rps": 400}, "with the default driver answered 400 req/s /db, 40%"),
        ({"fast_p99": 15}, "echo p99 with the default driver 15 ms is not below 50%"),
    ],
)
def test_undetected_io_fails(kwargs, why):
    verdict = undetected_io.check(_undetected(**kwargs), UNDETECTED_SETUP)
    assert verdict.verdict == FAILS
    assert why in verdict.reason


def test_database_plans_give_their_servers_the_database_and_its_settings():
    work = rig.Work(10_000, 1_000_000, 100.0)
    names = list(models.NAMES)
    wait = claims.plan("db-wait", names, work, 2)
    assert [run.model for run in wait.runs] == names and wait.needs_database
    assert all(run.database and "--db-pool" in run.server_args for run in wait.runs)
    bound = claims.plan("db-pool-bound", names, work, 2)
    assert [run.variant for run in bound.runs] == ["db pool 5", "db pool 10"]
    assert {run.model for run in bound.runs} == {bound.setup["db_model"]} == {SWITCHING[0]}
    undetected = claims.plan("undetected-io", names, work, 2)
    assert {run.model for run in undetected.runs} == set(EVENT_LOOPS)
    variants = [run.variant for run in undetected.runs if run.model == LOOP]
    assert variants == [*undetected_io.DRIVERS, undetected_io.WORK_REFERENCE]
    # The /work run computes as long as a query waits, and needs no database.
    [computed] = [run for run in undetected.runs if run.model == LOOP and not run.database]
    assert undetected.setup["work_rounds"] == work.rounds_1ms * rig.DB_MS
    assert "--db-driver" not in computed.server_args
    assert not claims.plan("io-wait", names, work, 2).needs_database


def test_without_postgresql_the_database_lessons_are_inconclusive_and_the_run_goes_on(tmp_path):
    """A real run with no PostgreSQL binaries (ARENA_PG_BINDIR names an empty directory)."""
    empty = tmp_path / "no-postgres"
    empty.mkdir()
    result = run_module(
        "loadtest.lessons",
        *("--quick", "--lessons", "db-wait,undetected-io", "--out", str(tmp_path)),
        env={**os.environ, postgres.BINDIR_VARIABLE: str(empty)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "lessons.json").read_text())
    assert [entry["id"] for entry in data["lessons"]] == ["db-wait", "undetected-io"]
    for entry in data["lessons"]:
        assert entry["verdict"] == INCONCLUSIVE and entry["figures"] == {}
        assert "no PostgreSQL here" in entry["reason"] and "apt-get install" in entry["reason"]
    assert "not checked: no PostgreSQL here" in result.stderr


# -- report ----------------------------------------------------------------------------------


def _results(tmp_path: Path) -> dict:
    entries = []
    cases: dict[str, tuple[dict, dict]] = {
        "io-wait": (_io(4800, 99), IO_SETUP),
        "cpu-work": (_cpu(dict.fromkeys(models.NAMES, 950)), CPU_SETUP),
        "pool-bound": (_pool_bound({2: 39, 4: 78}), POOL_SETUP),
        "cores": (_cores(1800), CORES_SETUP),
        "many-clients": (_many(352), MANY_SETUP),
        "blocked-loop": (_blocked(threads_p99=160, cpython_p99=40), BLOCKED_SETUP),
        "closed-loop": (_stall(), STALL_SETUP),
        "db-wait": (_db_wait(), DB_SETUP),
        "db-pool-bound": (_db_pool_bound({5: 245, 10: 490}), DB_POOL_SETUP),
        "undetected-io": (_undetected(blocking_p99=5), UNDETECTED_SETUP),
    }
    for lesson_id, (figures, setup) in cases.items():
        figures = json.loads(json.dumps(figures))  # as lessons.json gives them back
        nested = [f["at_cpython_interval"] for f in figures.values() if "at_cpython_interval" in f]
        for figure in [*figures.values(), *nested]:
            figure.setdefault("rps", 500.0)
            figure.setdefault("p99_ms", 21.5)
            figure.setdefault("of_ideal", figure.get("rps", 0) / 5000)
            figure.setdefault("cores_worth", figure.get("rps", 0) / 1000)
            figure.setdefault("server_cores", 1.0)
            figure.setdefault("expected_rps", 400)
            figure.setdefault("of_expected", 0.98)
            figure.setdefault("requests_per_connection", {"min": 0, "median": 4, "max": 9})
            figure.setdefault("threads", 3)
            figure.setdefault("peak_rss_mib", 40.0)
            figure.setdefault("work_p50_ms", 101.0)
            figure.setdefault("bound_rps", 1000.0)
            figure.setdefault("of_bound", figure.get("rps", 0) / 1000)
            figure.setdefault("errors", 0)
            figure.setdefault("db_pool", 20)
            for run in figure.get("runs", []):
                size = run.get("workers") or run.get("db_pool") or 1
                run.setdefault("rps", 300.0)
                run.update(
                    p99_ms=500.0,
                    expected_rps=size * (20 if "workers" in run else 50),
                    of_expected=run["rps"] / (size * (20 if "workers" in run else 50)),
                )
        verdict = claims.decide(lesson_id, figures, setup)
        entries.append(
            {
                "id": lesson_id,
                "title": claims.lesson(lesson_id).title,
                "claim": claims.lesson(lesson_id).claim,
                "hypothesis": claims.hypothesis(lesson_id, setup),
                "verdict": verdict.verdict,
                "reason": verdict.reason,
                "setup": setup,
                "figures": figures,
                "reading": claims.reading(lesson_id, figures, setup),
            }
        )
    return {
        "when": "2026-12-02 10:00 UTC",
        "machine": {"cpu_model": "Test CPU", "cores": 2, "system": "Linux 6", "python": "3.11.7"},
        "pace": {"quick": False, "reps": 3, "duration_s": 3.0},
        "method": "each model alone.",
        "background": {"before": 0.02, "after": 0.03, "text": "quiet."},
        "lessons": entries,
    }


def test_report_prints_and_writes_every_lesson(tmp_path):
    results = _results(tmp_path)
    for entry in results["lessons"]:
        block = report.console_block(entry)
        for part in ("claim:", "hypothesis:", "figures:", "verdict:", entry["claim"]):
            assert part in block
        for model in entry["figures"]:
            assert model in block
        assert entry["reading"]
    summary = report.summary_table(results)
    assert re.search(r"many-clients +FAILS", summary) and re.search(r"io-wait +holds", summary)
    assert re.search(r"undetected-io +FAILS", summary) and re.search(r"db-wait +holds", summary)
    for entry in results["lessons"]:
        entry["chart"] = report.write_chart(entry, results, tmp_path)
        assert (tmp_path / f"{entry['id']}.png").stat().st_size > 10_000
    report.write_json(results, tmp_path)
    markdown = report.write_markdown(results, tmp_path).read_text()
    assert "**Verdict: FAILS**" in markdown and "![blocked-loop](blocked-loop.png)" in markdown
    assert json.loads((tmp_path / "lessons.json").read_text())["lessons"][0]["id"] == "io-wait"


def test_the_readme_section_is_written_from_lessons_json(tmp_path):
    results = _results(tmp_path)
    for entry in results["lessons"]:
        entry["chart"] = f"{entry['id']}.png"
    (tmp_path / "lessons").mkdir()
    report.write_json(results, tmp_path / "lessons")
    text = "intro\n<!-- figures:lessons:begin -->\nold\n<!-- figures:lessons:end -->\n"
    fresh = docfigures.render_text(text, docfigures.Sources(tmp_path))
    assert "Latest run: **2026-12-02 10:00 UTC" in fresh
    assert "| many-clients |" in fresh and "**FAILS**" in fresh
    assert "![cores](results/lessons/cores.png)" in fresh
    empty = docfigures.render_text(text, docfigures.Sources(tmp_path / "nothing"))
    assert docfigures.NO_LESSONS in empty


# -- a real run ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_quick_real_run_writes_figures_verdicts_and_a_chart(tmp_path):
    """Shape only: the verdict depends on how busy the machine is (the full run decides)."""
    narrowed = [name for name in models.NAMES if name in (THREADS, POOL)]
    result = run_module(
        "loadtest.lessons",
        *("--quick", "--lessons", "io-wait", "--models", ",".join(narrowed)),
        *("--out", str(tmp_path)),
        timeout=240,
    )
    assert result.returncode in (0, 1), result.stderr
    data = json.loads((tmp_path / "lessons.json").read_text())
    assert {"when", "machine", "lessons"} <= set(data)
    [entry] = data["lessons"]
    assert entry["id"] == "io-wait"
    assert entry["claim"] == catalog.get("io-wait").claim
    assert entry["verdict"] in (HOLDS, FAILS, INCONCLUSIVE)
    assert entry["reading"] and entry["reason"]
    assert set(entry["figures"]) == set(narrowed)
    for figure in entry["figures"].values():
        assert figure["rps"] > 0 and figure["p99_ms"] > 0
    assert (tmp_path / "io-wait.png").stat().st_size > 10_000
    assert (tmp_path / "lessons.md").exists()
    assert "[  2/2]" in result.stderr  # progress
    assert "claim:" in result.stdout and "verdict:" in result.stdout  # the lesson's block
    assert "lesson" in result.stdout.splitlines()[-2]  # the final summary table
    assert rig.QUICK.quick


def test_blocked_loop_fails_when_any_event_loop_does_not_show_the_block():
    figures = _blocked()
    last = EVENT_LOOPS[-1]
    figures[last] = _quiet(echo_p99_ms=2, echo_p99_alone_ms=1, blocked_s=0.0, blocked_span_s=3.8)
    verdict = blocked_loop.check(figures, BLOCKED_SETUP)
    assert verdict.verdict == FAILS, verdict.reason
    assert f"{last}'s echo p99" in verdict.reason and LOOP not in verdict.reason.split(";")[0]


@pytest.mark.slow
def test_a_quick_real_database_lesson_starts_postgresql_and_measures_the_pool(tmp_path):
    """Shape only, as above: one model at two database pool sizes against a real PostgreSQL."""
    try:
        postgres.find_bindir()
    except postgres.PostgresUnavailable as error:
        pytest.skip(str(error))
    result = run_module(
        "loadtest.lessons",
        *("--quick", "--lessons", "db-pool-bound", "--models", THREADS, "--out", str(tmp_path)),
        timeout=240,
    )
    assert result.returncode in (0, 1), result.stderr
    assert "a throwaway PostgreSQL on port" in result.stderr
    [entry] = json.loads((tmp_path / "lessons.json").read_text())["lessons"]
    assert entry["id"] == "db-pool-bound" and entry["reading"]
    assert entry["verdict"] in (HOLDS, FAILS, INCONCLUSIVE)
    assert "not checked" not in entry["reason"]  # measured: the database was there
    runs = entry["figures"][THREADS]["runs"]
    assert [run["db_pool"] for run in runs] == list(db_pool_bound.DB_POOL_SIZES)
    for run in runs:
        assert run["rps"] > 0 and run["errors"] == 0
    assert (tmp_path / "db-pool-bound.png").stat().st_size > 10_000
