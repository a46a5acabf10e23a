"""`--processes N`: N workers of one model on one port, supervised, one scrape for all.

Real supervisors and workers on 127.0.0.1 (port 0), real signals. services/supervisor.py says
how the port is shared and why the metrics are merged the way they are.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loadtest.tools import procs
from services import models
from tests.conftest import ROOT, RunningServer, launch_server, run_module, stop_server
from tests.server_helpers import LineClient, scrape, wait_for, wait_for_metrics

pytestmark = pytest.mark.slow

# The models that take --processes (the pool spreads its requests over --workers already).
SUPERVISED = [name for name in models.SUITE_TARGETS if models.target(name)[0].processes]


def worker_pids(server: RunningServer) -> list[int]:
    """The workers' pids, as the supervisor's ready line names them."""
    found = re.search(r"ready model=\S+ .* workers=([\d,]+)", server.log_text())
    assert found, server.log_text()
    return [int(pid) for pid in found[1].split(",")]


def live_worker_pids(server: RunningServer) -> set[str]:
    """The pids the merged scrape shows per-worker series for."""
    return scrape(server).label_values("arena_worker_connections_active", "pid")


@pytest.mark.parametrize("name", SUPERVISED)
def test_two_workers_share_one_port_and_one_scrape_adds_them_up(name):
    server = launch_server(name, "--processes", "2")
    try:
        clients = [LineClient(server.address) for _ in range(40)]
        try:
            for number, client in enumerate(clients):
                assert client.request(f"hello {number}".encode()) == f"HELLO {number}\n".encode()
            metrics = wait_for_metrics(server, lambda m: m.value("arena_connections_active") == 40)
            assert metrics.value("arena_requests_total", command="echo", outcome="ok") == 40
            assert metrics.value("arena_supervisor_workers") == 2
            per_worker = metrics.matching("arena_worker_connections_active")
            assert {labels["worker"] for labels, _ in per_worker} == {"0", "1"}
            # The kernel spread the connections: each worker holds some (all 40 on one
            # worker has a chance of 2 in 2**40).
            assert all(value >= 1 for _, value in per_worker), per_worker
            assert sum(value for _, value in per_worker) == 40
            model = models.target(name)[0].name
            assert metrics.value("arena_server_info", model=model, processes="2") == 1
        finally:
            for client in clients:
                client.close()
    finally:
        assert server.stop() == 0


def test_the_pool_model_refuses_processes_with_a_clear_message():
    result = run_module("services", "pool", "--processes", "2")
    assert result.returncode == 2
    assert "--processes: the pool model already spreads its requests" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_killed_worker_is_replaced_within_a_second_and_the_others_keep_serving():
    """SIGKILL one of two gevent workers under 100 clients."""
    server = launch_server("gevent", "--processes", "2")
    stop = threading.Event()
    resets, problems = [0], []
    lock = threading.Lock()

    def client(index: int) -> None:
        """Echo until told to stop; a connection the dead worker held is reset: reconnect."""
        line_client = LineClient(server.address)
        for number in range(1_000_000):
            if stop.is_set():
                break
            text = f"c{index} n{number}".encode()
            try:
                reply = line_client.request(text)
            except (OSError, AssertionError):  # reset, or closed: the kernel ended it
                with lock:
                    resets[0] += 1
                line_client.close()
                line_client = LineClient(server.address)  # the port never stops accepting
                continue
            if reply != text.upper() + b"\n":
                with lock:
                    problems.append(reply[:80])
        line_client.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(100)]
    try:
        for thread in threads:
            thread.start()
        # The bound holds once the spare is built (a kill right after start waits for a fresh
        # worker instead).
        wait_for_metrics(
            server,
            lambda m: (
                m.value("arena_connections_active") == 100
                and m.value("arena_supervisor_spare_ready") == 1
            ),
        )
        victim, survivor = worker_pids(server)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        metrics = wait_for_metrics(
            server,
            lambda m: (
                m.value("arena_supervisor_worker_restarts_total") == 1
                and m.value("arena_supervisor_workers") == 2
            ),
            interval=0.02,
        )
        replaced_after = time.monotonic() - killed_at
        assert replaced_after < 1.0, f"a new worker served after {replaced_after:.2f} s"
        assert str(victim) not in live_worker_pids(server)
        assert str(survivor) in live_worker_pids(server)
        before = metrics.value("arena_requests_total", command="echo", outcome="ok")
        wait_for_metrics(
            server,
            lambda m: m.value("arena_requests_total", command="echo", outcome="ok") > before + 500,
        )
        assert f"pid {victim}) killed by SIGKILL" in server.log_text()
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        if server.proc.poll() is None and sys.exc_info()[0] is not None:
            stop_server(server)  # a failed check above: stop the supervisor and its workers
    assert not problems, problems[:5]
    assert resets[0] >= 1  # the dead worker's clients saw their connections end
    assert server.stop() == 0, server.log_text()[-3000:]


def test_workers_that_die_as_they_start_end_the_server_with_exit_1(tmp_path: Path):
    """A fault only the workers meet (here: a site hook that exits in every worker)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('ARENA_WORKER_INDEX'):\n    os._exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "services", "asyncio", "--processes", "2", "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "exited with code 3" in result.stderr
    assert "died within 5 s of their start; exiting with code 1" in result.stderr
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("name", SUPERVISED)
def test_sigterm_answers_what_every_worker_holds_and_exits_0(name):
    server = launch_server(name, "--processes", "2", "--grace", "10")
    clients = [LineClient(server.address, timeout=30) for _ in range(20)]
    try:
        for client in clients:
            client.send(b"/sleep 1000 answered\n")
        metrics = wait_for_metrics(server, lambda m: m.value("arena_connections_active") == 20)
        assert all(value >= 1 for _, value in metrics.matching("arena_worker_connections_active"))
        members = procs.session_members(server.proc.pid)
        assert len(members) >= 3  # the supervisor and its two workers
        server.proc.send_signal(signal.SIGTERM)
        for client in clients:
            assert client.read_line() == b"ANSWERED\n"
        assert server.proc.wait(30) == 0
        wait_for(lambda: not procs.session_members(server.proc.pid), what="no process left")
    finally:
        for client in clients:
            client.close()
        stop_server(server)


def test_a_killed_supervisor_leaves_no_worker_and_frees_the_port():
    server = launch_server("threaded", "--processes", "2")
    pids = worker_pids(server)
    port = server.port
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    wait_for(lambda: not any(procs_alive(pid) for pid in pids), what="the workers to die")
    with socket.socket() as probe:
        # Bind as a restarted server does (services/servers/base.py): SO_REUSEADDR lets it past
        # connections in TIME_WAIT on that port (a closed health check leaves some, and a plain
        # bind then fails at random), never past a socket still listening or reserving it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))  # nobody holds the port any more
        probe.listen()
    stop_server(server)


def procs_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return False
