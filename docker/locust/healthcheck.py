"""Container healthcheck for Locust: `master` serves its web API; `worker` is connected to it.

A worker has no port of its own, so it asks the master's `/stats/requests` whether a worker
whose id starts with this container's hostname (Locust ids are `HOSTNAME_UUID`) is alive.
Standard library only. Exit 0 = healthy.
"""

import json
import os
import socket
import sys
import urllib.request

role = sys.argv[1] if len(sys.argv) > 1 else "master"
if role == "master":
    host = "127.0.0.1"
    port = os.environ.get("LOCUST_WEB_PORT", "8089")
else:
    host = os.environ.get("LOCUST_MASTER_NODE_HOST", "locust")
    port = os.environ.get("LOCUST_MASTER_WEB_PORT", "8089")
try:
    with urllib.request.urlopen(f"http://{host}:{port}/stats/requests", timeout=5) as response:
        report = json.load(response)
except (OSError, ValueError) as error:
    print(f"unhealthy: {error}", file=sys.stderr)
    sys.exit(1)
if role != "master":
    prefix = socket.gethostname() + "_"
    mine = [w for w in report.get("workers", []) if str(w.get("id", "")).startswith(prefix)]
    if not mine or all(w.get("state") == "missing" for w in mine):
        print(f"unhealthy: master does not list worker {prefix}*", file=sys.stderr)
        sys.exit(1)
