"""The lessons with a verdict, one module each, in the order they run and print; found by id.

Each module holds one lesson whole: its claim in numbers, what it runs, the figures it keeps,
its verdict, its reading, its table and its chart. Every one has the parts `Claim` names (checked
when this package is imported); the optional ones get their defaults here. The measuring is
`loadtest.lessons.rig`'s, the verdict rules they share `loadtest.lessons.verdict`'s and the
table and chart helpers `loadtest.lessons.charts`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from loadtest.lessons import rig, verdict
from loadtest.lessons.catalog import Lesson
from loadtest.lessons.charts import Column, Rows, one_row_per_model
from loadtest.lessons.claims import (
    blocked_loop,
    closed_loop,
    cores,
    cpu_work,
    db_pool_bound,
    db_wait,
    gil_tax,
    io_wait,
    many_clients,
    pool_bound,
    processes_x_coroutines,
    undetected_io,
)


class Claim(Protocol):
    """What a lesson module defines, in this order. Optional, with their defaults here:
    `hypothesis_values(setup)` (what its HYPOTHESIS names beyond verdict.hypothesis_values;
    nothing), `settle(figure)` (on each model's figure once every run is in; nothing),
    `rows(figures)` (its table's rows; one per model) and `PANELS` (its chart's; 1)."""

    ID: str  # `io-wait`
    DATABASE: bool  # do its servers query PostgreSQL?
    LESSON: Lesson  # its catalog entry: title and claim
    HYPOTHESIS: str  # the claim in numbers: a template over its setup and thresholds
    COLUMNS: list[Column]  # its table's columns, after the row's label

    def plan(self, models: Sequence[str], work: rig.Work, cpus: int) -> rig.Planned:
        """Its setup and its runs over the chosen models."""

    def add_figures(
        self, figure: dict, run: rig.Run, summary: Mapping, base: dict, setup: Mapping
    ) -> None:
        """One run's figures, added to its model's figure."""

    def check(self, figures: Mapping[str, Mapping], setup: Mapping) -> verdict.Verdict:
        """Its verdict on the figures."""

    def reading(self, figures: Mapping[str, Mapping], setup: Mapping) -> str:
        """What the figures say, in a few sentences."""

    def chart(self, axes: list, entry: Mapping) -> None:
        """Its chart of one lessons.json entry, on PANELS axes side by side."""


REQUIRED: tuple[str, ...] = tuple(
    dict.fromkeys(
        name for name in (*Claim.__annotations__, *vars(Claim)) if not name.startswith("_")
    )
)


def _checked(*lessons: Claim) -> tuple[Claim, ...]:
    """The lesson modules, each found to have every part Claim requires and its own id."""
    for lesson in lessons:
        missing = [name for name in REQUIRED if not hasattr(lesson, name)]
        if missing:
            raise TypeError(f"{lesson!r} lacks {', '.join(missing)} (see Claim)")
    ids = [lesson.ID for lesson in lessons]
    if len(set(ids)) != len(ids):
        raise TypeError(f"two lessons share an id: {ids}")
    return lessons


# The lessons with a verdict, in the order they run and print.
LESSONS: tuple[Claim, ...] = _checked(
    io_wait,
    cpu_work,
    gil_tax,
    pool_bound,
    cores,
    processes_x_coroutines,
    many_clients,
    blocked_loop,
    closed_loop,
    db_wait,
    db_pool_bound,
    undetected_io,
)
CHECKED_IDS: tuple[str, ...] = tuple(lesson.ID for lesson in LESSONS)
# The lessons that query PostgreSQL: `python -m loadtest.lessons` starts one for them.
DATABASE_IDS: tuple[str, ...] = tuple(lesson.ID for lesson in LESSONS if lesson.DATABASE)
_BY_ID: Mapping[str, Claim] = {lesson.ID: lesson for lesson in LESSONS}


def get(lesson_id: str) -> Claim:
    """The module of the lesson called `lesson_id`; KeyError names the choices."""
    try:
        return _BY_ID[lesson_id]
    except KeyError:
        raise KeyError(
            f"unknown lesson {lesson_id!r}; choose from {', '.join(CHECKED_IDS)}"
        ) from None


def lesson(lesson_id: str) -> Lesson:
    """The catalog entry of a checked lesson (the check-only ones included)."""
    return get(lesson_id).LESSON


def plan(lesson_id: str, models: Sequence[str], work: rig.Work, cpus: int) -> rig.Plan:
    """The runs of one lesson over the chosen models."""
    claim = get(lesson_id)
    setup, runs = claim.plan(models, work, cpus)
    return rig.Plan(claim.ID, setup, runs, needs_database=claim.DATABASE)


def _settle_nothing(figure: dict) -> None:
    """The default `settle`: a model's figure is complete once its runs are in."""


def figures(plan_: rig.Plan, results: Mapping[rig.Run, dict]) -> dict[str, dict]:
    """Per model, the figures the lesson's check reads, from its runs' measurements."""
    claim = get(plan_.lesson)
    settle = getattr(claim, "settle", _settle_nothing)
    return rig.figures(plan_, results, claim.add_figures, settle)


def hypothesis(lesson_id: str, setup: Mapping) -> str:
    """The claim of one lesson in numbers, for this setup."""
    claim = get(lesson_id)
    values = verdict.hypothesis_values(setup, vars(claim))
    own = getattr(claim, "hypothesis_values", None)
    if own is not None:
        values.update(own(setup))
    return claim.HYPOTHESIS.format_map(values)


def decide(lesson_id: str, figures: Mapping[str, Mapping], setup: Mapping) -> verdict.Verdict:
    """The verdict of one lesson."""
    return get(lesson_id).check(figures, setup)


def reading(lesson_id: str, figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """What the figures say, in a few sentences."""
    return get(lesson_id).reading(figures, setup)


def rows(lesson_id: str, figures: Mapping[str, Mapping]) -> Rows:
    """(label, figure) per table row: one per model unless the lesson says otherwise."""
    return getattr(get(lesson_id), "rows", one_row_per_model)(figures)


def panels(lesson_id: str) -> int:
    """How many panels the lesson's chart has, side by side."""
    return getattr(get(lesson_id), "PANELS", 1)
