"""loadtest/tools/postgres.py: a real throwaway PostgreSQL, its least-privilege role, its life.

Every test runs the machine's real server binaries. Without them the `postgres` fixture skips
(with the install command), or fails under CI / ARENA_REQUIRE_POSTGRES; the tests that start
clusters of their own ask for that fixture too, for the same verdict.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import psycopg
import pytest

from loadtest.tools import procs
from loadtest.tools.postgres import Postgres, PostgresUnavailable
from tests.conftest import ROOT, run_module, wait_until

CONNECT_TIMEOUT = 5  # seconds, for every psycopg.connect here


def connect(cluster: Postgres, **options: str) -> psycopg.Connection:
    """A connection as the arena role, with its password, as the servers will connect."""
    return psycopg.connect(
        cluster.url, password=cluster.password, connect_timeout=CONNECT_TIMEOUT, **options
    )


def gone(process: psutil.Process) -> bool:
    """The process has exited (a zombie not yet reaped by whoever adopted it counts)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def processes_using(directory: Path) -> list[int]:
    """Live processes whose command line names `directory` (a postmaster: `-D DIR/data`)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if str(directory) in " ".join(process.info["cmdline"] or ()) and not gone(process):
            found.append(process.pid)
    return found


def test_the_arena_role_connects_with_its_password_and_runs_pg_sleep(postgres: Postgres) -> None:
    assert postgres.url == f"postgresql://arena@127.0.0.1:{postgres.port}/arena"
    assert postgres.password and postgres.password not in postgres.url
    assert postgres.env() == {"ARENA_DB_URL": postgres.url, "ARENA_DB_PASSWORD": postgres.password}
    with connect(postgres) as conn:
        conn.execute("SELECT pg_sleep(0)")
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (
            "arena",
            "arena",
        )
    assert postgres.admin_query("SHOW max_connections") == [("200",)]


def test_admin_query_finds_a_session_by_its_application_name(postgres: Postgres) -> None:
    name = f"arena-test-{os.getpid()}"
    query = (
        "SELECT usename, datname FROM pg_stat_activity "
        f"WHERE application_name = '{name}' AND backend_type = 'client backend'"
    )
    with connect(postgres, application_name=name):
        assert postgres.admin_query(query) == [("arena", "arena")]
    # The session ends on the server shortly after the client closes it.
    assert wait_until(lambda: postgres.admin_query(query) == [], timeout=10)


def test_the_arena_role_may_only_connect_to_its_database(postgres: Postgres) -> None:
    attributes = postgres.admin_query(
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
        "FROM pg_roles WHERE rolname = 'arena'"
    )
    assert attributes == [("f", "f", "f", "f", "f")]
    with connect(postgres) as conn:
        for statement in (
            "CREATE TABLE public.intruder (x int)",
            "CREATE TEMP TABLE intruder (x int)",
            "CREATE SCHEMA intruder",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
            conn.rollback()
    refused = [
        (postgres.url, "not-the-password"),
        (postgres.url.rsplit("/", 1)[0] + "/postgres", postgres.password),  # another database
        (f"postgresql://postgres@127.0.0.1:{postgres.port}/postgres", ""),  # superuser over TCP
    ]
    for url, password in refused:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, password=password, connect_timeout=CONNECT_TIMEOUT)


@pytest.mark.slow
def test_stop_refuses_connections_start_comes_back_on_the_same_port_close_leaves_nothing(
    postgres: Postgres,
) -> None:
    cluster = Postgres(max_connections=20)
    try:
        cluster.start()
        port, directory = cluster.port, cluster.directory
        assert cluster.admin_query("SHOW max_connections") == [("20",)]
        assert cluster.pid is not None
        first = psutil.Process(cluster.pid)
        held = connect(cluster)  # open across the outage, like a server's pooled connection
        held.execute("SELECT pg_sleep(0)")

        cluster.stop()
        assert cluster.pid is None and gone(first)
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT pg_sleep(0)")
        held.close()
        with pytest.raises(psycopg.OperationalError):
            connect(cluster)
        assert (directory / "data" / "PG_VERSION").is_file()  # stop() keeps the data

        cluster.start()
        assert cluster.port == port and cluster.pid not in (None, first.pid)
        with connect(cluster) as conn:  # the same role and password
            conn.execute("SELECT pg_sleep(0)")
        assert cluster.pid is not None
        postmaster = psutil.Process(cluster.pid)
        family = [postmaster, *postmaster.children(recursive=True)]
        assert len(family) > 1  # the backends and workers that must go with it
    finally:
        cluster.close()
    assert not directory.exists()
    assert wait_until(lambda: all(gone(process) for process in family), timeout=10)
    assert processes_using(directory) == []
    assert procs.port_is_free("127.0.0.1", port)
    with pytest.raises(psycopg.OperationalError):
        connect(cluster)


@pytest.mark.slow
def test_a_cluster_left_open_is_closed_when_its_owner_exits(postgres: Postgres) -> None:
    script = (
        "from loadtest.tools.postgres import Postgres\n"
        "cluster = Postgres().start()\n"
        "print(cluster.pid, cluster.directory)\n"  # and exit without close(): atexit's turn
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    pid, directory = result.stdout.split()
    assert not Path(directory).exists()
    assert not psutil.pid_exists(int(pid)) or gone(psutil.Process(int(pid)))
    assert processes_using(Path(directory)) == []


@pytest.mark.slow
def test_a_killed_owner_takes_its_postmaster_down(postgres: Postgres, tmp_path: Path) -> None:
    out = tmp_path / "owner.out"
    script = (
        "import sys\n"
        "from loadtest.tools.postgres import Postgres\n"
        "cluster = Postgres().start()\n"
        "print(cluster.pid, cluster.directory, flush=True)\n"
        "sys.stdin.read()\n"  # until killed
    )
    with open(out, "w") as stdout:
        owner = subprocess.Popen(
            [sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE, stdout=stdout
        )
    directory = None
    try:
        assert wait_until(lambda: out.read_text().strip() or owner.poll() is not None, 120)
        pid, directory = out.read_text().split()
        postmaster = psutil.Process(int(pid))
        owner.kill()  # no atexit, no finally: only the kernel's parent-death signal is left
        owner.wait(timeout=10)
        assert wait_until(lambda: gone(postmaster), timeout=30)
        assert processes_using(Path(directory)) == []
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(timeout=10)
        if directory is not None:  # a killed owner cannot delete its directory
            shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
def test_the_command_line_prints_the_settings_and_cleans_up_on_sigterm(
    postgres: Postgres, tmp_path: Path
) -> None:
    out = tmp_path / "cli.out"
    with open(out, "w") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loadtest.tools.postgres", "--max-connections", "30"],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        assert wait_until(
            lambda: "Ctrl-C" in out.read_text() or proc.poll() is not None, timeout=120
        ), out.read_text()
        text = out.read_text()
        settings = dict(re.findall(r"^(ARENA_DB_\w+)=(\S+)$", text, re.MULTILINE))
        assert settings.keys() == {"ARENA_DB_URL", "ARENA_DB_PASSWORD"}, text
        match = re.search(r"\(pid (\d+), in (\S+)\)", text)
        assert match, text
        directory = Path(match[2])
        with psycopg.connect(
            settings["ARENA_DB_URL"],
            password=settings["ARENA_DB_PASSWORD"],
            connect_timeout=CONNECT_TIMEOUT,
        ) as conn:
            conn.execute("SELECT pg_sleep(0)")
            assert conn.execute("SHOW max_connections").fetchone() == ("30",)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert not directory.exists()
    assert processes_using(directory) == []


def test_missing_binaries_give_a_clear_error_naming_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARENA_PG_BINDIR", str(tmp_path))  # a directory without binaries
    with pytest.raises(PostgresUnavailable, match="apt-get install postgresql") as raised:
        Postgres()
    assert str(tmp_path) in str(raised.value)
    result = run_module("loadtest.tools.postgres")  # inherits ARENA_PG_BINDIR
    assert result.returncode == 2
    assert "apt-get install postgresql" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""
