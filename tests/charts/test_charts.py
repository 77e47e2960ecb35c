"""The Helm charts under charts/: lint, render, Kubernetes schemas, checkov, and what the
rendered manifests must say (limits, probes, non-root, NetworkPolicies, PDBs, HPA, hooks).

Real tools, no mocks: helm (charts/get-helm.sh), the Kubernetes schemas of the
kubernetes-validate wheel, checkov in its own venv (charts/get-checkov.sh). A missing tool is
fetched once; if that fails the tests fail with what to install.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from .chartlib import REPO, checks, containers, helm_or_fail, workload_problems

CHARTS = REPO / "charts"
CHART_NAMES = ["ccat-api", "ccat-migrate", "ccat-transfer"]
SETS = ["default", "production"]


def value_set(chart: str, name: str):
    sets = {v.name: v for v in checks().value_sets(CHARTS / chart)}
    return sets[name]


def render_docs(chart: str, values: str = "default", *extra: str) -> list[dict]:
    text = checks().render(helm_or_fail(), CHARTS / chart, value_set(chart, values), *extra)
    return checks().documents(text)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_every_chart_is_checked() -> None:
    assert [p.name for p in checks().chart_dirs()] == CHART_NAMES
    for chart in CHART_NAMES:
        assert (CHARTS / chart / "values.schema.json").is_file()
        assert [v.name for v in checks().value_sets(CHARTS / chart)] == SETS


def test_shared_helpers_are_identical_copies() -> None:
    master = (CHARTS / "_common.tpl").read_text()
    for chart in CHART_NAMES:
        copy = (CHARTS / chart / "templates" / "_common.tpl").read_text()
        assert copy == master, f"{chart}/templates/_common.tpl differs from charts/_common.tpl"


@pytest.mark.parametrize("values", SETS)
@pytest.mark.parametrize("chart", CHART_NAMES)
def test_lint_strict_template_and_schemas(chart: str, values: str) -> None:
    helm = helm_or_fail()
    ok, out = checks().lint(helm, CHARTS / chart, value_set(chart, values))
    assert ok, out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out
    docs = render_docs(chart, values)
    assert docs, "nothing rendered"
    assert checks().validate_schemas(docs) == []
    assert workload_problems(docs) == []
    for d in docs:
        assert d["metadata"].get("namespace") == checks().NAMESPACE, d["metadata"]["name"]


def test_schema_validation_catches_a_bad_manifest() -> None:
    """The schema check is strict: an unknown field and a wrong type are reported."""
    docs = render_docs("ccat-api")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert checks().validate_schemas([dep]) == []
    typo = copy.deepcopy(dep)
    typo["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    (error,) = checks().validate_schemas([typo])
    assert "livenessProbes" in error, error
    wrong_type = copy.deepcopy(dep)
    wrong_type["spec"]["replicas"] = "two"
    (error,) = checks().validate_schemas([wrong_type])
    assert error.startswith("Deployment/ccat-api: spec/replicas:"), error


def test_checkov_finds_nothing_unjustified_and_does_catch_an_insecure_manifest(
    tmp_path: Path,
) -> None:
    """The same run as charts/check.sh (every chart and value set), plus one insecure
    manifest in the same checkov run, to show the scan really reports (one checkov start:
    it costs most of the time)."""
    helm = helm_or_fail()
    try:
        checkov = checks().find_checkov(fetch=True)
    except checks().ToolMissingError as exc:
        pytest.fail(f"{exc} (needs python3-venv and the package index)", pytrace=False)
    results = checks().run_all(helm, None, tmp_path)
    assert len(results) == len(CHART_NAMES) * len(SETS)
    dep = next(d for d in checks().documents(results[0].rendered) if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    c["securityContext"] = {"privileged": True, "runAsUser": 0}
    del c["resources"]
    (tmp_path / "bad--default.yaml").write_text(yaml.safe_dump(dep))
    scan = checks().run_checkov(checkov, tmp_path)
    for r in results:
        assert r.ok, (r.chart, r.values, r.lint, r.template_error, r.schema_errors)
        entry = scan[f"{r.chart}--{r.values}.yaml"]
        assert entry["failed"] == [], (r.chart, r.values)
        assert entry["passed"] > 50, (r.chart, r.values, entry)
    ids = {f.split()[0] for f in scan["bad--default.yaml"]["failed"]}
    assert {"CKV_K8S_16", "CKV_K8S_11", "CKV_K8S_13"} <= ids, ids


def test_values_schema_rejects_bad_values_naming_the_field() -> None:
    helm = helm_or_fail()
    cases = [
        ("ccat-api", ["--set", "securityContext.runAsUser=0"], "/securityContext/runAsUser"),
        ("ccat-api", ["--set", "resources.limits=null"], "limits"),
        ("ccat-api", ["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        ("ccat-transfer", ["--set", "workers[0].locations=null"], "locations"),
        ("ccat-transfer", ["--set", "transfer.BROKER=x"], "'BROKER' does not match"),
        (
            "ccat-migrate",
            ["--set", "database.passwordSecret.name="],
            "/database/passwordSecret/name",
        ),
        ("ccat-api", ["--set", "databse.host=x"], "databse"),
    ]
    for chart, args, field in cases:
        res = checks().helm(helm, "template", "x", str(CHARTS / chart), *args)
        assert res.returncode != 0, (chart, args)
        assert field in res.stderr, (chart, args, res.stderr)


def test_api_chart() -> None:
    docs = render_docs("ccat-api")
    (dep,) = by_kind(docs, "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "ccat-data-center:0.1.0"
    assert c["args"] == ["api"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e for e in c["env"]}
    assert env["CCAT_OPS_DB_DATABASE_POSTGRESQL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "ccat-db-credentials",
        "key": "password",
    }
    # with the HPA on, the Deployment leaves the replica count to it
    assert "replicas" not in dep["spec"]
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    (test_pod,) = by_kind(docs, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = test_pod["spec"]["containers"][0]["command"][-1]
    assert "http://ccat-api:8000/readyz" in script
    # production: pinned by digest, three replicas at least, two kept through disruptions
    prod = render_docs("ccat-api", "production")
    (dep,) = by_kind(prod, "Deployment")
    assert re.fullmatch(
        r"ccat-data-center@sha256:[0-9a-f]{64}",
        dep["spec"]["template"]["spec"]["containers"][0]["image"],
    )
    assert "checkov.io/skip9" not in (dep["metadata"].get("annotations") or {})
    assert by_kind(prod, "HorizontalPodAutoscaler")[0]["spec"]["minReplicas"] == 3
    assert by_kind(prod, "PodDisruptionBudget")[0]["spec"]["minAvailable"] == 2


def test_network_policies_deny_by_default() -> None:
    """Every pod of every chart is selected by a policy with both directions; the API admits
    only its test pod by default and the listed peers when given."""
    for chart in CHART_NAMES:
        for values in SETS:
            docs = render_docs(chart, values)
            policies = by_kind(docs, "NetworkPolicy")
            assert policies, chart
            for p in policies:
                assert sorted(p["spec"]["policyTypes"]) == ["Egress", "Ingress"]
            for d in docs:
                if d["kind"] not in ("Deployment", "Job", "Pod"):
                    continue
                labels = (
                    d["metadata"]["labels"]
                    if d["kind"] == "Pod"
                    else d["spec"]["template"]["metadata"]["labels"]
                )
                assert any(
                    all(
                        labels.get(k) == v
                        for k, v in p["spec"]["podSelector"]["matchLabels"].items()
                    )
                    for p in policies
                ), f"{chart}/{values}: {d['kind']}/{d['metadata']['name']} has no NetworkPolicy"
    api = by_kind(render_docs("ccat-api"), "NetworkPolicy")[0]
    peers = api["spec"]["ingress"][0]["from"]
    assert (
        len(peers) == 1
        and peers[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "api-test"
    )
    prod = by_kind(render_docs("ccat-api", "production"), "NetworkPolicy")[0]
    assert len(prod["spec"]["ingress"][0]["from"]) == 3


def test_transfer_chart_one_deployment_per_location_set() -> None:
    """As compose: a worker per site location set, mounting its storage at root_path."""
    docs = render_docs("ccat-transfer")
    values = yaml.safe_load((CHARTS / "ccat-transfer" / "values.yaml").read_text())
    workers = {w["name"]: w for w in values["workers"]}
    deps = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    assert len(deps) == len(workers) + 1
    topology = yaml.safe_load((REPO / "compose" / "topology.yaml").read_text())
    root_paths = {
        (s["short_name"], loc["name"]): loc.get("root_path")
        for s in topology["sites"]
        for loc in s["locations"]
    }
    for name, w in workers.items():
        dep = deps[f"ccat-transfer-worker-{name}"]
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert c["args"][:2] == ["worker", w["site"]]
        assert c["args"][2 : 2 + len(w["locations"])] == w["locations"]
        assert c["livenessProbe"]["exec"]["command"] == ["ccat-entrypoint", "health", "worker"]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        for loc in w["locations"]:
            path = root_paths[(w["site"], loc)]
            assert path is None or path in mounts, (name, loc, path)
        env = {e["name"]: e for e in c["env"]}
        assert "secretKeyRef" in env["CCAT_TRANSFER_BROKER_URL"]["valueFrom"]
        assert "secretKeyRef" in env["CCAT_S3_COLOGNE_LTA_SECRET_ACCESS_KEY"]["valueFrom"]
    managers = deps["ccat-transfer-managers"]
    assert managers["spec"]["replicas"] == 1
    assert managers["spec"]["strategy"]["type"] == "Recreate"
    # every Deployment has its PDB: maxUnavailable for one replica, minAvailable for more
    pdbs = {p["metadata"]["name"]: p["spec"] for p in by_kind(docs, "PodDisruptionBudget")}
    assert set(pdbs) == set(deps)
    assert all(p == {**p, "maxUnavailable": 1} for p in pdbs.values())
    prod = render_docs("ccat-transfer", "production")
    prod_pdbs = {p["metadata"]["name"]: p["spec"] for p in by_kind(prod, "PodDisruptionBudget")}
    assert prod_pdbs["ccat-transfer-worker-cologne-buffer"]["minAvailable"] == 1
    assert prod_pdbs["ccat-transfer-worker-cologne-processing"]["maxUnavailable"] == 1


def test_transfer_chart_rejects_duplicate_workers(tmp_path: Path) -> None:
    helm = helm_or_fail()
    worker = {"name": "twice", "site": "ccat", "locations": ["buffer"], "storage": []}
    values = tmp_path / "dup.yaml"
    values.write_text(yaml.safe_dump({"workers": [worker, worker]}))
    res = checks().helm(helm, "template", "x", str(CHARTS / "ccat-transfer"), "-f", str(values))
    assert res.returncode != 0
    assert 'workers: duplicate name "twice"' in res.stderr, res.stderr


def test_migration_job_is_a_pre_install_and_pre_upgrade_hook() -> None:
    docs = render_docs(
        "ccat-migrate", "default", "--set-file", f"topology={REPO / 'compose' / 'topology.yaml'}"
    )
    (job,) = by_kind(docs, "Job")
    ann = job["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert ann["helm.sh/hook-delete-policy"] == "before-hook-creation"
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert script.splitlines() == [
        "ccat-ops-db migrate --no-backup",
        "ccat-ops-db seed /etc/ccat/topology/topology.yaml",
        "exec ccat-ops-db check",
    ]
    # what the Job needs exists before it: lower hook weights
    weights = {d["kind"]: int(d["metadata"]["annotations"]["helm.sh/hook-weight"]) for d in docs}
    assert weights["ServiceAccount"] < weights["ConfigMap"] < weights["Job"]
    assert weights["NetworkPolicy"] < weights["Job"]
    (cm,) = by_kind(docs, "ConfigMap")
    assert yaml.safe_load(cm["data"]["topology.yaml"])["sites"][0]["short_name"] == "ccat"
    # production takes the pg_dump onto a claim
    prod = render_docs("ccat-migrate", "production")
    (job,) = by_kind(prod, "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][0].startswith(
        "ccat-ops-db migrate\n"
    )


def test_no_secret_and_no_registry_host_in_charts() -> None:
    """Secrets are referenced, never embedded; images are bare names."""
    for chart in CHART_NAMES:
        for values in SETS:
            docs = render_docs(chart, values)
            assert not by_kind(docs, "Secret"), chart
            for d in docs:
                if d["kind"] not in ("Deployment", "Job", "Pod"):
                    continue
                _, ctrs = containers(d)
                for c in ctrs:
                    first = c["image"].split("/")[0]
                    assert "/" not in c["image"] or "." not in first, c["image"]
                    for e in c.get("env", []):
                        if re.search(r"PASSWORD|SECRET|BROKER_URL|KEY_ID", e["name"]):
                            assert "valueFrom" in e and "value" not in e, (chart, e)
    text = "\n".join(
        p.read_text()
        for p in CHARTS.rglob("*")
        if p.is_file() and p.suffix in (".yaml", ".tpl", ".json")
    )
    for host in ("docker.io", "ghcr.io", "quay.io", "registry.k8s.io", "gcr.io"):
        assert host not in text


def test_workload_rules_catch_a_bad_workload() -> None:
    """The rules the chart and infra tests apply do report what is missing."""
    docs = render_docs("ccat-api")
    dep = copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment"))
    pod = dep["spec"]["template"]["spec"]
    pod["securityContext"]["runAsNonRoot"] = False
    c = pod["containers"][0]
    del c["resources"]["limits"]["memory"]
    del c["readinessProbe"]
    c["securityContext"]["readOnlyRootFilesystem"] = False
    assert workload_problems([dep]) == [
        "Deployment/ccat-api: pod not forced non-root",
        "Deployment/ccat-api/api: no limits.memory",
        "Deployment/ccat-api/api: root fs writable",
        "Deployment/ccat-api/api: no readinessProbe",
    ]
