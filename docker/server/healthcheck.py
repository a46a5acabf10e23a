"""Container healthcheck: the server answers `/ping` with `PONG` on its protocol port.

Needs nothing but the standard library (the image has no curl or nc, nor loadtest/). Exit 0 =
healthy. It gives the same verdict as loadtest/tools/procs.py's `ping` (tests/test_healthchecks.py).
"""

import os
import socket
import sys

port = int(os.environ.get("ARENA_PORT", "9000"))
try:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"/ping\n/quit\n")
        reply = sock.makefile("rb").readline(256)
except OSError as error:
    print(f"unhealthy: {error}", file=sys.stderr)
    sys.exit(1)
if reply != b"PONG\n":
    print(f"unhealthy: expected PONG, got {reply[:80]!r}", file=sys.stderr)
    sys.exit(1)
