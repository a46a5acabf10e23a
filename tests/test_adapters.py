"""Each private-API adapter falls back loudly when what it relies on is missing, and still works.

Loud: a WARNING naming the adapter, and the adapter's fallback gauge at 1 (the server's
`arena_adapter_fallback`, the Locust master's `locust_adapter_fallback`). In-process where an
object lacking the attribute can be handed in; a subprocess where the check runs at start-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gevent.socket
import pytest
from flask import Flask, jsonify, request

from loadtest.plugin import locust_adapter
from services.adapters import Adapters
from services.servers import executors, greenlets

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"ready model=\S+ host=\S+ port=(\d+) metrics_port=(\d+)")
log = logging.getLogger("test.adapters")


def warned(caplog: pytest.LogCaptureFixture, adapter: str) -> bool:
    """Whether a WARNING names the adapter's fallback."""
    return any(
        r.levelno == logging.WARNING
        and adapter in r.getMessage()
        and "falls back" in r.getMessage()
        for r in caplog.records
    )


# -- executor-processes ----------------------------------------------------------------------


def test_an_executor_without_processes_falls_back_to_the_warm_up_pids(caplog):
    adapters = Adapters()
    with ThreadPoolExecutor(1) as lacking:  # a real executor with no `_processes`
        workers = executors.recorded_workers(lacking, {os.getpid()}, adapters, log)
    assert [(w.pid, w.process) for w in workers] == [(os.getpid(), None)]
    assert adapters.snapshot() == {"executor-processes": True}
    assert warned(caplog, "executor-processes")


# In a fresh interpreter: this test process has been monkey-patched by gevent (importing Locust
# does that), and a process pool's manager thread would then be a greenlet that never lets the
# interpreter exit.
PROCESS_POOL_WITHOUT_PROCESSES = """
import json, logging, sys
from services.adapters import Adapters
from services.servers import executors
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
executors.executor_processes = lambda executor: None  # as if the private field were gone
adapters = Adapters()
pool = executors.WorkerPool("process", 1, logging.getLogger("test"), adapters)
try:
    sentinels = pool.sentinels()
    answer = pool.executor.submit(pow, 2, 10).result(timeout=30)
    pids = list(pool.pids)
    alive_before = [executors.is_alive(pid) for pid in pids]
finally:
    pool.end()
alive_after = [executors.is_alive(pid) for pid in pids]
print(json.dumps({"sentinels": len(sentinels), "answer": answer, "pids": pids,
                  "alive_before": alive_before, "alive_after": alive_after,
                  "fallbacks": adapters.snapshot()}))
"""


def test_a_process_pool_still_serves_and_ends_its_workers_after_the_fallback():
    result = subprocess.run(
        [sys.executable, "-c", PROCESS_POOL_WITHOUT_PROCESSES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["sentinels"] == 0  # no Process objects: deaths seen by failed requests only
    assert seen["answer"] == 1024
    assert len(seen["pids"]) == 1 and seen["alive_before"] == [True]
    assert seen["alive_after"] == [False], "the recorded pid was not ended"
    assert seen["fallbacks"] == {"executor-processes": True}
    assert "executor-processes" in result.stderr and "WARNING" in result.stderr


# -- gevent-io (in-process: gevent imported, nothing patched) ----------------------------------


def test_gevent_io_falls_back_when_socket_is_not_patched():
    # A fresh interpreter: importing Locust in another test patches this one for good.
    check = "from services.servers import greenlets; print(greenlets.fast_io_problem())"
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "the socket module is not monkey-patched", result.stderr


def test_gevent_io_probe_passes_on_gevent_sockets_and_names_a_missing_internal(monkeypatch):
    left, right = gevent.socket.socketpair()
    try:
        assert greenlets.probe_fast_io(left, right) is None
        monkeypatch.setattr(greenlets, "FAST_IO_INTERNALS", ("_sock", "_wait", "_read_watcher"))
        problem = greenlets.probe_fast_io(left, right)
        assert problem is not None and "_read_watcher" in problem
    finally:
        left.close()
        right.close()


LAUNCH_GEVENT_WITHOUT_READ_EVENT = """
import sys
from gevent import monkey
monkey.patch_all()
from services.servers import greenlets
# As if gevent renamed a socket internal the fast path reads.
greenlets.FAST_IO_INTERNALS = ("_sock", "_wait", "_read_event_renamed")
from services.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_gevent_server_lacking_the_internals_falls_back_loudly_and_still_answers(tmp_path):
    log_path = tmp_path / "gevent.log"
    command = [sys.executable, "-c", LAUNCH_GEVENT_WITHOUT_READ_EVENT, "gevent"]
    flags = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [*command, *flags], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log_file
        )
    try:
        deadline = time.monotonic() + 30
        while not (match := READY.search(log_path.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        port, metrics_port = int(match[1]), int(match[2])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"still here\n/ping\n")
            replies = b""
            while replies.count(b"\n") < 2:
                replies += client.recv(4096)
        assert replies == b"STILL HERE\nPONG\n"
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        metrics = urllib.request.urlopen(url, timeout=10).read().decode()
        assert 'arena_adapter_fallback{adapter="gevent-io"} 1.0' in metrics
        assert 'arena_adapter_fallback{adapter="gevent-os-primitives"} 0.0' in metrics
        text = log_path.read_text()
        assert "WARNING" in text and "adapter gevent-io falls back" in text
        assert "_read_event_renamed" in text
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


# -- Locust's parser ---------------------------------------------------------------------------


@pytest.fixture(autouse=False)
def locust_checks():
    locust_adapter.reset()
    yield
    locust_adapter.reset()


def test_a_parser_without_config_files_falls_back_and_says_so_in_metrics(locust_checks, caplog):
    parser = argparse.ArgumentParser()  # argparse has no _default_config_files
    locust_adapter.read_config_first(parser, "/somewhere/locust.conf")
    assert locust_adapter.fallbacks().keys() == {"parser-config-files"}
    assert warned(caplog, "parser-config-files")
    text = locust_adapter.metrics_text().decode()
    assert 'locust_adapter_fallback{adapter="parser-config-files"} 1.0' in text


def test_config_files_are_read_first_when_the_parser_has_them(locust_checks):
    parser = argparse.ArgumentParser()
    parser._default_config_files = ["~/.locust.conf"]  # as configargparse keeps them
    locust_adapter.read_config_first(parser, "/ours.conf")
    locust_adapter.read_config_first(parser, "/ours.conf")
    assert parser._default_config_files == ["/ours.conf", "~/.locust.conf"]
    assert locust_adapter.fallbacks() == {}


def test_without_known_options_each_knob_is_still_added_once(locust_checks, caplog):
    parser = argparse.ArgumentParser()
    known = locust_adapter.known_options(object())  # no _option_string_actions
    assert warned(caplog, "parser-known-options")
    for _registration in range(2):  # python -m loadtest, then the locustfile
        locust_adapter.add_argument_once(parser, "--think-ms", known, default="")
    assert parser.parse_args(["--think-ms", "5"]).think_ms == "5"


# -- /swarm ------------------------------------------------------------------------------------


def locust_like_app(reads: tuple[str, ...] = ("user_count", "host")) -> Flask:
    """A Flask app with a POST /swarm whose handler reads the given form fields."""
    app = Flask("swarm-test")
    source = (
        "def swarm():\n    form = request.form\n    return jsonify("
        + ", ".join(f"{name}=form.get({name!r})" for name in reads)
        + ")\n"
    )
    namespace = {"request": request, "jsonify": jsonify}
    exec(source, namespace)  # a handler whose code names exactly these fields
    app.add_url_rule("/swarm", "swarm", namespace["swarm"], methods=["POST"])
    return app


def test_the_swarm_check_runs_before_locusts_handler(locust_checks):
    app = locust_like_app()
    assert locust_adapter.intercept_swarm(app, lambda: jsonify(success=False, message="no"))
    reply = app.test_client().post("/swarm", data={"user_count": "1"}).get_json()
    assert reply == {"success": False, "message": "no"}
    assert locust_adapter.fallbacks() == {}


@pytest.mark.parametrize(
    ("app", "reason"),
    [
        (Flask("no-swarm"), "no POST /swarm route"),
        (locust_like_app(("users", "host")), "no longer reads the form fields user_count"),
    ],
    ids=["no-route", "renamed-field"],
)
def test_the_swarm_interception_falls_back_loudly_and_the_app_still_serves(
    locust_checks, caplog, app, reason
):
    assert not locust_adapter.intercept_swarm(app, lambda: jsonify(success=False))
    assert reason in locust_adapter.fallbacks()["swarm-interception"]
    assert warned(caplog, "swarm-interception")
    text = locust_adapter.metrics_text().decode()
    assert 'locust_adapter_fallback{adapter="swarm-interception"} 1.0' in text
    if "/swarm" in {rule.rule for rule in app.url_map.iter_rules()}:
        reply = app.test_client().post("/swarm", data={"users": "1"}).get_json()
        assert reply == {"users": "1", "host": None}  # Locust's own handler, unchecked


LAUNCH_LOCUST_WITH_RENAMED_SWARM_FIELD = """
import sys
from loadtest.plugin import locust_adapter
locust_adapter.SWARM_FIELDS = ("user_count", "host_renamed")  # as if Locust renamed a field
from loadtest.__main__ import main
sys.argv = ["loadtest", *sys.argv[1:]]
main()
"""


@pytest.mark.locust
def test_locust_starts_with_the_swarm_fallback_and_reports_it(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        web_port = probe.getsockname()[1]
    command = [sys.executable, "-c", LAUNCH_LOCUST_WITH_RENAMED_SWARM_FIELD]
    flags = ["--web-host", "127.0.0.1", "--web-port", str(web_port)]
    log_path = tmp_path / "locust.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [*command, *flags], cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                url = f"http://127.0.0.1:{web_port}/metrics"
                metrics = urllib.request.urlopen(url, timeout=5).read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        assert 'locust_adapter_fallback{adapter="swarm-interception"} 1.0' in metrics
        assert 'locust_adapter_fallback{adapter="parser-config-files"} 0.0' in metrics
        assert "Locust adapter swarm-interception falls back" in log_path.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
