"""A throwaway PostgreSQL cluster from this machine's server binaries, for `/db`.

Tests, the local stack (`make up`), the lessons and the benchmark need a real PostgreSQL but not
Docker: `Postgres` runs `initdb` into a temporary directory, starts `postgres` on a free port of
127.0.0.1 and creates a login role `arena` (a random password, no privilege but CONNECT to its
database `arena`) for the servers' `ARENA_DB_URL` and `ARENA_DB_PASSWORD`::

    with Postgres() as database:
        env = database.env()  # {"ARENA_DB_URL": "postgresql://arena@127.0.0.1:PORT/arena", ...}

`initdb`, `postgres` and `pg_ctl` refuse to run as root: as root the cluster belongs to the
`postgres` system user (the Debian package creates it), otherwise to the current user. Only the
owner reaches the unix socket (its directory is 0700), where the superuser logs in without a
password for `admin_query`; over TCP only `arena` may log in, with its password, to `arena`.

The cluster never outlives its owner: `close()` (also on leaving the `with` block, and at
interpreter exit for any left open) stops it and deletes its directory; if the owner is killed
outright, the kernel sends the postmaster SIGINT (fast shutdown) when the thread that started it
is the main thread.

`python -m loadtest.tools.postgres` starts one, prints its URL and environment lines and runs until
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import ctypes
import glob
import io
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from loadtest.tools import procs

BINDIR_VARIABLE = "ARENA_PG_BINDIR"
NEEDED = ("initdb", "postgres", "pg_ctl", "psql")
INSTALL_HINT = (
    "install them with `apt-get install postgresql` (Debian/Ubuntu), or set "
    f"{BINDIR_VARIABLE} to the directory holding initdb and postgres"
)
OWNER_AS_ROOT = "postgres"  # the system user the Debian package creates
SUPERUSER = "postgres"
ROLE = DATABASE = "arena"
HOST = "127.0.0.1"
START_TIMEOUT = 60.0  # seconds for initdb, and again for the server to accept connections
STOP_TIMEOUT = 30.0  # seconds for a fast shutdown before the postmaster is killed
QUERY_TIMEOUT = 30.0  # seconds for one admin_query
PORT_ATTEMPTS = 5  # a free port can be taken before postgres binds it: try another
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class PostgresError(RuntimeError):
    """The cluster failed to start, stop or answer; the message holds what it logged."""


class PostgresUnavailable(PostgresError):
    """No PostgreSQL server binaries here (or no unprivileged user to run them as)."""


# ---- finding the binaries ------------------------------------------------------------------


def _has_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in NEEDED)


def _version_key(directory: str) -> tuple[int, ...]:
    """/usr/lib/postgresql/15/bin -> (15,): 9.6 sorts below 10 (as numbers, not text)."""
    version = Path(directory).parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def find_bindir(environ: Mapping[str, str] | None = None) -> Path:
    """The directory of the server binaries: ARENA_PG_BINDIR, else the newest Debian
    /usr/lib/postgresql/*/bin, else `pg_config --bindir`, else initdb's on the PATH."""
    environ = os.environ if environ is None else environ
    override = environ.get(BINDIR_VARIABLE, "")
    if override:
        # An explicit choice is not second-guessed: falling back would hide a typo.
        if _has_binaries(Path(override)):
            return Path(override)
        raise PostgresUnavailable(
            f"{BINDIR_VARIABLE}={override} holds no PostgreSQL server binaries "
            f"({', '.join(NEEDED)}); {INSTALL_HINT}"
        )
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    pg_config = shutil.which("pg_config", path=environ.get("PATH"))
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            result = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(result.stdout.strip())
    initdb = shutil.which("initdb", path=environ.get("PATH"))
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    for candidate in candidates:
        if candidate and _has_binaries(Path(candidate)):
            return Path(candidate)
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (looked in /usr/lib/postgresql/*/bin, `pg_config "
        f"--bindir` and the PATH); {INSTALL_HINT}"
    )


# ---- running as the cluster's owner --------------------------------------------------------


def _owner_options() -> dict[str, Any]:
    """Popen options that run a command as the cluster's owner: as root, the postgres user.

    The setuid happens in the child itself (as `runuser -u postgres` does, minus its PAM
    session) rather than through runuser, which forks and stays in between: the postmaster must
    be this process's own child, for its pid, its signals and its parent-death signal.
    """
    if os.geteuid() != 0:
        return {}
    try:
        owner = pwd.getpwnam(OWNER_AS_ROOT)
    except KeyError:
        raise PostgresUnavailable(
            "initdb and postgres refuse to run as root and there is no "
            f"`{OWNER_AS_ROOT}` user to run them as; `apt-get install postgresql` creates it "
            f"(or: useradd --system {OWNER_AS_ROOT}), or run this as an unprivileged user"
        ) from None
    # extra_groups: without it the child would keep root's supplementary groups (gid 0).
    groups = os.getgrouplist(owner.pw_name, owner.pw_gid)
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": groups}


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGINT the child when its parent dies, or None.

    prctl's setting belongs to the starting *thread*: a cluster started from another thread
    would be shut down when that thread ends, so only the main thread sets it. It runs after
    the child's setuid, which would otherwise clear it.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGINT), 0, 0, 0)

    return set_signal


def _clean_environ(home: Path) -> dict[str, str]:
    """This environment without libpq's PG* variables (PGDATA, PGPORT... would redirect the
    tools), HOME in the cluster's directory (the owner may not read root's), messages in C."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    return {**env, "HOME": str(home), "LC_MESSAGES": "C"}


def _postmaster_status(pid_file: Path, pid: int) -> str:
    """Line 8 of postmaster.pid, `starting`, `ready` (accepting connections) or `stopping`,
    when line 1 is `pid` (a killed postmaster leaves its file behind)."""
    try:
        lines = pid_file.read_text().splitlines()
    except OSError:
        return ""
    if len(lines) < 8 or lines[0].strip() != str(pid):
        return ""
    return lines[7].strip()


# ---- the cluster ---------------------------------------------------------------------------


class Postgres:
    """A throwaway PostgreSQL cluster with a least-privilege login role for the servers."""

    def __init__(
        self,
        max_connections: int = 200,
        *,
        bindir: str | Path | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        """Find the binaries (PostgresUnavailable when there are none); start() runs it."""
        self.bindir = Path(bindir) if bindir is not None else find_bindir()
        if not _has_binaries(self.bindir):
            raise PostgresUnavailable(f"{self.bindir} holds no {', '.join(NEEDED)}; {INSTALL_HINT}")
        self.max_connections = max_connections
        self.start_timeout = start_timeout
        self._owner = _owner_options()
        self._password = secrets.token_urlsafe(24)  # URL- and SQL-safe: [A-Za-z0-9_-]
        self._directory: Path | None = None
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._initialised = False
        self._closed = False

    def __repr__(self) -> str:
        state = "running" if self.running else "closed" if self._closed else "stopped"
        return f"<Postgres {state} port={self._port} dir={self._directory}>"

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- what clients need --

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1, the same across stop() and start()."""
        if self._port is None:
            raise PostgresError("the cluster was never started")
        return self._port

    @property
    def url(self) -> str:
        """The libpq URL of the arena database for the arena role, without the password."""
        return f"postgresql://{ROLE}@{HOST}:{self.port}/{DATABASE}"

    @property
    def password(self) -> str:
        """The arena role's password."""
        return self._password

    def env(self) -> dict[str, str]:
        """The servers' settings for this database: ARENA_DB_URL and ARENA_DB_PASSWORD."""
        return {"ARENA_DB_URL": self.url, "ARENA_DB_PASSWORD": self.password}

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs, else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the postmaster is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def directory(self) -> Path:
        """The temporary directory: data/, the unix socket, postgres.log."""
        if self._directory is None:
            raise PostgresError("the cluster was never started")
        return self._directory

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (PGDATA)."""
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        """The server's log (its stdout and stderr)."""
        return self.directory / "postgres.log"

    def log_text(self, last: int = 4000) -> str:
        """The end of the server's log, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-last:]
        except (OSError, PostgresError):
            return "(no log)"

    # -- life cycle --

    def start(self) -> Postgres:
        """Initialise (the first time), start and wait until it accepts connections.

        After stop() it starts again on the same port with the same data and password.
        """
        if self._closed:
            raise PostgresError("the cluster was closed; create a new Postgres")
        if self.running:
            return self
        if self._initialised:
            # A failed restart (the port taken meanwhile) keeps the data for another try.
            self._start_postmaster(self.port)
            return self
        _LIVE.add(self)
        try:
            self._initialise()
            self._start_on_a_free_port()
            self._create_role_and_database()
        except BaseException:
            # Ctrl-C or a failure half way: nothing may stay behind.
            self.close()
            raise
        return self

    def stop(self) -> None:
        """Fast shutdown (`pg_ctl -m fast`): clients are disconnected, the data stays."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            # A failing or hanging pg_ctl is not the end: the postmaster is killed below.
            with contextlib.suppress(PostgresError, subprocess.SubprocessError, OSError):
                self._run_as_owner(
                    [
                        self._binary("pg_ctl"),
                        "stop",
                        "-D",
                        str(self.data_dir),
                        "-m",
                        "fast",
                        "-w",
                        "-t",
                        str(int(STOP_TIMEOUT)),
                    ],
                    timeout=STOP_TIMEOUT + 5,
                )
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                # pg_ctl failed or timed out: kill the postmaster's whole process group (its
                # backends are in it: it leads its own session).
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT)
        self._proc = None

    def close(self) -> None:
        """Stop the cluster and delete its directory; it cannot start again."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop()
        finally:
            if self._directory is not None:
                shutil.rmtree(self._directory, ignore_errors=True)
            _LIVE.discard(self)

    # -- queries --

    def admin_query(self, sql: str, database: str = "postgres") -> list[tuple[str, ...]]:
        """Run SQL as the superuser over the unix socket; the rows it printed, as text
        (NULL is ''). For tests: pg_stat_activity by application_name, say."""
        if not self.running:
            raise PostgresError("the cluster is not running")
        command = [
            self._binary("psql"),
            "-X",  # no ~/.psqlrc
            "-q",
            "--csv",
            "--tuples-only",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.directory),
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "-d",
            database,
            "-f",
            "-",
        ]
        # SQL on stdin, not the command line: it may hold the role's password.
        try:
            result = self._run_as_owner(command, stdin=sql, timeout=QUERY_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise PostgresError(f"psql did not answer within {QUERY_TIMEOUT:g} s") from None
        return [tuple(row) for row in csv.reader(io.StringIO(result.stdout)) if row]

    # -- internals --

    def _binary(self, name: str) -> str:
        return str(self.bindir / name)

    def _run_as_owner(
        self, command: Sequence[str], stdin: str | None = None, timeout: float = START_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run a tool as the cluster's owner to its end; PostgresError with its output on
        failure."""
        # Either input or stdin, never both: gevent's subprocess.run (patched in by any test
        # module that imports Locust) refuses a stdin=None next to input, unlike the stdlib's.
        feed: dict[str, Any] = (
            {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
        )
        result = subprocess.run(
            command,
            **feed,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_clean_environ(self.directory),
            cwd=self.directory,
            start_new_session=True,  # a Ctrl-C in the terminal is the owner's to handle
            check=False,
            **self._owner,
        )
        if result.returncode != 0:
            raise PostgresError(
                f"{Path(command[0]).name} failed (exit code {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()}"
            )
        return result

    def _initialise(self) -> None:
        self._directory = Path(tempfile.mkdtemp(prefix="arena-pg-"))
        if self._owner:
            os.chown(self._directory, self._owner["user"], self._owner["group"])
        try:
            self._run_as_owner(
                [
                    self._binary("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    "-E",
                    "UTF8",
                    "--locale=C",  # every machine has it; pg_sleep needs no collation
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--no-sync",  # throwaway data: no need to wait for the disk
                    "--no-instructions",
                ],
                timeout=self.start_timeout,
            )
        except subprocess.TimeoutExpired:
            raise PostgresError(f"initdb did not finish within {self.start_timeout:g} s") from None
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(
            "# Written by loadtest/tools/postgres.py. The superuser: only over the unix socket,\n"
            "# whose directory only the owner can enter. The arena role: only over TCP, to its\n"
            "# own database, with its password. Nothing else may log in.\n"
            f"local  all    {SUPERUSER}  trust\n"
            f"host   {DATABASE}  {ROLE}  {HOST}/32  scram-sha-256\n"
        )
        if self._owner:
            os.chown(hba, self._owner["user"], self._owner["group"])
        self._initialised = True

    def _start_on_a_free_port(self) -> None:
        for attempt in range(PORT_ATTEMPTS):
            self._port = procs.free_port(HOST)
            try:
                self._start_postmaster(self._port)
                return
            except PostgresError:
                # Another program took the port between our probe and postgres' bind.
                if attempt + 1 == PORT_ATTEMPTS or "already in use" not in self.log_text():
                    raise

    def _start_postmaster(self, port: int) -> None:
        command = [
            self._binary("postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(port),
            "-k",
            str(self.directory),
            "-c",
            f"listen_addresses={HOST}",
            "-c",
            f"max_connections={self.max_connections}",
            "-c",
            "unix_socket_permissions=0700",
            # Throwaway data, and /db only sleeps: never wait for the disk.
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_clean_environ(self.directory),
                cwd=self.directory,
                # Its own session: a Ctrl-C in the terminal must not shut the database down
                # under the servers that still use it; killpg reaches its backends.
                start_new_session=True,
                preexec_fn=_parent_death_signal(),
                **self._owner,
            )
        proc = self._proc
        pid_file = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + self.start_timeout
        while _postmaster_status(pid_file, proc.pid) != "ready":
            if proc.poll() is not None:
                self._proc = None
                raise PostgresError(
                    f"postgres exited with code {proc.returncode} while starting on port "
                    f"{port}; its log:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise PostgresError(
                    f"postgres did not accept connections within {self.start_timeout:g} s; "
                    f"its log:\n{self.log_text()}"
                )
            time.sleep(0.02)

    def _create_role_and_database(self) -> None:
        # The role needs only to connect and run `SELECT pg_sleep(...)`: no superuser, no
        # CREATE anywhere (PUBLIC loses it on the database and on schema public), no TEMP.
        self.admin_query(
            f"CREATE ROLE {ROLE} LOGIN PASSWORD '{self._password}' "
            "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;\n"
            f"CREATE DATABASE {DATABASE};\n"
            f"REVOKE ALL ON DATABASE {DATABASE} FROM PUBLIC;\n"
            f"GRANT CONNECT ON DATABASE {DATABASE} TO {ROLE};\n"
            f"\\connect {DATABASE}\n"
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC;\n"
        )


# Clusters started and not yet closed: closed at interpreter exit if their owner forgot.
_LIVE: set[Postgres] = set()


@atexit.register
def _close_all() -> None:
    for cluster in list(_LIVE):
        with contextlib.suppress(Exception):
            cluster.close()


# ---- python -m loadtest.tools.postgres -----------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Start a cluster, print its URL and environment, run until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.tools.postgres",
        description="Run a throwaway PostgreSQL for the servers' /db command until Ctrl-C or "
        "SIGTERM, then delete it. Uses this machine's server binaries "
        f"({BINDIR_VARIABLE} chooses them).",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=200,
        metavar="N",
        help="PostgreSQL's max_connections (default 200)",
    )
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        cluster = Postgres(args.max_connections).start()
    except PostgresError as error:
        print(f"python -m loadtest.tools.postgres: error: {error}", file=sys.stderr)
        return 2
    with cluster:
        print(f"PostgreSQL ready: {cluster.url} (pid {cluster.pid}, in {cluster.directory})")
        print("The servers' settings (ARENA_DB_URL, ARENA_DB_PASSWORD):")
        for key, value in cluster.env().items():
            print(f"{key}={value}")
        print("Ctrl-C or SIGTERM stops it and deletes its data.", flush=True)
        while not stop.wait(0.5):
            if not cluster.running:
                print(f"postgres exited on its own; its log:\n{cluster.log_text()}")
                return 1
        print("stopping", flush=True)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
