"""The arena's process toolkit: start, probe, sample and stop the processes that make it up.

One place for what the local stack, the soak, the benchmark and the tests all do to a process:

- `start_server` runs a server (`python -m services MODEL`, a textbook server, the C echo
  server) on port 0 and reads the one ready line they all print,
  `ready model=M host=H port=P metrics_port=M`, from its stderr (kept in a log file).
- `stop` / `stop_all`: SIGTERM, wait for the grace period, then SIGKILL the whole process
  group, so no helper (a pool worker, a forkserver) outlives it. Every process started here
  leads its own session and process group.
- `descendants`, `session_members`: the processes below one, and the members of a session.
- `ping`, `http_ok`: is a protocol server answering `/ping` with `PONG`; does a URL answer.
  The images' healthchecks (docker/*/healthcheck.py) stay standalone files that need nothing
  but the standard library; tests/test_healthchecks.py checks their verdict against these.
- `proc_sample`, `tree_rss`: CPU seconds, resident memory, threads and descriptors from /proc.
- `Metrics`: one `/metrics` page parsed with prometheus_client's own parser.
- `poll_until`: call a check until it holds, with one deadline.

Standard library, psutil (which Locust installs) and prometheus_client only.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
# The line every server prints once it listens (services/__main__.py, loadtest/bench/textbook.py
# and the C echo server of loadtest/bench/loadgen.c); metrics_port=0 means no /metrics.
READY = re.compile(
    r"ready model=(?P<model>\S+) host=(?P<host>\S+) port=(?P<port>\d+) "
    r"metrics_port=(?P<metrics_port>\d+)"
)
START_TIMEOUT = 60.0  # seconds from start to the ready line (a loaded 2-core box included)
STOP_GRACE = 30.0  # seconds between SIGTERM and SIGKILL (a server's default grace is 10 s)
READY_POLL = 0.02  # seconds between two reads of a starting server's log
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class PollTimeout(TimeoutError):
    """A `poll_until` check did not hold in time; `last` is its last value (or exception)."""

    def __init__(self, message: str, last: Any) -> None:
        super().__init__(message)
        self.last = last


class StartError(RuntimeError):
    """A process exited or stayed silent before its ready line; the message holds its log."""


# -- waiting ---------------------------------------------------------------------------------


def poll_until(
    what: str,
    check: Callable[[], Any],
    timeout: float,
    interval: float = 0.1,
    *,
    ignore: tuple[type[BaseException], ...] = (),
    explain: Callable[[], str] | None = None,
) -> Any:
    """Call `check` until it returns something truthy and return that.

    Exceptions of the `ignore` types count as "not yet" (a service still starting). After
    `timeout` seconds raise PollTimeout (a TimeoutError) naming `what` and the last value (or
    exception), with `explain()` appended when given (logs, container states).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            last: Any = check()
        except ignore as error:
            last = error
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout:g} s waiting for {what}; last value {last!r}"
            if explain is not None:
                message += "\n" + explain()
            raise PollTimeout(message, last)
        time.sleep(interval)


# -- starting and stopping -------------------------------------------------------------------


def server_command(
    model: str, *flags: str, host: str = "127.0.0.1", port: int = 0, metrics_port: int = 0
) -> list[str]:
    """`python -m services MODEL` on `host` (protocol and metrics on port 0 unless given),
    then `flags` (which may override those: the last flag wins)."""
    return [
        sys.executable,
        "-m",
        "services",
        model,
        "--host",
        host,
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        *flags,
    ]


@dataclass
class Server:
    """A started server: its process, the ports from its ready line, and its stderr log."""

    name: str
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    metrics_port: int
    log_path: Path
    own_log: bool = False  # the log file is a temporary one: removed by stop()
    _final_log: str | None = field(default=None, repr=False)

    @property
    def model(self) -> str:
        """The name it was started under (the model for `python -m services` servers)."""
        return self.name

    @property
    def pid(self) -> int:
        """The server's process id (it leads its own session and process group)."""
        return self.proc.pid

    @property
    def address(self) -> tuple[str, int]:
        """The protocol address to connect to."""
        return (connect_host(self.host), self.port)

    def log_text(self) -> str:
        """Everything the server wrote to stderr so far (also after stop())."""
        if self._final_log is not None:
            return self._final_log
        return self.log_path.read_text(errors="replace")

    @property
    def log(self) -> list[str]:
        """The log's lines."""
        return self.log_text().splitlines()

    def metrics_text(self, timeout: float = 10.0) -> str:
        """One scrape of its /metrics page."""
        return http_get(f"http://{connect_host(self.host)}:{self.metrics_port}/metrics", timeout)

    def metrics(self, timeout: float = 10.0) -> Metrics:
        """One scrape of /metrics, parsed."""
        return Metrics(self.metrics_text(timeout))

    def stop(self, grace: float = STOP_GRACE) -> int:
        """Stop it (see `stop`) and keep its log in memory; returns the exit code."""
        code = stop(self.proc, grace)
        if self.own_log and self._final_log is None:
            self._final_log = self.log_path.read_text(errors="replace")
            with contextlib.suppress(OSError):
                self.log_path.unlink()
        return code


def start_server(
    command: str | Sequence[str],
    *flags: str,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
    log_path: Path | None = None,
    cpus: Iterable[int] | None = None,
    timeout: float = START_TIMEOUT,
    pass_fds: Sequence[int] = (),
) -> Server:
    """Start a server and wait for its ready line; the Server has the ports it bound.

    `command` is a model name (then `server_command(model, *flags)`) or a whole command line
    (then `flags` are appended). `env` replaces the environment (default: this one), with
    PYTHONUNBUFFERED=1 added. stderr goes to `log_path` (default: a temporary file that
    `Server.stop` removes), stdout is discarded. `cpus` pins the process (and its children);
    `pass_fds` stay open in it (an inherited listening socket).
    Raises StartError with the log when it exits or stays silent for `timeout` seconds.
    """
    if isinstance(command, str):
        name = name or command
        argv = server_command(command, *flags)
    else:
        argv = [*command, *flags]
        name = name or Path(argv[0]).name
    own_log = log_path is None
    if log_path is None:
        safe = re.sub(r"[^\w.-]+", "_", name)[:40]  # a name may be a whole command line
        handle, temporary = tempfile.mkstemp(prefix=f"arena-{safe}-", suffix=".log")
        os.close(handle)
        log_path = Path(temporary)
    pinned = frozenset(cpus) if cpus else None
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, pinned)) if pinned else None,
            pass_fds=tuple(pass_fds),
        )
    server = Server(name, proc, "", 0, 0, log_path, own_log)

    def ready() -> re.Match[str] | None:
        match = READY.search(log_path.read_text(errors="replace"))
        if match is None and proc.poll() is not None:
            raise StartError(f"{name} exited with code {proc.returncode} before its ready line")
        return match

    try:
        match = poll_until(f"{name}'s ready line", ready, timeout, READY_POLL)
    except (StartError, TimeoutError) as error:
        server.stop()
        raise StartError(f"{error}; its log:\n{server.log_text()}") from None
    server.host = match["host"]
    server.port, server.metrics_port = int(match["port"]), int(match["metrics_port"])
    return server


def wait_exit(
    proc: subprocess.Popen[Any], timeout: float, explain: Callable[[], str] | None = None
) -> int:
    """The exit code of a process that must end by itself within `timeout` seconds; else
    TimeoutError, with `explain()` (its log, say) in the message."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        details = "\n" + explain() if explain is not None else ""
        raise TimeoutError(f"pid {proc.pid} still running after {timeout:g} s{details}") from None


def stop_all(procs: Sequence[subprocess.Popen[Any]], grace: float = STOP_GRACE) -> list[int]:
    """SIGTERM every process, wait for all up to `grace` seconds in total, then SIGKILL each
    one's whole process group (what outlived it too: workers, helpers); return the exit codes
    (-9 for a process that had to be killed)."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return [proc.wait() for proc in procs]


def stop(proc: subprocess.Popen[Any], grace: float = STOP_GRACE) -> int:
    """SIGTERM, wait up to `grace` seconds, SIGKILL the process group; the exit code."""
    return stop_all([proc], grace)[0]


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, for programs that cannot bind port 0 and report it
    (Locust's web UI, published container ports)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether a listener could bind host:port now (SO_REUSEADDR, as the servers set it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def connect_host(host: str) -> str:
    """Where to reach a service bound to `host` (a wildcard address is reached on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


# -- the processes below one -----------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children...); [] when it is gone."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat from the state on (field 3 of proc(5) is index 0): the command name
    before it may hold spaces and parentheses."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rpartition(b")")[2].decode().split()


def session_members(session_id: int) -> list[int]:
    """Live (non-zombie) processes of a session: a server and everything it forked, also
    after they were re-parented (every process started here leads its own session)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat(int(entry))
        except OSError:
            continue  # it ended while we looked
        if int(fields[3]) == session_id and fields[0] != "Z":
            found.append(int(entry))
    return found


@dataclass(frozen=True)
class ProcSample:
    """One look at one process in /proc."""

    cpu_seconds: float  # utime + stime of all its threads
    reaped_cpu_seconds: float  # cutime + cstime: of the children it waited for
    rss: int  # resident bytes
    threads: int
    fds: int  # open descriptors


def proc_sample(pid: int) -> ProcSample:
    """CPU seconds, RSS, threads and descriptors of a process; OSError when it is gone."""
    fields = _stat(pid)
    # proc(5) numbers from 1 and `fields` starts at field 3: utime 14, stime 15, cutime 16,
    # cstime 17, num_threads 20, rss 24 (pages).
    fd_dir = f"/proc/{pid}/fd"
    # The directory's size is the descriptor count on Linux 6.2+, without listing 10,000 of them.
    fds = os.stat(fd_dir).st_size or len(os.listdir(fd_dir))
    return ProcSample(
        cpu_seconds=(int(fields[11]) + int(fields[12])) / TICKS,
        reaped_cpu_seconds=(int(fields[13]) + int(fields[14])) / TICKS,
        rss=int(fields[21]) * PAGE,
        threads=int(fields[17]),
        fds=fds,
    )


def tree_samples(pid: int) -> list[ProcSample]:
    """`proc_sample` of a process and of every process below it that is still there."""
    samples = []
    for member in (pid, *descendants(pid)):
        with contextlib.suppress(OSError):
            samples.append(proc_sample(member))
    return samples


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and everything below it (a server and its workers)."""
    return sum(sample.rss for sample in tree_samples(pid))


# -- probes ----------------------------------------------------------------------------------


def ping_reply(host: str, port: int, timeout: float = 5.0) -> bytes:
    """The first reply line to `/ping` (then `/quit`) on host:port; OSError when unreachable."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"/ping\n/quit\n")
        with sock.makefile("rb") as replies:
            return replies.readline(256)


def ping(host: str, port: int, timeout: float = 5.0) -> bool:
    """Whether a protocol server on host:port answers `/ping` with `PONG`."""
    try:
        return ping_reply(host, port, timeout) == b"PONG\n"
    except OSError:
        return False


def http_request(url: str, login: str | None = None) -> urllib.request.Request:
    """A GET request, with HTTP Basic credentials when `login` ("user:password") is given."""
    request = urllib.request.Request(url)
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    return request


def http_get(url: str, timeout: float = 10.0, login: str | None = None) -> str:
    """GET a URL; its body as text (urllib's errors for a failure or a non-2xx status)."""
    with urllib.request.urlopen(http_request(url, login), timeout=timeout) as response:
        return response.read().decode()


def http_ok(
    url: str, timeout: float = 2.0, login: str | None = None, any_status: bool = False
) -> bool:
    """Whether a URL answers 2xx (with `any_status`, any HTTP status, e.g. a login's 401)."""
    try:
        with urllib.request.urlopen(http_request(url, login), timeout=timeout) as response:
            return 200 <= response.status < 300
    except urllib.error.HTTPError:
        return any_status
    except OSError:
        return False


# -- /metrics --------------------------------------------------------------------------------


class Metrics:
    """One scrape of Prometheus text, parsed by prometheus_client, indexed by sample name
    (`arena_requests_total`, `..._bucket`, `..._count`)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples.setdefault(sample.name, []).append((sample.labels, sample.value))

    @classmethod
    def parse(cls, text: str) -> Metrics:
        """The same as `Metrics(text)`."""
        return cls(text)

    @classmethod
    def scrape(cls, url: str, timeout: float = 10.0, login: str | None = None) -> Metrics:
        """GET a /metrics URL and parse it."""
        return cls(http_get(url, timeout, login))

    def has(self, name: str) -> bool:
        """Whether any sample with this exact name was exposed."""
        return name in self.samples

    def matching(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """Samples of `name` whose labels include every given label."""
        return [
            (sample_labels, value)
            for sample_labels, value in self.samples.get(name, [])
            if all(sample_labels.get(key) == wanted for key, wanted in labels.items())
        ]

    def sum(self, name: str, **labels: str) -> float:
        """Sum of the matching samples; 0 when none is exposed (an untouched labelled counter)."""
        return sum(value for _, value in self.matching(name, **labels))

    def get(self, name: str, **labels: str) -> float | None:
        """The single matching sample's value; None when there is none or more than one."""
        found = self.matching(name, **labels)
        return found[0][1] if len(found) == 1 else None

    def value(self, name: str, **labels: str) -> float:
        """The single matching sample's value; fails when there is not exactly one."""
        found = self.matching(name, **labels)
        assert len(found) == 1, f"expected one {name}{labels}, found {found}"
        return found[0][1]

    def by_labels(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        """Every sample of `name` as {frozenset(label items): value}."""
        return {frozenset(labels.items()): value for labels, value in self.samples.get(name, [])}

    def label_values(self, name: str, label: str) -> set[str]:
        """Every value the given label takes on the samples of `name`."""
        return {labels[label] for labels, _ in self.samples.get(name, []) if label in labels}
