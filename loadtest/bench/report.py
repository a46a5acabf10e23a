"""Write the benchmark's results: bench.json, bench.md and PNG charts."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from loadtest.bench.harness import NOISY_OTHER_FRACTION, starved_text, wait_text

KIND_COLORS = {"ours": "#1f77b4", "no-metrics": "#9ecae1", "textbook": "#ff7f0e"}
FAMILY_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#d62728", "#8c564b")
KIND_NAMES = {"ours": "ours", "no-metrics": "ours, metrics off", "textbook": "textbook"}
CHARTS = ("throughput.png", "latency.png", "resources.png", "fairness.png")
# Only when a `/db` scenario ran: CPU per request of each server and of PostgreSQL.
DATABASE_CHART = "database.png"


def machine_info() -> dict:
    """Which machine ran the benchmark: CPU model, cores, memory, kernel, Python."""
    import psutil

    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "usable_cpus": sorted(os.sched_getaffinity(0)),
        "memory_bytes": psutil.virtual_memory().total,
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
    }


def machine_line(meta: dict) -> str:
    """One line saying where, when and how the figures were measured."""
    machine = meta["machine"]
    return (
        f"{meta['date']} · {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['memory_bytes'] / 2**30:.0f} GiB, {machine['system']}, "
        f"Python {machine['python']} · {meta['pinning']} · median of {meta['reps']} runs of "
        f"{meta['duration_s']:g} s"
    )


def write_json(results: dict, directory: Path) -> Path:
    """bench.json: everything, repetitions included."""
    path = directory / "bench.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def _by_key(results: dict) -> dict[tuple[str, str], dict]:
    return {(run["scenario"], run["target"]): run for run in results["runs"]}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def comparisons(results: dict) -> list[dict]:
    """Per scenario and family: ours vs textbook and the cost of metrics (req/s)."""
    runs = _by_key(results)
    rows = []
    for scenario in results["scenarios"]:
        for family in results["families"]:
            ours = runs.get((scenario, family))
            if ours is None:
                continue
            off = runs.get((scenario, family + " (metrics off)"))
            textbook = runs.get((scenario, family + " textbook"))
            rps = ours["median"]["rps"]
            cpu = ours["median"]["server_cpu_us_per_request"]
            rows.append(
                {
                    "scenario": scenario,
                    "family": family,
                    "vs_textbook": _ratio(rps, textbook["median"]["rps"]) if textbook else None,
                    "metrics_cost": (1 - rps / off["median"]["rps"])
                    if off and off["median"]["rps"]
                    else None,
                    # The same two comparisons in server CPU per request (higher is better for
                    # ours: textbook CPU / our CPU; cost: extra CPU per request with metrics on).
                    "vs_textbook_cpu": _ratio(textbook["median"]["server_cpu_us_per_request"], cpu)
                    if textbook
                    else None,
                    "metrics_cost_cpu": (cpu / off["median"]["server_cpu_us_per_request"] - 1)
                    if off and off["median"]["server_cpu_us_per_request"]
                    else None,
                }
            )
    return rows


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _fmt_cost(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.1f} %"


def _fmt_other(median: dict) -> str:
    share = median.get("other_cpu_fraction", 0.0)
    return f"{share:.0%}" + (" ⚠ noisy" if share > NOISY_OTHER_FRACTION else "")


def _fmt_us(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _has_fairness(median: dict) -> bool:
    """Results written before the fairness figures existed have none: show dashes."""
    return "answered_connections" in median


def _fmt_answered(median: dict) -> str:
    if not _has_fairness(median):
        return "-"
    text = f"{median['answered_connections']}/{median['connections']}"
    return text + " ⚠" if median["starved"] else text


def _fmt_per_connection(median: dict) -> str:
    if not _has_fairness(median):
        return "-"
    return (
        f"{median['requests_per_connection_min']:,}\u2013{median['requests_per_connection_max']:,}"
    )


def _fmt_wait(median: dict) -> str:
    if not _has_fairness(median):
        return "-"
    wait = wait_text(median["longest_wait_s"])
    return f"still waiting after {wait}" if median["longest_wait_unanswered"] else wait


def _fmt_database(median: dict) -> str:
    """The postgres CPU cells of a `/db` row: seconds (share of one core), µs per request."""
    if "postgres_cpu_s" not in median:
        return "- | - | "
    return (
        f"{median['postgres_cpu_s']:.2f} s ({median['postgres_cpu_fraction']:.0%}) | "
        f"{median['postgres_cpu_us_per_request']:,.1f} | "
    )


def starved_lines(results: dict, scenario: str | None = None) -> list[str]:
    """One warning per starved (scenario, target), optionally of one scenario only."""
    titles = {name: info["title"] for name, info in results["scenarios"].items()}
    lines = []
    for run in results["runs"]:
        median = run["median"]
        if scenario not in (None, run["scenario"]) or not median.get("starved"):
            continue
        where = "" if scenario else f" ({titles.get(run['scenario'], run['scenario'])})"
        runs = f"{median['starved_reps']} of {len(run['reps'])} runs"
        lines.append(f"⚠ {run['target']}{where}: {starved_text(median)} ({runs} starved)")
    return lines


def write_markdown(results: dict, directory: Path) -> Path:
    """bench.md: one table per scenario, the comparison tables, and the charts."""
    comparison = {(row["scenario"], row["family"]): row for row in comparisons(results)}
    lines = _method_lines(results["meta"]) + _status_lines(results)
    for scenario in results["scenarios"]:
        lines += _scenario_table(results, scenario, comparison)
    lines += _comparison_tables(results, comparison)
    lines += _servers_and_charts(results)
    path = directory / "bench.md"
    path.write_text("\n".join(lines))
    return path


def _method_lines(meta: dict) -> list[str]:
    """The heading and the bullets saying how the figures were measured."""
    return [
        "# Socket Arena benchmark",
        "",
        f"- **When / where:** {machine_line(meta)}; warm-up {meta['warmup_s']:g} s per run.",
        f"- **Load generator:** `loadtest/bench/loadgen.c`, closed loop, one request in flight "
        f"per connection, every reply checked. Against a C epoll echo server it reached "
        f"{meta['ceiling']['rps']:,.0f} req/s using {meta['ceiling']['loadgen_cpu_fraction']:.0%}"
        f" of its core (echo 64 B, 100 conns): that is this rig's ceiling."
        if meta.get("ceiling")
        else "- **Load generator:** `loadtest/bench/loadgen.c`.",
        f"- **/work size:** {meta['work_rounds']:,} rounds ≈ "
        f"{meta['work_rounds'] * meta['work_round_ns'] / 1e6:.2f} ms of CPU here.",
        f"- **Mix:** {meta['mix']}.",
        "- Latency in µs from the load generator's histogram (≤ 0.4 % error); server CPU "
        "includes pool worker processes (share of one core in brackets); RSS is summed over "
        "the server and its workers; errors are summed over all runs. *loadgen CPU* is the load "
        "generator's share of its core (above "
        f"{meta['loadgen_saturation_threshold']:.0%} the rate is flagged: the load generator, "
        "not the server, may be the limit). *other on server CPU* is CPU time on the server's "
        "core(s) not used by the server (interrupts, other processes; above "
        f"{NOISY_OTHER_FRACTION:.0%} a run is measured again, up to {meta['noisy_retries']} "
        "times, keeping the quietest attempt; still above it, it is flagged as noisy).",
        "- **Fairness:** every connection sends its first request at one fixed start and nothing "
        "waits for a connection to be served before measuring. *answered* is the connections "
        "that got at least one reply in the measured window (of N); *req/conn* the fewest and "
        "most replies one connection got; *longest wait* the longest any request waited, "
        'counting requests never answered at their age at the end ("still waiting after"). '
        "These three are from the worst run, not the median. A run in which any connection got "
        "no reply is **starved** and flagged ⚠.",
        *_several_processes_lines(meta),
    ]


def _several_processes_lines(meta: dict) -> list[str]:
    """The bullet about the rows of several processes, when the run had any."""
    several = meta.get("several_processes")
    if not several:
        return []
    return [
        f"- **{', '.join(several['families'])}:** the model with `--processes "
        f"{several['processes']}` (services/supervisor.py), the {several['pinning']}: one CPU "
        "would keep its processes on one core. *loadgen CPU* is then the load generator's CPU "
        "on those shared CPUs (a share of one core), and *other on server CPU* leaves it out; "
        "compare these rows' rates with the same model's on its one core, not with the "
        "textbooks."
    ]


def _status_lines(results: dict) -> list[str]:
    """The bullets about this run: its PostgreSQL, skipped scenarios and starved runs."""
    lines = []
    if results["meta"].get("postgres"):
        database = results["meta"]["postgres"]
        lines.append(
            f"- **/db:** one throwaway PostgreSQL {database['version']} for the run "
            f"(`loadtest/tools/postgres.py`, {database['pinning']}), each server holding up to "
            f"{database['db_pool']} connections (a process worker: 1). *postgres CPU* is the CPU "
            "of the postmaster and all its backends in the same window as the server's; the "
            "textbook servers have no database, so the /db tables compare our models only."
        )
    for name, why in results.get("skipped_scenarios", {}).items():
        lines.append(f"- **{name} {why}**")
    starved = starved_lines(results)
    lines += (
        [f"- **{line}**" for line in starved]
        if starved
        else ["- No run starved a connection: every connection was answered in every window."]
    )
    lines.append("")
    return lines


def _scenario_table(results: dict, scenario: str, comparison: dict) -> list[str]:
    """One scenario's section: its table of servers and its starved warnings."""
    runs = _by_key(results)
    info = results["scenarios"][scenario]
    database = bool(info.get("database"))
    lines = [f"## {info['title']}", ""]
    lines.append(
        "| server | req/s | p50 µs | p99 µs | p99.9 µs | errors | answered | req/conn | "
        "longest wait | server CPU | CPU µs/req | "
        + ("postgres CPU | postgres µs/req | " if database else "")
        + "peak RSS | threads | loadgen CPU | other on server CPU | vs textbook | "
        "metrics cost |"
    )
    lines.append("|---|" + "--:|" * (18 if database else 16))
    for target in results["targets"]:
        run = runs.get((scenario, target["name"]))
        if run is None:
            continue
        row = comparison.get((scenario, target["name"]), {})
        lines.append(_server_row(target["name"], run["median"], row, database))
    lines.append("")
    for line in starved_lines(results, scenario):
        lines += [f"> **{line}**", ""]
    return lines


def _server_row(name: str, median: dict, row: dict, database: bool) -> str:
    """One server's row of a scenario table."""
    latency = median["latency_us"]
    rps = f"{median['rps']:,.0f}"
    if median["loadgen_saturated"]:
        rps += " ⚠ load generator saturated"
    return (
        f"| {name} | {rps} | {_fmt_us(latency['p50'])} | "
        f"{_fmt_us(latency['p99'])} | {_fmt_us(latency['p999'])} | {median['errors']} | "
        f"{_fmt_answered(median)} | {_fmt_per_connection(median)} | {_fmt_wait(median)} | "
        f"{median['server_cpu_s']:.2f} s ({median['server_cpu_fraction']:.0%}) | "
        f"{median['server_cpu_us_per_request']:,.1f} | "
        + (_fmt_database(median) if database else "")
        + f"{median['peak_rss_bytes'] / 2**20:.0f} MiB | {median['threads']:.0f} | "
        f"{median['loadgen_cpu_fraction']:.0%} | {_fmt_other(median)} | "
        f"{_fmt_ratio(row.get('vs_textbook'))} | "
        f"{_fmt_cost(row.get('metrics_cost'))} |"
    )


# The comparison tables of bench.md: title, key in a comparisons() row, cell format.
COMPARISON_TABLES = (
    ("Ours vs textbook (req/s, metrics on; ≥ 1.00x is the target)", "vs_textbook", _fmt_ratio),
    (
        "Cost of metrics (req/s lost with metrics on; ≤ 10 % is the target)",
        "metrics_cost",
        _fmt_cost,
    ),
    (
        "Ours vs textbook in server CPU per request (textbook CPU/req ÷ ours; ≥ 1.00x: ours "
        "is cheaper)",
        "vs_textbook_cpu",
        _fmt_ratio,
    ),
    (
        "Cost of metrics in server CPU per request (extra CPU/req with metrics on)",
        "metrics_cost_cpu",
        _fmt_cost,
    ),
)


def _comparison_tables(results: dict, comparison: dict) -> list[str]:
    """One table per COMPARISON_TABLES entry: a row per model, a column per scenario."""
    scenario_names = list(results["scenarios"])
    lines = []
    for title, key, fmt in COMPARISON_TABLES:
        lines += [
            f"## {title}",
            "",
            "| model | " + " | ".join(scenario_names) + " |",
            "|---|" + "--:|" * len(scenario_names),
        ]
        for family in results["families"]:
            cells = [
                fmt(comparison.get((scenario, family), {}).get(key)) for scenario in scenario_names
            ]
            lines.append(f"| {family} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _servers_and_charts(results: dict) -> list[str]:
    """The list of servers with their commands, then the charts."""
    lines = ["## Servers", ""]
    lines += [f"- **{target['name']}**: {target['command']}" for target in results["targets"]]
    lines.append("")
    for chart in results.get("charts", []):
        lines += [f"![{chart}]({chart})", ""]
    return lines


def write_charts(results: dict, directory: Path) -> list[str]:
    """throughput.png, latency.png, resources.png and fairness.png, and database.png after a
    `/db` scenario; returns the file names (none when nothing was measured)."""
    if not results["runs"]:
        return []
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    _write_throughput_chart(results, directory / "throughput.png")
    _write_latency_chart(results, directory / "latency.png")
    _write_resources_chart(results, directory / "resources.png")
    write_fairness_chart(results, directory / "fairness.png")
    if write_database_chart(results, directory / DATABASE_CHART):
        return [*CHARTS, DATABASE_CHART]
    return list(CHARTS)


def _scenario_grid(results: dict):
    """A figure with one panel per scenario, up to three a row; the figure and its axes."""
    from matplotlib import pyplot

    count = len(results["scenarios"])
    columns = min(3, max(1, count))
    rows = -(-count // columns)
    return pyplot.subplots(rows, columns, figsize=(5.2 * columns, 4.2 * rows), squeeze=False)


def _write_throughput_chart(results: dict, path: Path) -> None:
    """throughput.png: per scenario, req/s of each server, saturated or noisy runs noted."""
    from matplotlib import pyplot
    from matplotlib.ticker import FuncFormatter

    runs = _by_key(results)
    scenarios = results["scenarios"]
    figure, axes = _scenario_grid(results)
    for axis, (scenario, info) in zip(axes.flat, scenarios.items(), strict=False):
        names, values, colors = [], [], []
        for target in results["targets"]:
            run = runs.get((scenario, target["name"]))
            if run:
                names.append(target["name"])
                values.append(run["median"]["rps"])
                colors.append(KIND_COLORS[target["kind"]])
        axis.barh(names, values, color=colors)
        axis.invert_yaxis()
        axis.set_title(info["title"])
        axis.set_xlabel("requests / s")
        axis.xaxis.set_major_formatter(FuncFormatter(_rate_label))
        axis.tick_params(axis="y", labelsize=7)
        for index, target_name in enumerate(names):
            median = runs[(scenario, target_name)]["median"]
            notes = (["loadgen saturated"] if median["loadgen_saturated"] else []) + (
                ["noisy"] if median.get("other_cpu_fraction", 0) > NOISY_OTHER_FRACTION else []
            )
            if notes:
                axis.text(values[index], index, " " + ", ".join(notes), va="center", fontsize=6)
    footer = machine_line(results["meta"])
    _finish(figure, axes, len(scenarios), "Throughput per model and scenario", footer)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def _write_latency_chart(results: dict, path: Path) -> None:
    """latency.png: per scenario, p50, p99 and p99.9 of each server on a log scale."""
    from matplotlib import pyplot
    from matplotlib.ticker import FuncFormatter, NullFormatter

    runs = _by_key(results)
    scenarios = results["scenarios"]
    figure, axes = _scenario_grid(results)
    markers = (("p50", "o", "p50"), ("p99", "^", "p99"), ("p999", "s", "p99.9"))
    for axis, (scenario, info) in zip(axes.flat, scenarios.items(), strict=False):
        names = [t["name"] for t in results["targets"] if (scenario, t["name"]) in runs]
        for key, marker, label in markers:
            values = [runs[(scenario, name)]["median"]["latency_us"][key] for name in names]
            axis.scatter(values, range(len(names)), marker=marker, label=label, s=22)
        axis.set_yticks(range(len(names)), names, fontsize=7)
        axis.invert_yaxis()
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(FuncFormatter(_duration_label))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("latency (log scale)")
        axis.set_title(info["title"])
        axis.grid(axis="x", alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    _finish(
        figure,
        axes,
        len(scenarios),
        "Latency percentiles per model and scenario",
        machine_line(results["meta"]),
        kind_legend=False,
    )
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def _echo_series(scenarios: dict) -> tuple[int | None, list[tuple[str, int]]]:
    """The echo size the resources chart follows (64 B if measured, else the smallest) and its
    scenarios as (name, connections), fewest connections first."""
    echo_sizes = sorted({info["echo_size"] for info in scenarios.values() if info["echo_size"]})
    series_size = 64 if 64 in echo_sizes else (echo_sizes[0] if echo_sizes else None)
    series = [
        (name, info["connections"])
        for name, info in scenarios.items()
        if series_size is not None and info["echo_size"] == series_size
    ]
    series.sort(key=lambda item: item[1])
    return series_size, series


def _write_resources_chart(results: dict, path: Path) -> None:
    """resources.png: peak RSS and threads of each server against connections (echo)."""
    from matplotlib import pyplot

    runs = _by_key(results)
    figure, (memory_axis, threads_axis) = pyplot.subplots(1, 2, figsize=(12, 4.6))
    series_size, series = _echo_series(results["scenarios"])
    for target in results["targets"]:
        points = [
            (connections, runs[(name, target["name"])]["median"])
            for name, connections in series
            if (name, target["name"]) in runs
        ]
        if not points:
            continue
        style = _line_style(results, target)
        connections = [point[0] for point in points]
        memory_axis.plot(
            connections,
            [p[1]["peak_rss_bytes"] / 2**20 for p in points],
            label=target["name"],
            **style,
        )
        threads_axis.plot(connections, [p[1]["threads"] for p in points], **style)
    _label_resources_axes(memory_axis, threads_axis, series_size)
    figure.suptitle("Memory and threads vs connections")
    figure.text(0.5, 0.01, machine_line(results["meta"]), ha="center", fontsize=7)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def _line_style(results: dict, target: dict) -> dict:
    """A target's line on the resources chart: colour per model, marker and dashes per kind."""
    family_index = results["families"].index(target["family"])
    return {
        "color": FAMILY_COLORS[family_index % len(FAMILY_COLORS)],
        "marker": {"ours": "o", "no-metrics": "x", "textbook": "s"}[target["kind"]],
        "linestyle": {"ours": "-", "no-metrics": ":", "textbook": "--"}[target["kind"]],
    }


def _label_resources_axes(memory_axis, threads_axis, series_size: int | None) -> None:
    """Titles, labels, log scales and the legend of the resources chart's two panels."""
    from matplotlib.ticker import FuncFormatter

    memory_axis.set_title(f"Peak RSS vs connections (echo {series_size} B)")
    memory_axis.set_xlabel("connections")
    memory_axis.set_ylabel("MiB (server + workers)")
    threads_axis.set_title(f"Threads vs connections (echo {series_size} B)")
    threads_axis.set_xlabel("connections")
    threads_axis.set_ylabel("threads (server + workers)")
    threads_axis.set_yscale("log")
    threads_axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    for axis in (memory_axis, threads_axis):
        axis.grid(alpha=0.3)
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    if memory_axis.get_lines():  # no echo scenario (e.g. only /db): nothing to label
        memory_axis.legend(fontsize=7, ncol=2)


def write_database_chart(results: dict, path: Path) -> bool:
    """database.png: per `/db` scenario, CPU µs per request of each server, PostgreSQL's
    stacked beside it; False (nothing written) when no `/db` scenario ran."""
    runs = _by_key(results)
    scenarios = {
        name: info
        for name, info in results["scenarios"].items()
        if info.get("database")
        and any(
            "postgres_cpu_us_per_request" in run["median"]
            for run in results["runs"]
            if run["scenario"] == name
        )
    }
    if not scenarios:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    columns = len(scenarios)
    figure, axes = pyplot.subplots(1, columns, figsize=(6.2 * columns, 4.6), squeeze=False)
    for axis, (scenario, info) in zip(axes.flat, scenarios.items(), strict=True):
        medians = [
            (target, runs[(scenario, target["name"])]["median"])
            for target in results["targets"]
            if (scenario, target["name"]) in runs
        ]
        names = [target["name"] for target, _ in medians]
        server = [median["server_cpu_us_per_request"] for _, median in medians]
        database = [median.get("postgres_cpu_us_per_request", 0.0) for _, median in medians]
        colors = [KIND_COLORS[target["kind"]] for target, _ in medians]
        axis.barh(names, server, color=colors)
        axis.barh(names, database, left=server, color=POSTGRES_COLOR)
        for index, (_, median) in enumerate(medians):
            axis.text(
                server[index] + database[index],
                index,
                f" {median['rps']:,.0f} req/s",
                va="center",
                fontsize=6,
            )
        axis.invert_yaxis()
        axis.set_title(info["title"])
        axis.set_xlabel("CPU µs per request: server, then PostgreSQL")
        axis.tick_params(axis="y", labelsize=7)
        axis.grid(axis="x", alpha=0.3)
    handles = [
        _patch(KIND_COLORS["ours"], KIND_NAMES["ours"]),
        _patch(KIND_COLORS["no-metrics"], KIND_NAMES["no-metrics"]),
        _patch(POSTGRES_COLOR, "PostgreSQL (postmaster + backends)"),
    ]
    figure.legend(handles=handles, loc="upper right", fontsize=8)
    figure.suptitle("/db: CPU per request, server and PostgreSQL")
    figure.text(0.5, 0.005, machine_line(results["meta"]), ha="center", fontsize=7)
    figure.tight_layout(rect=(0, 0.02, 1, 0.93))
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return True


POSTGRES_COLOR = "#7f7f7f"


STARVED_COLOR = "#d62728"


def write_fairness_chart(results: dict, path: Path) -> None:
    """fairness.png: per scenario, connections answered of N and the longest wait (log)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    scenarios = results["scenarios"]
    pairs = min(2, max(1, len(scenarios)))  # two scenarios side by side, two panels each
    rows = -(-len(scenarios) // pairs)
    height = max(2.6, 0.24 * len(results["targets"]) + 1.4)
    legend_inches, title_inches = 0.75, 0.3  # fixed room for the legend, footer and title
    total = height * rows + legend_inches + title_inches
    # At least 10.5 in wide, so the when/where footer fits under a single scenario.
    figure, axes = pyplot.subplots(
        rows, 2 * pairs, figsize=(max(10.5, 7.2 * pairs), total), squeeze=False
    )
    for index, (scenario, info) in enumerate(scenarios.items()):
        medians = _fairness_medians(results, scenario)
        row, column = index // pairs, 2 * (index % pairs)
        _draw_answered(axes[row][column], info, medians)
        _draw_longest_wait(axes[row][column + 1], info, medians, results["meta"]["duration_s"])
    for axis in list(axes.flat)[2 * len(scenarios) :]:
        axis.set_visible(False)
    _fairness_legend(figure, total)
    figure.suptitle("Fairness: connections answered and the longest wait (worst run)")
    figure.text(0.5, 0.04 / total, machine_line(results["meta"]), ha="center", fontsize=7)
    figure.tight_layout(rect=(0, legend_inches / total, 1, 1 - title_inches / total))
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def _fairness_medians(results: dict, scenario: str) -> list[tuple[dict, dict]]:
    """(target, median) of each server measured in `scenario` that has fairness figures."""
    runs = _by_key(results)
    return [
        (target, runs[(scenario, target["name"])]["median"])
        for target in results["targets"]
        if (scenario, target["name"]) in runs
        and _has_fairness(runs[(scenario, target["name"])]["median"])
    ]


def _draw_answered(axis, info: dict, medians: list[tuple[dict, dict]]) -> None:
    """The left panel of a scenario: share of connections answered, starved runs in red."""
    names = [target["name"] for target, _ in medians]
    positions = range(len(medians))
    shares = [100 * m["answered_connections"] / max(1, m["connections"]) for _, m in medians]
    colors = [STARVED_COLOR if m["starved"] else KIND_COLORS[t["kind"]] for t, m in medians]
    axis.barh(list(positions), shares, color=colors)
    for position, (_, median) in zip(positions, medians, strict=True):
        label = f"{median['answered_connections']}/{median['connections']}"
        axis.text(
            2,
            position,
            ("⚠ " if median["starved"] else "") + label,
            va="center",
            fontsize=6,
            color="white" if not median["starved"] else "black",
        )
    axis.set_yticks(list(positions), names, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlim(0, 100)
    axis.set_xlabel("connections answered in the window (% of N)", fontsize=8)
    axis.set_title(info["title"], fontsize=9)


def _draw_longest_wait(axis, info: dict, medians: list[tuple[dict, dict]], window: float) -> None:
    """The right panel of a scenario: each server's longest wait (log), the window marked."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    positions = range(len(medians))
    for position, (target, median) in zip(positions, medians, strict=True):
        still = median["longest_wait_unanswered"]
        axis.scatter(
            [median["longest_wait_s"] * 1e6],
            [position],
            s=30 if still else 22,
            marker=">" if still else "o",
            color=STARVED_COLOR if still else KIND_COLORS[target["kind"]],
        )
    waits = [m["longest_wait_s"] * 1e6 for _, m in medians] or [window * 1e6]
    axis.set_xlim(min(waits) / 3, max(max(waits), window * 1e6) * 3)
    axis.axvline(window * 1e6, color="grey", linestyle="--", linewidth=0.8)
    axis.text(window * 1e6, -0.6, " window", fontsize=6, color="grey", va="bottom")
    axis.set_yticks(list(positions), [""] * len(medians))
    axis.set_ylim(len(medians) - 0.5, -1)
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(FuncFormatter(_duration_label))
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set_xlabel("longest wait of any request (log scale)", fontsize=8)
    axis.set_title(f"{info['title']}: longest wait", fontsize=9)
    axis.grid(axis="x", alpha=0.3)


def _fairness_legend(figure, total: float) -> None:
    """The fairness chart's legend: the kinds, starved, and still waiting at the end."""
    from matplotlib.lines import Line2D

    handles = [
        _patch(KIND_COLORS[kind], KIND_NAMES[kind]) for kind in ("ours", "no-metrics", "textbook")
    ]
    handles += [
        _patch(STARVED_COLOR, "starved: a connection got no reply in the window"),
        Line2D(
            [],
            [],
            marker=">",
            linestyle="",
            color=STARVED_COLOR,
            label="still waiting at the end (never answered)",
        ),
    ]
    figure.legend(
        handles=handles, loc="lower center", fontsize=7, ncol=3, bbox_to_anchor=(0.5, 0.2 / total)
    )


def _rate_label(rate: float, _position: object = None) -> str:
    """Tick label for requests per second: 500, 20k."""
    return f"{rate / 1000:g}k" if rate >= 1000 else f"{rate:g}"


def _duration_label(microseconds: float, _position: object = None) -> str:
    """Tick label for a latency axis in µs: 100 µs, 10 ms, 1 s."""
    if microseconds >= 1e6:
        return f"{microseconds / 1e6:g} s"
    if microseconds >= 1e3:
        return f"{microseconds / 1e3:g} ms"
    return f"{microseconds:g} µs"


def _finish(figure, axes, used: int, title: str, footer: str, kind_legend: bool = True) -> None:
    for axis in list(axes.flat)[used:]:
        axis.set_visible(False)
    if kind_legend:
        handles = [
            _patch(KIND_COLORS[kind], KIND_NAMES[kind])
            for kind in ("ours", "no-metrics", "textbook")
        ]
        figure.legend(handles=handles, loc="upper right", fontsize=8)
    figure.suptitle(title)
    figure.text(0.5, 0.005, footer, ha="center", fontsize=7)
    figure.tight_layout(rect=(0, 0.02, 1, 0.97))


def _patch(color: str, label: str):
    from matplotlib.patches import Patch

    return Patch(color=color, label=label)
