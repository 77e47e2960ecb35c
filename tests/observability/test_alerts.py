"""The alerting rules select what the real processes export.

A rule whose metric or label is misspelt never fires, and nothing says so: promtool accepts
any name. So every metric, label name and label value the rules in charts/*/files/alerts.yml
select is looked up in the scrapes of the observed pipeline run (real worker, manager and API
processes; conftest.py). Label values the run may not produce (a copy whose deletion failed, a
location type with no worker in the run) are looked up in the enums the code exports them from.
"""

from __future__ import annotations

import re

import httpx

from ccat_ops_db.enums import LocationType, PhysicalCopyStatus, Status
from data_transfer.metrics import Holdups, holdup_families
from ops_db_api.app import create_app
from tests.observability.conftest import ObservedStack, scrape
from tests.test_alerts import PROMETHEUS_OWN, ROOT, alerts, metric_names

#: Labels Prometheus adds to every scraped series (not the exporter's).
TARGET_LABELS = {"job", "instance"}
#: Exported by the observatory's API only (site mode), not by the main API of this run; those
#: names are checked against the site mode's collector in src/ops_db_api/site/metrics.py.
SITE_MODE = "ccat_api_buffer_"


def _labels_by_metric(observed: ObservedStack) -> dict[str, dict[str, set[str]]]:
    """metric sample name -> label name -> values seen, over every process's last scrape.

    The run files nothing through the API and refuses no token, so the API is first sent a
    request with an unknown token (401) and a filing with the reader's token (403: no ``file``
    scope), and scraped again. The holdup gauges a healthy run leaves empty (bad copies) get
    their label names from the managers' collector fed one item of each."""
    api = observed.metrics_urls["api"].removesuffix("/metrics")
    bulk = f"{api}/api/v1/raw_data_files/bulk"
    assert httpx.post(bulk, json={}, headers={"Authorization": "Bearer nope"}).status_code == 401
    reader = {"Authorization": f"Bearer {observed.reader_token}"}
    assert httpx.post(bulk, json={}, headers=reader).status_code == 403
    scrapes = [*observed.after.values(), scrape(observed.metrics_urls["api"])]
    one = Holdups({"s": (1, 1.0)}, {"s": 1}, {("s", "l", "present"): 1}, {("s", "l"): 1})
    families = {f.name: f for f in holdup_families(one)}
    scrapes.append(
        {
            name: {tuple(sorted(s.labels.items())): s.value for s in family.samples}
            for name, family in families.items()
        }
    )
    out: dict[str, dict[str, set[str]]] = {}
    for scraped in scrapes:
        for name, samples in scraped.items():
            labels = out.setdefault(name, {})
            for key in samples:
                for label, value in key:
                    labels.setdefault(label, set()).add(value)
    return out


def _matchers(expr: str) -> list[tuple[str, str, str, str]]:
    """(metric, label, operator, value) of every label matcher in ``expr``."""
    out = []
    for metric, body in re.findall(r"\b([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", expr):
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', body):
            out.append((metric, label, op, value))
    return out


def _grouping_labels(expr: str) -> set[str]:
    """Label names of every ``by (...)`` and ``on (...)`` clause."""
    found: set[str] = set()
    for clause in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr):
        found |= {label.strip() for label in clause.split(",") if label.strip()}
    return found


def _known_values(metric: str, label: str, seen: dict[str, dict[str, set[str]]]) -> set[str]:
    values = set(seen.get(metric, {}).get(label, set()))
    if label == "location_type":
        values |= {t.value for t in LocationType}
    if metric == "ccat_transfer_copies" and label == "status":
        values |= {s.value for s in PhysicalCopyStatus}
    if metric == "ccat_transfer_records" and label == "status":
        values |= {s.value for s in Status}
    return values


def test_every_metric_and_label_the_alerts_select_is_exported(observed: ObservedStack) -> None:
    seen = _labels_by_metric(observed)
    site_source = (ROOT / "src/ops_db_api/site/metrics.py").read_text()
    problems: list[str] = []
    for rule in alerts():
        where = f"{rule['alert']} ({rule['_file']})"
        names = metric_names(rule["expr"]) - PROMETHEUS_OWN
        ours = [n for n in names if not n.startswith(SITE_MODE)]
        for name in names - set(ours):
            if f'"{name}"' not in site_source:
                problems.append(f"{where}: {name} is not exported by the site mode")
        for name in ours:
            if name not in seen:
                problems.append(f"{where}: no process exports {name}")
        exported = set().union(*(seen.get(n, {}).keys() for n in ours)) if ours else set()
        if ours:
            for label in _grouping_labels(rule["expr"]) - TARGET_LABELS - {"le"}:
                if label not in exported:
                    problems.append(f"{where}: groups by {label!r}, which {ours} do not carry")
        for metric, label, op, value in _matchers(rule["expr"]):
            if metric in PROMETHEUS_OWN or metric.startswith(SITE_MODE) or label in TARGET_LABELS:
                continue
            if label not in seen.get(metric, {}):
                problems.append(f"{where}: {metric} has no label {label!r}")
                continue
            known = _known_values(metric, label, seen)
            if op == "=" and value not in known:
                problems.append(f"{where}: {metric}{{{label}={value!r}}}: not one of {known}")
            if op in ("=~", "!="):  # the literal words of a pattern (5.. is a pattern)
                for word in value.split("|"):
                    if re.fullmatch(r"\w+", word) and word not in known:
                        problems.append(f"{where}: {metric}{{{label}}}: {word!r} unknown")
    assert not problems, "\n".join(problems)


def test_the_filing_routes_the_latency_alert_watches_exist() -> None:
    """CCATAPISlowFiling selects POST routes by a pattern on the route template; it must
    match the real filing routes (single and bulk), and no read route."""
    [rule] = [r for r in alerts() if r["alert"] == "CCATAPISlowFiling"]
    [pattern] = [v for _, label, op, v in _matchers(rule["expr"]) if label == "route"]
    paths = create_app().openapi()["paths"]
    posts = {path for path, methods in paths.items() if "post" in methods}
    watched = {path for path in posts if re.fullmatch(pattern, path)}
    assert "/api/v1/raw_data_files" in watched and "/api/v1/raw_data_files/bulk" in watched, (
        watched,
        sorted(posts),
    )
