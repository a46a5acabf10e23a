"""What the arena's command-line tools share: their options, their timestamp, the docs hint.

The benchmark (`loadtest.bench`), the lessons, the scrape cost, soak and docfigures each parse
a few options of the same kinds (a comma-separated choice among names, a number with its
default in the help, a path under the repository) and, when they write the committed results,
say that `make docs` is the next step (they never rewrite the docs themselves). Standard
library only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def parser(module: str, description: str) -> argparse.ArgumentParser:
    """The parser of `python -m MODULE`."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=description)


def names(allowed: Sequence[str], what: str, canonical: bool = False) -> Callable[[str], list[str]]:
    """An argparse `type`: a comma-separated choice of one or more of `allowed`, in the order
    given (`canonical`: in the order of `allowed`)."""

    def parse(text: str) -> list[str]:
        chosen = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in allowed]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from "
                + ", ".join(allowed)
            )
        return [name for name in allowed if name in chosen] if canonical else chosen

    return parse


def add_names(
    parser: argparse.ArgumentParser,
    flag: str,
    allowed: Sequence[str],
    what: str,
    canonical: bool = False,
    help: str | None = None,
) -> None:
    """`FLAG a,b`: some of `allowed` (all by default), listed in the help."""
    parser.add_argument(
        flag,
        default=list(allowed),
        type=names(allowed, what, canonical),
        help=(help or f"comma-separated {what}s") + " (default: all): " + ", ".join(allowed),
    )


def add_number(parser: argparse.ArgumentParser, flag: str, default: float, help: str) -> None:
    """`FLAG N`, typed like its default (int or float), the default shown after the help."""
    shown = str(default) if isinstance(default, int) else f"{default:g}"
    parser.add_argument(flag, type=type(default), default=default, help=f"{help} (default {shown})")


def add_path(parser: argparse.ArgumentParser, flag: str, default: Path, help: str) -> None:
    """`FLAG PATH`, the default shown after the help (relative to the repository)."""
    if default == ROOT:
        shown = "this checkout"
    else:
        shown = str(default.relative_to(ROOT)) + ("/" if not default.suffix else "")
    parser.add_argument(flag, type=Path, default=default, help=f"{help} (default: {shown})")


# How a lesson's verdict reads in reports and in the docs (loadtest/lessons/verdict.py's words).
VERDICT_MARK = {"holds": "holds", "fails": "FAILS", "inconclusive": "inconclusive"}


def machine_line(results: Mapping[str, Any]) -> str:
    """`2026-12-03 10:00 UTC · AMD EPYC, 2 cores, Linux 6.18, Python 3.11.7 · full run`."""
    machine = results["machine"]
    pace = results["pace"]
    how = (
        "quick run (--quick), one run per figure"
        if pace["quick"]
        else f"full run, median of {pace['reps']} runs per figure"
    )
    return (
        f"{results['when']} · {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['system']}, Python {machine['python']} · {how}"
    )


def commit_of(root: Path) -> str:
    """The checked-out commit of `root` (and '+dirty' when its services/ has local changes)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout

    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--", "services").strip() else "")


def timestamp() -> str:
    """Now, in UTC, to the minute: when a result was measured."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def write_result(tool: str, out: Path, report: dict, committed: Path) -> None:
    """Write `report` as JSON to `out` and say so (and, for the committed results, what next)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{tool}: wrote {out}")
    docs_hint(out, committed, lambda text: print(f"{tool}: {text}"))


def docs_hint(out: Path, committed: Path, note: Callable[[str], object]) -> None:
    """When `out` is where the committed results live, `note` how to refresh the docs.

    Writing results and writing the docs are two steps: a tool writes results; `make docs`
    (loadtest.tools.docfigures) writes their figures into README.md and docs/, and the test
    suite fails while they differ (tests/test_docs.py).
    """
    if out.resolve() == committed.resolve():
        note("the committed results changed: `make docs` writes their figures into the docs")
