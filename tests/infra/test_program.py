"""The Pulumi program of infra/ under Pulumi's mocks (see harness.py for why mocks).

What matters: every workload has limits, probes and runs non-root (the Helm releases are
rendered with the values the program computes, by the real helm binary and the real charts);
the migration runs before the API; secrets are secret outputs and nowhere else (the optional
notification secrets too: a Secret of their own, made only when set, for the managers alone);
production has the HA settings; production and staging deploy the alerting rules and
PodMonitors, dev does not. The Kubernetes objects the program writes itself are validated
against the Kubernetes schemas (kubernetes-validate), like the charts' manifests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.charts.chartlib import checks, helm_or_fail, workload_problems

from .harness import (
    INFRA,
    NOTIFY_SECRETS,
    SECRETS,
    StackRun,
    is_secret,
    run_stack,
    stack_config,
    unwrap,
)

STACKS = ["dev", "staging", "production"]
RELEASE = "kubernetes:helm.sh/v3:Release"
SECRET = "kubernetes:core/v1:Secret"
CLUSTER = "kubernetes:postgresql.cnpg.io/v1:Cluster"


@pytest.fixture(scope="module")
def runs() -> dict[str, StackRun]:
    return {stack: run_stack(stack) for stack in STACKS}


def strip_secrets(value: object) -> object:
    """A recorded input with every secret-wrapped value removed."""
    if is_secret(value):
        return "<secret>"
    if isinstance(value, dict):
        return {k: strip_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_secrets(v) for v in value]
    return value


def rendered_release(run: StackRun, name: str, tmp_path: Path) -> list[dict]:
    """The manifests helm renders from the chart with the values the program computed."""
    rel = run.one(RELEASE, name)
    values_file = tmp_path / f"{run.stack}-{name}.yaml"
    values_file.write_text(yaml.safe_dump(unwrap(rel.inputs["values"])))
    chart = Path(rel.inputs["chart"])
    assert chart.parent == checks().CHARTS_DIR, chart
    res = checks().helm(
        helm_or_fail(),
        "template",
        rel.inputs["name"],
        str(chart),
        "--namespace",
        rel.inputs["namespace"],
        "-f",
        str(values_file),
    )
    assert res.returncode == 0, res.stderr
    return checks().documents(res.stdout)


def test_every_stack_builds(runs: dict[str, StackRun]) -> None:
    namespaces = set()
    for stack, run in runs.items():
        (ns,) = run.of_type("kubernetes:core/v1:Namespace")
        namespaces.add(ns.inputs["metadata"]["name"])
        assert ns.inputs["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        assert {r.name for r in run.of_type(RELEASE)} == {
            "ccat-migrate",
            "ccat-api",
            "ccat-transfer",
        }
        assert run.exports["environment"] == {"dev": "development"}.get(stack, stack)
        # deny by default for every pod of the namespace
        deny = run.one("kubernetes:networking.k8s.io/v1:NetworkPolicy", "ccat-default-deny")
        assert deny.inputs["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert namespaces == {"ccat-dev", "ccat-staging", "ccat"}


def test_migration_runs_before_the_api(runs: dict[str, StackRun]) -> None:
    for run in runs.values():
        migrate = run.one(RELEASE, "ccat-migrate")
        # the release completes only when its Job (a pre-install/pre-upgrade hook) succeeded
        assert migrate.inputs["waitForJobs"] is True
        assert migrate.inputs["atomic"] is True
        assert "ccat-db-cluster" in migrate.depends_on
        assert "ccat-db-credentials" in migrate.depends_on
        assert run.one(RELEASE, "ccat-api").depends_on == ["ccat-migrate"]
        assert "ccat-migrate" in run.one(RELEASE, "ccat-transfer").depends_on
        ingress = run.of_type("kubernetes:networking.k8s.io/v1:Ingress")
        for ing in ingress:
            assert ing.depends_on == ["ccat-api"]
    job_template = (checks().CHARTS_DIR / "ccat-migrate" / "templates" / "job.yaml").read_text()
    assert "helm.sh/hook: pre-install,pre-upgrade" in job_template


def test_secrets_are_secret_outputs_and_nowhere_else(runs: dict[str, StackRun]) -> None:
    for run in runs.values():
        secrets = {r.inputs["metadata"]["name"]: r for r in run.of_type(SECRET)}
        assert set(secrets) == {"ccat-db-credentials", "ccat-broker", "ccat-s3-credentials"}
        for s in secrets.values():
            assert is_secret(s.inputs["stringData"]), s.name
        db = unwrap(secrets["ccat-db-credentials"].inputs["stringData"])
        assert db == {"username": "ccat", "password": SECRETS["ccat:dbPassword"]}
        broker = unwrap(secrets["ccat-broker"].inputs["stringData"])
        assert SECRETS["ccat:redisPassword"] in broker["url"]
        s3 = unwrap(secrets["ccat-s3-credentials"].inputs["stringData"])
        assert s3["cologne-lta-secret-access-key"] == SECRETS["ccat:s3SecretAccessKey"]
        # no secret value outside a secret wrapper: not in Helm values, not in any resource
        everything = json.dumps([strip_secrets(r.inputs) for r in run.resources])
        for value in SECRETS.values():
            assert value not in everything
        exported = json.dumps({k: v for k, v in run.exports.items() if isinstance(v, str | None)})
        for value in SECRETS.values():
            assert value not in exported
        # the charts get the Secrets' names only: no secret value, wrapped or not, in any
        # release's values (Helm would store it in its release record)
        for rel in run.of_type(RELEASE):
            assert "<secret>" not in json.dumps(strip_secrets(rel.inputs["values"])), rel.name
            plain = json.dumps(unwrap(rel.inputs["values"]))
            for value in SECRETS.values():
                assert value not in plain, rel.name
        api = run.release_values("ccat-api")
        assert api["database"]["passwordSecret"] == {
            "name": "ccat-db-credentials",
            "key": "password",
        }
        transfer = run.release_values("ccat-transfer")
        assert transfer["broker"]["urlSecret"] == {"name": "ccat-broker", "key": "url"}
    # and the stack files hold no secret in clear
    for stack in STACKS:
        text = (INFRA / f"Pulumi.{stack}.yaml").read_text()
        config = yaml.safe_load(text)["config"]
        for key in (*SECRETS, *NOTIFY_SECRETS):
            assert key not in config or "secure" in config[key], (stack, key)


def test_a_missing_secret_stops_the_program() -> None:
    secrets = {k: v for k, v in SECRETS.items() if k != "ccat:dbPassword"}
    with pytest.raises(Exception, match=r"ccat:dbPassword"):
        run_stack("dev", secrets=secrets)


def test_every_workload_has_limits_probes_and_runs_non_root(
    runs: dict[str, StackRun], tmp_path: Path
) -> None:
    for run in runs.values():
        for name in ("ccat-migrate", "ccat-api", "ccat-transfer"):
            docs = rendered_release(run, name, tmp_path)
            assert docs, name
            assert workload_problems(docs) == [], (run.stack, name)
            assert checks().validate_schemas(docs) == [], (run.stack, name)
        # the workload the program writes itself: Redis
        redis = run.one("kubernetes:apps/v1:Deployment", "ccat-redis-deployment")
        assert workload_problems([unwrap(redis.inputs)]) == []


def test_program_manifests_validate_against_kubernetes_schemas(
    runs: dict[str, StackRun],
) -> None:
    for run in runs.values():
        checked = 0
        for r in run.resources:
            if not r.type.startswith("kubernetes:") or r.type in (RELEASE, CLUSTER):
                continue
            manifest = unwrap(r.inputs)
            kubernetes_validate.validate(manifest, checks().KUBERNETES_VERSION, strict=True)
            checked += 1
        assert checked >= 8, checked
        # the CloudNativePG Cluster has no schema in the wheel: its shape is checked here
        (cluster,) = run.of_type(CLUSTER)
        spec = cluster.inputs["spec"]
        assert spec["bootstrap"]["initdb"]["secret"] == {"name": "ccat-db-credentials"}
        assert spec["bootstrap"]["initdb"]["owner"] == "ccat"
        assert set(spec["resources"]) == {"requests", "limits"}


def test_production_is_highly_available(runs: dict[str, StackRun], tmp_path: Path) -> None:
    prod = runs["production"]
    api = prod.release_values("ccat-api")
    assert api["autoscaling"]["enabled"] is True
    assert api["autoscaling"]["minReplicas"] >= 3
    assert 2 <= api["podDisruptionBudget"]["minAvailable"] < api["autoscaling"]["minReplicas"]
    assert api["topologySpread"]["whenUnsatisfiable"] == "DoNotSchedule"
    (cluster,) = prod.of_type(CLUSTER)
    assert cluster.inputs["spec"]["instances"] >= 3
    assert cluster.inputs["spec"]["affinity"]["podAntiAffinityType"] == "required"
    assert cluster.inputs["spec"]["enablePDB"] is True
    assert prod.release_values("ccat-transfer")["workerDefaults"]["replicas"] >= 2
    # what the cluster would get: PDBs for the API and every worker with minAvailable
    docs = rendered_release(prod, "ccat-api", tmp_path)
    (pdb,) = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == 2
    docs = rendered_release(prod, "ccat-transfer", tmp_path)
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    pdbs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert set(pdbs) == set(deployments)
    for name, dep in deployments.items():
        if name.endswith("-managers"):
            assert dep["spec"]["replicas"] == 1  # one manager process, by design
            continue
        assert dep["spec"]["replicas"] >= 2, name
        assert pdbs[name]["minAvailable"] == 1, name
    # and dev is not: the same checks tell the two apart
    dev = runs["dev"]
    assert dev.release_values("ccat-api")["autoscaling"]["minReplicas"] == 1
    assert dev.of_type(CLUSTER)[0].inputs["spec"]["instances"] == 1


def test_values_follow_the_stack_config(runs: dict[str, StackRun]) -> None:
    prod = runs["production"]
    api = prod.release_values("ccat-api")
    assert api["image"] == {
        "repository": "ccat-data-center",
        "tag": "0.1.0",
        "digest": "",
        "pullPolicy": "IfNotPresent",
    }
    assert api["database"]["host"] == "ccat-db-rw"
    assert api["database"]["env"] == "production"
    peers = api["networkPolicy"]["ingressFrom"]
    assert {
        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in peers
    } == {"ingress-nginx"}
    # Prometheus' namespace scrapes the API's /metrics and the workers' and managers' ports
    monitoring = [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert api["networkPolicy"]["metricsFrom"] == monitoring
    assert prod.release_values("ccat-transfer")["networkPolicy"]["metricsFrom"] == monitoring
    migrate = prod.release_values("ccat-migrate")
    topology = yaml.safe_load(migrate["topology"])
    assert {s["short_name"] for s in topology["sites"]} == {"ccat", "cologne", "us"}
    transfer = prod.release_values("ccat-transfer")
    assert [c["envPrefix"] for c in transfer["s3"]["credentials"]] == [
        "CCAT_S3_COLOGNE_LTA",
        "CCAT_S3_US_LTA",
    ]
    assert {"port": 5031, "endPort": 5040, "protocol": "TCP"} in (
        transfer["networkPolicy"]["transferEgress"][0]["ports"]
    )
    # the Cologne workers mount the reference topology's root paths
    assert {w["name"]: [m["mountPath"] for m in w["storage"]] for w in transfer["workers"]} == {
        "cologne-buffer": ["/data/input"],
        "cologne-lta": ["/data/input"],
        "cologne-processing": ["/scratch/ccat/staging"],
    }
    assert transfer["networkPolicy"]["brokerTo"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "ccat-redis"}}}
    ]
    (ing,) = prod.of_type("kubernetes:networking.k8s.io/v1:Ingress")
    assert ing.inputs["spec"]["tls"] == [
        {"hosts": ["ccat-data.example.org"], "secretName": "ccat-data-tls"}
    ]
    assert prod.exports["apiUrl"] == "https://ccat-data.example.org/"
    assert runs["dev"].of_type("kubernetes:networking.k8s.io/v1:Ingress") == []


def test_alerting_rules_and_pod_monitors_follow_the_stack_config(
    runs: dict[str, StackRun], tmp_path: Path
) -> None:
    """ccat:monitoring: production and staging get a PrometheusRule per chart (the chart's
    rule file unchanged) and the PodMonitors, labelled for the operator's selectors; dev
    gets neither."""
    for stack in ("production", "staging"):
        run = runs[stack]
        for name in ("ccat-api", "ccat-transfer"):
            values = run.release_values(name)
            assert values["prometheusRule"] == {
                "enabled": True,
                "labels": {"release": "kube-prometheus-stack"},
            }
            assert values["podMonitor"]["enabled"] is True
            assert values["podMonitor"]["labels"] == {"release": "kube-prometheus-stack"}
            docs = rendered_release(run, name, tmp_path)
            (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
            rule_file = checks().CHARTS_DIR / name / "files" / "alerts.yml"
            assert rule["spec"] == {"groups": yaml.safe_load(rule_file.read_text())["groups"]}
            assert rule["metadata"]["namespace"] == run.one(RELEASE, name).inputs["namespace"]
            assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
            monitors = [d for d in docs if d["kind"] == "PodMonitor"]
            assert monitors, (stack, name)
            jobs = {
                r["replacement"]
                for m in monitors
                for ep in m["spec"]["podMetricsEndpoints"]
                for r in ep["relabelings"]
                if r.get("targetLabel") == "job"
            }
            assert jobs == (
                {"ccat-api"} if name == "ccat-api" else {"ccat-worker", "ccat-manager"}
            ), (stack, name)
        assert "prometheusRule" not in run.release_values("ccat-migrate")
    dev = runs["dev"]
    for name in ("ccat-api", "ccat-transfer"):
        values = dev.release_values(name)
        assert values["prometheusRule"]["enabled"] is False
        assert values["podMonitor"]["enabled"] is False
        kinds = {d["kind"] for d in rendered_release(dev, name, tmp_path)}
        assert not kinds & {"PrometheusRule", "PodMonitor"}, (name, kinds)
    # rules without PodMonitors, where Prometheus scrapes the pods by other means
    run = run_stack(
        "production", overrides={"ccat:monitoring": {"alerts": True, "podMonitors": False}}
    )
    api = run.release_values("ccat-api")
    assert api["prometheusRule"] == {"enabled": True, "labels": {}}
    assert api["podMonitor"]["enabled"] is False
    kinds = {d["kind"] for d in rendered_release(run, "ccat-transfer", tmp_path)}
    assert "PrometheusRule" in kinds and "PodMonitor" not in kinds


def test_external_database_and_redis() -> None:
    run = run_stack(
        "staging",
        overrides={
            "ccat:database": {"mode": "external", "host": "pg.example.org"},
            "ccat:redis": {"mode": "external", "host": "redis.example.org"},
        },
    )
    assert run.of_type(CLUSTER) == []
    assert run.of_type("kubernetes:apps/v1:Deployment") == []
    api = run.release_values("ccat-api")
    assert api["database"]["host"] == "pg.example.org"
    assert api["networkPolicy"]["databaseTo"] == []
    broker = unwrap(run.one(SECRET, "ccat-redis-broker").inputs["stringData"])
    assert broker["url"] == f"redis://:{SECRETS['ccat:redisPassword']}@redis.example.org:6379/0"
    # the migration waits for the password Secret only
    assert run.one(RELEASE, "ccat-migrate").depends_on == ["ccat-db-credentials"]


# --- operator notifications -------------------------------------------------------------------

MAIL = {
    "CCAT_TRANSFER_NOTIFY_SMTP_HOST": "smtp.example.org",
    "CCAT_TRANSFER_NOTIFY_SMTP_PORT": "465",
    "CCAT_TRANSFER_NOTIFY_SMTP_SECURITY": "ssl",
    "CCAT_TRANSFER_NOTIFY_SMTP_USER": "ccat-transfer",
    "CCAT_TRANSFER_NOTIFY_EMAIL_TO": "ccat-ops@example.org",
}


# A CA bundle's shape (the program checks the PEM marker, the managers parse it at start).
TEST_CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB...test...\n-----END CERTIFICATE-----\n"
CONFIGMAP = "kubernetes:core/v1:ConfigMap"


def with_transfer(stack: str, **extra: object) -> dict[str, object]:
    """An override of ``ccat:transfer``: the stack's own, with these keys changed."""
    return {"ccat:transfer": {**stack_config(stack).get("ccat:transfer", {}), **extra}}


def notify_parts(docs: list[dict]) -> tuple[dict, list[dict], list[dict]]:
    """(the managers' Deployment, the workers' Deployments, the notify NetworkPolicies)."""
    deps = [d for d in docs if d["kind"] == "Deployment"]
    (managers,) = [d for d in deps if d["metadata"]["name"].endswith("-managers")]
    workers = [d for d in deps if d is not managers]
    policies = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-notify")
    ]
    return managers, workers, policies


def env_of(dep: dict) -> dict[str, dict]:
    return {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_notifications_are_off_without_their_settings(
    runs: dict[str, StackRun], tmp_path: Path
) -> None:
    """No notify secret and no mail server in the stack: no Secret, notifications off, the
    managers get no notify secret and no extra egress."""
    for run in runs.values():
        assert "ccat-notifications" not in {
            r.inputs["metadata"]["name"] for r in run.of_type(SECRET)
        }
        assert run.release_values("ccat-transfer")["notifications"] == {"enabled": False}
        managers, _, policies = notify_parts(rendered_release(run, "ccat-transfer", tmp_path))
        assert not {n for n in env_of(managers) if n.startswith("CCAT_TRANSFER_NOTIFY_")}
        assert policies == []


def test_notification_secrets_reach_the_managers_through_a_secret_only(tmp_path: Path) -> None:
    """ccat:notifyWebhookUrl and ccat:notifySmtpPassword become the Secret ccat-notifications
    (secret outputs), the chart gets its name and keys only, and renders them as secretKeyRefs
    on the managers alone, with egress to HTTPS and the mail server's port."""
    run = run_stack(
        "production",
        overrides=with_transfer("production", settings=MAIL),
        secrets={**SECRETS, **NOTIFY_SECRETS},
    )
    secret = run.one(SECRET, "ccat-notify-secret")
    assert secret.inputs["metadata"]["name"] == "ccat-notifications"
    assert is_secret(secret.inputs["stringData"])
    assert unwrap(secret.inputs["stringData"]) == {
        "webhook-url": NOTIFY_SECRETS["ccat:notifyWebhookUrl"],
        "smtp-password": NOTIFY_SECRETS["ccat:notifySmtpPassword"],
    }
    # no secret value outside a secret wrapper, in any resource or export
    everything = json.dumps([strip_secrets(r.inputs) for r in run.resources])
    exported = json.dumps({k: v for k, v in run.exports.items() if isinstance(v, str | None)})
    for value in NOTIFY_SECRETS.values():
        assert value not in everything and value not in exported
    rel = run.one(RELEASE, "ccat-transfer")
    assert "ccat-notify-secret" in rel.depends_on
    assert "<secret>" not in json.dumps(strip_secrets(rel.inputs["values"]))
    values = run.release_values("ccat-transfer")
    for value in NOTIFY_SECRETS.values():
        assert value not in json.dumps(values)
    assert values["notifications"] == {
        "enabled": True,
        "secretName": "ccat-notifications",
        "webhookUrlKey": "webhook-url",
        "smtpPasswordKey": "smtp-password",
        "egress": [{"ports": [{"port": 443, "protocol": "TCP"}, {"port": 465, "protocol": "TCP"}]}],
    }
    docs = rendered_release(run, "ccat-transfer", tmp_path)
    assert checks().validate_schemas(docs) == []
    managers, workers, (policy,) = notify_parts(docs)
    env = env_of(managers)
    for name, key in (
        ("CCAT_TRANSFER_NOTIFY_WEBHOOK_URL", "webhook-url"),
        ("CCAT_TRANSFER_NOTIFY_SMTP_PASSWORD", "smtp-password"),
    ):
        assert env[name] == {
            "name": name,
            "valueFrom": {"secretKeyRef": {"name": "ccat-notifications", "key": key}},
        }
    assert env["CCAT_TRANSFER_NOTIFY_SMTP_HOST"]["value"] == "smtp.example.org"
    assert workers
    for dep in workers:
        assert "CCAT_TRANSFER_NOTIFY_WEBHOOK_URL" not in env_of(dep)
        assert "CCAT_TRANSFER_NOTIFY_SMTP_PASSWORD" not in env_of(dep)
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector["app.kubernetes.io/component"] == "managers"
    assert policy["spec"]["egress"] == values["notifications"]["egress"]


def test_notifications_with_one_channel_or_a_relay(tmp_path: Path) -> None:
    """A webhook alone: the Secret holds only its URL; e-mail through a relay without a
    login: no Secret, the managers reach the mail server's port; ccat:transfer.notifyEgress
    replaces the egress the program works out."""
    webhook = {"ccat:notifyWebhookUrl": NOTIFY_SECRETS["ccat:notifyWebhookUrl"]}
    run = run_stack("dev", secrets={**SECRETS, **webhook})
    assert set(unwrap(run.one(SECRET, "ccat-notify-secret").inputs["stringData"])) == {
        "webhook-url"
    }
    notifications = run.release_values("ccat-transfer")["notifications"]
    assert notifications["webhookUrlKey"] == "webhook-url"
    assert notifications["smtpPasswordKey"] == ""
    assert notifications["egress"] == [{"ports": [{"port": 443, "protocol": "TCP"}]}]
    managers, _, _ = notify_parts(rendered_release(run, "ccat-transfer", tmp_path))
    assert "CCAT_TRANSFER_NOTIFY_SMTP_PASSWORD" not in env_of(managers)
    assert "secretKeyRef" in env_of(managers)["CCAT_TRANSFER_NOTIFY_WEBHOOK_URL"]["valueFrom"]

    relay = {k: v for k, v in MAIL.items() if "PORT" not in k and "USER" not in k}
    run = run_stack("dev", overrides=with_transfer("dev", settings=relay))
    assert run.of_type(SECRET) and "ccat-notify-secret" not in {r.name for r in run.of_type(SECRET)}
    notifications = run.release_values("ccat-transfer")["notifications"]
    assert notifications["enabled"] is True and notifications["secretName"] == ""
    assert notifications["egress"] == [{"ports": [{"port": 587, "protocol": "TCP"}]}]
    managers, _, (policy,) = notify_parts(rendered_release(run, "ccat-transfer", tmp_path))
    assert not {n for n in env_of(managers) if n.endswith(("WEBHOOK_URL", "SMTP_PASSWORD"))}

    rules = [
        {
            "ports": [{"port": 443, "protocol": "TCP"}],
            "to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}],
        },
        {
            "ports": [{"port": 587, "protocol": "TCP"}],
            "to": [{"ipBlock": {"cidr": "192.0.2.25/32"}}],
        },
    ]
    run = run_stack(
        "dev",
        overrides=with_transfer("dev", settings=relay, notifyEgress=rules),
        secrets={**SECRETS, **webhook},
    )
    assert run.release_values("ccat-transfer")["notifications"]["egress"] == rules
    _, _, (policy,) = notify_parts(rendered_release(run, "ccat-transfer", tmp_path))
    assert policy["spec"]["egress"] == rules


def test_the_mail_relays_ca_becomes_a_config_map_mounted_into_the_managers(
    tmp_path: Path,
) -> None:
    """ccat:transfer.notifySmtpCa: the ConfigMap ccat-notify-ca holds it, the release waits for
    it, and the managers (only) mount it and name it in CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE."""
    run = run_stack("dev", overrides=with_transfer("dev", settings=MAIL, notifySmtpCa=TEST_CA_PEM))
    ca = run.one(CONFIGMAP, "ccat-notify-ca")
    assert unwrap(ca.inputs["data"]) == {"ca.crt": TEST_CA_PEM}
    assert unwrap(ca.inputs["metadata"])["name"] == "ccat-notify-ca"
    assert "ccat-notify-ca" in run.one(RELEASE, "ccat-transfer").depends_on
    notifications = run.release_values("ccat-transfer")["notifications"]
    assert notifications["caConfigMap"] == "ccat-notify-ca"
    assert notifications["caKey"] == "ca.crt"
    managers, workers, _ = notify_parts(rendered_release(run, "ccat-transfer", tmp_path))
    assert env_of(managers)["CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE"]["value"] == (
        "/etc/ccat/notify-ca/ca.pem"
    )
    (volume,) = [
        v for v in managers["spec"]["template"]["spec"]["volumes"] if v["name"] == "notify-ca"
    ]
    assert volume["configMap"]["name"] == "ccat-notify-ca"
    for dep in workers:
        assert "CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE" not in env_of(dep)
    # without it: no ConfigMap, nothing mounted
    plain = run_stack("dev", overrides=with_transfer("dev", settings=MAIL))
    assert "ccat-notify-ca" not in {r.name for r in plain.of_type(CONFIGMAP)}
    assert "caConfigMap" not in plain.release_values("ccat-transfer")["notifications"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {},
            "ccat:notifySmtpPassword is set but ccat:transfer.settings has no "
            "CCAT_TRANSFER_NOTIFY_SMTP_HOST",
        ),
        (
            {"CCAT_TRANSFER_NOTIFY_SMTP_HOST": "smtp.example.org"},
            "has no CCAT_TRANSFER_NOTIFY_SMTP_USER",
        ),
    ],
)
def test_an_smtp_password_needs_its_server_and_login(settings: dict, message: str) -> None:
    with pytest.raises(Exception, match=re.escape(message)):
        run_stack(
            "dev",
            overrides=with_transfer("dev", settings=settings),
            secrets={**SECRETS, "ccat:notifySmtpPassword": "x"},
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ccat:environment": "prod"}, "ccat:environment must be one of"),
        ({"ccat:database": {"mode": "external"}}, "ccat:database.host is required"),
        ({"ccat:database": {"instances": 0}}, "ccat:database.instances must be an integer >= 1"),
        ({"ccat:api": {"minReplicas": 4, "maxReplicas": 2}}, "ccat:api.minReplicas must not"),
        ({"ccat:api": {"replicas": 2}}, "ccat:api: unknown setting(s) replicas"),
        ({"ccat:ingress": {"enabled": True}}, "ccat:ingress.host is required"),
        ({"ccat:transfer": {"settings": {"SLEEP": "1"}}}, "must start with CCAT_TRANSFER_"),
        (
            {"ccat:transfer": {"settings": {"CCAT_TRANSFER_NOTIFY_WEBHOOK_URL": "https://x"}}},
            "CCAT_TRANSFER_NOTIFY_WEBHOOK_URL is a secret; set it with "
            "`pulumi config set --secret ccat:notifyWebhookUrl ...`",
        ),
        (
            {"ccat:transfer": {"settings": {"CCAT_TRANSFER_NOTIFY_SMTP_PASSWORD": "x"}}},
            "ccat:notifySmtpPassword",
        ),
        ({"ccat:transfer": {"notifyEgress": []}}, "ccat:transfer.notifyEgress must be"),
        ({"ccat:transfer": {"notifySmtpCa": "ca.pem"}}, "must be a PEM CA bundle"),
        (
            {
                "ccat:transfer": {
                    "notifySmtpCa": TEST_CA_PEM,
                    "settings": {"CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE": "/etc/ssl/ca.pem"},
                }
            },
            "the program sets the variable to the mounted bundle",
        ),
        (
            {"ccat:transfer": {"notifySmtpCa": TEST_CA_PEM}},
            "ccat:transfer.notifySmtpCa is set but ccat:transfer.settings has no "
            "CCAT_TRANSFER_NOTIFY_SMTP_HOST",
        ),
        (
            {"ccat:transfer": {"notifyEgress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}},
            "each with its ports",
        ),
        (
            {
                "ccat:transfer": {
                    "settings": {
                        "CCAT_TRANSFER_NOTIFY_SMTP_HOST": "smtp.example.org",
                        "CCAT_TRANSFER_NOTIFY_SMTP_PORT": "smtp",
                    }
                }
            },
            "CCAT_TRANSFER_NOTIFY_SMTP_PORT must be a port number",
        ),
        ({"ccat:topologyFile": "nope.yaml"}, "ccat:topologyFile"),
        ({"ccat:monitoring": {"alerts": "yes"}}, "ccat:monitoring.alerts must be true or false"),
        ({"ccat:monitoring": {"rules": True}}, "ccat:monitoring: unknown setting(s) rules"),
        (
            {"ccat:monitoring": {"alerts": True}},
            "ccat:monitoring.podMonitors needs ccat:monitoringNamespace",
        ),
        (
            {"ccat:monitoring": {"labels": {"release": 1}}},
            "ccat:monitoring.labels must map label names to strings",
        ),
        (
            {"ccat:monitoring": {"interval": "30 seconds"}},
            "ccat:monitoring.interval must be a Prometheus duration",
        ),
        (
            {
                "ccat:transfer": {
                    "workers": [{"name": "w", "site": "cologne", "locations": ["buffer"]}]
                }
            },
            "worker 'w' serves cologne/buffer but mounts nothing at its root_path "
            "/srv/ccat/cologne/buffer (topology.yaml)",
        ),
        (
            {
                "ccat:transfer": {
                    "workers": [{"name": "w", "site": "mars", "locations": ["buffer"]}]
                }
            },
            "worker 'w' serves mars/buffer, which topology.yaml does not define",
        ),
    ],
)
def test_bad_config_is_refused_naming_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(Exception, match=re.escape(message)):
        run_stack("dev", overrides=overrides)
