"""Show the lessons' results: console blocks, lessons.json, lessons.md and one chart per lesson."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from loadtest.bench.report import _duration_label, _rate_label
from loadtest.lessons import checks
from loadtest.tools.cli import VERDICT_MARK, machine_line

VERDICT_COLOR = {checks.HOLDS: "#2ca02c", checks.FAILS: "#d62728", checks.INCONCLUSIVE: "#ff7f0e"}
BAR = "#1f77b4"
NOISY_BAR = "#9ecae1"
LIMIT = "#d62728"


def _ms(value: float) -> str:
    return f"{value:,.2f}" if value < 1 else f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _pct(value: float) -> str:
    return f"{value:.0%}"


def _noise(figure: Mapping) -> str:
    return f"{figure.get('other_cpu', 0):.0%}" + (" ⚠" if figure.get("noisy") else "")


Column = tuple[str, Callable[[Mapping], str]]
RPS: Column = ("req/s", lambda f: f"{f['rps']:,.0f}")
P99: Column = ("p99 ms", lambda f: _ms(f["p99_ms"]))
NOISE: Column = ("others on server CPU", _noise)
CPU_PER_REQUEST: Column = (
    "CPU ms per request",
    lambda f: f"{f['cpu_ms_per_request']:.2f}" if "cpu_ms_per_request" in f else "-",
)
COLUMNS: dict[str, list[Column]] = {
    "io-wait": [RPS, ("of ideal", lambda f: _pct(f["of_ideal"])), P99, NOISE],
    "cpu-work": [
        RPS,
        ("of one core's worth", lambda f: f"{f['cores_worth']:.2f}"),
        ("server CPU (cores)", lambda f: f"{f['server_cores']:.2f}"),
        CPU_PER_REQUEST,
        P99,
        NOISE,
    ],
    "pool-bound": [
        RPS,
        ("expected", lambda f: f"{f['expected_rps']:,.0f}"),
        ("of expected", lambda f: _pct(f["of_expected"])),
        P99,
        NOISE,
    ],
    "cores": [
        RPS,
        ("server CPU (cores)", lambda f: f"{f['server_cores']:.2f}"),
        CPU_PER_REQUEST,
        ("load generator (cores)", lambda f: f"{f['loadgen_cores']:.2f}"),
        ("others (cores)", lambda f: f"{f['other_cores']:.2f}" + (" ⚠" if f.get("noisy") else "")),
    ],
    "many-clients": [
        (
            "answered",
            lambda f: f"{f['answered']}/{f['connections']}" + (" ⚠" if f["starved"] else ""),
        ),
        (
            "longest wait",
            lambda f: (
                ("still waiting after " if f["longest_wait_unanswered"] else "")
                + f"{_ms(f['longest_wait_s'] * 1000)} ms"
            ),
        ),
        (
            "replies per connection",
            lambda f: "{min:,}\u2013{max:,}".format(**f["requests_per_connection"]),
        ),
        RPS,
        P99,
        ("threads", lambda f: f"{f['threads']:,}"),
        ("peak RSS MiB", lambda f: f"{f['peak_rss_mib']:.0f}"),
        NOISE,
    ],
    "blocked-loop": [
        ("echo p99 ms", lambda f: _ms(f["echo_p99_ms"])),
        ("echo p99 ms, no /work", lambda f: _ms(f["echo_p99_alone_ms"])),
        ("/work p50 ms", lambda f: _ms(f["work_p50_ms"])),
        ("loop blocked s", lambda f: f"{f['blocked_s']:.2f}" if "blocked_s" in f else "-"),
        RPS,
        NOISE,
    ],
    "closed-loop": [
        ("p99 ms, open loop", lambda f: _ms(f["open_p99_ms"])),
        ("p99 ms, closed loop", lambda f: _ms(f["closed_p99_ms"])),
        ("max ms, open loop", lambda f: _ms(f["open_max_ms"])),
        ("max ms, closed loop", lambda f: _ms(f["closed_max_ms"])),
        ("req/s open (offered)", lambda f: f"{f['open_rps']:,.0f} ({f['offered_rps']:,.0f})"),
        ("req/s closed", lambda f: f"{f['closed_rps']:,.0f}"),
        NOISE,
    ],
    "db-wait": [
        RPS,
        (
            "bound",
            lambda f: (
                f"{f['bound_rps']:,.0f} ("
                + (f"{f['workers']} workers" if "workers" in f else f"pool {f['db_pool']}")
                + ")"
            ),
        ),
        ("of bound", lambda f: _pct(f["of_bound"])),
        P99,
        ("errors", lambda f: f"{f['errors']:,}"),
        NOISE,
    ],
    "db-pool-bound": [
        RPS,
        ("expected", lambda f: f"{f['expected_rps']:,.0f}"),
        ("of expected", lambda f: _pct(f["of_expected"])),
        P99,
        ("errors", lambda f: f"{f['errors']:,}"),
        NOISE,
    ],
    "undetected-io": [
        ("/db (or /work) req/s", lambda f: f"{_slow_rps(f):,.0f}"),
        ("bound", lambda f: f"{f['bound_rps']:,.0f} ({f['bound_by']})"),
        ("echo p99 ms", lambda f: _ms(f["echo_p99_ms"])),
        ("server CPU (cores)", lambda f: f"{f['server_cores']:.2f}"),
        ("loop blocked s", lambda f: f"{f['blocked_s']:.2f}" if "blocked_s" in f else "-"),
        ("errors", lambda f: f"{f['errors']:,}"),
        NOISE,
    ],
}


def _slow_rps(figure: Mapping) -> float:
    """undetected-io: the rate of /db, or of /work in the run that computes instead."""
    return figure["db_rps"] if "db_rps" in figure else figure["work_rps"]


def _driver_label(model: str, figure: Mapping) -> str:
    """`gevent, blocking`, or `gevent, /work 20 ms` for the run that computes instead."""
    if figure["driver"] == checks.WORK_REFERENCE:
        return f"{model}, /work (blocked-loop)"
    return f"{model}, {figure['driver']}"


def rows(lesson: str, figures: Mapping[str, Mapping]) -> list[tuple[str, Mapping]]:
    """(label, figure) per table row: one per model, one per pool size in pool-bound."""
    out: list[tuple[str, Mapping]] = []
    for model, figure in figures.items():
        if lesson == "pool-bound" and "runs" in figure:
            out += [(f"{model}, {run['workers']} workers", run) for run in figure["runs"]]
        elif lesson == "db-pool-bound" and "runs" in figure:
            out += [(f"{model}, db pool {run['db_pool']}", run) for run in figure["runs"]]
        elif lesson == "undetected-io" and "runs" in figure:
            out += [(_driver_label(model, run), run) for run in figure["runs"]]
        elif lesson == "blocked-loop" and figure.get("at_cpython_interval"):
            out += [
                (f"{model}, switch {_interval_ms(part)}", part)
                for part in (figure, figure["at_cpython_interval"])
            ]
        else:
            out.append((model, figure))
    return out


def _interval_ms(figure: Mapping) -> str:
    interval = figure.get("switch_interval_s")
    return f"{interval * 1000:g} ms" if interval else "?"


def table(lesson: str, figures: Mapping[str, Mapping]) -> list[list[str]]:
    """Header row then one row per model (or pool size)."""
    columns = COLUMNS[lesson]
    body = [
        [label] + [render(figure) for _, render in columns]
        for label, figure in rows(lesson, figures)
    ]
    return [["model"] + [name for name, _ in columns], *body]


# -- readings --------------------------------------------------------------------------------


def _join(parts: list[str]) -> str:
    return ", ".join(parts) if parts else "(no model measured)"


def _switching(figures: Mapping[str, Mapping]) -> dict[str, Mapping]:
    """The figures of the models that switch between connections (all but the pool)."""
    return {name: figures[name] for name in checks.switching_models(figures)}


def _io_wait_reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """io-wait: the switching models overlap the waits, the pool waits a few at a time."""
    text = (
        f"Every /sleep holds what runs it for {setup['sleep_ms']} ms. A thread or "
        f"greenlet per connection overlaps the {setup['connections']} waits: "
        + _join(
            [
                f"{name} {f['rps']:,.0f} req/s ({_pct(f['of_ideal'])} of the ideal)"
                for name, f in _switching(figures).items()
            ]
        )
        + "."
    )
    pool = figures.get(checks.POOL)
    if pool:
        text += (
            f" The pool runs each request on one of its {setup['pool_workers']} "
            f"workers, so only {setup['pool_workers']} wait at a time: "
            f"{pool['rps']:,.0f} req/s, and a p99 of {_ms(pool['p99_ms'])} ms spent "
            "queueing for a worker."
        )
    return text


def _cpu_work_reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """cpu-work: no model does more than one core's worth; what is left is cost per request."""
    return (
        f"Each /work computes {setup['work_ms']:.2f} ms holding the GIL; on one core, "
        "threads and greenlets only take turns, so no model does more than one core's "
        "worth: "
        + _join(
            [
                f"{name} {f['rps']:,.0f} req/s ({f['cores_worth']:.2f} of a core's worth)"
                for name, f in figures.items()
            ]
        )
        + ". What is left between them is each model's cost per request, not "
        "concurrency: the server CPU per request shows it (with many threads waiting "
        "for the GIL, hand-overs cost a share of the core)."
    )


def _pool_bound_reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """pool-bound: the pool's rate follows its size; the switching models serve everyone."""
    text = f"{setup['connections']} connections each ask for a {setup['sleep_ms']} ms wait. "
    pool = figures.get(checks.POOL)
    if pool:
        text += (
            "The pool's rate follows its size: "
            + _join(
                [
                    f"{run['workers']} workers {run['rps']:,.0f} req/s (expected "
                    f"{run['expected_rps']:,.0f})"
                    for run in pool["runs"]
                ]
            )
            + "; the other requests queue. "
        )
    switching = _switching(figures)
    if switching:
        text += (
            "A thread or greenlet per connection serves every connection at once: "
            + _join(
                [
                    f"{name} {f['rps']:,.0f} req/s of {f['expected_rps']:,.0f}"
                    for name, f in switching.items()
                ]
            )
            + "."
        )
    return text.strip()


def _cores_reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """cores: the cores each model used for its rate."""
    return (
        f"The server got {setup['cores']} cores. "
        + _join(
            [
                f"{name} used {f['server_cores']:.2f} cores for {f['rps']:,.0f} req/s"
                for name, f in figures.items()
            ]
        )
        + ". Worker processes each hold their own GIL and compute in parallel; a thread "
        "per connection or one event loop computes on one core at a time, whatever the "
        "cores. The load generator shared the cores and its CPU is reported separately."
    )


def _many_clients_reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """many-clients: who was answered, the longest wait, threads and memory per model."""
    return (
        f"{setup['connections']} connections send echo without pause. "
        + _join(
            [
                f"{name}: {f['answered']}/{f['connections']} answered, longest wait "
                f"{_ms(f['longest_wait_s'] * 1000)} ms, {f['threads']:,} threads, "
                f"{f['peak_rss_mib']:.0f} MiB"
                for name, f in figures.items()
            ]
        )
        + ". A thread per connection costs a thread and its stack each, and the GIL must "
        "hand over between them; a greenlet or a reactor slot costs almost nothing."
    )


def _blocked_loop_reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """blocked-loop: the event loops' echo waits for /work, threads' for a slice, the pool's
    for a worker."""
    text = f"{setup['work_share']:.0%} of requests compute {setup['work_ms']:.0f} ms. "
    for name in checks.EVENT_LOOPS:
        loop = figures.get(name)
        if not loop:
            continue
        text += (
            f"{name} runs one connection's code at a time on its loop: an echo that "
            f"arrives during /work waits for it, so its echo p99 is "
            f"{_ms(loop['echo_p99_ms'])} ms (without /work {_ms(loop['echo_p99_alone_ms'])}"
            f" ms) and its probe saw the loop blocked {loop.get('blocked_s', 0):.1f} s of a "
            f"{loop.get('blocked_span_s', 0):.1f} s run. "
        )
    threads = figures.get(checks.OS_THREADS)
    if threads:
        parts = [threads, threads.get("at_cpython_interval") or {}]
        p99s = " and ".join(
            f"{_ms(part['echo_p99_ms'])} ms at a {_interval_ms(part)} switch interval"
            for part in parts
            if part
        )
        text += (
            f"{checks.OS_THREADS}: the OS runs every thread, and the long request's "
            "thread must hand over the GIL each switch interval, so an echo waits for "
            f"a slice, not the whole /work: p99 {p99s}. "
        )
    pool = figures.get(checks.POOL)
    if pool:
        text += (
            f"The pool's echo requests wait for one of its {setup['pool_workers']} "
            f"busy workers: p99 {_ms(pool['echo_p99_ms'])} ms."
        )
    return text.strip()


def _closed_loop_reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """closed-loop: every request due during the stall timed, against once per connection."""
    stall = setup["stall_ms"]
    return (
        f"Each server stopped for {stall:.0f} ms. On the timetable "
        f"({setup['rate']:,} requests/s) about {setup['rate'] * stall / 1000:,.0f} requests "
        "fell due during the stall and each waited from when it was due: "
        + _join([f"{name} p99 {_ms(f['open_p99_ms'])} ms" for name, f in figures.items()])
        + ". The closed loop sent nothing while its "
        f"{setup['connections']} connections waited, so only {setup['connections']} requests "
        "saw the stall: "
        + _join(
            [
                f"{name} p99 {_ms(f['closed_p99_ms'])} ms (max {_ms(f['closed_max_ms'])} ms)"
                for name, f in figures.items()
            ]
        )
        + "."
    )


def _db_wait_reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """db-wait: the switching models wait for their queries without holding the core; the
    pool's workers wait one query each."""
    text = (
        f"Every /db holds one of the server's {setup['db_pool']} database connections for "
        f"{setup['db_ms']} ms, so {setup['connections']} connections can get at most "
        f"{checks.db_bound(setup):,.0f} answers a second. A thread, greenlet or coroutine per "
        "connection waits for its query without holding the core: "
        + _join(
            [
                f"{name} {f['rps']:,.0f} req/s ({_pct(f['of_bound'])} of it)"
                for name, f in _switching(figures).items()
            ]
        )
        + "."
    )
    pool = figures.get(checks.POOL)
    if pool:
        text += (
            f" The pool's {setup['pool_workers']} workers each wait for one query at a "
            f"time: {pool['rps']:,.0f} req/s of at most {pool['bound_rps']:,.0f}, the other "
            f"connections queueing for a worker (p99 {_ms(pool['p99_ms'])} ms)."
        )
    return text


def _db_pool_bound_reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """db-pool-bound: the rate per database pool size."""
    name = setup.get("db_model", "")
    figure = figures.get(name)
    if not figure:
        return "(no model measured)"
    return (
        f"{setup['connections']} connections each send /db {setup['db_ms']} to {name}, whose "
        "database pool lets only so many queries run at once; the others wait for a "
        "connection: "
        + _join(
            [
                f"a pool of {run['db_pool']} {run['rps']:,.0f} req/s (expected "
                f"{run['expected_rps']:,.0f}, p99 {_ms(run['p99_ms'])} ms)"
                for run in figure["runs"]
            ]
        )
        + ". However cheaply the model switches, the pool's size sets the rate."
    )


def _undetected_io_reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """undetected-io: per event loop, blocking against /work (CPU side by side), then the
    drivers that overlap the queries again."""
    parts = [
        _undetected_loop_reading(name, figures[name], setup)
        for name in checks.EVENT_LOOPS
        if figures.get(name)
    ]
    return " ".join(parts) if parts else "(no model measured)"


def _undetected_loop_reading(name: str, figure: Mapping, setup: Mapping) -> str:
    """undetected-io, one event loop: its blocking driver's reading, then its fixes'."""
    runs = {run["driver"]: run for run in figure["runs"]}
    text = f"{name}: "
    blocking = runs.get(checks.BLOCKING)
    if blocking:
        text += _blocking_reading(blocking, runs.get(checks.WORK_REFERENCE), setup)
    fixes = [
        f"{driver} {run['db_rps']:,.0f} /db a second ({_pct(run['of_bound'])} of the "
        f"{run['bound_rps']:,.0f} set by its {run['bound_by']}), echo p99 "
        f"{_ms(run['echo_p99_ms'])} ms"
        for driver, run in runs.items()
        if driver in (checks.BLOCKING_FIXED, checks.DEFAULT_DRIVER)
    ]
    if fixes:
        text += "A driver it can switch around overlaps the queries again: " + "; ".join(fixes)
        text += "."
    return text.strip()


def _blocking_reading(blocking: Mapping, work: Mapping | None, setup: Mapping) -> str:
    """undetected-io, --db-driver blocking: one query at a time, echo behind it, little CPU
    (against /work in place of /db when measured)."""
    text = (
        f"with --db-driver blocking its loop waits inside each query, so it answers "
        f"{blocking['db_rps']:,.0f} /db a second (one {setup['db_ms']} ms query at a "
        f"time: {1000 / setup['db_ms']:,.0f}) and an echo waits behind them: p99 "
        f"{_ms(blocking['echo_p99_ms'])} ms"
        + (
            f", the loop blocked {blocking['blocked_s']:.1f} s of "
            f"{blocking.get('blocked_span_s', 0):.1f} s"
            if "blocked_s" in blocking
            else ""
        )
        + f". Its CPU: {blocking['server_cores']:.2f} cores"
    )
    if work:
        text += (
            f", against {work['server_cores']:.2f} with /work of "
            f"{setup['work_ms']:.0f} ms in place of /db (blocked-loop's block, echo p99 "
            f"{_ms(work['echo_p99_ms'])} ms): the same stalled loop, but waiting, not "
            "computing, so a CPU graph shows nothing wrong"
        )
    return text + ". "


# Each lesson's reading: what its figures say, in a few sentences.
READINGS: dict[str, Callable[[Mapping[str, Mapping], Mapping], str]] = {
    "io-wait": _io_wait_reading,
    "cpu-work": _cpu_work_reading,
    "pool-bound": _pool_bound_reading,
    "cores": _cores_reading,
    "many-clients": _many_clients_reading,
    "blocked-loop": _blocked_loop_reading,
    "closed-loop": _closed_loop_reading,
    "db-wait": _db_wait_reading,
    "db-pool-bound": _db_pool_bound_reading,
    "undetected-io": _undetected_io_reading,
}


def reading(lesson: str, figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """What the figures say, in a few sentences."""
    read = READINGS.get(lesson)
    return read(figures, setup) if read else ""


# -- console ---------------------------------------------------------------------------------


def _aligned(cells: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]


def console_block(entry: Mapping) -> str:
    """One lesson as printed: claim, hypothesis, figures per model, verdict with its reason."""
    lines = [
        f"== {entry['title']}",
        f"claim:      {entry['claim']}",
        f"hypothesis: {entry['hypothesis']}",
        "figures:",
    ]
    if entry["figures"]:
        lines += ["  " + line for line in _aligned(table(entry["id"], entry["figures"]))]
    lines.append(f"verdict:    {VERDICT_MARK[entry['verdict']]} — {entry['reason']}")
    return "\n".join(lines)


def summary_table(results: Mapping) -> str:
    """The final table: one line per lesson with its verdict."""
    cells = [["lesson", "verdict", "reason"]]
    for entry in results["lessons"]:
        reason = entry["reason"] if len(entry["reason"]) <= 110 else entry["reason"][:107] + "..."
        cells.append([entry["id"], VERDICT_MARK[entry["verdict"]], reason])
    widths = [max(len(row[i]) for row in cells) for i in range(2)]
    return "\n".join(
        f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}" for row in cells
    )


# -- files -----------------------------------------------------------------------------------


def write_json(results: Mapping, directory: Path) -> Path:
    """lessons.json: every lesson's claim, verdict, figures and reading."""
    path = directory / "lessons.json"
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    return path


def markdown_table(cells: list[list[str]]) -> list[str]:
    """A Markdown table, first column left, the others right-aligned."""
    return [
        "| " + " | ".join(cells[0]) + " |",
        "|---|" + "--:|" * (len(cells[0]) - 1),
        *("| " + " | ".join(row) + " |" for row in cells[1:]),
    ]


def write_markdown(results: Mapping, directory: Path) -> Path:
    """lessons.md: per lesson the claim, hypothesis, figures, verdict, reading and chart."""
    lines = [
        "# Socket Arena lessons, checked in isolation",
        "",
        f"- **When / where:** {machine_line(results)}.",
        f"- **How:** {results['method']}",
        f"- **Machine load:** {results['background']['text']}",
        "",
        "| lesson | verdict |",
        "|---|---|",
        *(
            f"| [{entry['id']}](#{entry['id']}) | {VERDICT_MARK[entry['verdict']]} |"
            for entry in results["lessons"]
        ),
        "",
    ]
    for entry in results["lessons"]:
        lines += [
            f"## {entry['id']}",
            "",
            f"**Claim.** {entry['claim']}",
            "",
            f"**Hypothesis.** {entry['hypothesis']}",
            "",
            *(markdown_table(table(entry["id"], entry["figures"])) if entry["figures"] else []),
            "",
            f"**Verdict: {VERDICT_MARK[entry['verdict']]}** — {entry['reason']}.",
            "",
            f"**Reading.** {entry['reading']}",
            "",
        ]
        if entry.get("chart"):
            lines += [f"![{entry['id']}]({entry['chart']})", ""]
    path = directory / "lessons.md"
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
    return path


# -- charts ----------------------------------------------------------------------------------


def write_chart(entry: Mapping, results: Mapping, directory: Path) -> str | None:
    """<id>.png for one lesson; returns the file name (None without figures)."""
    if not entry["figures"]:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    from matplotlib import pyplot

    draw = CHARTS[entry["id"]]
    panels = PANELS.get(entry["id"], 1)
    figure, axes = pyplot.subplots(
        1, panels, figsize=({1: 8, 2: 11, 3: 15}[panels], 4.4), squeeze=False
    )
    draw(list(axes.flat), entry)
    verdict = VERDICT_MARK[entry["verdict"]]
    figure.suptitle(
        f"{entry['title']} — {verdict}", color=VERDICT_COLOR[entry["verdict"]], fontsize=11
    )
    figure.text(0.5, 0.01, machine_line(results), ha="center", fontsize=7)
    figure.tight_layout(rect=(0, 0.04, 1, 0.95))
    name = f"{entry['id']}.png"
    figure.savefig(directory / name, dpi=100)
    pyplot.close(figure)
    return name


def _bars(
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


def _limit(axis, value: float, text: str, color: str = LIMIT) -> None:
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


def _marks(axis, values: list[float]) -> None:
    """A short red mark across each bar at its value (what the row should reach)."""
    for index, value in enumerate(values):
        axis.plot([value] * 2, [index - 0.4, index + 0.4], color=LIMIT, linewidth=2)


def _against_expected(axis, pairs: list[tuple[str, Mapping]], note: str, title: str) -> None:
    """Each row's rate as a bar, marked in red where its expected rate lies; `note` says how
    the expectation is reckoned."""
    expected = [f["expected_rps"] for _, f in pairs]
    _bars(
        axis,
        [label for label, _ in pairs],
        [f["rps"] for _, f in pairs],
        [f["noisy"] for _, f in pairs],
        "requests / s",
        lambda v: f"{v:,.0f}",
        reach=expected,
    )
    _marks(axis, expected)
    axis.text(0.99, 0.5, note, color=LIMIT, fontsize=7, ha="right", transform=axis.transAxes)
    axis.set_title(title, fontsize=9)


def _legend_line(axis, value: float, label: str) -> None:
    """A dashed red vertical line at `value`, named in the legend."""
    axis.axvline(value, color=LIMIT, linestyle="--", linewidth=1, label=label)


def _log_durations(axis) -> None:
    """A log-scale x axis labelled in durations (its values in microseconds)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(FuncFormatter(_duration_label))
    axis.xaxis.set_minor_formatter(NullFormatter())


def _unlabelled_bars(
    axis, labels: list[str], values: list[float], noisy: list[bool], fmt: Callable[[float], str]
) -> None:
    """Horizontal bars beside another panel's (their labels left blank), noisy ones lighter,
    each with its value."""
    axis.barh(labels, values, color=[NOISY_BAR if flag else BAR for flag in noisy])
    for index, value in enumerate(values):
        axis.text(value, index, fmt(value), va="center", fontsize=8)
    axis.invert_yaxis()
    axis.set_yticks(range(len(labels)), [""] * len(labels))


def _chart_io_wait(axes, entry: Mapping) -> None:
    figures, setup = entry["figures"], entry["setup"]
    labels = [f"{m} ({f['workers']} workers)" if "workers" in f else m for m, f in figures.items()]
    values = [f["rps"] for f in figures.values()]
    _bars(
        axes[0],
        labels,
        values,
        [f["noisy"] for f in figures.values()],
        "requests / s",
        lambda v: f"{v:,.0f}",
    )
    ideal = setup["connections"] / (setup["sleep_ms"] / 1000)
    _limit(axes[0], ideal, f"ideal {ideal:,.0f}", "grey")
    _limit(axes[0], checks.IO_IDEAL_SHARE * ideal, f"{checks.IO_IDEAL_SHARE:.0%} of ideal")
    axes[0].set_title(
        f"/sleep {setup['sleep_ms']} ms, {setup['connections']} connections, server on one core",
        fontsize=9,
    )


def _chart_cpu_work(axes, entry: Mapping) -> None:
    figures, setup = entry["figures"], entry["setup"]
    values = [f["rps"] for f in figures.values()]
    _bars(
        axes[0],
        list(figures),
        values,
        [f["noisy"] for f in figures.values()],
        "requests / s",
        lambda v: f"{v:,.0f}",
    )
    worth = 1000 / setup["work_ms"]
    _limit(axes[0], worth, f"one core's worth {worth:,.0f}", "grey")
    axes[0].set_title(
        f"/work {setup['work_ms']:.2f} ms, {setup['connections']} connections, server on one core",
        fontsize=9,
    )


def _chart_pool_bound(axes, entry: Mapping) -> None:
    setup = entry["setup"]
    _against_expected(
        axes[0],
        rows("pool-bound", entry["figures"]),
        "red: expected, workers (or connections) / sleep",
        f"/sleep {setup['sleep_ms']} ms, {setup['connections']} connections, server on one core",
    )


def _chart_cores(axes, entry: Mapping) -> None:
    figures, setup = entry["figures"], entry["setup"]
    cores = iter([f["server_cores"] for f in figures.values()])
    _bars(
        axes[0],
        list(figures),
        [f["rps"] for f in figures.values()],
        [f["noisy"] for f in figures.values()],
        "requests / s",
        lambda v: f"{v:,.0f}, {next(cores):.2f} cores used",
    )
    worth = 1000 / setup["work_ms"]
    _limit(axes[0], worth, "one core", "grey")
    _limit(axes[0], setup["cores"] * worth, f"{setup['cores']} cores", "grey")
    axes[0].set_title(
        f"/work {setup['work_ms']:.2f} ms, {setup['connections']} connections, "
        f"server on {setup['cores']} cores (load generator shares them)",
        fontsize=9,
    )


def _chart_many_clients(axes, entry: Mapping) -> None:
    figures, setup = entry["figures"], entry["setup"]
    names = list(figures)
    shares = [100 * f["answered"] / max(1, f["connections"]) for f in figures.values()]
    colors = [LIMIT if f["starved"] else BAR for f in figures.values()]
    axes[0].barh(names, shares, color=colors)
    axes[0].invert_yaxis()
    for index, figure in enumerate(figures.values()):
        axes[0].text(
            2,
            index,
            f"{figure['answered']}/{figure['connections']}",
            va="center",
            fontsize=8,
            color="white",
        )
    axes[0].set_xlim(0, 100)
    axes[0].set_xlabel("connections answered in the window (%)")
    axes[0].set_title(f"echo, {setup['connections']} connections, server on one core", fontsize=9)
    waits = [f["longest_wait_s"] * 1e6 for f in figures.values()]
    axes[1].scatter(waits, range(len(names)), color=colors, s=40)
    for index, figure in enumerate(figures.values()):
        still = "still waiting " if figure["longest_wait_unanswered"] else ""
        axes[1].text(
            waits[index],
            index,
            f"  {still}{_ms(figure['longest_wait_s'] * 1e3)} ms",
            va="center",
            fontsize=8,
        )
    axes[1].set_yticks(range(len(names)), names)
    axes[1].set_ylim(len(names) - 0.5, -0.5)
    _log_durations(axes[1])
    axes[1].set_xlim(min(waits) / 3, max(waits) * 10)
    axes[1].set_xlabel("longest wait of any request (log scale)")
    axes[1].set_title("longest wait per model", fontsize=9)
    axes[1].grid(axis="x", alpha=0.3)


def _chart_blocked_loop(axes, entry: Mapping) -> None:
    figures, setup = entry["figures"], entry["setup"]
    pairs = rows("blocked-loop", figures)
    names = [label for label, _ in pairs]
    positions = range(len(names))
    with_work = [f["echo_p99_ms"] * 1e3 for _, f in pairs]
    alone = [f["echo_p99_alone_ms"] * 1e3 for _, f in pairs]
    axis = axes[0]
    axis.barh([p - 0.2 for p in positions], alone, height=0.4, color="#9ecae1", label="echo only")
    axis.barh(
        [p + 0.2 for p in positions],
        with_work,
        height=0.4,
        color=BAR,
        label=f"with {setup['work_share']:.0%} /work",
    )
    for position, value in zip(positions, with_work, strict=True):
        axis.text(value, position + 0.2, f" {_ms(value / 1e3)} ms", va="center", fontsize=8)
    axis.set_yticks(list(positions), names)
    axis.invert_yaxis()
    _log_durations(axis)
    _legend_line(axis, setup["work_ms"] * 1e3, f"the /work time, {setup['work_ms']:.0f} ms")
    axis.set_xlim(min([*alone, *with_work]) / 3, max([*with_work, setup["work_ms"] * 1e3]) * 40)
    axis.set_xlabel("echo p99 (log scale)")
    axis.set_title(f"echo p99, {setup['connections']} connections, server on one core", fontsize=9)
    axis.legend(fontsize=7, loc="upper right")
    blocked = [
        (name, f["blocked_s"], f.get("blocked_span_s", 0.0))
        for name, f in figures.items()
        if "blocked_s" in f
    ]
    axis = axes[1]
    if blocked:
        axis.bar(
            [name for name, _, _ in blocked],
            [span for _, _, span in blocked],
            color="#dddddd",
            label="the run (connect, warm-up, window)",
        )
        axis.bar(
            [name for name, _, _ in blocked],
            [value for _, value, _ in blocked],
            color=BAR,
            width=0.5,
            label="event loop blocked",
        )
        for index, (_, value, span) in enumerate(blocked):
            share = f" ({value / span:.0%})" if span else ""
            axis.text(index, value, f"{value:.2f} s{share}", ha="center", va="bottom", fontsize=8)
        axis.set_ylim(0, max(span for _, _, span in blocked) * 1.25 or 1)
        axis.legend(fontsize=7, loc="upper right")
    axis.set_ylabel("seconds")
    axis.set_title("arena_event_loop_blocked_seconds_total: its rise during one run", fontsize=9)


def _chart_closed_loop(axes, entry: Mapping) -> None:
    figures, setup = entry["figures"], entry["setup"]
    names = list(figures)
    positions = range(len(names))
    closed = [max(f["closed_p99_ms"], 0.001) * 1e3 for f in figures.values()]
    opened = [max(f["open_p99_ms"], 0.001) * 1e3 for f in figures.values()]
    axis = axes[0]
    axis.barh(
        [p - 0.2 for p in positions], closed, height=0.4, color="#9ecae1", label="closed loop"
    )
    axis.barh([p + 0.2 for p in positions], opened, height=0.4, color=BAR, label="open loop")
    for position, value in zip(positions, opened, strict=True):
        axis.text(value, position + 0.2, f" {_ms(value / 1e3)} ms", va="center", fontsize=8)
    for position, value in zip(positions, closed, strict=True):
        axis.text(value, position - 0.2, f" {_ms(value / 1e3)} ms", va="center", fontsize=8)
    axis.set_yticks(list(positions), names)
    axis.invert_yaxis()
    _log_durations(axis)
    stall_us = setup["stall_ms"] * 1e3
    _legend_line(axis, stall_us, f"the stall, {setup['stall_ms']:g} ms")
    axis.set_xlim(min([*closed, *opened]) / 3, max([*opened, stall_us]) * 40)
    axis.set_xlabel("p99 (log scale)")
    axis.set_title(
        f"p99 of one stall, {setup['connections']} connections; open loop at "
        f"{setup['rate']:,} requests/s",
        fontsize=9,
    )
    axis.legend(fontsize=7, loc="upper right")


def _chart_db_wait(axes, entry: Mapping) -> None:
    figures, setup = entry["figures"], entry["setup"]
    labels = [f"{m} ({f['workers']} workers)" if "workers" in f else m for m, f in figures.items()]
    _bars(
        axes[0],
        labels,
        [f["rps"] for f in figures.values()],
        [f["noisy"] for f in figures.values()],
        "requests / s",
        lambda v: f"{v:,.0f}",
    )
    bound = checks.db_bound(setup)
    _limit(axes[0], bound, f"database pool / query time {bound:,.0f}", "grey")
    _limit(axes[0], checks.DB_IDEAL_SHARE * bound, f"{checks.DB_IDEAL_SHARE:.0%} of it")
    axes[0].set_title(
        f"/db {setup['db_ms']} ms, {setup['connections']} connections, database pool "
        f"{setup['db_pool']}, server on one core",
        fontsize=9,
    )


def _chart_db_pool_bound(axes, entry: Mapping) -> None:
    setup = entry["setup"]
    _against_expected(
        axes[0],
        rows("db-pool-bound", entry["figures"]),
        "red: expected, database pool / query time",
        f"/db {setup['db_ms']} ms, {setup['connections']} connections, server on one core",
    )


def _chart_undetected_io(axes, entry: Mapping) -> None:
    setup = entry["setup"]
    pairs = rows("undetected-io", entry["figures"])
    labels = [label for label, _ in pairs]
    noisy = [f["noisy"] for _, f in pairs]
    bounds = [f["bound_rps"] for _, f in pairs]
    _bars(
        axes[0],
        labels,
        [_slow_rps(f) for _, f in pairs],
        noisy,
        "/db (or /work) requests / s",
        lambda v: f"{v:,.0f}",
        reach=bounds,
    )
    _marks(axes[0], bounds)
    axes[0].set_title(
        "rate; red: its bound (one at a time, helper threads, pool, one core)", fontsize=9
    )
    p99s = [max(f["echo_p99_ms"], 0.001) * 1e3 for _, f in pairs]
    axis = axes[1]
    _unlabelled_bars(axis, labels, p99s, noisy, lambda v: f" {_ms(v / 1e3)} ms")
    _log_durations(axis)
    axis.set_xlim(min(p99s) / 3, max([*p99s, setup["db_ms"] * 1e3]) * 20)
    _legend_line(axis, setup["db_ms"] * 1e3, f"the query time, {setup['db_ms']} ms")
    axis.legend(fontsize=7, loc="lower right")
    axis.set_xlabel("echo p99 (log scale)")
    axis.set_title(f"echo p99, {setup['connections']} connections, /db or /work half", fontsize=9)
    cores = [f["server_cores"] for _, f in pairs]
    axis = axes[2]
    _unlabelled_bars(axis, labels, cores, noisy, lambda v: f" {v:.2f}")
    axis.set_xlim(0, max([*cores, 1.0]) * 1.25)
    axis.set_xlabel("server CPU (cores)")
    axis.set_title("server CPU: waiting blocks the loop without computing", fontsize=9)
    axis.grid(axis="x", alpha=0.3)


# Charts of more than one panel (side by side).
PANELS: dict[str, int] = {"many-clients": 2, "blocked-loop": 2, "undetected-io": 3}
CHARTS: dict[str, Callable] = {
    "io-wait": _chart_io_wait,
    "cpu-work": _chart_cpu_work,
    "pool-bound": _chart_pool_bound,
    "cores": _chart_cores,
    "many-clients": _chart_many_clients,
    "blocked-loop": _chart_blocked_loop,
    "closed-loop": _chart_closed_loop,
    "db-wait": _chart_db_wait,
    "db-pool-bound": _chart_db_pool_bound,
    "undetected-io": _chart_undetected_io,
}
