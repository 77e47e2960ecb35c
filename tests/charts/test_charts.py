"""The Helm charts under charts/: lint, render, Kubernetes schemas, checkov, and what the
rendered manifests must say (limits, probes, non-root, NetworkPolicies, PDBs, HPA, hooks, the
Prometheus Operator's PrometheusRules and PodMonitors).

Real tools, no mocks: helm (charts/get-helm.sh), the Kubernetes schemas of the
kubernetes-validate wheel, checkov in its own venv (charts/get-checkov.sh), promtool (Debian's
prometheus package). A missing tool is fetched once (promtool is not); if that fails the tests
fail with what to install.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from .chartlib import (
    REPO,
    checks,
    containers,
    helm_or_fail,
    promtool_or_fail,
    workload_problems,
)

CHARTS = REPO / "charts"
CHART_NAMES = ["ccat-api", "ccat-migrate", "ccat-transfer"]
SETS = ["default", "production"]
# the charts with alerting rules (files/alerts.yml) and pods to scrape
MONITORED = ["ccat-api", "ccat-transfer"]
MONITORING_KINDS = ("PrometheusRule", "PodMonitor")


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
    results = checks().run_all(helm, None, tmp_path, promtool_or_fail())
    assert len(results) == len(CHART_NAMES) * len(SETS)
    # promtool checked every rule of the production renderings (they enable the rules)
    rules = {(r.chart, r.values): r.rules for r in results}
    for chart in MONITORED:
        assert rules[(chart, "production")] == rule_count(chart), chart
        assert rules[(chart, "default")] == 0, chart
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
        ("ccat-api", ["--set", "podMonitor.interval=30 seconds"], "/podMonitor/interval"),
        ("ccat-transfer", ["--set", "prometheusRule.enable=true"], "enable"),
        ("ccat-transfer", ["--set", "podMonitor.labels.release=a b"], "/podMonitor/labels"),
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
    # the test pod and the ingress controller; Prometheus (metricsFrom) in a rule of its own
    assert len(prod["spec"]["ingress"][0]["from"]) == 2
    assert prod["spec"]["ingress"][1]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


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


NOTIFY_SECRETS = {
    "CCAT_TRANSFER_NOTIFY_WEBHOOK_URL": "webhook-url",
    "CCAT_TRANSFER_NOTIFY_SMTP_PASSWORD": "smtp-password",
}


def pod_env(dep: dict) -> dict[str, dict]:
    """The environment entries of a Deployment's (one) container, by name."""
    _, ctrs = containers(dep)
    (c,) = ctrs
    return {e["name"]: e for e in c.get("env", [])}


def selects(policy: dict, dep: dict) -> bool:
    labels = dep["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items())


def test_notification_secrets_reach_the_managers_only_from_a_secret() -> None:
    """notifications: the webhook URL and the SMTP password are secretKeyRefs on the managers'
    Deployment, never values and never on a worker; the managers alone get the egress to the
    webhook and the mail server; nothing of it by default."""
    for values in SETS:
        docs = render_docs("ccat-transfer", values)
        for dep in by_kind(docs, "Deployment"):
            for name, e in pod_env(dep).items():
                if name in NOTIFY_SECRETS:
                    assert "value" not in e, (values, dep["metadata"]["name"], e)
    default = render_docs("ccat-transfer")
    for dep in by_kind(default, "Deployment"):
        assert not [n for n in pod_env(dep) if n.startswith("CCAT_TRANSFER_NOTIFY_")]
    assert [p["metadata"]["name"] for p in by_kind(default, "NetworkPolicy")] == ["ccat-transfer"]

    enabled = render_docs(
        "ccat-transfer",
        "default",
        "--set",
        "notifications.enabled=true",
        "--set",
        "notifications.secretName=ccat-notifications",
    )
    assert checks().validate_schemas(enabled) == []
    prod = render_docs("ccat-transfer", "production")
    for docs, smtp in ((enabled, {"port": 587, "protocol": "TCP"}), (prod, None)):
        deps = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
        managers = deps.pop("ccat-transfer-managers")
        env = pod_env(managers)
        for name, key in NOTIFY_SECRETS.items():
            assert env[name] == {
                "name": name,
                "valueFrom": {"secretKeyRef": {"name": "ccat-notifications", "key": key}},
            }
        assert deps, "no worker rendered"
        for name, dep in deps.items():
            assert not set(NOTIFY_SECRETS) & set(pod_env(dep)), name
        # a policy of its own, for the managers' pods only, opens the notification egress
        (notify,) = [
            p for p in by_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-notify")
        ]
        assert selects(notify, managers)
        assert not any(selects(notify, dep) for dep in deps.values())
        assert sorted(notify["spec"]["policyTypes"]) == ["Egress", "Ingress"]
        assert notify["spec"]["ingress"] == []
        ports = [p for rule in notify["spec"]["egress"] for p in rule["ports"]]
        assert {"port": 443, "protocol": "TCP"} in ports
        if smtp is not None:
            assert smtp in ports
    # production: e-mail over implicit TLS to one mail server; its plain settings are values
    (notify,) = [
        p for p in by_kind(prod, "NetworkPolicy") if p["metadata"]["name"].endswith("-notify")
    ]
    assert {
        "ports": [{"port": 465, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "192.0.2.25/32"}}],
    } in notify["spec"]["egress"]
    env = pod_env(
        next(d for d in by_kind(prod, "Deployment") if d["metadata"]["name"].endswith("-managers"))
    )
    assert env["CCAT_TRANSFER_NOTIFY_SMTP_HOST"] == {
        "name": "CCAT_TRANSFER_NOTIFY_SMTP_HOST",
        "value": "smtp.example.org",
    }
    assert env["CCAT_TRANSFER_NOTIFY_SMTP_PORT"]["value"] == "465"
    assert env["CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE"]["value"] == "/etc/ccat/notify-ca/ca.pem"

    # one channel only: a webhook and no SMTP password
    webhook_only = render_docs(
        "ccat-transfer",
        "default",
        "--set",
        "notifications.enabled=true",
        "--set",
        "notifications.secretName=site-hooks",
        "--set",
        "notifications.webhookUrlKey=mattermost",
        "--set",
        "notifications.smtpPasswordKey=",
    )
    (managers,) = [
        d
        for d in by_kind(webhook_only, "Deployment")
        if d["metadata"]["name"].endswith("-managers")
    ]
    env = pod_env(managers)
    assert env["CCAT_TRANSFER_NOTIFY_WEBHOOK_URL"]["valueFrom"] == {
        "secretKeyRef": {"name": "site-hooks", "key": "mattermost"}
    }
    assert "CCAT_TRANSFER_NOTIFY_SMTP_PASSWORD" not in env
    # enabled without a Secret (e-mail through a relay without a login): the egress, no secret
    relay = render_docs("ccat-transfer", "default", "--set", "notifications.enabled=true")
    assert not [n for d in by_kind(relay, "Deployment") for n in pod_env(d) if n in NOTIFY_SECRETS]
    assert any(p["metadata"]["name"].endswith("-notify") for p in by_kind(relay, "NetworkPolicy"))


def test_notifications_refuse_literal_secrets_and_a_closed_mail_port(tmp_path: Path) -> None:
    helm = helm_or_fail()
    chart = str(CHARTS / "ccat-transfer")
    empty_egress = tmp_path / "empty-egress.yaml"
    empty_egress.write_text(yaml.safe_dump({"notifications": {"enabled": True, "egress": []}}))
    cases = [
        # a secret as a plain value, where the chart would write it into the manifest
        (
            ["--set", "transfer.CCAT_TRANSFER_NOTIFY_WEBHOOK_URL=https://hooks.invalid/x"],
            "CCAT_TRANSFER_NOTIFY_WEBHOOK_URL",
        ),
        (
            ["--set", "extraEnv.CCAT_TRANSFER_NOTIFY_SMTP_PASSWORD=pw"],
            "CCAT_TRANSFER_NOTIFY_SMTP_PASSWORD",
        ),
        (
            ["--set", "notifications.secretName=ccat-notifications"],
            "notifications.enabled is false",
        ),
        (
            [
                "--set",
                "notifications.enabled=true",
                "--set",
                "notifications.secretName=ccat-notifications",
                "--set",
                "notifications.webhookUrlKey=",
                "--set",
                "notifications.smtpPasswordKey=",
            ],
            "names no key",
        ),
        (
            ["--set", "notifications.caConfigMap=mail-ca"],
            "notifications.caConfigMap is set but notifications.enabled is false",
        ),
        (
            [
                "--set",
                "notifications.enabled=true",
                "--set",
                "notifications.caConfigMap=mail-ca",
                "--set",
                "transfer.CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE=/etc/ssl/mine.pem",
            ],
            "drop one",
        ),
        (["--set", "notifications.enabled=true", "--set", "notifications.egress=null"], "no rule"),
        (["-f", str(empty_egress)], "/notifications/egress"),
        (
            [
                "--set",
                "notifications.enabled=true",
                "--set",
                "notifications.egress[0].to[0].ipBlock.cidr=10.0.0.0/8",
            ],
            "missing property 'ports'",
        ),
        # the mail server's port is not among the managers' egress
        (
            [
                "--set",
                "notifications.enabled=true",
                "--set",
                "transfer.CCAT_TRANSFER_NOTIFY_SMTP_HOST=smtp.example.org",
                "--set-string",
                "transfer.CCAT_TRANSFER_NOTIFY_SMTP_PORT=465",
            ],
            "notifications.egress opens no port 465",
        ),
    ]
    for args, message in cases:
        res = checks().helm(helm, "template", "x", chart, *args)
        assert res.returncode != 0, args
        assert message in res.stderr, (args, res.stderr)
    # the same port in a range, or without a NetworkPolicy, is accepted
    for extra in (
        [
            "--set",
            "notifications.egress[0].ports[0].port=400",
            "--set",
            "notifications.egress[0].ports[0].endPort=500",
        ],
        ["--set", "networkPolicy.enabled=false"],
    ):
        res = checks().helm(helm, "template", "x", chart, *cases[-1][0], *extra)
        assert res.returncode == 0, (extra, res.stderr)


def test_the_mail_servers_ca_bundle_is_mounted_into_the_managers_only() -> None:
    """notifications.caConfigMap: the bundle is a read-only ConfigMap volume of the managers,
    and CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE names the mounted file; no worker gets either."""
    docs = render_docs(
        "ccat-transfer",
        "default",
        "--set",
        "notifications.enabled=true",
        "--set",
        "notifications.caConfigMap=mail-relay-ca",
        "--set",
        "notifications.caKey=bundle.pem",
    )
    assert checks().validate_schemas(docs) == []
    deps = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    managers = deps.pop("ccat-transfer-managers")
    pod = managers["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "notify-ca"]
    assert volume["configMap"] == {
        "name": "mail-relay-ca",
        "items": [{"key": "bundle.pem", "path": "ca.pem"}],
    }
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "notify-ca"]
    assert mount == {"name": "notify-ca", "mountPath": "/etc/ccat/notify-ca", "readOnly": True}
    path = mount["mountPath"] + "/" + volume["configMap"]["items"][0]["path"]
    assert pod_env(managers)["CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE"]["value"] == path
    for name, dep in deps.items():
        assert "CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE" not in pod_env(dep), name
        assert "notify-ca" not in {v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]}
    default = render_docs("ccat-transfer")
    for dep in by_kind(default, "Deployment"):
        assert "notify-ca" not in {v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]}


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
                        if re.search(r"PASSWORD|SECRET|BROKER_URL|KEY_ID|WEBHOOK", e["name"]):
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


# --- Prometheus Operator: PrometheusRule and PodMonitor ---------------------------------------


def rule_file(chart: str) -> dict:
    """The chart's files/alerts.yml (the file compose's Prometheus loads as it is)."""
    return yaml.safe_load((CHARTS / chart / "files" / "alerts.yml").read_text())


def rule_count(chart: str) -> int:
    return sum(len(g["rules"]) for g in rule_file(chart)["groups"])


def up_job_selectors(chart: str) -> list[tuple[str, str, str]]:
    """(alert, operator, value) of every `job` matcher inside an `up{...}` selector of the
    chart's rules: the scrape jobs the alerts about a process being down expect."""
    out = []
    for group in rule_file(chart)["groups"]:
        for rule in group["rules"]:
            for matchers in re.findall(r"\bup\{([^}]*)\}", rule["expr"]):
                for op, value in re.findall(r'\bjob\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers):
                    out.append((rule["alert"], op, value))
    return out


def job_matches(op: str, value: str, job: str) -> bool:
    """A PromQL label matcher; regular expressions are anchored, as in Prometheus."""
    if op == "=":
        return job == value
    if op == "!=":
        return job != value
    matched = re.fullmatch(value, job) is not None
    return matched if op == "=~" else not matched


def relabel(labels: dict[str, str], configs: list[dict]) -> dict[str, str] | None:
    """Prometheus' relabeling (replace, keep, drop) of a target's labels; None: dropped."""
    labels = dict(labels)
    for cfg in configs:
        action = cfg.get("action", "replace").lower()
        source = cfg.get("separator", ";").join(
            labels.get(s, "") for s in cfg.get("sourceLabels", [])
        )
        m = re.fullmatch(cfg.get("regex", "(.*)"), source)
        if (action == "keep" and not m) or (action == "drop" and m):
            return None
        if action == "replace" and m:
            # Prometheus writes $1 or ${1} for a group, Python \g<1>
            template = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", cfg.get("replacement", "$1"))
            labels[cfg["targetLabel"]] = m.expand(template)
        elif action not in ("replace", "keep", "drop"):
            raise AssertionError(f"this test knows replace, keep and drop, not {action}")
    return labels


def pod_targets(monitor: dict, docs: list[dict]) -> list[tuple[dict, dict, dict, dict]]:
    """(Deployment, endpoint, container port, target labels) of every pod the PodMonitor
    scrapes, with the labels Prometheus gives the target: the operator's (job
    <namespace>/<name>, the pod's meta labels), then the endpoint's relabelings."""
    ns = monitor["metadata"]["namespace"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    out = []
    for dep in by_kind(docs, "Deployment"):
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        if dep["metadata"]["namespace"] != ns or any(
            pod_labels.get(k) != v for k, v in selector.items()
        ):
            continue
        _, ctrs = containers(dep)
        pod_name = f"{dep['metadata']['name']}-6f7c9b8d4-x2x7q"
        for ep in monitor["spec"]["podMetricsEndpoints"]:
            ports = [p for c in ctrs for p in c.get("ports", []) if p.get("name") == ep["port"]]
            assert len(ports) == 1, (dep["metadata"]["name"], ep["port"], ports)
            meta = {
                f"__meta_kubernetes_pod_label_{re.sub(r'[^A-Za-z0-9_]', '_', k)}": v
                for k, v in pod_labels.items()
            }
            address = f"10.1.2.3:{ports[0]['containerPort']}"
            meta |= {
                "__meta_kubernetes_namespace": ns,
                "__meta_kubernetes_pod_name": pod_name,
                "__meta_kubernetes_pod_container_port_name": ep["port"],
                "__address__": address,
                "job": f"{ns}/{monitor['metadata']['name']}",
            }
            target = relabel(meta, ep.get("relabelings", []))
            assert target is not None, (monitor["metadata"]["name"], dep["metadata"]["name"])
            target.setdefault("instance", target["__address__"])
            out.append((dep, ep, ports[0], target | {"__pod__": pod_name}))
    return out


def test_monitoring_objects_only_when_enabled() -> None:
    """Off by default (they need the operator's CRDs in the cluster); migrate has none."""
    for chart in CHART_NAMES:
        docs = render_docs(chart)
        assert [d for d in docs if d["kind"] in MONITORING_KINDS] == [], chart
    assert not [
        d for d in render_docs("ccat-migrate", "production") if d["kind"] in MONITORING_KINDS
    ]
    for chart in MONITORED:
        kinds = {d["kind"] for d in render_docs(chart, "production")}
        assert set(MONITORING_KINDS) <= kinds, chart


@pytest.mark.parametrize("chart", MONITORED)
def test_prometheus_rule_is_the_rule_file_unchanged(chart: str) -> None:
    """spec.groups is the rule file's groups, equal as data: nothing was templated away (the
    annotations' own {{ $labels.x }} / {{ $value }} reach Prometheus as written)."""
    groups = rule_file(chart)["groups"]
    annotations = [v for g in groups for r in g["rules"] for v in r.get("annotations", {}).values()]
    assert any("{{ $labels." in a for a in annotations), "the rules use Prometheus templates"
    docs = render_docs(chart, "default", "--set", "prometheusRule.enabled=true")
    (rule,) = by_kind(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == {"groups": groups}
    assert rule["metadata"]["namespace"] == checks().NAMESPACE
    assert "release" not in rule["metadata"]["labels"]
    assert by_kind(docs, "PodMonitor") == []  # each is switched on by itself
    # production: the labels the operator's ruleSelector needs, next to the chart's own
    (prod,) = by_kind(render_docs(chart, "production"), "PrometheusRule")
    assert prod["spec"] == {"groups": groups}
    labels = prod["metadata"]["labels"]
    assert labels["release"] == "kube-prometheus-stack"
    assert labels["app.kubernetes.io/part-of"] == "ccat-data-center"
    # a namespace of its own when the Prometheus looks for rules elsewhere
    (other,) = by_kind(
        render_docs(
            chart,
            "default",
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "prometheusRule.namespace=monitoring",
        ),
        "PrometheusRule",
    )
    assert other["metadata"]["namespace"] == "monitoring"
    assert other["spec"] == {"groups": groups}


def test_pod_monitors_scrape_every_pod_under_the_job_names_the_rules_select() -> None:
    """Every Deployment's pods are scraped once, under the job compose gives that process
    (compose/prometheus/prometheus.yml), and the rules' up{job...} selectors (parsed out of
    the rule files) match exactly the jobs of their chart."""
    compose = yaml.safe_load((REPO / "compose" / "prometheus" / "prometheus.yml").read_text())
    compose_job = {
        sc["static_configs"][0]["labels"]["process"]: sc["job_name"]
        for sc in compose["scrape_configs"]
    }
    seen_jobs = set()
    for chart in MONITORED:
        docs = render_docs(chart, "production")
        monitors = by_kind(docs, "PodMonitor")
        assert monitors, chart
        scraped: dict[str, str] = {}
        for monitor in monitors:
            assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
            for dep, ep, _, target in pod_targets(monitor, docs):
                name = dep["metadata"]["name"]
                assert name not in scraped, f"{chart}: {name} is scraped twice"
                pod_labels = dep["spec"]["template"]["metadata"]["labels"]
                process = (
                    pod_labels.get("ccat.fyst/role") or pod_labels["app.kubernetes.io/component"]
                )
                assert target["job"] == compose_job[process], (chart, name, target["job"])
                assert target["instance"] == target["__pod__"]
                assert ep["path"] == "/metrics"
                assert ep["interval"] == "30s"
                scraped[name] = target["job"]
        # every long-running pod of the chart has its metrics scraped
        assert set(scraped) == {d["metadata"]["name"] for d in by_kind(docs, "Deployment")}
        jobs = set(scraped.values())
        selectors = up_job_selectors(chart)
        assert selectors, f"{chart}: no up{{job=...}} alert"
        covered = set()
        for alert, op, value in selectors:
            matched = {j for j in jobs if job_matches(op, value, j)}
            assert matched, f"{chart}: {alert} selects job{op}{value!r}, none of {jobs}"
            covered |= matched
        assert covered == jobs, f"{chart}: no down alert for {jobs - covered}"
        seen_jobs |= jobs
    assert seen_jobs == set(compose_job.values())


def test_pod_monitors_are_let_in_by_the_network_policy() -> None:
    """A PodMonitor behind a NetworkPolicy that admits no scraper is refused; in production
    the metricsFrom peers reach the scraped port of every scraped pod."""
    helm = helm_or_fail()
    for chart in MONITORED:
        res = checks().helm(
            helm, "template", chart, str(CHARTS / chart), "--set", "podMonitor.enabled=true"
        )
        assert res.returncode != 0, chart
        assert "set networkPolicy.metricsFrom" in res.stderr, res.stderr
        docs = render_docs(
            chart,
            "default",
            "--set",
            "podMonitor.enabled=true",
            "--set",
            "networkPolicy.enabled=false",
        )
        assert by_kind(docs, "PodMonitor") and not by_kind(docs, "NetworkPolicy")
        values = yaml.safe_load((CHARTS / chart / "ci" / "production-values.yaml").read_text())
        peers = values["networkPolicy"]["metricsFrom"]
        assert peers, chart
        docs = render_docs(chart, "production")
        policies = by_kind(docs, "NetworkPolicy")
        for monitor in by_kind(docs, "PodMonitor"):
            for dep, _, port, _ in pod_targets(monitor, docs):
                pod_labels = dep["spec"]["template"]["metadata"]["labels"]
                admitted = [
                    rule
                    for p in policies
                    if all(
                        pod_labels.get(k) == v
                        for k, v in p["spec"]["podSelector"]["matchLabels"].items()
                    )
                    for rule in p["spec"]["ingress"]
                    if any(rp["port"] == port["containerPort"] for rp in rule["ports"])
                    and all(peer in rule["from"] for peer in peers)
                ]
                assert admitted, f"{chart}: {dep['metadata']['name']} not open to {peers}"


def test_monitoring_checks_catch_bad_objects() -> None:
    """charts/checks.py checks the custom resources for real: a misspelt or unknown field, a
    bad duration or relabel action (schema), bad PromQL or a broken template (promtool), and
    a kind with no schema at all."""
    docs = render_docs("ccat-transfer", "production")
    (rule,) = by_kind(docs, "PrometheusRule")
    monitor = by_kind(docs, "PodMonitor")[0]
    assert checks().validate_schemas([rule, monitor]) == []
    promtool = promtool_or_fail()
    assert checks().check_rules(promtool, [rule]) == (rule_count("ccat-transfer"), [])

    typo = copy.deepcopy(monitor)
    typo["spec"]["podMetricEndpoints"] = typo["spec"].pop("podMetricsEndpoints")
    errors = checks().validate_schemas([typo])
    assert any("podMetricEndpoints" in e for e in errors), errors
    action = copy.deepcopy(monitor)
    action["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["action"] = "rename"
    (error,) = checks().validate_schemas([action])
    assert error.startswith(
        "PodMonitor/ccat-transfer-workers: spec/podMetricsEndpoints/0/relabelings/0/action:"
    ), error

    duration = copy.deepcopy(rule)
    duration["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    (error,) = checks().validate_schemas([duration])
    assert error.startswith("PrometheusRule/ccat-transfer: spec/groups/0/rules/0/for:"), error
    both = copy.deepcopy(rule)
    both["spec"]["groups"][0]["rules"][0]["record"] = "ccat:down"
    assert checks().validate_schemas([both]) != []

    expr = copy.deepcopy(rule)
    expr["spec"]["groups"][0]["rules"][0]["expr"] = "max by (instance) (up"
    assert checks().validate_schemas([expr]) == []  # a string: only promtool sees it
    _, errors = checks().check_rules(promtool, [expr])
    assert len(errors) == 1 and errors[0].startswith("PrometheusRule/ccat-transfer: promtool")
    template = copy.deepcopy(rule)
    template["spec"]["groups"][0]["rules"][0]["annotations"]["summary"] = "{{ $labels.job "
    _, errors = checks().check_rules(promtool, [template])
    assert len(errors) == 1, errors

    unknown = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x", "namespace": "ccat"},
        "spec": {},
    }
    (error,) = checks().validate_schemas([unknown])
    assert error.startswith("ServiceMonitor/x: no schema:"), error
