"""Helpers for the Locust tests: run Locust as a subprocess, scrape its pages, read its CSVs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.tools import procs
from loadtest.tools.procs import free_port as free_port
from loadtest.tools.procs import poll_until as poll  # noqa: F401  (re-exported for the tests)
from services import models

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtest" / "plugin" / "locustfile.py"
TARGETS = models.NAMES
COMMANDS = ("echo", "ping", "sleep", "work", "connect")
HTTP_TIMEOUT = 10.0

Key = tuple[str, str]  # (target, command)


def locust_env(targets: dict[str, tuple[str, int]], **extra: str) -> dict[str, str]:
    """The environment for a Locust subprocess: no inherited LOCUST_* settings, our targets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    env["PYTHONUNBUFFERED"] = "1"
    for target, (host, port) in targets.items():
        env[f"LOCUST_{target.upper()}_TARGET"] = f"tcp://{host}:{port}"
    env.update(extra)
    return env


@dataclass
class LocustProcess:
    """A Locust subprocess with its output in files and, unless headless, a web UI port."""

    proc: subprocess.Popen[bytes]
    workdir: Path
    name: str
    web_port: int | None = None

    @property
    def stdout(self) -> str:
        """Everything printed to stdout so far."""
        return (self.workdir / f"{self.name}.out").read_text(errors="replace")

    @property
    def stderr(self) -> str:
        """Everything logged to stderr so far."""
        return (self.workdir / f"{self.name}.err").read_text(errors="replace")

    def url(self, path: str) -> str:
        """A URL on this Locust's web UI."""
        return f"http://127.0.0.1:{self.web_port}{path}"

    def get(self, path: str) -> str:
        """GET a page of the web UI."""
        with urllib.request.urlopen(self.url(path), timeout=HTTP_TIMEOUT) as response:
            return response.read().decode()

    def post(self, path: str, form: dict[str, str] | None = None) -> Any:
        """POST a form to the web UI and decode the JSON answer."""
        data = urllib.parse.urlencode(form or {}).encode()
        with urllib.request.urlopen(self.url(path), data=data, timeout=HTTP_TIMEOUT) as response:
            return json.loads(response.read())

    def web_ready(self) -> bool:
        """Whether the web UI answers (False while Locust is still starting)."""
        try:
            self.get("/metrics")
        except OSError:
            return False
        return True

    def metrics(self) -> Metrics:
        """Scrape /metrics once."""
        return Metrics.parse(self.get("/metrics"))

    def stats(self) -> dict[str, Any]:
        """Locust's own statistics (what its web UI polls)."""
        return json.loads(self.get("/stats/requests"))

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; its exit code."""
        return procs.wait_exit(
            self.proc, timeout, lambda: f"locust {self.name}: {self.stderr[-3000:]}"
        )

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (Locust then writes its files and exits with its usual code) and wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """Last-resort cleanup: kill the process group if it is still running."""
        if self.proc.poll() is None:
            procs.stop(self.proc, grace=0)


def start_locust(
    workdir: Path, name: str, args: list[str], env: dict[str, str], web_port: int | None = None
) -> LocustProcess:
    """Start `locust -f plugin/locustfile.py ARGS` in `workdir` (outside the repo on purpose)."""
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *args]
    if web_port is not None:
        command += ["--web-host", "127.0.0.1", "--web-port", str(web_port)]
    with (
        open(workdir / f"{name}.out", "wb") as out,
        open(workdir / f"{name}.err", "wb") as err,
    ):
        proc = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=out, stderr=err, start_new_session=True
        )
    return LocustProcess(proc, workdir, name, web_port)


def start_distributed(
    workdir: Path, args: list[str], env: dict[str, str], workers: int = 2
) -> tuple[LocustProcess, list[LocustProcess]]:
    """Start a Locust master (web UI on a free port, `args` added) and `workers` workers.

    The workers get no target addresses of their own: the master's settings must reach them.
    """
    master_port = free_port()
    bind = ["--master-bind-host", "127.0.0.1", "--master-bind-port", str(master_port)]
    expect = ["--expect-workers", str(workers)]
    master = start_locust(
        workdir, "master", ["--master", *bind, *expect, *args], env, web_port=free_port()
    )
    started = [
        start_locust(
            workdir,
            f"worker{n}",
            ["--worker", "--master-host", "127.0.0.1", "--master-port", str(master_port)],
            locust_env({}),
        )
        for n in range(1, workers + 1)
    ]
    return master, started


def run_to_end(
    workdir: Path,
    name: str,
    args: list[str],
    env: dict[str, str],
    timeout: float = 120.0,
    expect: int = 0,
) -> LocustProcess:
    """Run Locust until it ends by itself (killed if it overruns `timeout`); its exit code must
    be `expect`."""
    run = start_locust(workdir, name, args, env)
    try:
        code = run.wait(timeout=timeout)
    finally:
        run.kill()
    assert code == expect, run.stderr[-3000:]
    return run


class Metrics(procs.Metrics):
    """One scrape (the toolkit's parser), plus Locust's totals and users per target."""

    def totals(self) -> dict[Key, tuple[int, int]]:
        """(requests, failures) per (target, command)."""
        result = {}
        for labels, value in self.samples.get("locust_requests_total", []):
            failures = self.value("locust_failures_total", **labels)
            result[(labels["target"], labels["command"])] = (int(value), int(failures))
        return result

    def users(self) -> dict[str, int]:
        """Users per target."""
        return {
            labels["target"]: int(value) for labels, value in self.samples.get("locust_users", [])
        }


def csv_totals(path: Path) -> dict[Key, tuple[int, int]]:
    """(requests, failures) per (target, command) from a Locust PREFIX_stats.csv."""
    with open(path, newline="") as handle:
        return {
            (row["Type"], row["Name"]): (int(row["Request Count"]), int(row["Failure Count"]))
            for row in csv.DictReader(handle)
            if row["Name"] != "Aggregated"
        }


def stats_totals(stats: dict[str, Any]) -> dict[Key, tuple[int, int]]:
    """(requests, failures) per (target, command) from Locust's /stats/requests JSON."""
    return {
        (entry["method"], entry["name"]): (entry["num_requests"], entry["num_failures"])
        for entry in stats["stats"]
        if entry["name"] != "Aggregated"
    }


def nonzero(totals: dict[Key, tuple[int, int]]) -> dict[Key, tuple[int, int]]:
    """Drop rows without requests (/metrics shows zero rows for selected targets)."""
    return {key: value for key, value in totals.items() if value[0]}


def server_counts(server: Any) -> dict[str, float]:
    """A server's own count of connections and answered requests, from its /metrics."""
    metrics = Metrics.parse(server.metrics_text())
    counts = {"connections": metrics.value("arena_connections_total")}
    for command in ("echo", "ping", "sleep", "work"):
        counts[command] = metrics.value("arena_requests_total", command=command, outcome="ok")
    return counts
