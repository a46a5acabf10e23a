"""The shared pieces of a lesson's table, reading and chart: formats, columns, chart helpers.

Each lesson module (`loadtest.lessons.claims`) builds its table columns, its reading and its
chart from these; `loadtest.lessons.report` writes them out. matplotlib is imported only when a
chart is drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from loadtest.bench.report import _duration_label, _rate_label

BAR = "#1f77b4"
NOISY_BAR = "#9ecae1"
LIMIT = "#d62728"


def ms_number(value: float) -> str:
    """Milliseconds without the unit: `0.25`, `21.5`, `250`."""
    return f"{value:,.2f}" if value < 1 else f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def percent(value: float) -> str:
    """`96%`."""
    return f"{value:.0%}"


def joined(parts: list[str]) -> str:
    """The parts of a reading, comma-separated (or that no model was measured)."""
    return ", ".join(parts) if parts else "(no model measured)"


def _noise(figure: Mapping) -> str:
    return f"{figure.get('other_cpu', 0):.0%}" + (" ⚠" if figure.get("noisy") else "")


# -- table columns ---------------------------------------------------------------------------

Column = tuple[str, Callable[[Mapping], str]]  # a column's header and how a figure reads in it
RPS: Column = ("req/s", lambda f: f"{f['rps']:,.0f}")
P99: Column = ("p99 ms", lambda f: ms_number(f["p99_ms"]))
NOISE: Column = ("others on server CPU", _noise)
CPU_PER_REQUEST: Column = (
    "CPU ms per request",
    lambda f: f"{f['cpu_ms_per_request']:.2f}" if "cpu_ms_per_request" in f else "-",
)
SERVER_CORES: Column = ("server CPU (cores)", lambda f: f"{f['server_cores']:.2f}")
EXPECTED: Column = ("expected", lambda f: f"{f['expected_rps']:,.0f}")
OF_EXPECTED: Column = ("of expected", lambda f: percent(f["of_expected"]))
ERRORS: Column = ("errors", lambda f: f"{f['errors']:,}")
ECHO_P99: Column = ("echo p99 ms", lambda f: ms_number(f["echo_p99_ms"]))
LOOP_BLOCKED: Column = (
    "loop blocked s",
    lambda f: f"{f['blocked_s']:.2f}" if "blocked_s" in f else "-",
)

Rows = list[tuple[str, Mapping]]  # (label, figure) per table row


def one_row_per_model(figures: Mapping[str, Mapping]) -> Rows:
    """(model, figure) per model: a lesson's table rows unless it says otherwise."""
    return list(figures.items())


def one_row_per_run(figures: Mapping[str, Mapping], label: Callable[[str, Mapping], str]) -> Rows:
    """A row per run of a figure made of runs (pool sizes, drivers), labelled by `label`
    (model, run); a model measured once keeps its one row."""
    out: Rows = []
    for model, figure in figures.items():
        if "runs" in figure:
            out += [(label(model, run), run) for run in figure["runs"]]
        else:
            out.append((model, figure))
    return out


# -- chart helpers ---------------------------------------------------------------------------


def bars(
    axis,
    labels: list[str],
    values: list[float],
    noisy: list[bool],
    unit: str,
    fmt: Callable[[float], str],
    reach: list[float] | None = None,
) -> None:
    """Horizontal bars with their values; noisy ones lighter. `reach`: where each label may
    start (past a marker drawn on the bar)."""
    from matplotlib.ticker import FuncFormatter

    colors = [NOISY_BAR if flag else BAR for flag in noisy]
    axis.barh(labels, values, color=colors)
    axis.invert_yaxis()
    axis.set_xlabel(unit)
    axis.xaxis.set_major_formatter(FuncFormatter(_rate_label))
    starts = reach or values
    for index, value in enumerate(values):
        axis.text(
            max(value, starts[index]),
            index,
            " " + fmt(value) + ("  (noisy ⚠)" if noisy[index] else ""),
            va="center",
            fontsize=8,
        )
    axis.set_xlim(0, max([*values, *starts, 1]) * 1.35)
    axis.grid(axis="x", alpha=0.3)
    if any(noisy):
        from matplotlib.patches import Patch

        axis.legend(
            handles=[Patch(color=NOISY_BAR, label="noisy: other processes took the server's CPU")],
            fontsize=7,
            loc="lower right",
        )


def model_rates(
    axis, figures: Mapping[str, Mapping], fmt: Callable[[float], str] = lambda v: f"{v:,.0f}"
) -> None:
    """Each model's rate as a bar (the pool's labelled with its workers when they count)."""
    bars(
        axis,
        [f"{m} ({f['workers']} workers)" if "workers" in f else m for m, f in figures.items()],
        [f["rps"] for f in figures.values()],
        [f["noisy"] for f in figures.values()],
        "requests / s",
        fmt,
    )


def limit(axis, value: float, text: str, color: str = LIMIT) -> None:
    """A dashed vertical line with its label written along it, inside the axes."""
    from matplotlib.transforms import blended_transform_factory

    low, high = axis.get_xlim()
    if axis.get_xscale() == "linear" and value * 1.1 > high:
        axis.set_xlim(low, value * 1.1)  # the line and its label stay inside the axes
    axis.axvline(value, color=color, linestyle="--", linewidth=1)
    where = blended_transform_factory(axis.transData, axis.transAxes)
    axis.text(
        value,
        0.98,
        text + " ",
        color=color,
        fontsize=7,
        rotation=90,
        ha="right",
        va="top",
        transform=where,
    )


def marks(axis, values: list[float]) -> None:
    """A short red mark across each bar at its value (what the row should reach)."""
    for index, value in enumerate(values):
        axis.plot([value] * 2, [index - 0.4, index + 0.4], color=LIMIT, linewidth=2)


def row_bars(
    axis,
    pairs: Rows,
    key: str = "rps",
    unit: str = "requests / s",
    fmt: Callable[[float], str] = lambda v: f"{v:,.0f}",
    reach: list[float] | None = None,
) -> None:
    """One bar per table row (label, figure): the figure's `key`, noisy rows lighter."""
    bars(
        axis,
        [label for label, _ in pairs],
        [figure[key] for _, figure in pairs],
        [figure["noisy"] for _, figure in pairs],
        unit,
        fmt,
        reach,
    )


def against_expected(axis, pairs: list[tuple[str, Mapping]], note: str, title: str) -> None:
    """Each row's rate as a bar, marked in red where its expected rate lies; `note` says how
    the expectation is reckoned."""
    expected = [f["expected_rps"] for _, f in pairs]
    row_bars(axis, pairs, reach=expected)
    marks(axis, expected)
    axis.text(0.99, 0.5, note, color=LIMIT, fontsize=7, ha="right", transform=axis.transAxes)
    axis.set_title(title, fontsize=9)


def legend_line(axis, value: float, label: str) -> None:
    """A dashed red vertical line at `value`, named in the legend."""
    axis.axvline(value, color=LIMIT, linestyle="--", linewidth=1, label=label)


def log_durations(axis) -> None:
    """A log-scale x axis labelled in durations (its values in microseconds)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(FuncFormatter(_duration_label))
    axis.xaxis.set_minor_formatter(NullFormatter())


def unlabelled_bars(
    axis, labels: list[str], values: list[float], noisy: list[bool], fmt: Callable[[float], str]
) -> None:
    """Horizontal bars beside another panel's (their labels left blank), noisy ones lighter,
    each with its value."""
    axis.barh(labels, values, color=[NOISY_BAR if flag else BAR for flag in noisy])
    for index, value in enumerate(values):
        axis.text(value, index, fmt(value), va="center", fontsize=8)
    axis.invert_yaxis()
    axis.set_yticks(range(len(labels)), [""] * len(labels))
