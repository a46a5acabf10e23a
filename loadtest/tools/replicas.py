"""Replicas add cores: one model's /work rate with 1 replica, then N, each limited to one CPU.

One process of threaded or gevent runs Python on one core at a time (the GIL); N processes can
use N cores. This runs the real Compose stack (docker-compose.yml): the model scaled to 1, then
to N replicas (`--scale`), each with `ARENA_SERVER_CPUS` (1 by default), Locust's master and
worker in their containers running the `cpu-work` lesson (every request ~1 ms of CPU, no think
time) against that one target. After a warm-up it reads, over the same window, Locust's
request count (all replicas together) and the CPU time of every container from its cgroup,
so the figure comes with how much of the machine Locust itself used, and everything else
(other processes, from /proc/stat): on a machine with fewer spare cores than replicas +
Locust, the ratio stays below N.

    python -m loadtest.tools.replicas                  # gevent, 1 then 2 replicas, 30 s each
    python -m loadtest.tools.replicas --duration 2 --warmup 1 --out /tmp/r.json   # a smoke run

Needs a Docker engine with Compose v2 (docs/SCALING.md); writes results/replicas.json and
refreshes the docs' figures from it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from loadtest.tools import cli, procs
from services import models

ROOT = cli.ROOT
DEFAULT_OUT = ROOT / "results" / "replicas.json"
COMPOSE_FILE = ROOT / "docker-compose.yml"
LOCUST_SERVICES = ("locust", "locust-worker")
SCENARIO = "cpu-work"
UP_TIMEOUT = 420.0  # image builds included
TRAFFIC_TIMEOUT = 120.0
# Where the engine's cgroupfs driver keeps a container's CPU time (cgroup v1, then v2).
CGROUP_CPU_FILES = (
    "/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.usage",  # nanoseconds
    "/sys/fs/cgroup/system.slice/docker-{id}.scope/cpu.stat",  # usage_usec
    "/sys/fs/cgroup/docker/{id}/cpu.stat",
)


def machine_busy_seconds() -> float:
    """CPU time every core of this machine spent busy so far (/proc/stat: all but idle, iowait)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    # guest and guest_nice (fields 8, 9) are already counted in user and nice.
    return (sum(fields[:8]) - idle) / procs.TICKS


class MeasureError(Exception):
    """The stack could not be started or measured (exit 2)."""


def cpu_seconds(container_id: str) -> float:
    """CPU time a container used so far, from its cgroup on this host."""
    for pattern in CGROUP_CPU_FILES:
        path = Path(pattern.format(id=container_id))
        if not path.exists():
            continue
        text = path.read_text()
        if path.name == "cpuacct.usage":
            return int(text) / 1e9
        fields = dict(line.split() for line in text.splitlines())
        return int(fields["usage_usec"]) / 1e6
    raise MeasureError(f"no cgroup CPU file for container {container_id[:12]} on this host")


class Stack:
    """One compose project: `model` with some replicas, Locust on that target only."""

    def __init__(self, model: str, replicas: int, users: int, cpus: float) -> None:
        self.name = f"arena-replicas-{secrets.token_hex(4)}"
        self.model = models.get(model)
        self.replicas = replicas
        self.locust_port = procs.free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("ARENA_", "LOCUST_"))},
            "COMPOSE_BAKE": "false",
            f"ARENA_{self.model.env_name}_PORT": "",  # a free host port per replica
            "ARENA_LOCUST_PORT": str(self.locust_port),
            "ARENA_SERVER_CPUS": f"{cpus:g}",
            "LOCUST_TARGETS": model,
            "LOCUST_SCENARIO": SCENARIO,
            "LOCUST_USERS_PER_TARGET": str(users),
            "LOCUST_USERS": str(users),
        }

    def compose(self, *args: str, timeout: float = 120.0) -> str:
        """`docker compose -p NAME ARGS`; its stdout, or MeasureError with its output."""
        command = ["docker", "compose", "-p", self.name, "-f", str(COMPOSE_FILE), *args]
        result = subprocess.run(
            command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise MeasureError(f"`{' '.join(command[3:])}` failed:\n{result.stderr[-3000:]}")
        return result.stdout

    def up(self) -> None:
        """Build and start the model's replicas and Locust, healthy."""
        self.compose(
            "up", "-d", "--build", "--wait", "--wait-timeout", str(int(UP_TIMEOUT)),
            f"--scale={self.model.name}={self.replicas}", self.model.name, *LOCUST_SERVICES,
            timeout=UP_TIMEOUT + 60,
        )  # fmt: skip

    def down(self) -> None:
        """Remove everything the project created."""
        try:
            self.compose("down", "-v", "--remove-orphans", "--timeout", "30", timeout=180)
        except (MeasureError, subprocess.TimeoutExpired) as error:
            print(f"replicas: could not take {self.name} down: {error}", file=sys.stderr)

    def containers(self, service: str) -> list[str]:
        """Full ids of the service's running containers."""
        return self.compose("ps", "-q", "--no-trunc", service).split()

    def requests(self) -> float:
        """Requests Locust completed so far on the target (connects not counted)."""
        url = f"http://127.0.0.1:{self.locust_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        samples = procs.Metrics(text).by_labels("locust_requests_total")
        return sum(v for labels, v in samples.items() if dict(labels).get("command") != "connect")


def measure(stack: Stack, warmup: float, duration: float) -> dict:
    """Start the stack, warm up, then one window: requests/s and CPU cores of each part."""
    stack.up()
    procs.poll_until(
        "Locust's first requests",
        lambda: stack.requests() > 0,
        TRAFFIC_TIMEOUT,
        1.0,
        ignore=(OSError, ValueError),
    )
    time.sleep(warmup)  # the users ramp up and the replicas reach their steady rate
    servers = stack.containers(stack.model.name)
    locusts = [cid for service in LOCUST_SERVICES for cid in stack.containers(service)]
    if len(servers) != stack.replicas:
        raise MeasureError(f"{len(servers)} containers of {stack.model.name}, not {stack.replicas}")
    before = {cid: cpu_seconds(cid) for cid in servers + locusts}
    busy_before = machine_busy_seconds()
    requests_before, started = stack.requests(), time.monotonic()
    time.sleep(duration)
    requests_after, elapsed = stack.requests(), time.monotonic() - started
    used = {cid: (cpu_seconds(cid) - before[cid]) / elapsed for cid in before}
    busy = (machine_busy_seconds() - busy_before) / elapsed
    return {
        "replicas": stack.replicas,
        "rps": round((requests_after - requests_before) / elapsed, 1),
        "server_cores": [round(used[cid], 2) for cid in servers],
        "locust_cores": round(sum(used[cid] for cid in locusts), 2),
        # Everything else on the machine (other sessions, dockerd, this tool): on a shared
        # machine it shows how much of the cores the replicas could not have.
        "other_cores": round(max(0.0, busy - sum(used.values())), 2),
        "seconds": round(elapsed, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure 1 and N replicas, print and write the JSON; exit 2 when it cannot."""
    parser = cli.parser("loadtest.tools.replicas", __doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gevent", choices=models.NAMES, help="(default gevent)")
    cli.add_number(parser, "--replicas", 2, "replicas of the second run")
    cli.add_number(parser, "--cpus", 1.0, "CPU limit of each replica (ARENA_SERVER_CPUS)")
    cli.add_number(parser, "--users", 100, "Locust users on the target")
    cli.add_number(parser, "--warmup", 10.0, "seconds of load before the window")
    cli.add_number(parser, "--duration", 30.0, "seconds of the measured window")
    cli.add_path(parser, "--out", DEFAULT_OUT, "JSON output")
    args = parser.parse_args(argv)
    if args.replicas < 2 or args.users < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("needs --replicas >= 2, --users >= 1, --duration > 0, --warmup >= 0")
    runs = []
    for replicas in (1, args.replicas):
        print(
            f"replicas: {args.model} x{replicas} ({args.cpus:g} CPU each), {SCENARIO}, "
            f"{args.users} users: starting, {args.warmup:g} s warm-up, {args.duration:g} s window",
            flush=True,
        )
        stack = Stack(args.model, replicas, args.users, args.cpus)
        try:
            run = measure(stack, args.warmup, args.duration)
        except (MeasureError, procs.PollTimeout, OSError) as error:
            print(f"replicas: {error}", file=sys.stderr)
            return 2
        finally:
            stack.down()
        print(
            f"replicas: x{replicas}: {run['rps']:,.0f} requests/s; server cores "
            f"{run['server_cores']}, Locust {run['locust_cores']}, others {run['other_cores']}",
            flush=True,
        )
        runs.append(run)
    ratio = runs[1]["rps"] / runs[0]["rps"] if runs[0]["rps"] else 0.0
    report = {
        "what": f"/work ({SCENARIO}) with 1 and {args.replicas} replicas (docs/SCALING.md)",
        "when": cli.timestamp(),
        "commit": cli.commit_of(ROOT),
        "cpus": os.cpu_count(),
        "model": args.model,
        "cpus_per_replica": args.cpus,
        "users": args.users,
        "runs": runs,
        "ratio": round(ratio, 2),
    }
    print(f"replicas: x{args.replicas} / x1 = {ratio:.2f}", flush=True)
    cli.write_result("replicas", args.out, report, DEFAULT_OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
