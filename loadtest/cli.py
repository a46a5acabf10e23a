"""What the arena's command-line tools share: their options, their timestamp, the docs refresh.

The benchmark (`loadtest.bench`), the lessons, the scrape cost, soak and docfigures each parse
a few options of the same kinds (a comma-separated choice among names, a number with its
default in the help, a path under the repository) and, when they write the committed results,
refresh the docs' figures. Standard library only.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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


def timestamp() -> str:
    """Now, in UTC, to the minute: when a result was measured."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def write_result(tool: str, out: Path, report: dict, committed: Path) -> None:
    """Write `report` as JSON to `out`, say so, and refresh the docs when `out` is `committed`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{tool}: wrote {out}")
    refresh_docs_if_committed(out, committed, lambda text: print(f"{tool}: {text}"))


def refresh_docs_if_committed(out: Path, committed: Path, note: Callable[[str], object]) -> None:
    """When `out` is where the committed results live, rewrite the docs' figures from them and
    `note` each file written."""
    if out.resolve() != committed.resolve():
        return
    from loadtest import docfigures  # only then: it reads every result file

    for path in docfigures.refresh():
        note(f"wrote {path.relative_to(ROOT)}")
