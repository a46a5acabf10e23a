"""Supervision of the serving loops, on real server processes with one real fault injected.

Each server runs `python -m services` (its real `main`) from a small `python -c` script that
first plants one fault: a listener broken under the running server, a protocol function that
raises for one request line, or a failing sweep or loop-lag probe. What must follow
(`base.Server.run_or_exit`, `serve_blocking`): a broken listener or a failed loop logs a critical
line with its traceback and exits 1, so a supervisor restarts the server; a bug in one session
closes only that connection, is counted in `arena_internal_errors_total{where="session"}`, and
everyone else is served (the pool, which runs requests rather than sessions, contains a task
that raises in its own way: `pool.PoolServer.task_failed`).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import sys
from collections.abc import Iterator

import pytest

from loadtest.tools import procs
from services import models
from tests.conftest import EVENT_LOOPS, MODELS, RunningServer, launch, stop_server
from tests.reliability_helpers import connect, poll, poll_metrics, read_until_closed, request

EXIT_TIMEOUT = 30.0  # a broken server exits within a second; the rest is slack for a loaded CI
FAULT_LINE = b"boom"  # the request line the injected protocol bug raises on
# The models that answer a connection's requests in the server process, where the fault is
# planted: a thread or greenlet running the blocking session loop (services/blocking.py), or an
# asyncio Protocol (on each event loop). The pool answers in its workers.
IN_PROCESS = [name for name in MODELS if models.target(name)[0].flow != "reactor"]

# Runs the real `services.__main__.main` after planting one fault (argv: model, fault, flags).
# gevent patches first, as `python -m services gevent` does before importing anything else.
FAULTY_SERVER = r"""
import sys
model, fault, *flags = sys.argv[1:]
if model == "gevent":
    from gevent import monkey
    monkey.patch_all()
import os, socket, threading
from services import protocol, session
from services.servers import base

def injected(*_args, **_kwargs):
    raise RuntimeError("injected fault")

if fault == "session":
    real_answer = protocol.answer
    def answer(line, *rest):
        if line == FAULT_LINE:
            raise RuntimeError("injected fault in one session")
        return real_answer(line, *rest)
    protocol.answer = answer  # pool workers fork later and inherit it
elif fault == "sweep":  # the blocking models' sweep closes idle sessions; every sweep checks
    session.ServerStats.sweep_idle = injected
    base.Server.check_listener = injected
elif fault == "probe":
    session.Histogram.observe = injected  # only the event-loop probes call it in a server
elif fault in ("shutdown", "devnull"):
    real_start = base.Server.start
    def start_then_break(self):
        address = real_start(self)
        listener = self.listener
        def break_listener():
            if fault == "shutdown":  # accept() now fails with EINVAL, and wakes up to see it
                listener.shutdown(socket.SHUT_RDWR)
            else:  # the descriptor becomes /dev/null: accept() fails with ENOTSOCK
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, listener.fileno())
                os.close(null)
            print("test: listener broken", file=sys.stderr, flush=True)
        threading.Timer(0.3, break_listener).start()
        return address
    base.Server.start = start_then_break
from services.__main__ import main
sys.exit(main([model, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *flags]))
""".replace("FAULT_LINE", repr(FAULT_LINE))


def launch_faulty(model: str, fault: str, *flags: str) -> RunningServer:
    """Start a server of `model` (or a variant) with `fault` planted; wait for its ready line."""
    registered, variant_flags = models.target(model)
    command = [
        sys.executable,
        "-c",
        FAULTY_SERVER,
        registered.name,
        fault,
        *variant_flags,
        *registered.small_flags,
        *flags,
    ]
    return launch(command, model)


@pytest.fixture
def faulty() -> Iterator:
    """Start faulty servers; each is stopped (or found dead) at the end of the test."""
    started: list[RunningServer] = []

    def start(model: str, fault: str, *flags: str) -> RunningServer:
        server = launch_faulty(model, fault, *flags)
        started.append(server)
        return server

    yield start
    for server in started:
        stop_server(server)


def wait_for_exit(server: RunningServer, wake_accept: bool = False) -> int:
    """The exit code of a server that must exit by itself; fails if it is still up."""
    if wake_accept:
        # A blocked accept() or poll() holds the old socket: a connection wakes it up.
        # Or the exit itself: the server may notice and exit before the breaker's line is out.
        poll(
            "the listener to be broken",
            lambda: "listener broken" in server.log_text() or server.proc.poll() is not None,
            timeout=EXIT_TIMEOUT,
        )
        try:
            connect(server.address, timeout=2.0).close()
        except OSError:
            pass
    return procs.wait_exit(
        server.proc, EXIT_TIMEOUT, lambda: "after the fault:\n" + server.log_text()
    )


@contextlib.contextmanager
def others_served(server: RunningServer) -> Iterator[socket.socket]:
    """A victim connection for the fault; a bystander is answered before and after it, and a
    newcomer after it."""
    with connect(server.address) as bystander, connect(server.address, timeout=5) as victim:
        assert request(bystander, b"before") == b"BEFORE\n"
        yield victim
        assert request(bystander, b"after") == b"AFTER\n"
        with connect(server.address) as newcomer:
            assert request(newcomer, b"/ping") == b"PONG\n"


def assert_fatal_logged(server: RunningServer, loop: str) -> None:
    """The log names the failed loop at CRITICAL level, with the traceback."""
    log = server.log_text()
    logger = f"arena.{models.target(server.model)[0].name}"
    assert f"CRITICAL {logger}: the {loop} loop failed; exiting with code 1" in log, log
    assert "Traceback (most recent call last)" in log, log


# (model, how the listener breaks, the loop that notices). A descriptor replaced under gevent's
# accept, which waits in epoll, is never accepted on again (epoll drops the closed file): the
# sweep's listener check notices it. The threaded accept wakes up on the next connection.
BROKEN_LISTENERS = [
    ("threaded", "shutdown", "accept"),
    ("pool", "shutdown", "reactor"),
    ("gevent", "shutdown", "accept"),
    ("threaded", "devnull", "accept"),
    ("gevent", "devnull", "sweep"),
    ("pool", "devnull", "reactor"),  # the reactor's sweep checks the listener
    # asyncio waits for the listener in its loop's epoll, as gevent does.
    *((name, "shutdown", "accept") for name in EVENT_LOOPS if name != "gevent"),
    *((name, "devnull", "sweep") for name in EVENT_LOOPS if name != "gevent"),
]


@pytest.mark.parametrize(("model", "how", "loop"), BROKEN_LISTENERS)
def test_a_broken_listener_exits_1_with_a_critical_log(faulty, model, how, loop):
    server = faulty(model, how)
    assert wait_for_exit(server, wake_accept=True) == 1
    assert_fatal_logged(server, loop)
    # EINVAL from accept() after shutdown (gevent: EBADF, it cancels the wait), ENOTSOCK on
    # /dev/null: every one of them is in base.BROKEN_LISTENER_ERRNOS.
    errors = (errno.EINVAL, errno.EBADF) if how == "shutdown" else (errno.ENOTSOCK,)
    assert any(f"[Errno {error}]" in server.log_text() for error in errors), server.log_text()


@pytest.mark.parametrize("model", IN_PROCESS)
def test_a_bug_in_one_session_closes_only_that_connection_and_is_counted(faulty, model):
    server = faulty(model, "session")
    with others_served(server) as victim:
        victim.sendall(FAULT_LINE + b"\n")
        try:
            replies, _ended = read_until_closed(victim)
        except TimeoutError:
            log = server.log_text()
            raise AssertionError(f"the failed session was not closed:\n{log}") from None
        assert replies == b"", replies
    metrics = poll_metrics(
        server,
        "the session error to be counted",
        lambda m: m.sum("arena_internal_errors_total", where="session") >= 1,
    )
    assert metrics.sum("arena_internal_errors_total", where="session") == 1
    assert metrics.sum("arena_internal_errors_total") == 1
    assert server.proc.poll() is None, server.log_text()
    assert "session failed; closing its connection" in server.log_text()
    assert "injected fault in one session" in server.log_text()


def test_a_bug_in_one_pool_task_is_contained_and_counted(faulty):
    # The pool runs requests in tasks, not sessions: a task that raises is retried alone, then
    # its lines are answered with an error (pool.task_failed), counted as where="worker". The
    # process workers start from a forkserver without the planted fault, so the test runs the
    # protocol in thread workers, in the process where it is planted.
    server = faulty("pool", "session", "--executor", "thread")
    with others_served(server) as victim:
        assert request(victim, FAULT_LINE).startswith(b"ERR "), server.log_text()
    metrics = poll_metrics(
        server,
        "the task error to be counted",
        lambda m: m.sum("arena_internal_errors_total", where="worker") >= 1,
    )
    assert metrics.sum("arena_internal_errors_total", where="worker") >= 1
    assert server.proc.poll() is None, server.log_text()
    assert "injected fault in one session" in server.log_text()


@pytest.mark.parametrize("model", IN_PROCESS)
def test_a_failing_sweep_loop_exits_1(faulty, model):
    server = faulty(model, "sweep", "--idle-timeout", "0.4")  # a sweep every 0.1 s
    assert wait_for_exit(server) == 1
    assert_fatal_logged(server, "sweep")


@pytest.mark.parametrize("model", EVENT_LOOPS)
def test_a_failing_event_loop_probe_exits_1(faulty, model):
    server = faulty(model, "probe")
    assert wait_for_exit(server) == 1
    assert_fatal_logged(server, "probe")
