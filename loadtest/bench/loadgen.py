"""Build and run the C load generator (loadgen.c next to this file).

The binary is compiled once per source version with the system C compiler (`cc -O2`) into a
cache directory, so a changed loadgen.c is rebuilt and an unchanged one is not.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("loadgen.c")
# Above this share of one core the load generator, not the server, may be the limit.
SATURATION_CPU_FRACTION = 0.9


class LoadgenError(RuntimeError):
    """The load generator could not be built or did not produce a result."""


def cache_dir() -> Path:
    """Where the compiled load generator lives (ARENA_BENCH_BUILD_DIR overrides)."""
    configured = os.environ.get("ARENA_BENCH_BUILD_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "socket-arena"


def built_for(tool: str) -> Path | None:
    """The load generator's binary for a command-line tool, or None after saying on stderr why
    it could not be built (the tool then exits 2)."""
    try:
        return build()
    except LoadgenError as error:
        print(f"{tool}: {error}", file=sys.stderr)
        return None


def build(directory: Path | None = None) -> Path:
    """Compile loadgen.c unless a binary of this exact source exists; return its path."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    directory = directory or cache_dir()
    binary = directory / f"loadgen-{digest}"
    if binary.exists():
        return binary
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise LoadgenError(
            "the benchmark's load generator is C and no C compiler was found: install one "
            "(Debian: apt-get install gcc) or set CC"
        )
    directory.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename, so parallel runs never see half a binary.
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".loadgen-", delete=False) as handle:
        partial = Path(handle.name)
    try:
        result = subprocess.run(
            [compiler, "-O2", "-o", str(partial), str(SOURCE)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise LoadgenError(f"compiling {SOURCE} failed:\n{result.stderr}")
        partial.chmod(0o755)
        partial.replace(binary)
    finally:
        partial.unlink(missing_ok=True)
    return binary


@dataclass(frozen=True)
class Request:
    """One request line of a scenario, its expected reply, and its share of the mix."""

    weight: int
    line: str
    expected: str


def command(
    binary: Path,
    port: int,
    connections: int,
    duration: float,
    warmup: float,
    requests: Sequence[Request],
    timeout: float = 30.0,
    connect_timeout: float = 10.0,
    rate: float = 0.0,
) -> list[str]:
    """The command line that runs one measurement against 127.0.0.1:port: closed loop, or with
    `rate` > 0 open loop at that many requests per second across the connections."""
    args = [
        str(binary),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--connections",
        str(connections),
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        "--timeout",
        str(timeout),
        "--connect-timeout",
        str(connect_timeout),
    ]
    if rate > 0:
        args += ["--rate", f"{rate:.3f}"]
    for request in requests:
        args += ["--request", str(request.weight), request.line, request.expected]
    return args


def run(
    args: list[str],
    on_marker: Callable[[str], None],
    cpus: set[int] | None = None,
    timeout: float = 120.0,
) -> dict:
    """Run the load generator; call on_marker at measure-start/measure-end; return its JSON."""
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=preexec,
    )
    diagnostics: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for raw in iter(proc.stderr.readline, b""):
            text = raw.decode(errors="replace").strip()
            if text in ("measure-start", "measure-end"):
                on_marker(text)
            else:
                diagnostics.append(text)

    output: list[bytes] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        output.append(proc.stdout.read())

    readers = [threading.Thread(target=read, daemon=True) for read in (read_stderr, read_stdout)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise LoadgenError(f"the load generator ran past {timeout} s") from None
    for reader in readers:
        reader.join(timeout=5)
    stdout = b"".join(output)
    if proc.returncode != 0:
        raise LoadgenError(
            f"the load generator exited {proc.returncode}: " + " | ".join(diagnostics[-5:])
        )
    try:
        return json.loads(stdout)
    except json.JSONDecodeError as error:
        raise LoadgenError(f"the load generator printed no JSON: {stdout[:200]!r}") from error
