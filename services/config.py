"""One frozen settings object for every model: `ARENA_*` environment variables, CLI flags win.

Standard library only: `python -m services gevent` reads its settings before gevent
monkey-patches, so nothing here may import sockets or threads.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn
from urllib.parse import urlsplit

from services import models
from services import options as parse
from services.options import Option

ENV_PREFIX = "ARENA_"


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the flag or variable."""


@dataclass(frozen=True)
class Settings:
    """Everything a server needs to know; the same keys for every model."""

    model: str = "threaded"
    host: str = "0.0.0.0"  # address the protocol and metrics listeners bind
    port: int = 9000  # protocol port; 0 binds a free one (logged)
    metrics_port: int = 9100  # Prometheus /metrics port; 0 binds a free one (logged)
    metrics: bool = True  # False: no /metrics endpoint and no per-request timing
    max_connections: int = 10000  # over it a client gets `ERR server-busy` and is closed
    idle_timeout: float = 300.0  # seconds without request bytes or a request in progress
    line_limit: int = 65536  # bytes per request line, counted before the newline
    grace: float = 10.0  # seconds to finish received requests on SIGTERM/SIGINT
    executor: str = "process"  # pool model only: process or thread workers
    workers: int = os.cpu_count() or 1  # pool model only: executor workers
    # threaded model only: sys.setswitchinterval, the seconds a thread may hold the GIL while
    # another waits (CPython's 0.005 by default; services/servers/threaded.py shows the trade-off)
    switch_interval: float = 0.005
    # threaded model only: above this many live connections, requests take turns in arrival
    # order (0: always); below it the GIL alone decides who runs next
    turns_above: int = 256
    loop: str = models.DEFAULT_LOOP  # asyncio model only: uvloop or asyncio (the standard one)
    backlog: int = 1024  # listen backlog: socketserver's 5 refuses 100 clients connecting at once
    log_level: str = "INFO"
    # PostgreSQL for `/db`: a libpq URL without the password (empty: `/db` answers
    # ERR backend-unavailable, everything else works), the password kept apart so that the URL
    # may be printed, the connections one server holds (four servers x 20 and the exporter fit
    # PostgreSQL's default max_connections of 100), the driver, and the seconds to connect or
    # to wait for a free connection.
    db_url: str = ""
    db_password: str = field(default="", repr=False)
    db_pool: int = 20
    db_driver: str = "default"
    db_timeout: float = 2.0
    # Worker processes of the model on one port (services/supervisor.py); 1 serves in this one.
    processes: int = 1
    # Bind the protocol port with SO_REUSEPORT: set by the supervisor for its workers.
    reuse_port: bool = False
    # Serve on this inherited, already listening socket instead of binding one (-1: bind):
    # gunicorn's way of sharing a port, which the spread measurement compares with
    # SO_REUSEPORT (loadtest/bench/spread.py, services/supervisor.py).
    listen_fd: int = -1


def _db_url(text: str) -> str:
    if not text:
        return text
    parts = urlsplit(text)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("use a libpq URL, postgresql://USER@HOST:PORT/DATABASE")
    if parts.password is not None:
        raise ValueError(
            "a password in the URL would be printed: give it in ARENA_DB_PASSWORD or "
            "ARENA_DB_PASSWORD_FILE"
        )
    return text


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _password_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip()
    except OSError as error:
        raise ValueError(f"cannot read it: {error.strerror}") from None


def _log_level(text: str) -> str:
    return parse.choice(("DEBUG", "INFO", "WARNING", "ERROR"))(text.upper())


# The options every model takes. The flag is --name-with-dashes, the variable ARENA_NAME. A
# model's own options (the pool's --workers, threaded's --switch-interval, asyncio's --loop) are
# declared in its registry entry (services/models.py, `Model.options`) and added after these.
COMMON_OPTIONS: tuple[Option, ...] = (
    Option("host", str, "address to bind the protocol and metrics ports"),
    Option("port", parse.port, "protocol port; 0 binds a free port and logs it"),
    Option("metrics_port", parse.port, "Prometheus /metrics port; 0 binds a free port and logs it"),
    Option("metrics", parse.boolean, "serve /metrics and time requests (false measures the cost)"),
    Option(
        "max_connections",
        parse.positive_int,
        "connections held at once; more get ERR server-busy",
    ),
    Option(
        "idle_timeout",
        parse.positive_seconds,
        "seconds without request bytes before a connection closes",
    ),
    Option(
        "line_limit",
        parse.positive_int,
        "longest request line in bytes (longer: ERR line-too-long)",
    ),
    Option(
        "grace",
        parse.non_negative_seconds,
        "seconds to answer received requests on SIGTERM/SIGINT",
    ),
    Option("backlog", parse.positive_int, "listen backlog of the protocol socket"),
    Option("log_level", _log_level, "DEBUG, INFO, WARNING or ERROR"),
    Option("db_url", _db_url, "PostgreSQL for /db, postgresql://USER@HOST:PORT/DB (no password)"),
    Option("db_password", str, "the database password (never printed)"),
    Option("db_password_file", _password_file, "a file holding the database password (a secret)"),
    Option("db_pool", parse.positive_int, "database connections this server holds at most"),
    Option(
        "db_driver",
        parse.choice(models.DB_DRIVERS),
        "default (cooperative), blocking or blocking-fixed (gevent and asyncio only)",
    ),
    Option(
        "db_timeout",
        parse.positive_seconds,
        "seconds to connect, or to wait for a free connection",
    ),
    Option(
        "processes",
        parse.positive_int,
        "worker processes of the model on one port, supervised (threaded, gevent, asyncio)",
    ),
    Option(
        "reuse_port",
        parse.boolean,
        "bind with SO_REUSEPORT (the supervisor sets it for workers)",
    ),
    Option(
        "listen_fd",
        parse.non_negative_int,
        "serve on this inherited listening socket (-1: bind one; the spread tool sets it)",
    ),
)
# Every model's own options, each named by the model that reads it (in --help and errors).
OWNER: dict[str, str] = {
    option.name: model.name for model in models.MODELS for option in model.options
}
OPTIONS: dict[str, Option] = {
    option.name: option
    for option in (
        *COMMON_OPTIONS,
        *(option for model in models.MODELS for option in model.options),
    )
}
# Options that fill another field: the password file fills the password.
FILLS = {"db_password_file": "db_password"}
SECRET_OPTIONS = ("db_password", "db_password_file")  # their values are never shown as defaults


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line, for ConfigError to carry."""

    def error(self, message: str) -> NoReturn:  # raises instead of exiting
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m services`."""
    defaults = Settings()
    parser = _OneLineParser(
        prog="python -m services",
        description="Run one Socket Arena TCP server (protocol: docs/PROTOCOL.md). Every "
        "option can also be set as an ARENA_* environment variable; flags win.",
    )
    parser.add_argument(
        "model",
        choices=models.NAMES,
        help="concurrency model: "
        + "; ".join(f"{model.name}: {model.summary}" for model in models.MODELS),
    )
    for name, option in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        variable = ENV_PREFIX + name.upper()
        default = getattr(defaults, FILLS.get(name, name))
        if name in SECRET_OPTIONS or default == "":
            default = "none"
        owner = f"{OWNER[name]} model only: " if name in OWNER else ""
        help_text = f"{owner}{option.help} (env {variable}, default {default})"
        if option.parse is parse.boolean:  # --flag and --no-flag
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(flag, dest=name, metavar=name.upper(), default=None, help=help_text)
    return parser


def load_settings(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Settings:
    """Read flags and `ARENA_*` variables (flags win) into validated Settings."""
    arguments = vars(build_parser().parse_args(argv))
    # Any: each value is what its option's parser returned, the type of the field it fills.
    values: dict[str, Any] = {"model": arguments.pop("model")}
    for name, option in OPTIONS.items():
        flag_value = arguments[name]
        variable = ENV_PREFIX + name.upper()
        owner = OWNER.get(name, values["model"])
        if flag_value is not None:
            source, text = "--" + name.replace("_", "-"), flag_value
            if owner != values["model"]:
                raise ConfigError(
                    f"{source}: only the {owner} model takes it; it means nothing for the "
                    f"{values['model']} model"
                )
        elif variable in environ and owner == values["model"]:
            # Another model's variable is left alone: one environment may start several
            # models (the local stack, a shell with ARENA_WORKERS exported).
            source, text = variable, environ[variable]
        else:
            continue
        if isinstance(text, bool):
            values[name] = text
            continue
        try:
            values[FILLS.get(name, name)] = option.parse(text)
        except ValueError as error:
            reason = (
                str(error)
                if not str(error).startswith(("invalid literal", "could not"))
                else "not a number"
            )
            shown = (
                "(hidden)"
                if name == "db_password"
                else repr(redact_url(text) if name == "db_url" else text)
            )
            raise ConfigError(f"{source}: invalid value {shown}: {reason}") from None
    known = {f.name for f in fields(Settings)}
    settings = Settings(**{k: v for k, v in values.items() if k in known})
    model = models.get(settings.model)
    if settings.processes > 1 and not model.processes:
        raise ConfigError(
            f"--processes: the {model.name} model already spreads its requests over worker "
            "processes (--workers); --processes is for the models that serve in one process"
        )
    if settings.db_driver not in model.db_drivers:
        raise ConfigError(
            f"the {settings.db_driver} database driver means nothing for the {model.name} model "
            f"(its requests already run where a blocking call blocks only them); it takes "
            + ", ".join(model.db_drivers)
        )
    return settings
