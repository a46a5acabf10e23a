"""The build and run configuration agrees with itself: one Python, one lock, one Dockerfile, one
set of scrape jobs, and `make test` enforcing types and format.

Fast: files are read, nothing is built or started. The images themselves are built and run by
tests/test_compose.py.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

from mypy.main import process_options
from mypy.options import PER_MODULE_OPTIONS
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from loadtest.tools import stack
from services import models

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "docker" / "constraints.txt"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus" / "prometheus.yml"
PROJECT = "socket-arena"
# Where the Dockerfile puts the lock; every `pip install` there must use it.
LOCK_IN_IMAGE = "/tmp/constraints.txt"
TARGETS = ("server", "locust")


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def lock_pins() -> dict[str, str]:
    """{canonical name: version} of docker/constraints.txt; every line must be `name==version`."""
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][\w.-]*)==([\w.+!-]+)", line.strip())
        assert match, f"{LOCK.name}: not an exact pin: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"{LOCK.name}: {name} pinned twice"
        pins[name] = match[2]
    return pins


def project_requirements() -> list[Requirement]:
    """Every requirement pyproject.toml states (dependencies and extras), the project's own
    extras reference left out."""
    project = pyproject()["project"]
    texts = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        texts += extra
    return [r for r in map(Requirement, texts) if canonicalize_name(r.name) != PROJECT]


def dockerfile_instructions() -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) for every instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stage = ""
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage = re.split(r"\s+as\s+", arguments, flags=re.IGNORECASE)[-1].strip()
        instructions.append((stage, keyword, " ".join(arguments.split())))
    return instructions


def stage_parents() -> dict[str, str]:
    """{stage: what it is built FROM}."""
    parents = {}
    for stage, keyword, arguments in dockerfile_instructions():
        if keyword == "FROM":
            parents[stage] = arguments.split()[0]
    return parents


def test_the_tests_run_on_the_python_the_images_use() -> None:
    """One Python: the interpreter running these tests, the images' base, the Makefile's,
    pyproject's floor, ruff's and mypy's target are the same major.minor."""
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = stage_parents()["base"]
    image = re.fullmatch(r"python:(\d+\.\d+)-slim", base)
    assert image, f"the images' base should be python:X.Y-slim, is {base}"
    makefile = re.search(r"^PYTHON_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert makefile, "Makefile: PYTHON_VERSION := X.Y"
    config = pyproject()
    stated = {
        "images (docker/Dockerfile)": image[1],
        "Makefile PYTHON_VERSION": makefile[1],
        "pyproject requires-python": config["project"]["requires-python"].removeprefix(">="),
        "ruff target-version": config["tool"]["ruff"]["target-version"].replace("py3", "3.", 1),
        "mypy python_version": config["tool"]["mypy"]["python_version"],
    }
    assert stated == dict.fromkeys(stated, running), f"tests run on {running}"


def test_the_lock_pins_exactly_what_is_installed() -> None:
    """docker/constraints.txt pins every distribution in this environment at its installed
    version, and nothing else (`make install` builds the venv from it; refresh: see its header)."""
    installed = {
        canonicalize_name(dist.metadata["Name"]): dist.version
        for dist in importlib.metadata.distributions()
    }
    installed.pop(PROJECT, None)
    pins = lock_pins()
    unpinned = {name: version for name, version in installed.items() if name not in pins}
    differ = {
        name: (version, pins[name])
        for name, version in installed.items()
        if name in pins and pins[name] != version
    }
    stale = sorted(set(pins) - set(installed))
    assert not unpinned, f"installed but not in the lock: {unpinned}"
    assert not differ, f"installed version != lock (installed, lock): {differ}"
    assert not stale, f"in the lock but not installed (stale, or run make install): {stale}"


def test_pyproject_ranges_are_bounded_and_admit_the_pins() -> None:
    """Every dependency has an upper bound, and the locked version lies in its range."""
    pins = lock_pins()
    build = [Requirement(text) for text in pyproject()["build-system"]["requires"]]
    for requirement in [*project_requirements(), *build]:
        operators = {spec.operator for spec in requirement.specifier}
        assert operators & {"<", "<=", "==", "~=", "==="}, f"no upper bound: {requirement}"
    for requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in the lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"the lock's {name}=={pins[name]} is outside pyproject's {requirement}"
        )


def test_both_images_install_only_from_the_lock() -> None:
    """docker/Dockerfile: a shared base copies the lock; each target installs pyproject
    dependencies with `-c` from it, runs `pip check`, and fails if anything is unpinned."""
    parents = stage_parents()
    assert {stage: parents.get(stage) for stage in TARGETS} == dict.fromkeys(TARGETS, "base")
    instructions = dockerfile_instructions()
    assert ("base", "COPY", f"docker/constraints.txt {LOCK_IN_IMAGE}") in instructions
    declared = {canonicalize_name(r.name) for r in project_requirements()}
    for target in TARGETS:
        installs = [
            arguments
            for stage, keyword, arguments in instructions
            if stage == target and keyword == "RUN" and "pip install" in arguments
        ]
        assert len(installs) == 1, (target, installs)
        command = installs[0]
        assert f"pip install -c {LOCK_IN_IMAGE} " in command, command
        assert "&& pip check" in command, command
        assert f"! pip freeze | grep -vixF -f {LOCK_IN_IMAGE}" in command, command
        packages = command.split("pip install -c " + LOCK_IN_IMAGE, 1)[1].split("&&")[0].split()
        assert packages, command
        assert {canonicalize_name(p) for p in packages} <= declared, (target, packages)
    for stage, keyword, arguments in instructions:
        if keyword == "RUN" and "pip install" in arguments:
            assert f"-c {LOCK_IN_IMAGE}" in arguments and " -r " not in arguments, (
                stage,
                arguments,
            )
    assert not list((ROOT / "docker").glob("requirements*.txt")), "the lock is the only pin file"


def test_the_dockerfile_needs_only_the_classic_builder() -> None:
    """No BuildKit-only syntax: the engine here has no buildx and no registry for `# syntax=`."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax=", text, re.M | re.I)
    assert "--mount" not in text
    assert "<<" not in text


def test_compose_builds_both_images_from_the_one_dockerfile() -> None:
    """docker-compose.yml builds the servers from target `server` and Locust from `locust`."""
    text = COMPOSE_FILE.read_text()
    builds = re.findall(
        r"^  build:\n    context: \.\n    dockerfile: (\S+)\n    target: (\S+)\n", text, re.M
    )
    assert builds == [("docker/Dockerfile", "server"), ("docker/Dockerfile", "locust")]
    assert text.count("build:") == 2


def scrape_jobs(text: str) -> dict[str, str]:
    """{job_name: metrics_path} of a Prometheus config in this project's plain layout."""
    jobs = {}
    for block in re.split(r"^\s*- job_name:", text, flags=re.M)[1:]:
        name = block.split()[0]
        path = re.search(r"^\s*metrics_path:\s*(\S+)", block, re.M)
        jobs[name] = path[1] if path else "/metrics"
    return jobs


def test_compose_and_the_local_stack_scrape_the_same_jobs() -> None:
    """docker/prometheus/prometheus.yml and the config `make up` generates name the same jobs
    (one per server model, then locust) at the same paths, at the same intervals, so one
    dashboard reads both. Compose alone also scrapes PostgreSQL's exporter (the local stack runs
    no exporter: its database is a throwaway cluster)."""
    generated = stack.prometheus_config(stack.StackSettings(), with_locust=True)
    compose = PROMETHEUS_CONFIG.read_text()
    compose_jobs = scrape_jobs(compose)
    assert list(compose_jobs) == [*models.NAMES, "locust", "postgres"]
    del compose_jobs["postgres"]
    assert scrape_jobs(generated) == compose_jobs
    for setting in ("scrape_interval", "scrape_timeout", "evaluation_interval"):
        pattern = rf"^  {setting}: (\S+)"
        assert re.findall(pattern, generated, re.M) == re.findall(pattern, compose, re.M), setting


def test_make_test_checks_format_and_types_before_the_tests() -> None:
    """`make test` (what CI runs) fails on lint, formatting or type errors first."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "Makefile: no test target"
    commands = [line.strip() for line in recipe[1].splitlines()]
    assert commands == [
        "$(PY) -m ruff check .",
        "$(PY) -m ruff format --check .",
        "$(PY) -m mypy",
        "$(PY) -m pytest",
    ]


def test_services_are_type_checked_as_strictly_as_mypy_strict() -> None:
    """pyproject's mypy settings for services/ turn on every flag `mypy --strict` does (mypy
    takes `strict` only globally, so they are listed; a new mypy flag shows up here)."""
    _, strict = process_options(["--strict", "services"])
    _, default = process_options(["services"])
    names = [name for name in dir(strict) if not name.startswith("_")]
    flags = {
        name: getattr(strict, name)
        for name in names
        if not callable(getattr(strict, name)) and getattr(strict, name) != getattr(default, name)
    }
    assert flags, "mypy --strict changed nothing?"
    mypy = pyproject()["tool"]["mypy"]
    overrides = [o for o in mypy.get("overrides", []) if "services.*" in o["module"]]
    assert len(overrides) == 1, overrides
    assert "services" in overrides[0]["module"]
    effective = {
        name: overrides[0].get(name, mypy.get(name))
        if name in PER_MODULE_OPTIONS
        else mypy.get(name)
        for name in flags
    }
    assert effective == flags
