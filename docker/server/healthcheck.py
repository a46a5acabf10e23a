"""Container healthcheck: the server answers `/ping` with `PONG` on its protocol port.

Needs nothing but the standard library (the image has no curl or nc). Exit 0 = healthy.
"""

import os
import socket
import sys

port = int(os.environ.get("ARENA_PORT", "9000"))
try:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(5)
        sock.sendall(b"/ping\n/quit\n")
        reply = b""
        while b"\n" not in reply and len(reply) < 256:
            chunk = sock.recv(256)
            if not chunk:
                break
            reply += chunk
except OSError as error:
    print(f"unhealthy: {error}", file=sys.stderr)
    sys.exit(1)
if not reply.startswith(b"PONG\n"):
    print(f"unhealthy: expected PONG, got {reply[:80]!r}", file=sys.stderr)
    sys.exit(1)
