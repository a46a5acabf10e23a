"""The model registry is the one list of models: everything else reads it."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from services import config, models, options
from services.config import ConfigError, load_settings
from services.servers import create_server, server_class
from tests.conftest import ROOT

REGISTRY = ROOT / "services" / "models.py"
# Folders whose Python files must not spell out a list of models.
SOURCE_DIRS = ("services", "loadtest", "tests", "docker")

DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "arena.json"
COMPOSE = ROOT / "docker-compose.yml"
STACK = ROOT / "docker" / "stack.yml"
PROMETHEUS = ROOT / "docker" / "prometheus" / "prometheus.yml"


def python_files() -> list[Path]:
    """Every Python file of the project, outside the virtual environment."""
    return sorted(path for folder in SOURCE_DIRS for path in (ROOT / folder).rglob("*.py"))


def model_lists(tree: ast.AST) -> list[tuple[int, list[str]]]:
    """Literal tuples, lists, sets and dict keys that name two or more models."""
    names = set(models.NAMES)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            elements = node.elts
        elif isinstance(node, ast.Dict):
            elements = [key for key in node.keys if key is not None]
        else:
            continue
        named = {e.value for e in elements if isinstance(e, ast.Constant) and e.value in names}
        if len(named) >= 2:
            found.append((node.lineno, sorted(named)))
    return found


def test_the_scan_finds_a_model_list_written_out() -> None:
    """The check below would notice a copied list (so it can fail)."""
    source = 'MODELS = ("threaded", "pool")\nPORTS = {"gevent": 1, "pool": 2}\nONE = ["pool"]\n'
    assert [line for line, _ in model_lists(ast.parse(source))] == [1, 2]


def test_no_model_list_is_written_outside_the_registry() -> None:
    """Adding a model touches the registry, not eight lists."""
    offenders = []
    for path in python_files():
        if path == REGISTRY:
            continue
        for line, named in model_lists(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(ROOT)}:{line} names {named}")
    assert not offenders, "model lists outside services/models.py:\n" + "\n".join(offenders)


def model_comparisons(tree: ast.AST) -> list[tuple[int, str]]:
    """Comparisons with a model's or a variant's name (`model == "gevent"`, `in ("pool",)`)."""
    names = set(models.NAMES) | set(models.VARIANTS)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for operand in [node.left, *node.comparators]:
            constants = (
                operand.elts if isinstance(operand, ast.Tuple | ast.List | ast.Set) else [operand]
            )
            for constant in constants:
                if isinstance(constant, ast.Constant) and constant.value in names:
                    found.append((node.lineno, str(constant.value)))
    return found


def test_the_scan_finds_a_question_about_a_model_by_name() -> None:
    """The check below would notice `if settings.model == "gevent"` (so it can fail)."""
    source = 'if settings.model == "gevent":\n    pass\nok = kind in ("x", "pool-thread")\n'
    assert model_comparisons(ast.parse(source)) == [(1, "gevent"), (3, "pool-thread")]


def test_nothing_outside_a_model_asks_for_a_model_by_name() -> None:
    """A model's setup, sizing and notes are in its registry entry and its module, so code
    elsewhere reads the entry (`model.sized`, `model.prepare`) instead of asking for a name."""
    own = {REGISTRY, *(ROOT / "services" / "servers").glob("*.py")}
    offenders = [
        f"{path.relative_to(ROOT)}:{line} asks for {name!r}"
        for path in python_files()
        if path not in own and path.parts[len(ROOT.parts)] in ("services", "loadtest")
        for line, name in model_comparisons(ast.parse(path.read_text(), str(path)))
    ]
    assert not offenders, "model names compared outside the registry:\n" + "\n".join(offenders)


def test_registry_entries_are_unique_and_complete() -> None:
    """Names, ports and colours are distinct; every entry has a summary."""
    assert len(set(models.NAMES)) == len(models.MODELS)
    for attribute in ("port", "metrics_port", "colour"):
        values = [getattr(model, attribute) for model in models.MODELS]
        assert len(set(values)) == len(values), f"two models share a {attribute}: {values}"
    assert all(model.summary for model in models.MODELS)
    with pytest.raises(KeyError, match="choose from"):
        models.get("no-such-model")


@pytest.mark.parametrize("model", models.NAMES)
def test_every_model_builds_its_server_class(model: str) -> None:
    """The import path names a Server subclass whose `model` is the registry name."""
    cls = server_class(models.get(model))
    assert cls.model == model


@pytest.mark.parametrize("model", models.NAMES)
def test_cli_accepts_every_registered_model(model: str) -> None:
    """`python -m services MODEL` knows every model the registry knows, and only those."""
    assert load_settings([model], {}).model == model
    with pytest.raises(ConfigError):
        load_settings(["no-such-model"], {})


def test_each_setting_is_every_models_or_declared_by_exactly_one() -> None:
    """A model's own options live in its registry entry; each fills a field of Settings."""
    fields = {field.name for field in dataclasses.fields(config.Settings)} - {"model"}
    common = {option.name for option in config.COMMON_OPTIONS}
    owned = [option.name for model in models.MODELS for option in model.options]
    assert len(owned) == len(set(owned)), owned  # no option declared by two models
    assert not common & set(owned)
    filled = {config.FILLS.get(name, name) for name in common | set(owned)}
    assert filled == fields


@pytest.mark.parametrize(
    ("model", "option"),
    [(model, option) for model in models.MODELS for option in model.options],
    ids=lambda value: getattr(value, "name", ""),
)
def test_a_models_own_flag_is_refused_for_any_other_model(
    model: models.Model, option: options.Option
) -> None:
    flag = "--" + option.name.replace("_", "-")
    value = {"executor": "thread", "loop": "asyncio"}.get(option.name, "2")
    assert getattr(load_settings([model.name, flag, value], {}), option.name) == option.parse(value)
    for other in (name for name in models.NAMES if name != model.name):
        with pytest.raises(ConfigError, match=f"^{flag}: only the {model.name} model takes it"):
            load_settings([other, flag, value], {})
        # Its variable is another model's business: one environment may start several models.
        variable = config.ENV_PREFIX + option.name.upper()
        settings = load_settings([other], {variable: value})
        assert getattr(settings, option.name) == getattr(config.Settings(), option.name)


def test_create_server_refuses_an_unknown_model() -> None:
    """A settings object with an unknown model is a clear error, not an AttributeError."""
    settings = load_settings(["threaded"], {})
    object.__setattr__(settings, "model", "no-such-model")
    with pytest.raises(ValueError, match="unknown model"):
        create_server(settings)


def test_cli_help_lists_every_model_with_its_summary() -> None:
    """--help shows the registry's one-line summaries."""
    result = subprocess.run(
        [sys.executable, "-m", "services", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    text = " ".join(result.stdout.split())
    for model in models.MODELS:
        assert f"{model.name}: {' '.join(model.summary.split())}" in text


@pytest.mark.parametrize("model", models.MODELS, ids=models.NAMES)
def test_compose_has_a_service_port_and_locust_target_per_model(model: models.Model) -> None:
    """docker-compose.yml: the service, its published port variable and default, its target."""
    text = COMPOSE.read_text()
    assert re.search(rf"^  {re.escape(model.name)}:\n", text, re.MULTILINE), model.name
    assert f"${{ARENA_{model.env_name}_PORT-{model.port}}}:9000" in text
    assert f"LOCUST_{model.env_name}_TARGET: tcp://{model.name}:9000" in text


@pytest.mark.parametrize("model", models.MODELS, ids=models.NAMES)
def test_swarm_stack_and_prometheus_have_each_model_with_its_replicas(model: models.Model) -> None:
    """docker/stack.yml: the service, its replicas variable, its Locust target and its place in
    the default targets; prometheus.yml: its job, finding every replica by DNS."""
    text = STACK.read_text()
    assert re.search(rf"^  {re.escape(model.name)}:\n", text, re.MULTILINE), model.name
    assert f"replicas: ${{ARENA_{model.env_name}_REPLICAS:-2}}" in text
    assert f"LOCUST_{model.env_name}_TARGET: tcp://{model.name}:9000" in text
    targets = re.search(r"LOCUST_TARGETS: \$\{LOCUST_TARGETS:-([\w,-]+)\}", text)
    assert targets and targets[1].split(",") == list(models.NAMES)
    job = re.search(
        rf"- job_name: {re.escape(model.name)}\n(?:    .*\n)*?.*names: \[{re.escape(model.name)}\]",
        PROMETHEUS.read_text(),
    )
    assert job, f"no dns_sd_configs job for {model.name} in {PROMETHEUS}"


@pytest.mark.parametrize("model", models.MODELS, ids=models.NAMES)
def test_dashboard_gives_each_model_its_registry_colour(model: models.Model) -> None:
    """Every colour override for a model's series uses the registry's colour."""
    overrides = []
    pending = list(json.loads(DASHBOARD.read_text())["panels"])
    while pending:
        panel = pending.pop()
        pending.extend(panel.get("panels", []))
        overrides.extend(panel.get("fieldConfig", {}).get("overrides", []))
    colours = {
        prop["value"].get("fixedColor")
        for override in overrides
        if model.name in str(override.get("matcher", {}).get("options", ""))
        for prop in override.get("properties", [])
        if prop.get("id") == "color"
    }
    assert colours == {model.colour}
