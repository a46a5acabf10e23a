"""Show the lessons' results: console blocks, lessons.json, lessons.md and one chart per lesson.

What each lesson's table, reading and chart hold is its module's (`loadtest.lessons.claims`);
this module lays them out and writes them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from loadtest.lessons import claims
from loadtest.lessons.verdict import FAILS, HOLDS, INCONCLUSIVE
from loadtest.tools.cli import VERDICT_MARK, machine_line

VERDICT_COLOR = {HOLDS: "#2ca02c", FAILS: "#d62728", INCONCLUSIVE: "#ff7f0e"}


def table(lesson: str, figures: Mapping[str, Mapping]) -> list[list[str]]:
    """Header row then one row per model (or pool size)."""
    columns = claims.get(lesson).COLUMNS
    body = [
        [label] + [render(figure) for _, render in columns]
        for label, figure in claims.rows(lesson, figures)
    ]
    return [["model"] + [name for name, _ in columns], *body]


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


def resources_line(results: Mapping) -> list[str]:
    """What the machine could give, measured before the lessons (the hypotheses' inputs)."""
    found = results.get("resources")
    if not found:
        return []
    shares = ", ".join(f"CPU {cpu} {share:.0%}" for cpu, share in found["free_by_cpu"].items())
    return [
        f"- **What the machine gave:** {found['cpus']} CPUs, {found['free_cores']:.2f} free "
        f"cores (a busy process on each for 0.5 s got {shares}); the load generator's ceiling "
        f"{found['loadgen_ceiling_rps']:,.0f} req/s (echo against its own C server). The "
        "hypotheses below are derived from these figures and the /work calibration."
    ]


def write_markdown(results: Mapping, directory: Path) -> Path:
    """lessons.md: per lesson the claim, hypothesis, figures, verdict, reading and chart."""
    lines = [
        "# Socket Arena lessons, checked in isolation",
        "",
        f"- **When / where:** {machine_line(results)}.",
        f"- **How:** {results['method']}",
        f"- **Machine load:** {results['background']['text']}",
        *resources_line(results),
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

    lesson = claims.get(entry["id"])
    panels = claims.panels(entry["id"])
    figure, axes = pyplot.subplots(
        1, panels, figsize=({1: 8, 2: 11, 3: 15}[panels], 4.4), squeeze=False
    )
    lesson.chart(list(axes.flat), entry)
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
