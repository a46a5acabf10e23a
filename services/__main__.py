"""`python -m services MODEL ...`: run one server until SIGTERM or SIGINT.

Arguments are parsed with the standard library first and the model imported after, because
gevent must monkey-patch before anything that creates sockets, threads or locks is imported.
"""

from __future__ import annotations

import os
import sys

from services.config import ConfigError, load_settings

STANDBY_VARIABLE = "ARENA_STANDBY"  # set by the supervisor for its spare worker
STANDBY_LINE = "standby: built, waiting to serve"


def _fail(message: str) -> int:
    print(f"python -m services: error: {message}", file=sys.stderr)
    return 2


def _exit_now(code: int) -> None:
    """Exit without interpreter teardown: everything is closed, and the executor's exit hook
    would otherwise join worker threads still inside a /sleep or poke a closed pipe."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run a server; returns the exit code (2 for bad settings or a port that cannot be bound)."""
    try:
        settings = load_settings(argv, os.environ)
    except ConfigError as error:
        return _fail(f"{error} (see --help)")
    if settings.processes > 1:
        from services.supervisor import serve_supervised

        return serve_supervised(settings, sys.argv[1:] if argv is None else argv)

    from services import models

    models.get(settings.model).run_prepare()  # gevent monkey-patches here, before any import

    import logging  # after monkey-patching: logging creates locks at import

    from services.metrics import build_registry, serve_metrics
    from services.servers import create_server

    logging.basicConfig(
        level=settings.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger(f"arena.{settings.model}")
    server = create_server(settings)  # the pool forks its workers here, before any thread
    if os.environ.get(STANDBY_VARIABLE):
        # A supervisor's spare worker (services/supervisor.py): everything is imported and
        # built; it binds and serves once the supervisor writes a line to its stdin.
        print(STANDBY_LINE, file=sys.stderr, flush=True)
        if not sys.stdin.buffer.readline():
            _exit_now(0)  # the supervisor closed our stdin: not needed after all
    wait_for_signal = server.catch_signals()  # before the ready line: a quick SIGTERM is graceful
    try:
        host, port = server.start()
    except OSError as error:
        server.stop(0)
        _exit_now(
            _fail(
                f"cannot listen on {settings.host}:{settings.port}: {error.strerror} "
                "(choose another with --port or ARENA_PORT)"
            )
        )
    metrics_port = 0
    if settings.metrics:
        registry = build_registry(
            server.stats, server.info(), server.metric_families, server.adapters
        )
        try:
            metrics_port = serve_metrics(
                registry, settings.host, settings.metrics_port, server.adapters
            )
        except OSError as error:
            server.stop(0)
            _exit_now(
                _fail(
                    f"cannot serve metrics on {settings.host}:{settings.metrics_port}: "
                    f"{error.strerror} (choose another with --metrics-port or ARENA_METRICS_PORT)"
                )
            )
    log.info(
        "ready model=%s host=%s port=%d metrics_port=%d max_connections=%d idle_timeout=%s%s",
        settings.model,
        host,
        port,
        metrics_port,
        settings.max_connections,
        settings.idle_timeout,
        "".join(f" {name}={value}" for name, value in server.ready_fields().items()),
    )
    wait_for_signal()
    log.info("stopping: answering received requests for up to %ss", settings.grace)
    server.stop(settings.grace)
    server.close_database()
    log.info("stopped")
    _exit_now(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
