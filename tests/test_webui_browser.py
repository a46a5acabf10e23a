"""The Locust web UI as a user sees it: headless Chromium against real servers and a real Locust.

What is checked is what a reader of the page gets: tab titles after Locust upper-cases them, no
host warning, the scenario select first among the custom parameters, a latency row for every
target, and a scenario switched in the edit form changing the request mix. The screenshots it
takes are the README's (results/screenshots/).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loadtest.plugin import scenarios
from loadtest.plugin.workload import KNOBS
from services import models
from tests.conftest import ROOT, RunningServer, launch_server, stop_server
from tests.loadtest_helpers import (
    TARGETS,
    LocustProcess,
    free_port,
    locust_env,
    poll,
    start_locust,
    stats_totals,
)

pytestmark = [pytest.mark.slow, pytest.mark.locust]

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
CHROMEDRIVER = Path(shutil.which("chromedriver") or "/usr/bin/chromedriver")
SCREENSHOTS = ROOT / "results" / "screenshots"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1440,1000",
)
HOST_WARNINGS = ("no host attribute", "override the host")
GREEK_CAPITAL_MU = "\u039c"  # what "µ" becomes when Locust upper-cases a tab title
WAIT_S = 90  # a loaded 2-core machine: generous, never a timing assertion


def missing_browser() -> str | None:
    """Why the browser test cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return f"{path} is missing (apt-get install {package})"
    return None


@dataclass
class LocustUi:
    """A Locust web UI and the real servers its targets point at."""

    run: LocustProcess
    servers: dict[str, RunningServer]


@pytest.fixture(scope="module")
def locust_ui(tmp_path_factory) -> Iterator[LocustUi]:
    """Three real servers and a real Locust web UI pointed at them (not started)."""
    reason = missing_browser()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("webui")
    servers: dict[str, RunningServer] = {}
    run = None
    try:
        for target in TARGETS:
            servers[target] = launch_server(target, *models.get(target).small_flags)
        env = locust_env({target: server.address for target, server in servers.items()})
        run = start_locust(workdir, "webui", [], env, web_port=free_port())
        poll("the web UI", run.web_ready, timeout=WAIT_S)
        yield LocustUi(run, servers)
    finally:
        if run is not None:
            run.kill()
        for server in servers.values():
            stop_server(server)


@pytest.fixture
def browser(tmp_path) -> Iterator[Any]:
    """Headless Chromium with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def find_text(driver: Any, text: str) -> Any:
    """The first element whose own text is `text`, waiting for it to appear."""
    from selenium.webdriver.common.by import By

    xpath = f"//*[normalize-space(text())='{text}']"
    return poll(
        f"{text!r} on the page", lambda: driver.find_elements(By.XPATH, xpath), timeout=WAIT_S
    )[0]


def click_button(driver: Any, label: str) -> None:
    """Click the button labelled `label` (as written in the page, before CSS upper-cases it)."""
    from selenium.webdriver.common.by import By

    xpath = f"//button[normalize-space()='{label}']"
    poll(f"the {label} button", lambda: driver.find_elements(By.XPATH, xpath), timeout=WAIT_S)[
        0
    ].click()


def open_custom_parameters(driver: Any) -> Any:
    """Expand "Custom parameters" (Locust collapses it); the scenario select inside."""
    from selenium.webdriver.common.by import By

    summary = "//*[@aria-expanded][.//*[normalize-space(text())='Custom parameters']]"

    def scenario_select() -> Any:
        found = driver.find_elements(By.XPATH, summary)
        if not found:
            return None
        # The innermost match is the accordion's own header (ancestors come first).
        if found[-1].get_attribute("aria-expanded") != "true":
            found[-1].click()  # again if a dialog was still opening when clicked
            return None
        selects = driver.find_elements(By.NAME, field_name("scenario"))
        return selects[0] if selects and selects[0].is_displayed() else None

    return poll("the custom parameters to open", scenario_select, timeout=WAIT_S, interval=1)


def tabs(driver: Any) -> dict[str, Any]:
    """The tabs by their title as shown (upper-cased by Locust's CSS)."""
    from selenium.webdriver.common.by import By

    return {tab.text: tab for tab in driver.find_elements(By.CSS_SELECTOR, "[role=tab]")}


def open_tab(driver: Any, title: str) -> None:
    """Click the tab whose shown title is `title`."""
    poll(f"the {title} tab", lambda: title in tabs(driver), timeout=WAIT_S)
    tabs(driver)[title].click()


def field_name(dest: str) -> str:
    """A knob's form field name: Locust's UI camel-cases option names (think_ms -> thinkMs)."""
    return re.sub(r"_([a-z0-9])", lambda match: match.group(1).upper(), dest)


def custom_parameter_names(driver: Any) -> list[str]:
    """The knobs' form fields, in page order, by knob name."""
    from selenium.webdriver.common.by import By

    knobs = {field_name(knob.dest): knob.dest for knob in KNOBS}
    fields = driver.find_elements(By.CSS_SELECTOR, "form [name]")
    names = (field.get_attribute("name") for field in fields)
    return [knobs[name] for name in names if name in knobs]


def body_text(driver: Any) -> str:
    """Everything the page shows as text."""
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def screenshot(driver: Any, name: str) -> None:
    """Save the window as results/screenshots/NAME.png (the README shows them)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    time.sleep(1)  # let tab and dialog animations finish: the picture is for people
    assert driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def counts(run: LocustProcess, command: str) -> dict[str, int]:
    """Requests of `command` per target so far, from Locust's /stats/requests."""
    totals = stats_totals(run.stats())
    return {target: totals.get((target, command), (0, 0))[0] for target in TARGETS}


def shows_what_make_lessons_found(browser, lesson: str) -> None:
    """The Scenario tab's row with the committed verdict of `lesson` (results/lessons/)."""
    verdict = scenarios.checked(lesson)
    assert verdict, f"results/lessons/lessons.json has no {lesson}"
    find_text(browser, "Checked by make lessons")
    # The verdict and when it was found, e.g. "holds (2026-12-08 01:17 UTC)".
    assert verdict.split("):")[0] + ")" in body_text(browser)


def test_a_user_picks_a_lesson_and_sees_the_mix_change(locust_ui, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    run, servers = locust_ui.run, locust_ui.servers
    browser.get(run.url("/"))
    find_text(browser, "Start new load test")
    scenario = open_custom_parameters(browser)

    # The start form: the header names every target's address, no host warning anywhere, and
    # the custom parameters in the order of the knobs (scenario first, workload, then targets).
    page = body_text(browser)
    for target, server in servers.items():
        assert f"{target} tcp://127.0.0.1:{server.port}" in page
    assert not [warning for warning in HOST_WARNINGS if warning in page.lower()], page
    assert custom_parameter_names(browser) == [knob.dest for knob in KNOBS]
    assert scenario.tag_name == "select"
    options = [option.get_attribute("value") for option in Select(scenario).options]
    assert options[0] == "steady" and "io-wait" in options
    browser.set_window_size(1440, 1500)  # the whole form, for the README
    screenshot(browser, "start-form")
    browser.set_window_size(1440, 1000)

    click_button(browser, "Start")
    poll("every target answering echo", lambda: all(counts(run, "echo").values()), timeout=WAIT_S)
    titles = list(tabs(browser))
    assert "LATENCY (MICROSECONDS)" in [title.upper() for title in titles], titles
    assert "SCENARIO" in [title.upper() for title in titles], titles
    assert not [title for title in titles if GREEK_CAPITAL_MU in title or "µ" in title]
    assert not [warning for warning in HOST_WARNINGS if warning in body_text(browser).lower()]
    poll(
        "Locust to report requests per second", lambda: run.stats()["total_rps"] > 0, timeout=WAIT_S
    )
    time.sleep(4)  # the page polls every 2 s: let it show the rates too
    screenshot(browser, "statistics")

    open_tab(browser, "LATENCY (MICROSECONDS)")

    def latency_targets() -> set[str]:
        cells = browser.find_elements(By.CSS_SELECTOR, "tbody tr td:first-child")
        return {cell.text for cell in cells} & set(TARGETS)

    poll(
        "a latency row for every target", lambda: latency_targets() == set(TARGETS), timeout=WAIT_S
    )
    screenshot(browser, "latency-tab")

    # Switch the running test to io-wait in the edit form: only /sleep requests from then on.
    click_button(browser, "Edit")
    find_text(browser, "Edit running load test")
    Select(open_custom_parameters(browser)).select_by_value("io-wait")
    screenshot(browser, "edit-form")
    click_button(browser, "Update")

    def only_sleep_grows() -> bool:
        echo, sleep = counts(run, "echo"), counts(run, "sleep")
        time.sleep(3)
        echo_after, sleep_after = counts(run, "echo"), counts(run, "sleep")
        return echo_after == echo and all(sleep_after[t] > sleep[t] for t in TARGETS)

    poll("sleep requests growing and echo requests not", only_sleep_grows, timeout=WAIT_S)
    open_tab(browser, "SCENARIO")
    find_text(browser, "io-wait: every request waits 20 ms")
    shows_what_make_lessons_found(browser, "io-wait")
    screenshot(browser, "scenario-tab")

    # Users per target apply when a test starts: a scenario that changes them is refused while
    # the test runs, with a message saying so.
    answer = run.post(
        "/swarm", {"user_count": "300", "spawn_rate": "100", "scenario": "many-clients"}
    )
    assert answer["success"] is False
    assert "apply when a test starts" in answer["message"]
    assert run.post("/stop")["success"]
    poll("the test to stop", lambda: run.stats()["state"] == "stopped", timeout=WAIT_S)

    # A new test whose users per target come from the scenario starts users per target x
    # targets, whatever smaller number the form says (the same code raises many-clients to 3000).
    one = TARGETS[0]
    answer = run.post(
        "/swarm", {"user_count": "3", "spawn_rate": "100", "scenario": "steady", "targets": one}
    )
    assert answer["success"], answer
    poll("100 users on one target", lambda: run.stats()["user_count"] == 100, timeout=WAIT_S)
    assert run.post("/stop")["success"]
    poll("the test to stop", lambda: run.stats()["state"] == "stopped", timeout=WAIT_S)

    # Arrival-rate mode from the start form: type a rate, start, and the Scenario tab shows the
    # offered against the achieved rate; the latency tab counts late starts beside the service
    # time.
    browser.get(run.url("/"))
    click_button(browser, "New")
    find_text(browser, "Start new load test")
    open_custom_parameters(browser)
    rate = browser.find_element(By.NAME, field_name("arrival_rate"))
    rate.send_keys("40")
    arrival = browser.find_element(By.NAME, field_name("arrival"))
    assert [o.get_attribute("value") for o in Select(arrival).options] == ["poisson", "uniform"]
    Select(arrival).select_by_value("uniform")
    click_button(browser, "Start")
    open_tab(browser, "SCENARIO")
    offered = find_text(browser, "Offered vs achieved")
    assert "40 requests/s per target on a uniform timetable" in body_text(browser)
    assert offered.is_displayed()

    def achieved_rates() -> list[float]:
        return [float(rate) for rate in re.findall(r"vs ([0-9.]+)/s", body_text(browser))]

    # Locust's current rate averages the last seconds: wait until it has caught up.
    poll(
        "the achieved rate near the offered one",
        lambda: len(achieved_rates()) == len(TARGETS) and min(achieved_rates()) >= 30,
        timeout=WAIT_S,
        interval=1,
    )
    screenshot(browser, "arrival-rate")
    open_tab(browser, "LATENCY (MICROSECONDS)")
    find_text(browser, "late starts")
    assert run.post("/stop")["success"]
