"""loadtest/plugin/weblogin.py: ARENA_LOCUST_LOGIN=user:password alone puts Locust's web UI behind a
login; unset, nothing changes; a bad value or --web-login without it refuses to start.

Real Locust subprocesses (the image's two locustfiles, no users started) on free 127.0.0.1
ports, real HTTP requests. The same plugin runs in the compose stack (tests/test_compose.py).
"""

from __future__ import annotations

import http.cookiejar
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.compose_helpers import free_port, http_json, http_request, http_text, poll

pytestmark = [pytest.mark.locust, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "loadtest" / "plugin"
LOCUSTFILES = f"{PLUGIN / 'locustfile.py'},{PLUGIN / 'weblogin.py'}"
LOGIN = ("operator", "pass:with:colons")
START_TIMEOUT = 30.0


def locust_environment(**extra: str) -> dict[str, str]:
    """The environment without inherited Locust or compose knobs, plus `extra`."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "ARENA_"))}
    return {**keep, "PYTHONUNBUFFERED": "1", **extra}


def run_locust(port: int, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """Start Locust's web UI (no test started) with the image's locustfiles."""
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        LOCUSTFILES,
        "--web-host",
        "127.0.0.1",
        "--web-port",
        str(port),
        *args,
    ]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def stop(process: subprocess.Popen[str]) -> None:
    """Stop a Locust started by run_locust and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def status(
    url: str, login: tuple[str, str] | None = None, headers: dict[str, str] | None = None
) -> int:
    """The HTTP status of a GET, without following redirects."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(http_request(url, login=login, headers=headers), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture
def locust_with_login() -> Iterator[str]:
    """A Locust web UI started with ARENA_LOCUST_LOGIN; yields its base URL."""
    port = free_port()
    process = run_locust(port, locust_environment(ARENA_LOCUST_LOGIN=":".join(LOGIN)))
    base = f"http://127.0.0.1:{port}"
    try:
        up = poll(lambda: status(f"{base}/metrics") == 200, START_TIMEOUT, interval=0.2)
        assert up is True, f"Locust did not start: {process.poll()} {up!r}"
        yield base
    finally:
        stop(process)


def test_with_the_variable_every_page_needs_the_login(locust_with_login: str) -> None:
    """401 (with a Basic challenge) for the API, the login page for a browser, in with the
    right user and password only; /metrics stays open for Prometheus."""
    base = locust_with_login
    for path in ("/stats/requests", "/latency", "/logs", "/"):
        assert status(base + path) == 401, path
    assert status(f"{base}/stats/requests", ("operator", "wrong")) == 401
    assert status(f"{base}/stats/requests", ("intruder", LOGIN[1])) == 401
    assert "stats" in http_json(f"{base}/stats/requests", login=LOGIN)
    assert status(f"{base}/", headers={"Accept": "text/html"}) == 302
    assert "username_password_callback" in http_text(f"{base}/login")
    assert "locust_users" in http_text(f"{base}/metrics")


def test_the_login_form_opens_a_session(locust_with_login: str) -> None:
    """Locust's login page posts to /login_submit: a wrong password stays out, the right one
    gets a session cookie that opens the API."""
    base = locust_with_login
    jar = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    form = {"username": LOGIN[0], "password": "wrong"}
    with browser.open(http_request(f"{base}/login_submit", data=form), timeout=10) as response:
        assert response.url.endswith("/login")
    form["password"] = LOGIN[1]
    with browser.open(http_request(f"{base}/login_submit", data=form), timeout=10) as response:
        assert not response.url.endswith("/login")
    with browser.open(f"{base}/stats/requests", timeout=10) as response:
        assert response.status == 200


def test_without_the_variable_nothing_changes() -> None:
    """Unset or empty: the web UI and its API answer without any login."""
    port = free_port()
    process = run_locust(port, locust_environment(ARENA_LOCUST_LOGIN=""))
    try:
        url = f"http://127.0.0.1:{port}/stats/requests"
        up = poll(lambda: status(url) == 200, START_TIMEOUT, interval=0.2)
        assert up is True, f"Locust did not answer without a login: {up!r}"
        assert status(f"http://127.0.0.1:{port}/", headers={"Accept": "text/html"}) == 200
    finally:
        stop(process)


@pytest.mark.parametrize(
    ("variable", "args", "message"),
    [
        ("no-colon", (), "must be user:password"),
        (":only-a-password", (), "must be user:password"),
        ("", ("--web-login",), "--web-login needs ARENA_LOCUST_LOGIN"),
    ],
)
def test_a_login_that_cannot_work_refuses_to_start(
    variable: str, args: tuple[str, ...], message: str
) -> None:
    """A malformed variable, or --web-login without one, exits 2 instead of serving an open UI."""
    process = run_locust(free_port(), locust_environment(ARENA_LOCUST_LOGIN=variable), *args)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        stop(process)
    assert process.returncode == 2, stderr
    assert message in stderr
