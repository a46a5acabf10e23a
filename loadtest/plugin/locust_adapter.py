"""Every use of Locust's private parts, each checked at start-up, each falling back loudly.

- `parser-config-files`: loadtest/plugin/locust.conf is read first by putting it in front of the
  parser's private `_default_config_files` (configargparse). Without that list, locust.conf is
  read only when given with `--config`.
- `parser-known-options`: a knob already on the parser (``python -m loadtest`` adds the knobs
  before Locust imports the locustfile, which adds them again) is found in argparse's private
  `_option_string_actions`. Without it, each knob is added and a conflict (argparse's own
  error for a flag added twice) skips it.
- `swarm-interception`: the web UI checks knobs before Locust's ``/swarm`` handler runs, from a
  Flask ``before_request`` hook that rewrites the form fields Locust reads (``user_count``,
  ``host``). It needs a POST ``/swarm`` route whose handler still reads those fields. Without
  it the hook is not installed: a bad knob is then refused by the users (they keep the last
  good workload) rather than by the form.

A fallback is logged once as a warning naming the adapter and why, and shows on the Locust
master's ``/metrics`` as ``locust_adapter_fallback{adapter="..."} 1`` (0 for an adapter that
found what it needs). Nothing here imports Locust or Flask: the objects are handed in.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import threading
import types
from collections.abc import Callable, Container, Iterator
from typing import Any

logger = logging.getLogger(__name__)

CONFIG_FILES = "parser-config-files"
KNOWN_OPTIONS = "parser-known-options"
SWARM = "swarm-interception"
# The form fields Locust's /swarm handler reads that the interception rewrites.
SWARM_FIELDS = ("user_count", "host")

_lock = threading.Lock()
_checked: dict[str, str | None] = {}  # adapter -> why it fell back (None: it did not)


def works(adapter: str) -> None:
    """Record that `adapter` found what it relies on."""
    with _lock:
        _checked.setdefault(adapter, None)


def fell_back(adapter: str, reason: str) -> None:
    """Record, and log once as a warning, that `adapter` fell back."""
    with _lock:
        first = _checked.get(adapter) is None
        _checked[adapter] = reason
    if first:
        logger.warning("Locust adapter %s falls back: %s", adapter, reason)


def fallbacks() -> dict[str, str]:
    """The adapters that fell back in this process, with their reasons."""
    with _lock:
        return {name: reason for name, reason in _checked.items() if reason is not None}


def reset() -> None:
    """Forget every check (tests)."""
    with _lock:
        _checked.clear()


def metrics_text() -> bytes:
    """``locust_adapter_fallback`` in Prometheus text: one sample per adapter checked."""
    with _lock:
        checked = sorted(_checked.items())
    if not checked:
        return b""
    lines = [
        "# HELP locust_adapter_fallback 1 when an adapter of Locust's private API fell back",
        "# TYPE locust_adapter_fallback gauge",
        *(
            f'locust_adapter_fallback{{adapter="{name}"}} {0.0 if reason is None else 1.0}'
            for name, reason in checked
        ),
    ]
    return ("\n".join(lines) + "\n").encode()


# -- the parser ---------------------------------------------------------------------------------


def read_config_first(parser: Any, path: str) -> None:
    """Make `parser` read `path` before any other config file (lowest priority)."""
    defaults = getattr(parser, "_default_config_files", None)
    if not isinstance(defaults, list | tuple):
        fell_back(
            CONFIG_FILES,
            f"the parser has no _default_config_files list: {path} is read only with --config",
        )
        return
    works(CONFIG_FILES)
    if path not in defaults:
        parser._default_config_files = [path, *defaults]


def known_options(parser: Any) -> Container[str]:
    """The option strings already on `parser` (empty after a loud fallback)."""
    known = getattr(parser, "_option_string_actions", None)
    if not isinstance(known, dict):
        fell_back(
            KNOWN_OPTIONS,
            "the parser has no _option_string_actions: knobs are added and conflicts skipped",
        )
        return {}
    works(KNOWN_OPTIONS)
    return known


def add_argument_once(parser: Any, flag: str, known: Container[str], **options: Any) -> None:
    """Add `flag` unless it is there already (known, or refused by argparse as a conflict)."""
    if flag in known:
        return
    try:
        parser.add_argument(flag, **options)
    except argparse.ArgumentError:
        pass  # "conflicting option string": added before, by the other registration


# -- /swarm ---------------------------------------------------------------------------------------


def _strings(code: types.CodeType) -> Iterator[str]:
    """Every string constant in a code object and the code objects nested in it."""
    for constant in code.co_consts:
        if isinstance(constant, str):
            yield constant
        elif isinstance(constant, types.CodeType):
            yield from _strings(constant)


def swarm_problem(app: Any) -> str | None:
    """Why the /swarm interception cannot work on this Flask app, or None."""
    if not callable(getattr(app, "before_request", None)):
        return "the web UI's app has no before_request hook"
    url_map = getattr(app, "url_map", None)
    rules = [
        rule
        for rule in getattr(url_map, "iter_rules", lambda: [])()
        if str(rule.rule).endswith("/swarm") and "POST" in (rule.methods or ())
    ]
    if not rules:
        return "the web UI has no POST /swarm route"
    view = getattr(app, "view_functions", {}).get(rules[0].endpoint)
    code = getattr(inspect.unwrap(view), "__code__", None) if view is not None else None
    if not isinstance(code, types.CodeType):
        return "the /swarm handler is not a Python function"
    missing = [name for name in SWARM_FIELDS if name not in set(_strings(code))]
    if missing:
        return f"Locust's /swarm handler no longer reads the form fields {', '.join(missing)}"
    return None


def intercept_swarm(app: Any, check: Callable[[], Any]) -> bool:
    """Run `check` before Locust's /swarm handler; False (and a loud fallback) if it cannot."""
    problem = swarm_problem(app)
    if problem is not None:
        fell_back(SWARM, f"{problem}: knobs are not checked before a test starts")
        return False
    works(SWARM)

    def check_before_swarm() -> Any:
        from flask import request

        if request.method != "POST" or not request.path.endswith("/swarm"):
            return None
        return check()

    app.before_request(check_before_swarm)
    return True
