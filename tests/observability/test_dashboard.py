"""The Grafana dashboard is valid JSON and every panel's query names a metric the code exports.

The exported names are collected from the live ``/metrics`` of the observed run (API, manager,
workers) and from the observatory write buffer's collector over a real (SQLite) buffer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.observability.conftest import ObservedStack

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "compose" / "grafana" / "dashboards" / "ccat-pipeline.json"

#: PromQL words that are not metric names.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        follows = text[match.end() :].lstrip()
        if follows.startswith("(") or word.lower() in KEYWORDS:
            continue  # a function or an operator
        names.add(word)
    return names


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _buffer_metric_names(tmp_path: Path) -> set[str]:
    from ops_db_api.site.buffer import SiteBuffer
    from ops_db_api.site.metrics import BufferCollector

    buffer = SiteBuffer(f"sqlite:///{tmp_path / 'buffer.sqlite'}")
    buffer.create_schema()
    registry = CollectorRegistry()
    registry.register(BufferCollector(buffer))
    return _names(generate_latest(registry).decode())


def _names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + x for x in ("_bucket", "_count", "_sum"))
    return names


def test_metric_names_are_parsed_from_promql() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (stage, le) (rate(ccat_transfer_task_seconds_bucket"
        '{stage=~"data.*"}[15m]))) / on (stage) group_left ccat_transfer_records > 0'
    )
    assert metric_names(expr) == {"ccat_transfer_task_seconds_bucket", "ccat_transfer_records"}


def test_dashboard_is_valid_and_queries_exported_metrics(
    observed: ObservedStack, tmp_path: Path
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = [p for p in _panels(dashboard) if p.get("type") != "row"]
    assert len(panels) >= 10
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"

    exported: set[str] = set()
    for scrape in observed.after.values():
        exported |= set(scrape)
    exported |= _buffer_metric_names(tmp_path)
    for scrape in observed.after.values():  # counters are exported with _total
        exported |= {n + "_total" for n in scrape}

    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "ccat-prometheus"
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']!r}"
            unknown = names - exported
            assert not unknown, f"{panel['title']}: {sorted(unknown)} are not exported"
            used |= names
    # the pipeline, the sites and the failures are all on it
    for needed in (
        "ccat_transfer_backlog_items",
        "ccat_transfer_backlog_oldest_age_seconds",
        "ccat_transfer_route_bytes_total",
        "ccat_transfer_location_used_bytes",
        "ccat_transfer_failed_records",
        "ccat_transfer_task_failures_total",
        "ccat_api_buffer_depth",
    ):
        assert needed in used, needed


def test_grafana_and_prometheus_provisioning_point_at_each_other() -> None:
    datasource = yaml.safe_load(
        (REPO / "compose/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    [ds] = datasource["datasources"]
    assert ds["uid"] == "ccat-prometheus" and ds["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (REPO / "compose/grafana/provisioning/dashboards/ccat.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    prom = yaml.safe_load((REPO / "compose/prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert set(jobs) == {"ccat-api", "ccat-manager", "ccat-worker"}
    compose = yaml.safe_load((REPO / "compose/docker-compose.yml").read_text())
    services = compose["services"]
    workers = {n for n in services if n.startswith("worker-")}
    targets = {t.split(":")[0] for t in jobs["ccat-worker"]["static_configs"][0]["targets"]}
    assert targets == workers, "every worker is scraped"
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
