"""The Prometheus alerting rules (charts/*/files/alerts.yml), checked by Prometheus itself.

``promtool check rules`` parses every expression and annotation template; ``promtool test
rules`` runs the unit tests in tests/alerts/ through Prometheus's own rule engine (series in,
alerts out). The rest checks what promtool cannot: every alert is tested firing, carries a
severity and a runbook section that exists, and uses only documented metrics. That the metric
and label names exist in what the processes really export is checked against a live scrape in
tests/observability/test_alerts.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULE_FILES = [
    ROOT / "charts/ccat-transfer/files/alerts.yml",
    ROOT / "charts/ccat-api/files/alerts.yml",
]
TEST_FILES = sorted((ROOT / "tests/alerts").glob("*.test.yml"))
DOCS = ROOT / "docs/observability.md"
#: Metrics Prometheus makes itself, not ours to document.
PROMETHEUS_OWN = {"up", "ALERTS"}


def promtool() -> str:
    """The promtool binary; fails (not skips) with what to install when it is missing."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool not found: apt-get install prometheus (Debian's package carries promtool)"
        )
    return found


def alerts() -> list[dict[str, Any]]:
    """Every alerting rule of both files, with its file's name under ``_file``."""
    out = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    out.append({**rule, "_file": path.relative_to(ROOT).as_posix()})
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (ours start with ``ccat_``)."""
    names = set(re.findall(r"\b(ccat_[a-z0-9_]+)", expr))
    names |= {n for n in re.findall(r"\b([a-zA-Z_:][\w:]*)\s*\{", expr) if n in PROMETHEUS_OWN}
    return names


def test_promtool_checks_every_rule_file() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", *map(str, RULE_FILES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    found = sum(int(n) for n in re.findall(r"SUCCESS: (\d+) rules found", result.stdout))
    assert found == len(alerts()), result.stdout


def test_promtool_unit_tests_pass() -> None:
    assert len(TEST_FILES) == 2, TEST_FILES
    result = subprocess.run(
        [promtool(), "test", "rules", *(p.name for p in TEST_FILES)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT / "tests/alerts",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(TEST_FILES), result.stdout


def test_the_unit_tests_can_fail(tmp_path: Path) -> None:
    """A rule that counts a manager gauge twice (sum instead of max) or a stalled-stage rule
    turned around must make the unit tests fail: they compare values and exact alert sets."""
    rules = RULE_FILES[0].read_text()
    broken = rules.replace(
        "max by (stage, reason) (ccat_transfer_failed_records)",
        "sum by (stage, reason) (ccat_transfer_failed_records)",
    ).replace("unless on (stage, site)", "and on (stage, site)")
    assert broken != rules
    (tmp_path / "charts/ccat-transfer/files").mkdir(parents=True)
    (tmp_path / "charts/ccat-transfer/files/alerts.yml").write_text(broken)
    (tmp_path / "tests/alerts").mkdir(parents=True)
    test_file = tmp_path / "tests/alerts/transfer.test.yml"
    shutil.copy(ROOT / "tests/alerts/transfer.test.yml", test_file)
    result = subprocess.run(
        [promtool(), "test", "rules", test_file.name],
        capture_output=True,
        text=True,
        check=False,
        cwd=test_file.parent,
    )
    out = result.stdout + result.stderr  # promtool reports failures on stderr
    assert result.returncode != 0, out
    assert "name: failed for good" in out  # the doubled count is in its summary
    assert 'summary="4 data_transfer record(s)' in out
    # the inverted stall rule fires for transfers, which keep finishing
    assert 'alertname="CCATTransferStalled"' in out
    assert 'stage="data_transfer"' in out


def test_every_alert_is_tested_firing() -> None:
    fired: set[str] = set()
    for path in TEST_FILES:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("promql_expr_test", []):
                for sample in check.get("exp_samples") or []:
                    fired |= set(re.findall(r'alertname="(\w+)"', sample["labels"]))
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    untested = sorted({a["alert"] for a in alerts()} - fired)
    assert not untested, f"alerts no test in tests/alerts/ sees firing: {untested}"


def test_every_alert_says_how_bad_what_and_where_to_read_on() -> None:
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in DOCS.read_text().splitlines()
        if line.startswith("#")
    }
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)), "alert names must be unique across the rule files"
    for rule in alerts():
        where = f"{rule['_file']}: {rule['alert']}"
        assert rule["alert"].startswith("CCAT"), where
        assert rule.get("labels", {}).get("severity") in ("critical", "warning"), where
        notes = rule.get("annotations", {})
        assert notes.get("summary") and notes.get("description"), where
        assert notes.get("runbook") == f"docs/observability.md#{rule['alert'].lower()}", where
        assert rule["alert"].lower() in anchors, f"{where}: no section {rule['alert']} in {DOCS}"
        assert re.fullmatch(r"\d+[mh]", rule.get("for", "")), f"{where}: fires on one sample"


def test_alerts_use_documented_metrics_only() -> None:
    # the observatory's buffer metrics are documented with the site mode
    texts = DOCS.read_text() + (ROOT / "docs/site-mode.md").read_text()
    documented = set(re.findall(r"`(ccat_[a-z0-9_]+)`", texts))
    for rule in alerts():
        for name in metric_names(rule["expr"]) - PROMETHEUS_OWN:
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert base in documented, f"{rule['alert']}: {name} is not documented"
