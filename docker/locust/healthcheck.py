"""Container healthcheck for Locust: `master` serves its web API; `worker` is connected to it.

A worker has no port of its own, so it asks the master's `/stats/requests` whether a worker
whose id starts with this container's hostname (Locust ids are `HOSTNAME_UUID`) is alive.
With ARENA_LOCUST_LOGIN=user:password (weblogin.py) the web API needs a login: send it as
HTTP Basic credentials. Standard library only. Exit 0 = healthy.
"""

import base64
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
request = urllib.request.Request(f"http://{host}:{port}/stats/requests")
login = os.environ.get("ARENA_LOCUST_LOGIN", "")
if login:
    request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
try:
    with urllib.request.urlopen(request, timeout=5) as response:
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
