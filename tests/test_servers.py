"""The servers as programs: command line, limits, timeouts, shutdown and load, on every model."""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from loadtest.tools import procs
from services import config, models
from tests.conftest import (
    MODELS,
    ROOT,
    RunningServer,
    launch,
    run_module,
    small_flags,
    stop_server,
    wait_until,
)
from tests.server_helpers import (
    LineClient,
    processes_in_session,
    scrape,
    wait_for,
    wait_for_metrics,
)

# Every variant that must behave the same (services/models.py: each model, the pool with each
# executor), as a command line for a small run.
VARIANTS = {
    name: (model.name, *model.small_flags, *variant.flags)
    for name, (model, variant) in models.VARIANTS.items()
}
SHUTDOWN_TIMEOUT = 60.0


def model_args(model: str) -> tuple[str, ...]:
    """Extra flags a model needs in these tests (the pool gets 2 workers, as on 2 cores)."""
    return small_flags(model)


def clean_env(**extra: str) -> dict[str, str]:
    """The test environment without stray ARENA_* variables, plus the given ones."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ARENA_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m services ARGS` to completion; fail (not hang) if it starts serving."""
    try:
        return run_module("services", *args, timeout=30, env=env or clean_env())
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"`python -m services {' '.join(args)}` kept running: {error}")


def assert_one_clear_error_line(result: subprocess.CompletedProcess[str]) -> None:
    """Exit 2, exactly one non-empty line on stderr, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, f"expected one stderr line, got:\n{result.stderr}"


def listening_socket() -> socket.socket:
    """A socket listening on a free loopback port (to make that port busy)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def wait_until_received(server: RunningServer, byte_count: int) -> None:
    """Poll the metrics until the server has read `byte_count` request bytes."""
    wait_for_metrics(server, lambda m: m.sum("arena_received_bytes_total") >= byte_count)


def wait_until_all_closed(server: RunningServer):
    """Poll until the server holds no connection; returns that scrape."""
    return wait_for_metrics(server, lambda m: m.value("arena_connections_active") == 0)


# Command line -------------------------------------------------------------------------------

OPTIONS = (
    "--loop",
    "--host",
    "--port",
    "--metrics-port",
    "--max-connections",
    "--idle-timeout",
    "--line-limit",
    "--grace",
    "--executor",
    "--workers",
    "--no-metrics",
    "--log-level",
)


def test_help_documents_every_option():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for option in OPTIONS:
        assert option in result.stdout, f"{option} missing from --help"
    for model in models.NAMES:
        assert model in result.stdout
    assert "ARENA_" in result.stdout


SAFE_FLAGS = ("--host", "127.0.0.1", "--port", "0", "--metrics-port", "0")

BAD_COMMAND_LINES = {
    "port-not-a-number": (("threaded", "--port", "abc", "--metrics-port", "0"), {}),
    "port-out-of-range": (("threaded", "--port", "70000", "--metrics-port", "0"), {}),
    "metrics-port-not-a-number": (("threaded", "--port", "0", "--metrics-port", "x"), {}),
    "zero-workers": (("pool", *SAFE_FLAGS, "--workers", "0"), {}),
    "unknown-executor": (("pool", *SAFE_FLAGS, "--executor", "nope"), {}),
    "unknown-flag": (("threaded", *SAFE_FLAGS, "--no-such-flag"), {}),
    "unknown-model": (("nope", *SAFE_FLAGS), {}),
    "missing-model": (SAFE_FLAGS, {}),
    "idle-timeout-not-a-number": (("threaded", *SAFE_FLAGS, "--idle-timeout", "soon"), {}),
    "zero-max-connections": (("gevent", *SAFE_FLAGS, "--max-connections", "0"), {}),
    "negative-line-limit": (("threaded", *SAFE_FLAGS, "--line-limit", "-1"), {}),
    "unknown-log-level": (("threaded", *SAFE_FLAGS, "--log-level", "loud"), {}),
    "env-port-not-a-number": (
        ("threaded", "--host", "127.0.0.1", "--metrics-port", "0"),
        {"ARENA_PORT": "abc"},
    ),
    "env-zero-workers": (("pool", *SAFE_FLAGS), {"ARENA_WORKERS": "0"}),
    "env-bad-idle-timeout": (("gevent", *SAFE_FLAGS), {"ARENA_IDLE_TIMEOUT": "soon"}),
    "unknown-loop": (("asyncio", *SAFE_FLAGS, "--loop", "trio"), {}),
    "env-unknown-loop": (("asyncio", *SAFE_FLAGS), {"ARENA_LOOP": "tokio"}),
}


@pytest.mark.parametrize("case", BAD_COMMAND_LINES.keys())
def test_bad_flag_or_value_exits_2_with_one_line(case):
    args, env = BAD_COMMAND_LINES[case]
    assert_one_clear_error_line(run_cli(*args, env=clean_env(**env)))


@pytest.mark.parametrize("busy_flag", ["--port", "--metrics-port"])
@pytest.mark.parametrize("model", MODELS)
def test_port_in_use_exits_2_with_one_line_and_leaves_no_process(model, busy_flag):
    with listening_socket() as busy:
        busy_port = str(busy.getsockname()[1])
        ports = {"--port": "0", "--metrics-port": "0", busy_flag: busy_port}
        registered, variant_flags = models.target(model)
        args = [registered.name, *variant_flags, "--host", "127.0.0.1", *model_args(model)]
        for flag, port in ports.items():
            args += [flag, port]
        proc = subprocess.Popen(
            [sys.executable, "-m", "services", *args],
            cwd=ROOT,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"{model} kept running although {busy_flag} {busy_port} is in use")
    assert_one_clear_error_line(subprocess.CompletedProcess(args, proc.returncode, "", stderr))
    # A pool must not leave worker processes behind when it cannot start.
    wait_for(lambda: not processes_in_session(proc.pid), 10, "the server's processes to exit")


@pytest.mark.parametrize("model", MODELS)
def test_port_zero_ready_line_names_the_real_ports(server_factory, model):
    server = server_factory(model, *model_args(model))
    assert server.port != 0 and server.metrics_port != 0
    registered = models.target(model)[0].name
    assert f"ready model={registered} host=127.0.0.1 port={server.port} " in server.log_text()
    with LineClient(server.address) as client:
        assert client.request(b"/ping") == b"PONG\n"
    assert scrape(server).value("arena_server_info", model=registered) == 1


def test_flag_wins_over_env_for_idle_timeout(server_factory):
    server = server_factory("threaded", "--idle-timeout", "1", env={"ARENA_IDLE_TIMEOUT": "300"})
    with LineClient(server.address) as client:
        assert client.request(b"/ping") == b"PONG\n"
        # The flag's 1 s applies, so the server closes this idle connection (bounded by the
        # client's read timeout; the env's 300 s would fail it).
        assert client.read_until_closed() == b""


def test_env_alone_sets_the_line_limit_and_the_flag_overrides_it(server_factory):
    twenty = b"t" * 20
    from_env = server_factory("threaded", env={"ARENA_LINE_LIMIT": "16"})
    with LineClient(from_env.address) as client:
        assert client.request(twenty).startswith(b"ERR line-too-long ")
    overridden = server_factory("threaded", "--line-limit", "32", env={"ARENA_LINE_LIMIT": "16"})
    with LineClient(overridden.address) as client:
        assert client.request(twenty) == b"T" * 20 + b"\n"


def test_flag_port_wins_over_env_port(server_factory):
    with listening_socket() as busy:
        # The launcher passes --port 0; a busy ARENA_PORT must be ignored.
        server = server_factory("gevent", env={"ARENA_PORT": str(busy.getsockname()[1])})
        with LineClient(server.address) as client:
            assert client.request(b"/ping") == b"PONG\n"


# The variants that choose an event loop (the asyncio model's), with the loop each names.
LOOP_VARIANTS = {
    name: variant.flags[variant.flags.index("--loop") + 1]
    for name, (_, variant) in models.VARIANTS.items()
    if "--loop" in variant.flags
}


@pytest.mark.parametrize("variant", LOOP_VARIANTS)
def test_the_event_loop_is_named_in_the_ready_line_and_the_server_info(server_factory, variant):
    loop = LOOP_VARIANTS[variant]
    server = server_factory(variant)
    assert f" loop={loop}" in server.log_text()
    model = models.target(variant)[0].name
    assert scrape(server).value("arena_server_info", model=model, loop=loop) == 1


def test_uvloop_asked_for_but_not_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(models, "DEFAULT_LOOP", "asyncio")  # as where uvloop is not installed
    with pytest.raises(config.ConfigError, match="uvloop is not installed"):
        config.load_settings(["asyncio", "--loop", "uvloop"], {})
    assert config.load_settings(["asyncio", "--loop", "asyncio"], {}).loop == "asyncio"


@pytest.mark.parametrize("loop", sorted(set(LOOP_VARIANTS.values())))
def test_env_chooses_the_event_loop(loop):
    model = models.target(next(iter(LOOP_VARIANTS)))[0].name
    server = launch(procs.server_command(model), f"{model}-{loop}", {"ARENA_LOOP": loop})
    try:
        assert f" loop={loop}" in server.log_text()
        with LineClient(server.address) as client:
            assert client.request(b"/sleep 10 slept") == b"SLEPT\n"
    finally:
        stop_server(server)


def test_env_configures_the_pool(server_factory):
    server = server_factory(
        "pool", env={"ARENA_WORKERS": "3", "ARENA_EXECUTOR": "thread", "ARENA_MAX_CONNECTIONS": "1"}
    )
    metrics = scrape(server)
    assert metrics.value("arena_server_info", model="pool", executor="thread", workers="3") == 1
    assert metrics.value("arena_pool_workers") == 3
    with LineClient(server.address) as first, LineClient(server.address) as second:
        assert first.request(b"/ping") == b"PONG\n"
        assert second.read_line().startswith(b"ERR server-busy ")


def test_no_metrics_flag_still_serves_the_protocol():
    proc = subprocess.Popen(
        [sys.executable, "-m", "services", "threaded", *SAFE_FLAGS, "--no-metrics"],
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        ready_line = ""
        assert proc.stderr is not None
        for line in iter(proc.stderr.readline, b""):
            if b"ready model=threaded" in line:
                ready_line = line.decode()
                break
        assert ready_line, "no ready line"
        port = int(ready_line.split(" port=")[1].split()[0])
        with LineClient(("127.0.0.1", port)) as client:
            assert client.request(b"/ping") == b"PONG\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=SHUTDOWN_TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# The pool's two executors -------------------------------------------------------------------


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_pool_serves_with_each_executor(server_factory, executor):
    server = server_factory("pool", "--workers", "2", "--executor", executor)
    with LineClient(server.address) as client:
        assert client.request(b"hello") == b"HELLO\n"
        assert client.request(b"/ping") == b"PONG\n"
        assert client.request(b"/sleep 20 slept") == b"SLEPT\n"
        assert client.request(b"/work 1000 worked") == b"WORKED\n"
        client.send(b"a\n/ping\n/sleep 1 b\n/work 1 c\n//d\n")
        assert client.read_lines(5) == [b"A\n", b"PONG\n", b"B\n", b"C\n", b"/D\n"]
    metrics = scrape(server)
    assert metrics.value("arena_server_info", model="pool", executor=executor, workers="2") == 1
    assert metrics.value("arena_pool_workers") == 2


# Connection limit ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_connection_limit_refuses_the_sixth_and_frees_slots_on_close(server_factory, model):
    server = server_factory(model, *model_args(model), "--max-connections", "5")
    held = [LineClient(server.address) for _ in range(5)]
    try:
        for number, client in enumerate(held):
            assert client.request(b"held %d" % number) == b"HELD %d\n" % number
        with LineClient(server.address) as sixth:
            reply = sixth.read_line()
            assert reply.startswith(b"ERR server-busy ")
            assert sixth.read_until_closed() == b""
        # The five are still served.
        for client in held:
            assert client.request(b"/ping") == b"PONG\n"
        # After one client leaves, a new connection is accepted once the server has closed its
        # side: poll with a deadline, since that close is asynchronous.
        held.pop().close()
        wait_for(lambda: ping_succeeds(server), 20, "a freed connection slot")
    finally:
        for client in held:
            client.close()
    metrics = scrape(server)
    assert metrics.sum("arena_connections_rejected_total", reason="busy") >= 1
    assert metrics.sum("arena_protocol_errors_total", code="server-busy") >= 1


@pytest.mark.parametrize("model", MODELS)
def test_connection_counts_until_the_server_closes_it(server_factory, model):
    server = server_factory(model, *model_args(model), "--max-connections", "1")
    with LineClient(server.address) as leaver:
        leaver.send(b"/sleep 1000 gone\n")
        wait_until_received(server, leaver.sent_bytes)
    # The client has gone, but its request still runs: the server still holds the connection.
    with LineClient(server.address) as refused:
        assert refused.read_line().startswith(b"ERR server-busy ")
    wait_for(lambda: ping_succeeds(server), 20, "the slot to be freed after the request ended")


def ping_succeeds(server: RunningServer) -> bool:
    """One fresh connection's /ping: True if answered PONG, False if refused as busy."""
    with LineClient(server.address) as client:
        client.send(b"/ping\n")
        reply = client.read_line()
    if reply.startswith(b"ERR server-busy "):
        return False
    assert reply == b"PONG\n", reply
    return True


# Idle timeout -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_idle_timeout_closes_idle_and_partial_but_not_busy_connections(server_factory, model):
    server = server_factory(model, *model_args(model), "--idle-timeout", "1")
    with (
        LineClient(server.address) as silent,
        LineClient(server.address) as partial,
        LineClient(server.address) as busy,
    ):
        partial.send(b"no newline yet")
        busy.send(b"/sleep 2500 still here\n")
        # The request in progress outlives the idle timeout and still gets its reply.
        assert busy.read_line() == b"STILL HERE\n"
        assert silent.read_until_closed() == b""
        assert partial.read_until_closed() == b""
        # Once answered, the busy connection is idle too and gets closed.
        assert busy.read_until_closed() == b""
    metrics = wait_until_all_closed(server)
    assert metrics.sum("arena_connections_closed_total", reason="idle") == 3


# Line limit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_line_limit_boundaries(server_factory, model):
    server = server_factory(model, *model_args(model), "--line-limit", "16")
    with LineClient(server.address) as client:
        assert client.request(b"s" * 16) == b"S" * 16 + b"\n"
        assert client.request(b"r" * 15 + b"\r") == b"R" * 15 + b"\n"  # the \r counts
        assert client.request(b"/sleep 1 ab12345") == b"AB12345\n"  # 16 bytes as a command
        # Exactly the limit but with its newline still to come: not too long yet.
        client.send(b"p" * 16)
        wait_until_received(server, client.sent_bytes)
        client.send(b"\n")
        assert client.read_line() == b"P" * 16 + b"\n"
    with LineClient(server.address) as client:
        client.send(b"r" * 16 + b"\r\n")  # 17 with the \r
        assert client.read_line().startswith(b"ERR line-too-long ")
        assert client.read_until_closed() == b""
    with LineClient(server.address) as client:
        client.send(b"x" * 17 + b"\n")
        reply = client.read_line()
        assert reply.startswith(b"ERR line-too-long ") and reply.endswith(b"\n")
        assert client.read_until_closed() == b""
    with LineClient(server.address) as client:
        # Lines pipelined before the too-long one are answered first; nothing after it is.
        client.send(b"one\n/ping\n" + b"y" * 17 + b"\nthree\n")
        assert client.read_lines(2) == [b"ONE\n", b"PONG\n"]
        assert client.read_line().startswith(b"ERR line-too-long ")
        assert client.read_until_closed() == b""
    with LineClient(server.address) as client:
        client.send(b"z" * 17)  # no newline: the limit is passed anyway
        assert client.read_line().startswith(b"ERR line-too-long ")
        assert client.read_until_closed() == b""
    metrics = wait_until_all_closed(server)
    assert metrics.sum("arena_protocol_errors_total", code="line-too-long") == 4
    assert metrics.sum("arena_connections_closed_total", reason="line-too-long") == 4


# Misbehaving clients ------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_client_reset_is_counted_and_the_server_keeps_serving(server_factory, model):
    server = server_factory(model, *model_args(model))
    waiting = LineClient(server.address)
    waiting.send(b"half a line")
    wait_until_received(server, len(b"half a line"))
    waiting.reset()
    metrics = wait_until_all_closed(server)
    assert metrics.sum("arena_connections_closed_total", reason="reset") == 1
    # A reset while a request runs: the reply has nowhere to go; the server shrugs it off.
    sleeping = LineClient(server.address)
    sleeping.send(b"/sleep 200 nobody listens\n")
    wait_until_received(server, len(b"half a line") + len(b"/sleep 200 nobody listens\n"))
    sleeping.reset()
    wait_until_all_closed(server)
    with LineClient(server.address) as client:
        assert client.request(b"/ping") == b"PONG\n"
    assert server.proc.poll() is None


@pytest.mark.parametrize("model", MODELS)
def test_client_that_never_reads_is_throttled_not_buffered(server_factory, model):
    server = server_factory(model, *model_args(model))
    line = b"n" * 999 + b"\n"
    chunk = line * 1024  # 1 MiB of echo requests
    flooder = LineClient(server.address, timeout=3)
    pushed = 0
    try:
        # Without reading a reply, keep sending. A server that stops reading once its replies
        # back up makes sendall block (kernel buffers hold a few MiB); one that kept reading
        # would have to buffer all of it.
        for _ in range(100):
            flooder.send(chunk)
            pushed += len(chunk)
    except TimeoutError:
        pass
    finally:
        flooder.reset()
    assert pushed < 100 * len(chunk), "the server swallowed 100 MiB of requests nobody read"
    wait_until_all_closed(server)
    with LineClient(server.address) as client:
        assert client.request(b"/ping") == b"PONG\n"


@pytest.mark.parametrize("model", MODELS)
def test_running_out_of_file_descriptors_is_survived(server_factory, model):
    server = server_factory(model, *model_args(model))
    open_fds = int(scrape(server).value("process_open_fds"))
    _, hard_limit = resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE)
    # Room for a few connections only: the rest make accept() fail with EMFILE.
    resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (open_fds + 4, hard_limit))

    clients = [LineClient(server.address, timeout=60) for _ in range(12)]  # in the backlog
    try:
        unanswered = {}
        for number, client in enumerate(clients):
            client.send(b"fd %d\n" % number)
            unanswered[client.sock] = (number, client)
        # Only a few fit. Keep every client until the server has met EMFILE (the metrics cannot
        # be scraped now: that needs a descriptor too), else a fast client frees one first.
        wait_until(lambda: "Too many open files" in server.log_text(), timeout=10)
        # Answer and close whoever is served, which frees a descriptor for the next accept.
        deadline = time.monotonic() + 60
        while unanswered and time.monotonic() < deadline:
            readable, _, _ = select.select(list(unanswered), [], [], 1.0)
            for sock in readable:
                number, client = unanswered.pop(sock)
                assert client.read_line() == b"FD %d\n" % number
                client.close()
        assert not unanswered, f"{len(unanswered)} clients never served"
    finally:
        for client in clients:
            client.close()
    # Each client left after its reply, freeing a descriptor for the next accept.
    metrics = wait_until_all_closed(server)
    assert metrics.sum("arena_accept_errors_total", errno="EMFILE") >= 1, server.log_text()
    with LineClient(server.address) as client:
        assert client.request(b"/ping") == b"PONG\n"
    assert server.proc.poll() is None


# Shutdown -----------------------------------------------------------------------------------


def assert_refuses_new_connections(server: RunningServer) -> None:
    """Poll until a new connection is refused, while the server process is still running."""

    def refused() -> bool:
        assert server.proc.poll() is None, "the server exited before refusing was observed"
        try:
            probe = socket.create_connection(server.address, timeout=5)
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:
            # The handshake completed into the backlog just as the listener closed: the kernel
            # resets such a connection, which is a refusal too (it was never accepted). The
            # loop goes on until a plain refusal shows the listener is gone.
            return False
        probe.close()
        return False

    wait_for(refused, 10, "new connections to be refused after SIGTERM")


@pytest.mark.parametrize("variant", VARIANTS.keys())
def test_sigterm_answers_requests_in_flight_then_exits_0(server_factory, variant):
    server = server_factory(*VARIANTS[variant], "--grace", "60")
    sleepers = [LineClient(server.address) for _ in range(6)]  # the pool queues 4 of them
    pipeliner = LineClient(server.address)
    idle = LineClient(server.address)
    sent = 0
    try:
        for number, client in enumerate(sleepers):
            client.send(b"/sleep 1500 c%d\n" % number)
            sent += client.sent_bytes
        pipeliner.send(b"/sleep 300 p1\n/sleep 300 p2\np3\n")
        sent += pipeliner.sent_bytes
        wait_until_received(server, sent)
        server.proc.send_signal(signal.SIGTERM)
        assert_refuses_new_connections(server)
        for number, client in enumerate(sleepers):
            assert client.read_line() == b"C%d\n" % number
        assert pipeliner.read_lines(3) == [b"P1\n", b"P2\n", b"P3\n"]
        for client in [*sleepers, pipeliner, idle]:
            assert client.read_until_closed() == b""
        assert server.proc.wait(timeout=SHUTDOWN_TIMEOUT) == 0
    finally:
        for client in [*sleepers, pipeliner, idle]:
            client.close()
    assert "Traceback" not in server.log_text()
    wait_for(lambda: not processes_in_session(server.proc.pid), 10, "no process left behind")


@pytest.mark.parametrize("variant", VARIANTS.keys())
def test_grace_period_bounds_shutdown(server_factory, variant):
    server = server_factory(*VARIANTS[variant], "--grace", "1")
    with LineClient(server.address) as client:
        client.send(b"/sleep 60000 too slow\n")
        wait_until_received(server, client.sent_bytes)
        server.proc.send_signal(signal.SIGTERM)
        # A generous bound well below the 60 s request: the grace period ended it.
        assert server.proc.wait(timeout=30) == 0
        assert client.read_until_closed() == b""
    assert "Traceback" not in server.log_text()
    wait_for(lambda: not processes_in_session(server.proc.pid), 10, "no process left behind")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("model", MODELS)
def test_idle_connections_do_not_hold_up_shutdown(server_factory, model, stop_signal):
    server = server_factory(model, *model_args(model), "--grace", "120")
    with LineClient(server.address) as client:
        assert client.request(b"/ping") == b"PONG\n"
        server.proc.send_signal(stop_signal)
        # Nothing is in flight, so the server closes the connection instead of using the grace.
        assert client.read_until_closed() == b""
        assert server.proc.wait(timeout=30) == 0
    assert "Traceback" not in server.log_text()


# Load ---------------------------------------------------------------------------------------


def request_and_reply(client_number: int, request_number: int) -> tuple[bytes, bytes]:
    """A varied request unique to this client and position, with its exact expected reply."""
    tag = b"c%d r%d" % (client_number, request_number)
    kind = request_number % 6
    if kind == 0:
        return b"/ping", b"PONG\n"
    if kind == 1:
        return b"//" + tag, b"/" + tag.upper() + b"\n"
    if kind == 2:
        return b"/sleep 0 " + tag, tag.upper() + b"\n"
    if kind == 3:
        return b"/work 20 " + tag, tag.upper() + b"\n"
    echo = b"echo " + tag + b" \x00\xff mixed Case"
    return echo, echo.upper() + b"\n"


def run_concurrent_clients(
    server: RunningServer, clients: int, requests: int, depth_of: Callable[[int], int]
) -> tuple[int, int]:
    """`clients` threads, all connected at once, each sending `requests` checked requests.

    `depth_of(client)` says how many requests that client pipelines per send.
    Returns the total request bytes sent and reply bytes received.
    """
    all_connected = threading.Barrier(clients, timeout=60)

    def one_client(number: int) -> tuple[int, int]:
        with LineClient(server.address, timeout=60) as client:
            all_connected.wait()
            depth = depth_of(number)
            for first in range(0, requests, depth):
                batch = [request_and_reply(number, n) for n in range(first, first + depth)]
                client.send(b"".join(line + b"\n" for line, _ in batch))
                replies = client.read_lines(len(batch))
                assert replies == [reply for _, reply in batch], f"client {number}"
            return client.sent_bytes, client.received_bytes

    with ThreadPoolExecutor(max_workers=clients) as executor:
        futures = [executor.submit(one_client, number) for number in range(clients)]
        results = [future.result() for future in futures]
    return sum(sent for sent, _ in results), sum(received for _, received in results)


@pytest.mark.slow
def test_hundred_concurrent_clients_times_two_hundred_requests(server):
    clients, requests = 100, 200
    # Half the clients wait for each reply, half pipeline 10 requests per send.
    sent, received = run_concurrent_clients(
        server, clients, requests, lambda number: 1 if number % 2 else 10
    )
    metrics = wait_until_all_closed(server)
    assert metrics.sum("arena_requests_total") == clients * requests
    assert metrics.sum("arena_requests_total", outcome="error") == 0
    assert metrics.value("arena_connections_total") == clients
    assert metrics.value("arena_received_bytes_total") == sent
    assert metrics.value("arena_sent_bytes_total") == received


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["process", "thread"])
def test_pool_with_two_workers_serves_hundred_persistent_clients(server_factory, executor):
    server = server_factory("pool", "--workers", "2", "--executor", executor)
    clients = [LineClient(server.address) for _ in range(100)]
    try:
        # All 100 stay connected and idle while each in turn is served: a pool that ran one
        # connection per worker would hang on the third.
        for order in (clients, clients[::-1]):
            for number, client in enumerate(order):
                assert client.request(b"turn %d" % number) == b"TURN %d\n" % number
    finally:
        for client in clients:
            client.close()
    wait_until_all_closed(server)
    # And all at once, each client pipelining 5 requests per send.
    run_concurrent_clients(server, 100, 20, lambda number: 5)
