"""`python -m loadtest.bench.spread`: N real workers on one port, each way, real connections.

The two ways of sharing a port (services/supervisor.py says which one `--processes` uses and
why): each worker binding it with SO_REUSEPORT, or all accepting on one inherited listening
socket (`--listen-fd`). Real workers on 127.0.0.1, the real C load generator.
"""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from loadtest.bench import spread
from loadtest.tools import procs
from tests.conftest import run_module

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_both_ways_put_every_connection_on_some_worker_and_say_how_evenly(tmp_path):
    result = run_module(
        "loadtest.bench.spread",
        *("--models", "gevent", "--connections", "120", "--duration", "0.5"),
        *("--warmup", "0.2", "--out", str(tmp_path)),
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "spread.json").read_text())
    assert [(run["model"], run["way"]) for run in results["runs"]] == [
        ("gevent", "reuseport"),
        ("gevent", "inherited"),
    ]
    for run in results["runs"]:
        workers = run["workers"]
        assert len(workers) == 2 and run["errors"] == 0
        # Every connection open at the window's start is held by exactly one of the workers.
        assert sum(worker["connections"] for worker in workers) == 120, run
        assert run["answered_connections"] == 120
        assert sum(worker["requests"] for worker in workers) > 0
        assert 1.0 <= run["connections_imbalance"] <= 2.0
        assert run["connections_imbalance"] == spread.imbalance(workers, "connections")
    markdown = (tmp_path / "spread.md").read_text()
    assert "| gevent | reuseport |" in markdown and "| gevent | inherited |" in markdown
    assert (tmp_path / "spread.png").read_bytes()[:8] == PNG_MAGIC
    assert "[2/2] gevent    inherited" in result.stdout  # progress while it runs


def test_a_server_serves_on_an_inherited_listening_socket():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        server = procs.start_server(
            "threaded", "--listen-fd", str(listener.fileno()), pass_fds=[listener.fileno()]
        )
        try:
            assert server.port == port  # the ready line names the inherited socket's port
            assert procs.ping_reply("127.0.0.1", port) == b"PONG\n"
        finally:
            assert server.stop() == 0


def test_spread_refuses_one_worker_with_a_clear_message(tmp_path):
    result = run_module("loadtest.bench.spread", "--workers", "1", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "--workers >= 2" in result.stderr
    assert not (tmp_path / "spread.json").exists()


def test_a_bad_listen_fd_is_refused_with_the_flag_named():
    result = subprocess.run(
        [*procs.server_command("threaded"), "--listen-fd", "-3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--listen-fd: invalid value '-3'" in result.stderr
