"""The images' healthchecks give the same verdict as the toolkit's probes (loadtest/tools/procs.py).

docker/server/healthcheck.py and docker/locust/healthcheck.py stay standalone files in the
images (standard library only; the server image has no loadtest/). Each runs here as the
container runs it, against a real server or Locust started by the test and against a closed
port, and its verdict is compared with `procs.ping` or `procs.http_ok`, so they cannot drift.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.tools import procs
from services import models
from tests.conftest import ROOT, launch_server, stop_server
from tests.loadtest_helpers import locust_env, start_locust

SERVER_CHECK = ROOT / "docker" / "server" / "healthcheck.py"
LOCUST_CHECK = ROOT / "docker" / "locust" / "healthcheck.py"
CHECK_TIMEOUT = 30.0  # the scripts give up after 5 s; the rest is a loaded machine's slack
LOCUST_TIMEOUT = 60.0


def healthy(script: Path, *args: str, **env: str) -> bool:
    """Run a healthcheck as the container does (`python healthcheck.py ARGS`): exit 0?"""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ARENA_", "LOCUST_"))}
    result = subprocess.run(
        [sys.executable, str(script), *args],
        env={**clean, **env},
        capture_output=True,
        timeout=CHECK_TIMEOUT,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


@pytest.fixture
def wrong_reply_port() -> Iterator[int]:
    """A listener that answers every connection with a line that is not PONG."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            with conn:
                conn.sendall(b"NOPE\n")

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


@pytest.mark.parametrize("model", models.NAMES)
def test_the_server_healthcheck_agrees_with_procs_ping(model: str, wrong_reply_port: int) -> None:
    server = launch_server(model, *models.get(model).small_flags)
    try:
        cases = {"serving": server.port, "wrong reply": wrong_reply_port}
        verdicts = {
            case: (healthy(SERVER_CHECK, ARENA_PORT=str(port)), procs.ping("127.0.0.1", port))
            for case, port in cases.items()
        }
    finally:
        stop_server(server)
    closed = server.port  # stopped: nothing listens there any more
    verdicts["closed port"] = (
        healthy(SERVER_CHECK, ARENA_PORT=str(closed)),
        procs.ping("127.0.0.1", closed),
    )
    assert verdicts == {
        "serving": (True, True),
        "wrong reply": (False, False),
        "closed port": (False, False),
    }


def this_hosts_workers(url: str) -> list[dict]:
    """The workers the master lists as connected whose id starts with this host's name."""
    report = json.loads(procs.http_get(url))
    prefix = socket.gethostname() + "_"
    return [
        worker
        for worker in report.get("workers", [])
        if str(worker.get("id", "")).startswith(prefix) and worker.get("state") != "missing"
    ]


@pytest.mark.locust
def test_the_locust_healthcheck_agrees_with_procs_http_ok(tmp_path: Path) -> None:
    web_port, master_port = procs.free_port(), procs.free_port()
    env = {
        "LOCUST_WEB_PORT": str(web_port),
        "LOCUST_MASTER_NODE_HOST": "127.0.0.1",
        "LOCUST_MASTER_WEB_PORT": str(web_port),
    }
    api = f"http://127.0.0.1:{web_port}/stats/requests"
    bind = ["--master-bind-host", "127.0.0.1", "--master-bind-port", str(master_port)]
    master = start_locust(tmp_path, "master", ["--master", *bind], locust_env({}), web_port)
    worker = None
    try:
        procs.poll_until("the master's web API", lambda: procs.http_ok(api), LOCUST_TIMEOUT)
        assert healthy(LOCUST_CHECK, "master", **env)
        assert not this_hosts_workers(api)
        assert not healthy(LOCUST_CHECK, "worker", **env)

        join = ["--worker", "--master-host", "127.0.0.1", "--master-port", str(master_port)]
        worker = start_locust(tmp_path, "worker", join, locust_env({}))
        procs.poll_until("the worker to join", lambda: this_hosts_workers(api), LOCUST_TIMEOUT)
        assert healthy(LOCUST_CHECK, "worker", **env)
    finally:
        for run in (worker, master):
            if run is not None:
                procs.stop(run.proc, grace=30)
    assert not procs.http_ok(api)
    assert not healthy(LOCUST_CHECK, "master", **env)
    assert not healthy(LOCUST_CHECK, "worker", **env)
