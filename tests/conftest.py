"""Shared fixtures: start real servers as subprocesses on free loopback ports."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services import models

ROOT = Path(__file__).resolve().parent.parent
MODELS = models.NAMES
READY = re.compile(rb"ready model=(\S+) host=(\S+) port=(\d+) metrics_port=(\d+)")
START_TIMEOUT = 30.0


@dataclass
class RunningServer:
    """A server subprocess and the ports it reported in its ready line."""

    model: str
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: list[bytes] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        """The protocol address to connect to."""
        return ("127.0.0.1", self.port)

    def connect(self, timeout: float = 10.0) -> socket.socket:
        """Open a client socket with a timeout, so a broken server fails the test, not hangs it."""
        sock = socket.create_connection(self.address, timeout=timeout)
        return sock

    def metrics_text(self) -> str:
        """Scrape /metrics once."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def log_text(self) -> str:
        """Everything the server wrote to stderr so far."""
        return b"".join(self.log).decode(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        """Send SIGTERM and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def _pump(stream, sink: list[bytes], ready: threading.Event, found: list) -> None:
    for line in iter(stream.readline, b""):
        sink.append(line)
        if not ready.is_set():
            match = READY.search(line)
            if match:
                found.append(match)
                ready.set()
    ready.set()


def launch_server(model: str, *args: str, env: dict[str, str] | None = None) -> RunningServer:
    """Start `python -m services MODEL` on 127.0.0.1 with free ports and wait for its ready line."""
    command = [
        sys.executable,
        "-m",
        "services",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
        *args,
    ]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    log: list[bytes] = []
    ready = threading.Event()
    found: list[re.Match[bytes]] = []
    threading.Thread(target=_pump, args=(proc.stderr, log, ready, found), daemon=True).start()
    ready.wait(START_TIMEOUT)
    if not found:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{model} server did not become ready:\n" + b"".join(log).decode())
    match = found[0]
    return RunningServer(model, proc, int(match.group(3)), int(match.group(4)), log)


def stop_server(server: RunningServer) -> None:
    """Stop a server for good: SIGTERM, then SIGKILL of its whole session if it hangs."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


@pytest.fixture
def server_factory() -> Iterator:
    """Start servers with custom flags; every one is stopped at the end of the test."""
    started: list[RunningServer] = []

    def start(model: str, *args: str, env: dict[str, str] | None = None) -> RunningServer:
        server = launch_server(model, *args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        stop_server(server)


@pytest.fixture(params=MODELS)
def server(request) -> Iterator[RunningServer]:
    """One default server per model (pool with 2 workers, as on a 2-core machine)."""
    args = ("--workers", "2") if request.param == "pool" else ()
    running = launch_server(request.param, *args)
    yield running
    stop_server(running)


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Poll a condition until it holds or the bounded timeout passes; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
