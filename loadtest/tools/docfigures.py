"""`python -m loadtest.tools.docfigures [--check]`: write the measured figures into the docs.

Every figure in README.md and docs/ that a run produced is written here, from the committed
result files, into a marked section of the Markdown:

    <!-- figures:bench-table:begin -->
    ...generated, do not edit by hand...
    <!-- figures:bench-table:end -->

Sources: `results/bench.json` (`python -m loadtest.bench`), `results/soak.json`
(`python -m loadtest.tools.soak`, the small summary it writes next to its full report) and
`results/lessons/lessons.json` (`python -m loadtest.lessons`), `results/bench-open-loop.json`
(`python -m loadtest.bench --open-loop`). The tools call
:func:`refresh` after writing, so a fresh run refreshes the docs; `make docs` runs this by hand.
`--check` writes nothing: it exits 1 and prints a diff when a section differs from what would be
written (tests/test_docs.py runs it), so a figure cannot drift from its source unnoticed.

Figures no tool records (Locust's own capacity, memory per connection from
tests/test_reliability.py) are quoted once, in docs/LOADTEST.md and docs/RELIABILITY.md, and only
linked from elsewhere.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from loadtest.tools import cli
from services import models

ROOT = cli.ROOT
RESULTS = ROOT / "results"
DOCS = ("README.md", "docs")
SECTION = re.compile(
    r"(?P<begin><!-- figures:(?P<name>[a-z0-9-]+):begin -->\n)(?P<body>.*?)"
    r"(?P<end><!-- figures:(?P=name):end -->)",
    re.S,
)
ANY_MARK = re.compile(r"<!-- figures:([a-z0-9-]+):(begin|end) -->")
MIB = 1024 * 1024
# Typography of the docs, spelled out so the source stays plain ASCII.
TIMES, DASH = "\u00d7", "\u2013"
# Benchmark families (services/models.py's variants) grouped by what runs one connection.
# A thread or greenlet per connection:
THREAD_MODELS = [name for name, (model, _) in models.VARIANTS.items() if model.blocking]
# A few threads whatever the connections (an event loop: the pool's reactor, gevent's hub or
# asyncio's loop):
REACTORS = [name for name, (model, _) in models.VARIANTS.items() if model.flow != "thread"]
# Every connection waits on its own (a thread, a greenlet, an asyncio timer), not in a pool:
SWITCHING = [name for name, (model, _) in models.VARIANTS.items() if model.flow != "reactor"]
# A reactor whose requests run in a pool:
POOLS = [name for name, (model, _) in models.VARIANTS.items() if model.flow == "reactor"]


class FiguresError(Exception):
    """A doc or result file the generator cannot use (exit 2)."""


# -- reading the results ---------------------------------------------------------------------


class Sources:
    """The committed result files, read once; a missing file reads as None."""

    def __init__(self, results: Path = RESULTS) -> None:
        self.results = results
        self.bench = _load(results / "bench.json")
        self.soak = _load(results / "soak.json")
        self.lessons = _load(results / "lessons" / "lessons.json")
        self.scrape_cost = _load(results / "scrape_cost.json")
        self.replicas = _load(results / "replicas.json")
        self.open_loop = _load(results / "bench-open-loop.json")


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise FiguresError(f"cannot read {path}: {error}") from None


class Bench:
    """Look-ups into bench.json."""

    def __init__(self, data: dict) -> None:
        self.data = data
        self.meta = data["meta"]
        self.scenarios: dict = data["scenarios"]
        # Every row of the table; the readings compare servers on one core, so they leave out
        # the rows of several processes on every CPU (gevent-x2, ...).
        self.rows = [t for t in data["targets"] if t["kind"] in ("ours", "textbook")]
        self.targets = [t for t in self.rows if not t.get("every_cpu")]
        self.runs = {(run["scenario"], run["target"]): run["median"] for run in data["runs"]}
        self.comparisons = data.get("comparisons", [])

    def median(self, scenario: str, target: str) -> dict | None:
        """The median figures of one (scenario, target), or None when it was not run."""
        return self.runs.get((scenario, target))

    def medians(self, scenarios: Iterable[str], targets: Iterable[str]) -> list[dict]:
        """Every median that exists among these scenarios and targets."""
        found = (self.median(s, t) for s in scenarios for t in targets)
        return [median for median in found if median is not None]

    def title(self, scenario: str) -> str:
        """`echo 64 B, 100 conns`."""
        return self.scenarios[scenario]["title"]


def _k(rps: float) -> str:
    """85,482 -> `85k`; 4,558 -> `4.6k`; 948 -> `948`."""
    if rps >= 10_000:
        return f"{rps / 1000:.0f}k"
    if rps >= 1000:
        return f"{rps / 1000:.1f}".removesuffix(".0") + "k"
    return f"{rps:.0f}"


def _span(values: Iterable[float], fmt: Callable[[float], str], unit: str = "") -> str:
    """`12-23 µs` (with an en dash), or one value when they round alike."""
    values = sorted(values)
    low, high = fmt(values[0]), fmt(values[-1])
    return f"{low}{unit}" if low == high else f"{low}{DASH}{high}{unit}"


def _ms(us: float) -> str:
    return f"{us / 1000:.1f}" if us < 100_000 else f"{us / 1000:.0f}"


def _p99(median: dict) -> float:
    return median["latency_us"]["p99"]


def _wait(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"


def _duration(seconds: float) -> str:
    """300 -> `5-minute`, 86400 -> `24-hour`, 45 -> `45-second`."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}-hour"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}-minute"
    return f"{seconds:g}-second"


# -- bench sections --------------------------------------------------------------------------


def bench_run(bench: Bench) -> str:
    """The line saying when and where, and the req/s (p99) table."""
    meta, machine = bench.meta, bench.meta["machine"]
    kernel = re.sub(r"^(\S+ \d+\.\d+).*", r"\1", machine["system"])
    errors = sum(median["errors"] for median in bench.runs.values())
    saturated = sum(bool(median.get("loadgen_saturated")) for median in bench.runs.values())
    head = (
        f"Latest run: **{meta['date']}**, {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['memory_bytes'] / 2**30:.0f} GiB, {kernel}, "
        f"{machine.get('implementation', 'CPython')} {machine['python']}; {meta['pinning']}"
        + _several_processes(meta)
        + f"; median of {meta['reps']} runs of {meta['duration_s']:g} s each; "
        + ("0 errors in every run" if not errors else f"{errors:,} errors in all")
        + ("" if not saturated else f"; load generator saturated in {saturated} cells (⚠)")
        + ". Full tables (CPU per request, memory, threads, metrics on/off"
        + (", connections answered" if _has_fairness(bench) else "")
        + "): [results/bench.md](results/bench.md)."
    )
    lines = [
        wrap(head),
        "",
        "| req/s (p99 ms) | " + " | ".join(bench.title(s) for s in bench.scenarios) + " |",
        "|---|" + "--:|" * len(bench.scenarios),
    ]
    for target in bench.rows:
        cells = []
        for scenario in bench.scenarios:
            median = bench.median(scenario, target["name"])
            if median is None:
                cells.append("—")
                continue
            cell = f"{median['rps']:,.0f} ({_ms(_p99(median))})"
            if median.get("loadgen_saturated"):
                cell += " ⚠ saturated"
            if median.get("starved"):
                cell += f" ⚠ {median['answered_connections']}/{median['connections']} answered"
            cells.append(cell)
        lines.append(f"| {target['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _several_processes(meta: dict) -> str:
    """` (gevent-x2, asyncio-x2: ...)`: how the rows of several processes were pinned."""
    several = meta.get("several_processes")
    if not several:
        return ""
    return (
        f" ({', '.join(several['families'])}: `--processes {several['processes']}`, "
        f"{several['pinning']})"
    )


def _has_fairness(bench: Bench) -> bool:
    return any("answered_connections" in median for median in bench.runs.values())


def _fastest_echo(bench: Bench) -> tuple[str, dict] | None:
    ours = [
        (t["name"], median)
        for t in bench.targets
        if t["kind"] == "ours" and (median := bench.median("echo64", t["name"])) is not None
    ]
    return max(ours, key=lambda pair: pair[1]["rps"]) if ours else None


def bench_loadgen(bench: Bench) -> str:
    """README: why a C load generator, with the fastest server and the rig's ceiling."""
    fastest = _fastest_echo(bench)
    ceiling = bench.meta.get("ceiling")
    saturated = sum(bool(median.get("loadgen_saturated")) for median in bench.runs.values())
    text = (
        "**Why a C load generator.** Locust's own capacity here "
        "([docs/LOADTEST.md](docs/LOADTEST.md#locusts-capacity-here)) is a fraction of what the "
        "Python servers answer"
    )
    if fastest:
        name, median = fastest
        text += (
            f" (the fastest, {name}, answers {median['rps']:,.0f} echo requests/s on one "
            "core in the run below)"
        )
    text += (
        ": a Python client would measure itself. `loadtest/bench/loadgen.c` (compiled with `cc` "
        "on first use) is a plain epoll client — one request in flight per connection, every "
        "reply checked, latency in a log-linear histogram with < 0.4 % error. Every run first "
        "measures it against a trivial C echo server, the rig's ceiling"
    )
    if ceiling and fastest:
        text += (
            f": {ceiling['rps']:,.0f} req/s at {ceiling['loadgen_cpu_fraction']:.0%} of one "
            f"core in the run below, {ceiling['rps'] / fastest[1]['rps']:.1f}{TIMES} the "
            "fastest Python server"
        )
    threshold = bench.meta.get("loadgen_saturation_threshold", 0.9)
    text += (
        f'; any run where it passed {threshold:.0%} of its core is flagged as "load '
        f'generator saturated" ({saturated or "none"} below).'
    )
    return wrap(text)


def bench_ceiling(bench: Bench) -> str:
    """BENCHMARK.md: the ceiling and the fastest server of the committed run, one sentence."""
    ceiling = bench.meta.get("ceiling")
    fastest = _fastest_echo(bench)
    parts = [
        f"In the committed run ({bench.meta['date']}, [results/bench.md](../results/bench.md))"
    ]
    if ceiling:
        parts.append(
            f" the load generator reached {ceiling['rps']:,.0f} req/s against its C echo "
            f"server at {ceiling['loadgen_cpu_fraction']:.0%} of its core"
        )
    else:
        parts.append(" the ceiling was not measured (`--no-ceiling`)")
    if fastest:
        parts.append(
            f"; the fastest Python server, {fastest[0]}, answered "
            f"{fastest[1]['rps']:,.0f} echo requests/s (echo 64 B, one core)"
        )
    return wrap("".join(parts) + ".")


def _pct(value: float) -> str:
    return f"{value * 100:.1f} %"


def bench_reading(bench: Bench) -> str:
    """README: the reading of the committed run, every figure computed."""
    bullets = [
        _reading_echo(bench),
        _reading_process_pool(bench),
        _reading_many_connections(bench),
        _reading_sleep(bench),
        _reading_work(bench),
        _reading_targets(bench),
    ]
    return "**Reading.**\n" + "\n".join(wrap_bullet(b) for b in bullets if b)


def wrap(text: str, width: int = 100, first: str = "", rest: str = "") -> str:
    """Text wrapped at `width` columns; `first` and `rest` prefix the first and later lines."""
    lines: list[str] = []
    line = first
    for word in text.split():
        # A word like `-`, `+1` or `2.` starting a line would turn it into a list item.
        if (
            len(line) + 1 + len(word) > width
            and line.strip()
            and not re.fullmatch(r"[-+*>#]|\d+[.)]", word)
        ):
            lines.append(line)
            line = rest
        line += (" " if line.strip() else "") + word
    lines.append(line)
    return "\n".join(lines)


def wrap_bullet(text: str) -> str:
    """A Markdown bullet wrapped at 100 columns."""
    return wrap(text, first="- ", rest="  ")


def _reading_echo(bench: Bench) -> str | None:
    echo = [s for s in ("echo64", "echo1k") if s in bench.scenarios]
    ours = [t["name"] for t in bench.targets if t["kind"] == "ours"]
    medians = bench.medians(echo, ours)
    fastest = _fastest_echo(bench)
    if not medians or not fastest:
        return None
    name, median = fastest
    textbook = bench.median("echo64", f"{name} textbook")
    text = (
        f"*Echo, one core:* every model is bound by Python per request "
        f"({_span((m['server_cpu_us_per_request'] for m in medians), '{:.0f}'.format)} µs of "
        f"server CPU each, ours, echo 64 B and 1 KiB). {name} is fastest "
        f"({_k(median['rps'])} req/s"
    )
    if textbook:
        text += f", {median['rps'] / textbook['rps']:.2f}{TIMES} its textbook version"
    text += ")"
    because = models.target(name)[0].fast_because if name in models.VARIANTS else ""
    if because:
        text += ": " + because
    text += "."
    ratios = []
    for family in bench.data["families"]:
        values = [
            c["vs_textbook"]
            for c in bench.comparisons
            if c["family"] == family and c["scenario"] in echo and c.get("vs_textbook")
        ]
        if values:
            ratios.append(f"{family} {_span(values, '{:.2f}'.format)}{TIMES}")
    if ratios:
        text += " Ours versus textbook on echo: " + ", ".join(ratios) + "."
    costs = [
        c["metrics_cost"]
        for c in bench.comparisons
        if c["scenario"] in echo and c.get("metrics_cost") is not None
    ]
    if costs:
        low, high = min(costs), max(costs)
        text += (
            f" The cost of metrics on echo ranges from {_pct(low)} to {_pct(high)} "
            "(below zero: faster with metrics, i.e. run-to-run noise)."
        )
    return text


def _reading_process_pool(bench: Bench) -> str | None:
    ours = bench.median("echo64", "pool-process")
    textbook = bench.median("echo64", "pool-process textbook")
    if not ours or not textbook:
        return None
    return (
        f"*The process pool:* the textbook selector + `ProcessPoolExecutor` pays about "
        f"{textbook['server_cpu_us_per_request']:.0f} µs of server CPU per request for pickling, "
        f"pipes and wake-ups ({_k(textbook['rps'])} req/s, echo 64 B). Ours sends the ready lines "
        f"of many connections as one task per worker: {_k(ours['rps'])} req/s at "
        f"{ours['server_cpu_us_per_request']:.0f} µs per request, "
        f"**{ours['rps'] / textbook['rps']:.1f}{TIMES}**."
    )


def _reading_many_connections(bench: Bench) -> str | None:
    scenario = "echo64-c1000"
    if scenario not in bench.scenarios:
        return None
    connections = bench.scenarios[scenario]["connections"]
    reactors = bench.medians([scenario], REACTORS)
    threaded = bench.median(scenario, "threaded")
    textbook = bench.median(scenario, "threaded textbook")
    parts = [f"*{connections} connections (echo 64 B):*"]
    if reactors:
        parts.append(
            "the event-loop servers keep "
            f"{_span((m['threads'] for m in reactors), '{:.0f}'.format)} threads and a p99 of "
            f"{_span((_p99(m) for m in reactors), _ms)} ms;"
        )
    if threaded:
        parts.append(
            f"the threaded server holds {threaded['threads']:,.0f} threads and "
            f"{threaded['peak_rss_bytes'] / MIB:.0f} MiB, and its tail depends on how the GIL "
            f"hands over between {connections} runnable threads: p99 {_ms(_p99(threaded))} ms"
            + (f" (the textbook version {_ms(_p99(textbook))} ms)" if textbook else "")
            + ", and it varies widely from run to run."
        )
    parts.append(_fairness_sentence(bench, scenario, connections))
    return " ".join(parts)


def _fairness_sentence(bench: Bench, scenario: str, connections: int) -> str:
    """What the committed run says about every connection being served in the window."""
    medians = [
        (t["name"], m)
        for t in bench.targets
        if (m := bench.median(scenario, t["name"])) is not None
    ]
    if not medians or not all("answered_connections" in m for _, m in medians):
        return (
            "The load generator waits until each connection has been answered once before "
            "measuring; this run did not record whether every connection was answered during "
            "the measured window."
        )
    starved = [(name, m) for name, m in medians if m.get("starved")]
    if not starved:
        longest = max(medians, key=lambda pair: pair[1]["longest_wait_s"])
        return (
            f"Every server answered all {connections} connections in every measured window "
            f"(the longest wait: {_wait(longest[1]['longest_wait_s'])}, {longest[0]})."
        )
    described = []
    for name, m in starved:
        how = "still waiting after" if m.get("longest_wait_unanswered") else "answered after"
        described.append(
            f"{name} answered {m['answered_connections']} of {m['connections']} connections "
            f"(a request {how} {_wait(m['longest_wait_s'])}; "
            f"{m['requests_per_connection_min']:.0f}{DASH}{m['requests_per_connection_max']:.0f} "
            "requests per connection)"
        )
    rest = len(medians) - len(starved)
    return (
        "Not every connection was served in the measured window: "
        + "; ".join(described)
        + (f". The other {rest} servers answered every connection." if rest else ".")
    )


def _sleep_ms(bench: Bench, scenario: str) -> float | None:
    for request in bench.scenarios[scenario]["requests"]:
        match = re.match(r"/sleep (\d+)", request["line"])
        if match:
            return float(match.group(1))
    return None


def _reading_sleep(bench: Bench) -> str | None:
    scenario = "sleep20"
    if scenario not in bench.scenarios:
        return None
    sleep_ms = _sleep_ms(bench, scenario) or 20.0
    connections = bench.scenarios[scenario]["connections"]
    waiting = bench.medians([scenario], [f"{f}{k}" for f in SWITCHING for k in ("", " textbook")])
    pools = bench.medians([scenario], [f"{f}{k}" for f in POOLS for k in ("", " textbook")])
    parts = [f"*Waiting (`/sleep {sleep_ms:g}`):*"]
    if waiting:
        parts.append(
            "a thread, greenlet or timer per connection overlaps the waits: "
            f"{_span((m['rps'] for m in waiting), _k)} "
            f"req/s of the {_k(connections * 1000 / sleep_ms)} that {connections} connections / "
            f"{sleep_ms:g} ms allow."
        )
    if pools:
        parts.append(
            f"A pool of {bench.meta['workers']} workers holds a worker per wait: "
            f"{_span((m['rps'] for m in pools), '{:.0f}'.format)} req/s and a p99 of "
            f"{_span((_p99(m) / 1e6 for m in pools), '{:.1f}'.format)} s, whatever the "
            "implementation — the pool model's lesson; add workers or use threads for blocking "
            "I/O."
        )
    return " ".join(parts)


def _reading_work(bench: Bench) -> str | None:
    scenario = "work1ms"
    medians = bench.medians([scenario], [t["name"] for t in bench.targets])
    if not medians:
        return None
    text = (
        f"*CPU work (`/work` ~1 ms):* {_span((m['rps'] for m in medians), '{:,.0f}'.format)} "
        "req/s for every model: one core, and the GIL."
    )
    gevent, threaded = bench.median(scenario, "gevent"), bench.median(scenario, "threaded")
    if gevent and threaded:
        text += (
            f" gevent's one loop serves CPU work in arrival order (p99 {_ms(_p99(gevent))} "
            f"ms), threads preempt each other every 5 ms (p99 {_ms(_p99(threaded))} ms)."
        )
    text += (
        " With the server pinned to one core the process pool cannot show its parallelism "
        "here; in the compose stack (`ARENA_SERVER_CPUS`) and with `--no-pin` it spreads "
        "`/work` over the cores."
    )
    return text


def _cell(bench: Bench, scenario: str) -> str:
    """`echo 64 B` for the usual 100 connections, `echo 64 B at 1000 conns` otherwise."""
    return bench.title(scenario).replace(", 100 conns", "").replace(", ", " at ")


def _versus_textbook(bench: Bench, comparison: dict) -> str:
    """`threaded echo 64 B 0.94x`, saying so when the textbook left connections unanswered."""
    family, scenario = comparison["family"], comparison["scenario"]
    text = f"{family} {_cell(bench, scenario)} {comparison['vs_textbook']:.2f}{TIMES}"
    textbook = bench.median(scenario, f"{family} textbook") or {}
    if textbook.get("starved"):
        text += " (against a textbook that left connections unanswered)"
    return text


def _reading_targets(bench: Bench) -> str:
    below = [
        _versus_textbook(bench, c)
        for c in bench.comparisons
        if c.get("vs_textbook") is not None and round(c["vs_textbook"], 2) < 1.0
    ]
    costly = [
        f"{c['family']} {_cell(bench, c['scenario'])} {_pct(c['metrics_cost'])}"
        for c in bench.comparisons
        if c.get("metrics_cost") is not None and c["metrics_cost"] > 0.10
    ]
    if not below and not costly:
        return (
            "*Targets:* every server is at least as fast as its textbook version and metrics "
            "cost at most 10 % in every cell of this run."
        )
    text = "*Not yet at target in this run:*"
    if below:
        text += f" below its textbook version (target ≥ 1.00{TIMES}): " + ", ".join(below) + "."
    if costly:
        text += " Metrics cost above 10 %: " + ", ".join(costly) + "."
    return text + " Single cells within a few per cent are often run-to-run noise on this machine."


# -- soak sections ---------------------------------------------------------------------------


def soak_summary(report: dict) -> dict:
    """The few figures the docs quote from a soak report (written as results/soak.json)."""
    return {
        "started": report["started"],
        "finished": report["finished"],
        "duration_s": report["settings"]["duration_s"],
        "users_per_target": report["settings"]["users_per_target"],
        "passed": report["passed"],
        "locust": {
            "requests": report["locust"]["requests"],
            "failures": report["locust"]["failures"],
        },
        "servers": {
            model: {
                "requests": round(figures["requests"]),
                "request_errors": round(figures["request_errors"]),
                "rss_after_warmup_mib": round(figures["rss_first_third_mib"], 1),
                "rss_growth_mib": round(figures["rss_growth_mib"], 2),
                "fd_growth": figures["fd_growth"],
            }
            for model, figures in report["figures"].items()
        },
    }


def _soak_head(soak: dict) -> str:
    return (
        f"{_duration(soak['duration_s'])} soak at {soak['users_per_target']} users per server "
        f"({soak['started'][:10]})"
    )


def soak_readme(soak: dict) -> str:
    """README: one sentence on the committed soak."""
    servers = soak["servers"]
    total = sum(figures["requests"] for figures in servers.values())
    errors = sum(figures["request_errors"] for figures in servers.values())
    growth = ", ".join(
        f"{figures['rss_growth_mib']:+.2f} MiB ({model})" for model, figures in servers.items()
    )
    fds = {figures["fd_growth"] for figures in servers.values()}
    return wrap(
        f"A {_soak_head(soak)}: {total:,} requests answered, {errors} error replies, "
        f"{soak['locust']['failures']} failed at the client; RSS growth after warm-up {growth}; "
        + (
            "no descriptor growth."
            if fds == {0}
            else "descriptor growth "
            + ", ".join(f"{f['fd_growth']:+g}" for f in servers.values())
            + "."
        )
        + " Verdict: "
        + ("passed" if soak["passed"] else "**failed**")
        + " ([docs/RELIABILITY.md](docs/RELIABILITY.md#soak-python--m-loadtestsoak))."
    )


def soak_table(soak: dict) -> str:
    """RELIABILITY.md: the committed soak's table."""
    servers = soak["servers"]
    total = sum(figures["requests"] for figures in servers.values())
    lines = [
        wrap(
            f"The committed run: a {_soak_head(soak)}, {soak['started'][11:16]} to "
            f"{soak['finished'][11:16]} UTC, "
            f"verdict {'passed' if soak['passed'] else '**failed**'}. Locust sent "
            f"{soak['locust']['requests']:,} requests (connects included), "
            f"{soak['locust']['failures']} failed; the servers answered {total:,}."
        ),
        "",
        "| server | requests answered | error replies | RSS after warm-up (MiB) "
        "| RSS growth (MiB) | fd growth |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for model, figures in servers.items():
        lines.append(
            f"| {model} | {figures['requests']:,} | {figures['request_errors']} | "
            f"{figures['rss_after_warmup_mib']:.1f} | {figures['rss_growth_mib']:+.2f} | "
            + (f"{figures['fd_growth']:+g} |" if figures["fd_growth"] else "0 |")
        )
    return "\n".join(lines)


# -- lessons (results/lessons/lessons.json, python -m loadtest.lessons) ------------------------

LESSONS_DIR = "results/lessons"


def lessons_readme(data: dict) -> str:
    """The README's Lessons section: when and where, one row per lesson, the charts."""

    lines = [
        wrap(
            f"Latest run: **{cli.machine_line(data)}**. {data['background']['text']} Every "
            f"figure, table and reading: [{LESSONS_DIR}/lessons.md]({LESSONS_DIR}/lessons.md)."
        ),
        "",
        "| lesson | claim | verdict | why |",
        "|---|---|---|---|",
    ]
    for entry in data["lessons"]:
        cells = (
            entry["id"],
            entry["claim"],
            f"**{cli.VERDICT_MARK[entry['verdict']]}**",
            entry["reason"],
        )
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    charts = [entry for entry in data["lessons"] if entry.get("chart")]
    if charts:
        lines.append("")
        lines += [f"![{entry['id']}]({LESSONS_DIR}/{entry['chart']})" for entry in charts]
    return "\n".join(lines)


# -- scrape cost (results/scrape_cost.json, python -m loadtest.bench.scrape_cost) -----------


def scrape_cost_table(data: dict) -> str:
    """METRICS.md: server CPU and wall time per scrape at many idle connections, per model."""
    measured = data["models"]
    connections = {figures["connections"] for figures in measured.values()}
    scrapes = {figures["scrapes"] for figures in measured.values()}
    lines = [
        wrap(
            f"Measured {data['when']} at commit {data['commit']} on {data['cpus']} CPUs: "
            f"{_span(connections, lambda n: f'{n:,}')} idle connections, "
            f"{_span(scrapes, str)} scrapes per model."
        ),
        "",
        "| model | server CPU per scrape | scrape wall time (median) | first scrape (folds every "
        "tally) |",
        "|---|--:|--:|--:|",
    ]
    for model, figures in measured.items():
        lines.append(
            f"| {model} | {figures['cpu_ms_per_scrape']:.1f} ms | "
            f"{figures['wall_ms_median']:.1f} ms | {figures['first_scrape_wall_ms']:.0f} ms |"
        )
    return "\n".join(lines)


# -- replicas (results/replicas.json, python -m loadtest.tools.replicas) -------------------------


# Other processes above this many cores during a replicas run: the figure says so.
BUSY_OTHER_CORES = 0.25


def per_core_reading(one: dict, many: dict) -> str:
    """What the ratio is made of: requests per server core in each run, and the cores got."""
    one_cores, many_cores = sum(one["server_cores"]), sum(many["server_cores"])
    if not one_cores or not many_cores:
        return ""
    return (
        f" Per server core: {one['rps'] / one_cores:,.0f} and {many['rps'] / many_cores:,.0f} "
        "requests/s, so the rate follows the cores the replicas got "
        f"({many_cores / one_cores:.2f}x as many): the figure needs as many free cores as "
        "replicas beside Locust's."
    )


def replicas_figure(data: dict) -> str:
    """README and SCALING.md: one replica against N on /work, and what Locust used meanwhile."""
    one, many = data["runs"]

    def cores(run: dict) -> str:
        return f"{sum(run['server_cores']):.2f}"

    return wrap(
        f"Measured {data['when']} at commit {data['commit']} on {data['cpus']} CPUs "
        f"(`python -m loadtest.tools.replicas`): `/work` from {data['users']} Locust users on "
        f"{data['model']}, {data['cpus_per_replica']:g} CPU per replica: one replica "
        f"{one['rps']:,.0f} requests/s, {many['replicas']} replicas {many['rps']:,.0f} requests/s, "
        f"**{data['ratio']:.2f}x**. The servers used {cores(one)} and {cores(many)} cores; "
        f"Locust used {one['locust_cores']:.2f} and {many['locust_cores']:.2f} cores meanwhile"
        + (
            f", other processes {one['other_cores']:.2f} and {many['other_cores']:.2f}."
            if "other_cores" in one and "other_cores" in many
            else "."
        )
        + per_core_reading(one, many)
        + (
            " The machine was busy: the replicas did not get their cores, so this ratio is not "
            "the models' alone; measure again on a quiet machine."
            if max(one.get("other_cores", 0), many.get("other_cores", 0)) > BUSY_OTHER_CORES
            else ""
        )
    )


# -- open loop (results/bench-open-loop.json, python -m loadtest.bench --open-loop) ----------


def open_loop_readme(data: dict) -> str:
    """README: when and where, each model's closed-loop rate and knee, the chart."""
    meta = data["meta"]
    bound_ms = meta["knee_p99_us"] / 1000
    steps = meta["steps_percent"]
    top = max((p["percent"] for m in data["models"] for p in m["points"]), default=steps[-1])
    further = f" (and on while a model still kept up: {top} % here)" if top > steps[-1] else ""
    lines = [
        wrap(
            f"Latest open-loop run: **{meta['date']}**, {meta['machine']['cores']} cores; "
            f"{meta['pinning']}; {meta['scenario_title']}, offered {steps[0]} % to {steps[-1]} % "
            f"of each model's closed-loop rate in steps{further}, {meta['duration_s']:g} s each. "
            "The "
            f"knee is the highest offered rate a model sustains with p99 {bound_ms:g} ms or "
            f"less (every lower step too, the achieved rate within "
            f"{100 - meta['kept_up_share'] * 100:.0f} % of the offered one)."
        ),
        "",
        f"| model | closed loop req/s | knee: offered req/s with p99 ≤ {bound_ms:g} ms | share "
        "of closed loop | p99 at the knee | p99 one step higher |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for model in data["models"]:
        knee = model["knee"]
        closed = model["closed_loop"]["rps"]
        if knee is None:
            lines.append(
                f"| {model['family']} | {closed:,.0f} | none (p99 over {bound_ms:g} ms from the "
                f"first step) | {DASH} | {DASH} | {DASH} |"
            )
            continue
        after = [p for p in model["points"] if p["offered_rps"] > knee["offered_rps"]]
        next_p99 = _ms(after[0]["latency_us"]["p99"]) + " ms" if after else DASH
        lines.append(
            f"| {model['family']} | {closed:,.0f} | {knee['offered_rps']:,.0f} | "
            f"{knee['percent']} % | {_ms(knee['p99_us'])} ms | {next_p99} |"
        )
    lines += ["", "![latency against offered load](results/open-loop.png)"]
    return "\n".join(lines)


# -- sections and files ----------------------------------------------------------------------

NO_BENCH = "(No benchmark result is committed: run `make bench`.)"
NO_SOAK = "(No soak result is committed: run `make soak`.)"
NO_LESSONS = "(No lessons result is committed: run `make lessons`.)"
NO_REPLICAS = "(No replicas result is committed: run `python -m loadtest.tools.replicas`.)"
NO_SCRAPE_COST = "(No scrape-cost result is committed: run `python -m loadtest.bench.scrape_cost`.)"
NO_OPEN_LOOP = (
    "(No open-loop result is committed: run `python -m loadtest.bench --open-loop`, "
    "docs/BENCHMARK.md.)"
)


def _bench(render: Callable[[Bench], str]) -> Callable[[Sources], str]:
    return lambda sources: render(Bench(sources.bench)) if sources.bench else NO_BENCH


def _soak(render: Callable[[dict], str]) -> Callable[[Sources], str]:
    return lambda sources: render(sources.soak) if sources.soak else NO_SOAK


RENDERERS: dict[str, Callable[[Sources], str]] = {
    "bench-loadgen": _bench(bench_loadgen),
    "bench-run": _bench(bench_run),
    "bench-reading": _bench(bench_reading),
    "bench-ceiling": _bench(bench_ceiling),
    "soak-summary": _soak(soak_readme),
    "soak-table": _soak(soak_table),
    "lessons": lambda sources: lessons_readme(sources.lessons) if sources.lessons else NO_LESSONS,
    "scrape-cost": lambda sources: (
        scrape_cost_table(sources.scrape_cost) if sources.scrape_cost else NO_SCRAPE_COST
    ),
    "replicas": lambda sources: (
        replicas_figure(sources.replicas) if sources.replicas else NO_REPLICAS
    ),
    "open-loop": lambda sources: (
        open_loop_readme(sources.open_loop) if sources.open_loop else NO_OPEN_LOOP
    ),
}


def doc_paths(root: Path = ROOT) -> list[Path]:
    """README.md and every docs/*.md under `root`."""
    paths = []
    for name in DOCS:
        path = root / name
        paths += sorted(path.glob("*.md")) if path.is_dir() else [path] if path.exists() else []
    return paths


def render_text(text: str, sources: Sources, where: str = "") -> str:
    """The text with every marked section rewritten from the sources."""
    names = [match.group(1) for match in ANY_MARK.finditer(text)]
    pairs = [match.group("name") for match in SECTION.finditer(text)]
    if len(names) != 2 * len(pairs):
        raise FiguresError(f"{where}: unbalanced or nested figures markers: {names}")
    for name in pairs:
        if name not in RENDERERS:
            raise FiguresError(
                f"{where}: unknown figures section {name!r}; known: " + ", ".join(RENDERERS)
            )

    def replace(match: re.Match[str]) -> str:
        body = RENDERERS[match.group("name")](sources).rstrip("\n") + "\n"
        return match.group("begin") + body + match.group("end")

    return SECTION.sub(replace, text)


def stale(paths: Iterable[Path], sources: Sources) -> dict[Path, str]:
    """Every file whose marked sections differ from what would be written, with a diff."""
    diffs = {}
    for path in paths:
        text = path.read_text()
        fresh = render_text(text, sources, str(path))
        if fresh != text:
            diffs[path] = "".join(
                difflib.unified_diff(
                    text.splitlines(keepends=True),
                    fresh.splitlines(keepends=True),
                    f"{path} (committed)",
                    f"{path} (from the results)",
                )
            )
    return diffs


def refresh(root: Path = ROOT, results: Path = RESULTS) -> list[Path]:
    """Rewrite every stale marked section under `root`; returns the files written."""
    sources = Sources(results)
    written = []
    for path in doc_paths(root):
        text = path.read_text()
        fresh = render_text(text, sources, str(path))
        if fresh != text:
            path.write_text(fresh)
            written.append(path)
    return written


def publish_soak(report: dict, results: Path = RESULTS, root: Path = ROOT) -> list[Path]:
    """Write results/soak.json from a soak report, refresh the docs; returns the files written."""
    summary = results / "soak.json"
    summary.write_text(json.dumps(soak_summary(report), indent=1) + "\n")
    return [summary, *refresh(root, results)]


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, verify) every marked section; returns the exit code."""
    parser = cli.parser(
        "loadtest.tools.docfigures",
        "Write the measured figures from results/ into the marked sections of README.md and "
        "docs/*.md.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 with a diff when a section is stale",
    )
    cli.add_path(parser, "--results", RESULTS, "directory of bench.json and soak.json")
    cli.add_path(parser, "--root", ROOT, "where README.md and docs/ are")
    args = parser.parse_args(argv)
    try:
        if args.check:
            diffs = stale(doc_paths(args.root), Sources(args.results))
            for diff in diffs.values():
                sys.stdout.write(diff)
            if diffs:
                print(
                    "docfigures: stale sections in "
                    + ", ".join(map(str, diffs))
                    + "; run `make docs` (python -m loadtest.tools.docfigures)",
                    file=sys.stderr,
                )
            return 1 if diffs else 0
        for path in refresh(args.root, args.results):
            print(f"docfigures: wrote {path}")
    except FiguresError as error:
        print(f"docfigures: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
