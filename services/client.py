"""`python -m services.client HOST:PORT`: talk to a server line by line, like `nc`.

Reads request lines from stdin (typed or piped), sends each one, waits for its one reply line
and prints it, so a piped session prints exactly the replies, in order:

    printf 'hello\\n/ping\\n' | python -m services.client 127.0.0.1:9001

Standard library only, so it works wherever the project does (many machines lack `nc`).
Exit codes: 0 at the end of stdin or after `/quit`; 1 when the server closes the connection
while a reply is due; 2 for a bad address or a refused connection.
"""

from __future__ import annotations

import socket
import sys
from typing import BinaryIO

PROG = "python -m services.client"
CONNECT_TIMEOUT_S = 10.0


class UsageError(Exception):
    """A bad command line or address (exit 2)."""


def parse_address(text: str) -> tuple[str, int]:
    """Split `HOST:PORT` (also `tcp://HOST:PORT` and `[::1]:PORT`) into host and port."""
    address = text.strip().removeprefix("tcp://")
    host, colon, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UsageError(f"expected HOST:PORT (for example 127.0.0.1:9001), got {text!r}")
    return host, int(port_text)


def connect(host: str, port: int) -> socket.socket:
    """A connected socket, or UsageError naming the address and the reason."""
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    except OSError as error:
        reason = error.strerror or str(error)
        raise UsageError(f"cannot connect to {host}:{port}: {reason}") from None
    # A reply may take long (`/sleep 60000`, a busy server): wait as long as it takes.
    sock.settimeout(None)
    return sock


def session(sock: socket.socket, requests: BinaryIO, replies: BinaryIO) -> int:
    """Send each request line, print its reply line; returns the exit code."""
    from_server = sock.makefile("rb")
    for line in requests:
        request = line.rstrip(b"\n")
        try:
            sock.sendall(request + b"\n")
            reply = from_server.readline()
        except OSError as error:  # a reset after the server closed (e.g. a line too long)
            sys.stderr.write(
                f"{PROG}: the server closed the connection ({error.strerror or error})\n"
            )
            return 1
        if not reply:
            sys.stderr.write(f"{PROG}: the server closed the connection\n")
            return 1
        replies.write(reply)
        replies.flush()
        if request.rstrip(b"\r") == b"/quit":
            return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: connect, then run the session; returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print(f"usage: {PROG} HOST:PORT\n\n" + (__doc__ or "").split("\n\n", 1)[1], end="")
        return 0
    try:
        if len(args) != 1:
            raise UsageError("expected one argument, HOST:PORT (for example 127.0.0.1:9001)")
        sock = connect(*parse_address(args[0]))
    except UsageError as error:
        sys.stderr.write(f"usage: {PROG} HOST:PORT\n{PROG}: error: {error}\n")
        return 2
    with sock:
        try:
            return session(sock, sys.stdin.buffer, sys.stdout.buffer)
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())
