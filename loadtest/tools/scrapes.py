"""Prometheus's scrape configuration for Compose and Swarm, written from the model registry.

`python -m loadtest.tools.dashboard` writes it beside the dashboard (and `--check` fails while
the committed docker/prometheus/prometheus.yml differs), so a new model is scraped without an
edit. The local stack writes its own from the same registry (loadtest/tools/stack.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from loadtest.tools import cli
from services.models import MODELS, Model

PROMETHEUS_YML = cli.ROOT / "docker" / "prometheus" / "prometheus.yml"
METRICS_PORT = 9100  # every server image's /metrics port (docker/Dockerfile)

HEADER = """\
# Prometheus for the Socket Arena stack (docker-compose.yml and docker/stack.yml read this one
# file). Written by `python -m loadtest.tools.dashboard` from services/models.py: do not edit.
# The job name is the server model, so every panel in the Grafana dashboard can put the
# servers side by side with `by (job)` / legend {{job}}, however many replicas each one runs.
#
# Replicas: each server job asks DNS for every A record of its service name (Compose's DNS and
# Swarm's with `endpoint_mode: dnsrr` return one address per replica), so `--scale gevent=2` or
# `deploy.replicas: 2` gives two targets in job `gevent`. Each target is labelled with its
# `model` (= job) and its `replica` (the replica's address, also in `instance`); the dashboard
# sums per model and splits per replica. honor_labels keeps arena_server_info's own `model`
# label (the same value) instead of renaming it to exported_model.
# Kept to plain scrape_configs and dns_sd_configs (works on Prometheus 2.42 and later).
global:
  # Short on purpose: a demo that should show traffic within seconds of `docker compose up`.
  scrape_interval: 5s
  scrape_timeout: 4s
  evaluation_interval: 5s

scrape_configs:
"""

FOOTER = """\
  # The Locust master's /metrics: the client-side view (requests, failures, latency per target).
  - job_name: locust
    metrics_path: /metrics
    static_configs:
      - targets: ["locust:8089"]
  # PostgreSQL as its exporter sees it (docker/postgres/exporter-queries.yml): pg_up, connections
  # per database and state, and per application_name (arena-MODEL, one per server model).
  - job_name: postgres
    static_configs:
      - targets: ["postgres-exporter:9187"]
"""


def server_job(model: Model, first: bool) -> str:
    """One model's job: every replica of its service by DNS, labelled with model and replica."""
    job = (
        f"  - job_name: {model.name}\n"
        "    honor_labels: true\n"
        "    dns_sd_configs:\n"
        f"      - {{names: [{model.name}], type: A, port: {METRICS_PORT}, refresh_interval: 5s}}\n"
    )
    if first:  # the relabelling is written once and every later job refers to it
        return job + (
            "    relabel_configs: &replica-labels\n"
            "      - source_labels: [job]\n"
            "        target_label: model\n"
            "      - source_labels: [__address__]\n"
            "        target_label: replica\n"
        )
    return job + "    relabel_configs: *replica-labels\n"


def compose_config(models: Sequence[Model] = MODELS) -> str:
    """The whole prometheus.yml: a job per model, then Locust and PostgreSQL's exporter."""
    jobs = "".join(server_job(model, index == 0) for index, model in enumerate(models))
    return HEADER + jobs + FOOTER
