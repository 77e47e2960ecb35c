"""The stack configuration (``ccat:*`` keys), read once and checked.

Plain settings live in ``Pulumi.<stack>.yaml``; secrets only as Pulumi secrets
(``pulumi config set --secret ccat:dbPassword ...``), read with ``require_secret`` so they stay
secret outputs all the way into the Kubernetes Secrets. A bad value raises ConfigError naming
the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml

REPO = Path(__file__).resolve().parents[2]
CHARTS = REPO / "charts"
DEFAULT_TOPOLOGY = REPO / "src" / "ccat_ops_db" / "data" / "topology.yaml"
ENVIRONMENTS = ("development", "staging", "production")
# a Prometheus duration, as the prometheus-operator's CRDs check it
DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
# settings that are secrets: only as Pulumi secrets (these keys), never in ccat:transfer.settings
SECRET_SETTINGS = {
    "CCAT_TRANSFER_NOTIFY_WEBHOOK_URL": "notifyWebhookUrl",
    "CCAT_TRANSFER_NOTIFY_SMTP_PASSWORD": "notifySmtpPassword",
}


class ConfigError(ValueError):
    """A stack setting is missing or invalid; the message names the ``ccat:`` key."""


@dataclass(frozen=True)
class ImageConfig:
    """The one CCAT image (every role)."""

    repository: str = "ccat-data-center"
    tag: str = "0.1.0"
    digest: str = ""
    pull_policy: str = "IfNotPresent"

    def values(self) -> dict[str, str]:
        """The charts' ``image`` values."""
        return {
            "repository": self.repository,
            "tag": self.tag,
            "digest": self.digest,
            "pullPolicy": self.pull_policy,
        }


@dataclass(frozen=True)
class DatabaseConfig:
    """PostgreSQL: a CloudNativePG cluster (mode ``cnpg``) or an external server."""

    mode: str = "cnpg"
    name: str = "ccat_ops_db"
    user: str = "ccat"
    port: int = 5432
    host: str = ""  # external mode only
    instances: int = 1
    storage_size: str = "10Gi"
    storage_class: str = ""
    image: str = ""  # CNPG imageName; empty: the operator's default
    pool_size: int = 5


@dataclass(frozen=True)
class RedisConfig:
    """The Celery broker: a Redis Deployment here (mode ``deploy``) or an external server."""

    mode: str = "deploy"
    image: str = "redis:7"
    host: str = ""  # external mode only
    port: int = 6379
    memory_limit: str = "512Mi"


@dataclass(frozen=True)
class ApiConfig:
    """Sizing of the API."""

    min_replicas: int = 1
    max_replicas: int = 3
    workers: int = 2
    pdb_min_available: int = 1
    spread: str = "ScheduleAnyway"


@dataclass(frozen=True)
class IngressConfig:
    """The API's Ingress."""

    enabled: bool = False
    host: str = ""
    class_name: str = "nginx"
    tls_secret: str = ""
    path: str = "/"
    controller_namespace: str = "ingress-nginx"
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MonitoringConfig:
    """The Prometheus Operator objects of the API and transfer charts.

    ``alerts``: a PrometheusRule per chart (its files/alerts.yml); ``pod_monitors``: the
    PodMonitors that scrape the pods under the job names those rules select (ccat-api,
    ccat-worker, ccat-manager); ``labels`` go on both, for the operator's selectors.
    """

    alerts: bool = False
    pod_monitors: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    interval: str = "30s"

    def values(self) -> dict[str, Any]:
        """The charts' ``prometheusRule`` and ``podMonitor`` values."""
        return {
            "prometheusRule": {"enabled": self.alerts, "labels": dict(self.labels)},
            "podMonitor": {
                "enabled": self.pod_monitors,
                "labels": dict(self.labels),
                "interval": self.interval,
            },
        }


@dataclass(frozen=True)
class Settings:
    """Everything the program needs from the stack config."""

    stack: str
    namespace: str
    environment: str
    image: ImageConfig
    database: DatabaseConfig
    redis: RedisConfig
    api: ApiConfig
    ingress: IngressConfig
    s3_endpoint_url: str
    s3_archives: list[str]
    worker_replicas: int
    transfer_settings: dict[str, str]
    workers: list[dict[str, Any]] | None
    transfer_egress: list[dict[str, Any]] | None
    transfer_notify_egress: list[dict[str, Any]] | None
    transfer_notify_smtp_ca: str | None
    topology_file: Path
    monitoring_namespace: str
    monitoring: MonitoringConfig
    labels: dict[str, str]

    @property
    def production(self) -> bool:
        """Whether this stack is the production one (HA settings)."""
        return self.environment == "production"


def _obj(cfg: pulumi.Config, key: str) -> dict[str, Any]:
    value = cfg.get_object(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"ccat:{key} must be a mapping, got {type(value).__name__}")
    return value


def _known(key: str, value: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(
            f"ccat:{key}: unknown setting(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(allowed))})"
        )


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"ccat:{key} must be true or false, got {value!r}")
    return value


def _monitoring(cfg: pulumi.Config, monitoring_namespace: str) -> MonitoringConfig:
    mon = _obj(cfg, "monitoring")
    _known("monitoring", mon, {"alerts", "podMonitors", "labels", "interval"})
    alerts = _bool("monitoring.alerts", mon.get("alerts", False))
    # the alerts on `up` need the scrape jobs the PodMonitors name; turn them off only where
    # Prometheus scrapes the pods otherwise, under the same job names (docs/kubernetes.md)
    pod_monitors = _bool("monitoring.podMonitors", mon.get("podMonitors", alerts))
    labels = mon.get("labels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ConfigError(f"ccat:monitoring.labels must map label names to strings, got {labels!r}")
    interval = mon.get("interval", MonitoringConfig.interval)
    if not isinstance(interval, str) or not DURATION.match(interval):
        raise ConfigError(
            f"ccat:monitoring.interval must be a Prometheus duration (30s, 1m), got {interval!r}"
        )
    if pod_monitors and not monitoring_namespace:
        # the charts' NetworkPolicies let the scrapes in from that namespace only
        raise ConfigError(
            "ccat:monitoring.podMonitors needs ccat:monitoringNamespace (Prometheus' "
            "namespace, let in to the metrics ports)"
        )
    return MonitoringConfig(alerts, pod_monitors, dict(labels), interval)


def _int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"ccat:{key} must be an integer >= {minimum}, got {value!r}")
    return value


def check_worker_storage(topology_file: Path, workers: list[dict[str, Any]] | None) -> None:
    """Every disk location a worker serves must be mounted at its topology ``root_path``.

    ``workers`` is the transfer chart's list (None: the chart's defaults). The seeded topology
    and the mounts must agree, or a worker would write where no volume is.
    """
    if workers is None:
        chart_values = yaml.safe_load((CHARTS / "ccat-transfer" / "values.yaml").read_text())
        workers = chart_values["workers"]
    try:
        topology = yaml.safe_load(topology_file.read_text())
        paths = {
            (site["short_name"], loc["name"]): loc.get("root_path")
            for site in topology["sites"]
            for loc in site["locations"]
        }
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise ConfigError(f"ccat:topologyFile: {topology_file}: not a topology ({exc})") from exc
    for w in workers:
        mounts = {m.get("mountPath") for m in w.get("storage") or []}
        for loc in w.get("locations") or []:
            key = (w.get("site"), loc)
            if key not in paths:
                raise ConfigError(
                    f"ccat:transfer.workers: worker {w.get('name')!r} serves {key[0]}/{loc}, "
                    f"which {topology_file.name} does not define"
                )
            if paths[key] and paths[key] not in mounts:
                raise ConfigError(
                    f"ccat:transfer.workers: worker {w.get('name')!r} serves {key[0]}/{loc} "
                    f"but mounts nothing at its root_path {paths[key]} ({topology_file.name})"
                )


def load(cfg: pulumi.Config | None = None) -> Settings:
    """Read and check the ``ccat:`` settings of the current stack."""
    cfg = cfg or pulumi.Config("ccat")
    stack = pulumi.get_stack()
    environment = cfg.get("environment") or "development"
    if environment not in ENVIRONMENTS:
        raise ConfigError(
            f"ccat:environment must be one of {', '.join(ENVIRONMENTS)}, got {environment!r}"
        )

    img = _obj(cfg, "image")
    _known("image", img, {"repository", "tag", "digest", "pullPolicy"})
    image = ImageConfig(
        repository=img.get("repository", ImageConfig.repository),
        tag=str(img.get("tag", ImageConfig.tag)),
        digest=img.get("digest", ""),
        pull_policy=img.get("pullPolicy", ImageConfig.pull_policy),
    )

    db = _obj(cfg, "database")
    _known(
        "database",
        db,
        {
            "mode",
            "name",
            "user",
            "port",
            "host",
            "instances",
            "storageSize",
            "storageClass",
            "image",
            "poolSize",
        },
    )
    database = DatabaseConfig(
        mode=db.get("mode", "cnpg"),
        name=db.get("name", "ccat_ops_db"),
        user=db.get("user", "ccat"),
        port=_int("database.port", db.get("port", 5432), 1),
        host=db.get("host", ""),
        instances=_int("database.instances", db.get("instances", 1), 1),
        storage_size=db.get("storageSize", "10Gi"),
        storage_class=db.get("storageClass", ""),
        image=db.get("image", ""),
        pool_size=_int("database.poolSize", db.get("poolSize", 5), 1),
    )
    if database.mode not in ("cnpg", "external"):
        raise ConfigError(f"ccat:database.mode must be cnpg or external, got {database.mode!r}")
    if database.mode == "external" and not database.host:
        raise ConfigError("ccat:database.host is required when ccat:database.mode is external")

    rd = _obj(cfg, "redis")
    _known("redis", rd, {"mode", "image", "host", "port", "memoryLimit"})
    redis = RedisConfig(
        mode=rd.get("mode", "deploy"),
        image=rd.get("image", "redis:7"),
        host=rd.get("host", ""),
        port=_int("redis.port", rd.get("port", 6379), 1),
        memory_limit=rd.get("memoryLimit", "512Mi"),
    )
    if redis.mode not in ("deploy", "external"):
        raise ConfigError(f"ccat:redis.mode must be deploy or external, got {redis.mode!r}")
    if redis.mode == "external" and not redis.host:
        raise ConfigError("ccat:redis.host is required when ccat:redis.mode is external")

    ap = _obj(cfg, "api")
    _known("api", ap, {"minReplicas", "maxReplicas", "workers", "pdbMinAvailable", "spread"})
    api = ApiConfig(
        min_replicas=_int("api.minReplicas", ap.get("minReplicas", 1), 1),
        max_replicas=_int("api.maxReplicas", ap.get("maxReplicas", 3), 1),
        workers=_int("api.workers", ap.get("workers", 2), 1),
        pdb_min_available=_int("api.pdbMinAvailable", ap.get("pdbMinAvailable", 1), 0),
        spread=ap.get("spread", "ScheduleAnyway"),
    )
    if api.min_replicas > api.max_replicas:
        raise ConfigError("ccat:api.minReplicas must not exceed ccat:api.maxReplicas")
    if api.pdb_min_available >= api.min_replicas > 1:
        raise ConfigError("ccat:api.pdbMinAvailable must be below ccat:api.minReplicas")

    ing = _obj(cfg, "ingress")
    _known(
        "ingress",
        ing,
        {"enabled", "host", "className", "tlsSecret", "path", "controllerNamespace", "annotations"},
    )
    ingress = IngressConfig(
        enabled=bool(ing.get("enabled", False)),
        host=ing.get("host", ""),
        class_name=ing.get("className", "nginx"),
        tls_secret=ing.get("tlsSecret", ""),
        path=ing.get("path", "/"),
        controller_namespace=ing.get("controllerNamespace", "ingress-nginx"),
        annotations=dict(ing.get("annotations", {})),
    )
    if ingress.enabled and not ingress.host:
        raise ConfigError("ccat:ingress.host is required when ccat:ingress.enabled is true")

    s3 = _obj(cfg, "s3")
    _known("s3", s3, {"endpointUrl", "archives"})
    archives = s3.get("archives", ["CCAT_S3_COLOGNE_LTA", "CCAT_S3_US_LTA"])
    if not isinstance(archives, list) or not all(isinstance(a, str) and a for a in archives):
        raise ConfigError("ccat:s3.archives must be a list of credentials_env_prefix names")

    tr = _obj(cfg, "transfer")
    _known(
        "transfer",
        tr,
        {"workerReplicas", "settings", "workers", "egress", "notifyEgress", "notifySmtpCa"},
    )
    settings_map = {str(k): str(v) for k, v in (tr.get("settings") or {}).items()}
    bad = [k for k in settings_map if not k.startswith("CCAT_TRANSFER_")]
    if bad:
        raise ConfigError(f"ccat:transfer.settings: keys must start with CCAT_TRANSFER_: {bad}")
    for key in sorted(set(settings_map) & set(SECRET_SETTINGS)):
        raise ConfigError(
            f"ccat:transfer.settings: {key} is a secret; set it with "
            f"`pulumi config set --secret ccat:{SECRET_SETTINGS[key]} ...` instead"
        )
    workers = tr.get("workers")
    if workers is not None and not isinstance(workers, list):
        raise ConfigError(
            "ccat:transfer.workers must be a list (see charts/ccat-transfer/values.yaml)"
        )

    egress = tr.get("egress")
    if egress is not None and not isinstance(egress, list):
        raise ConfigError("ccat:transfer.egress must be a list of NetworkPolicy egress rules")
    # the managers' egress for operator notifications (default: notify.py works it out)
    notify_egress = tr.get("notifyEgress")
    if notify_egress is not None and (
        not isinstance(notify_egress, list)
        or not notify_egress
        or not all(isinstance(r, dict) and r.get("ports") for r in notify_egress)
    ):
        raise ConfigError(
            "ccat:transfer.notifyEgress must be a non-empty list of NetworkPolicy egress rules, "
            "each with its ports"
        )

    # the mail relay's CA bundle (PEM text); the program mounts it into the managers
    smtp_ca = tr.get("notifySmtpCa")
    if smtp_ca is not None:
        if not isinstance(smtp_ca, str) or "-----BEGIN CERTIFICATE-----" not in smtp_ca:
            raise ConfigError(
                "ccat:transfer.notifySmtpCa must be a PEM CA bundle (-----BEGIN CERTIFICATE-----"
                ' ...), e.g. `pulumi config set ccat:transfer.notifySmtpCa --path -- "$(cat'
                ' ca.pem)"`'
            )
        if "CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE" in settings_map:
            raise ConfigError(
                "ccat:transfer.settings has CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE and"
                " ccat:transfer.notifySmtpCa is set: the program sets the variable to the"
                " mounted bundle; drop the setting"
            )
    topology = cfg.get("topologyFile")
    topology_file = (REPO / topology) if topology else DEFAULT_TOPOLOGY
    if not topology_file.is_file():
        raise ConfigError(f"ccat:topologyFile: {topology_file} does not exist")
    check_worker_storage(topology_file, workers)
    monitoring_namespace = cfg.get("monitoringNamespace") or ""

    return Settings(
        stack=stack,
        namespace=cfg.get("namespace") or f"ccat-{stack}",
        environment=environment,
        image=image,
        database=database,
        redis=redis,
        api=api,
        ingress=ingress,
        s3_endpoint_url=s3.get("endpointUrl", ""),
        s3_archives=archives,
        worker_replicas=_int("transfer.workerReplicas", tr.get("workerReplicas", 1), 0),
        transfer_settings=settings_map,
        workers=workers,
        transfer_egress=egress,
        transfer_notify_egress=notify_egress,
        transfer_notify_smtp_ca=smtp_ca,
        topology_file=topology_file,
        monitoring_namespace=monitoring_namespace,
        monitoring=_monitoring(cfg, monitoring_namespace),
        labels={"app.kubernetes.io/part-of": "ccat-data-center", "ccat.fyst/stack": stack},
    )
