"""How a setting's text becomes its value: the parsers every option uses, and `Option`.

Standard library only, like the registry that declares each model's own options with them
(services/models.py) and the configuration that reads them (services/config.py): `python -m
services gevent` parses its settings before gevent monkey-patches. A parser takes the text of a
flag or an `ARENA_*` variable and returns the value, or raises ValueError with the reason the
error message shows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """A setting: its Settings field (flag --name-with-dashes, variable ARENA_NAME), the parser
    of its text, and one line for --help."""

    name: str
    parse: Callable[[str], object]
    help: str


def port(text: str) -> int:
    """A TCP port, 0 (a free one) to 65535."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("a port is 0..65535")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    """A whole number of at least 0."""
    value = int(text)
    if value < 0:
        raise ValueError("must be zero or more")
    return value


def positive_seconds(text: str) -> float:
    """A finite number of seconds above 0."""
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def non_negative_seconds(text: str) -> float:
    """A finite number of seconds, 0 or more."""
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be zero or a positive number of seconds")
    return value


def boolean(text: str) -> bool:
    """true/false, yes/no, on/off or 1/0."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"use true or false, got {text!r}")


def choice(allowed: Sequence[str]) -> Callable[[str], str]:
    """A parser that takes one of `allowed`, exactly."""

    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError("choose one of " + ", ".join(allowed))
        return text

    return parse
