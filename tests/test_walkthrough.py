"""The README's walk-through works as written: its commands, run literally, give what it shows.

The code blocks are read from README.md, so the README cannot drift from what the commands do.
Plus the line client (`python -m services.client`) against real servers.
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.plugin.workload import KNOBS
from loadtest.tools import procs
from services import models

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CODE_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def section(title: str) -> str:
    """The README text under `## title` up to the next `## ` heading."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def blocks(title: str, language: str) -> list[str]:
    """The code blocks of one language in one README section."""
    return [body for lang, body in CODE_BLOCK.findall(section(title)) if lang == language]


def commands(block: str) -> list[str]:
    """The command lines of a `sh` block (comments kept: the shell ignores them)."""
    return [line for line in block.splitlines() if line.strip()]


def session() -> tuple[str, bytes, bytes]:
    """The README's session: the command after `$ `, what is typed, and what is printed."""
    (block,) = blocks("The servers", "text")
    first, *lines = block.splitlines()
    assert first.startswith("$ ")
    # Every request gets exactly one reply line: typed and printed lines alternate.
    typed, printed = lines[0::2], lines[1::2]
    assert len(typed) == len(printed)
    return (
        first[2:],
        "".join(f"{line}\n" for line in typed).encode(),
        "".join(f"{line}\n" for line in printed).encode(),
    )


def run_client(*args: str, stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m services.client ARGS` with stdin piped."""
    return subprocess.run(
        [sys.executable, "-m", "services.client", *args],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


# -- the line client -------------------------------------------------------------------------


def test_client_prints_one_reply_per_line_and_exits_0_after_quit(server_factory):
    server = server_factory("threaded")
    result = run_client(f"127.0.0.1:{server.port}", stdin=b"hello\n/ping\n\n//x\n/quit\nnot sent\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"HELLO\nPONG\n\n/X\nBYE\n"
    assert result.stderr == b""


def test_client_exits_0_at_the_end_of_its_input_without_a_newline(server_factory):
    server = server_factory("gevent")
    result = run_client(f"tcp://127.0.0.1:{server.port}", stdin=b"abc")
    assert (result.returncode, result.stdout) == (0, b"ABC\n")


def test_client_says_when_the_server_closes_the_connection(server_factory):
    server = server_factory("pool", "--workers", "1", "--line-limit", "8")
    result = run_client(f"127.0.0.1:{server.port}", stdin=b"123456789\nagain\n")
    assert result.returncode == 1
    assert result.stdout.startswith(b"ERR line-too-long")
    assert b"the server closed the connection" in result.stderr


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:", "127.0.0.1:70000", ":9001"])
def test_client_refuses_a_bad_address_with_exit_2(address):
    result = run_client(address)
    assert result.returncode == 2
    assert b"usage: python -m services.client HOST:PORT" in result.stderr
    assert b"expected HOST:PORT" in result.stderr


def test_client_reports_a_refused_connection_with_exit_2():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connecting is refused
        result = run_client(f"127.0.0.1:{port}", stdin=b"hello\n")
    assert result.returncode == 2
    assert f"cannot connect to 127.0.0.1:{port}".encode() in result.stderr
    assert result.stdout == b""


# -- the README, literally -------------------------------------------------------------------


@pytest.fixture
def readme_servers():
    """The servers of README's "The servers", started with the README's own command lines."""
    lines = commands(blocks("The servers", "sh")[0])
    setup = [line for line in lines if not line.startswith(".venv/bin/python -m services ")]
    servers = [line for line in lines if line.startswith(".venv/bin/python -m services ")]
    assert len(servers) == len(models.NAMES)  # one command line per model
    ports = [int(p) for line in servers for p in re.findall(r"--(?:metrics-)?port (\d+)", line)]
    taken = [port for port in ports if not procs.port_is_free("127.0.0.1", port)]
    if taken:
        pytest.skip(f"the README's ports {taken} are in use on this machine")
    for line in setup:
        result = subprocess.run(
            line, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
        )
        assert result.returncode == 0, f"{line}: {result.stdout}{result.stderr}"
    started: list[procs.Server] = []
    try:
        for line in servers:
            started.append(procs.start_server(["bash", "-c", f"exec {line}"], name=line))
            assert started[-1].port in ports
        yield servers
    finally:
        codes = procs.stop_all([server.proc for server in started], grace=60)
        assert codes == [0] * len(started), [server.log_text() for server in started]


@pytest.mark.slow
def test_readme_quick_start_names_real_make_targets():
    (block,) = blocks("Quick start", "sh")
    for line in commands(block):
        if line.startswith("make "):
            target = shlex.split(line.split("#")[0])[1]
            dry = subprocess.run(
                ["make", "-n", target],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert dry.returncode == 0, f"{line}: {dry.stderr}"


@pytest.mark.slow
def test_readme_servers_and_session_work_as_written(readme_servers):
    command, typed, printed = session()
    result = subprocess.run(
        command, shell=True, input=typed, capture_output=True, cwd=ROOT, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == printed  # byte for byte what the README shows
    # The README says `nc 127.0.0.1 9001` is the same session.
    if shutil.which("nc"):
        port = re.search(r"(\d+)$", command).group(1)
        with_nc = subprocess.run(
            ["nc", "127.0.0.1", port], input=typed, capture_output=True, timeout=60, check=False
        )
        assert with_nc.stdout == printed
    # Every server of the section answers the same session the same way.
    for line in readme_servers:
        port = re.search(r"--port (\d+)", line).group(1)
        other = subprocess.run(
            re.sub(r"\d+$", port, command),
            shell=True,
            input=typed,
            capture_output=True,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
        assert other.stdout == printed, line


@pytest.mark.slow
def test_readme_locust_commands_reach_the_readme_servers(readme_servers, tmp_path):
    (block,) = blocks("Load test (Locust)", "sh")
    lines = commands(block)
    (help_line,) = [line for line in lines if "--help" in line]
    shown = subprocess.run(
        help_line, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert shown.returncode == 0, shown.stderr
    assert not [knob.flag for knob in KNOBS if knob.flag not in shown.stdout]

    (headless,) = [line for line in lines if "--headless" in line]
    # Run where `out/` may be written: the same relative paths, linked to the repository.
    for name in (".venv", "loadtest", "services"):
        (tmp_path / name).symlink_to(ROOT / name)
    # Only the run time is shortened; the rest is the README's line.
    short = re.sub(r"-t \S+", "-t 5s", headless.split(" #")[0])
    result = subprocess.run(
        short, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stats = (tmp_path / "out" / "run_stats.csv").read_text()
    for target in models.NAMES:
        assert f"{target},echo," in stats
