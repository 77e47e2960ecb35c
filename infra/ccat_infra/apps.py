"""The data center's own Helm charts (charts/), installed as Helm releases.

Each release is one ``kubernetes:helm.sh/v3:Release`` whose values are computed here from the
stack config; no value carries a secret, only the names of the Secrets the other components
created. Order: the migration release finishes only when its Job succeeded (a Helm
pre-install/pre-upgrade hook), and the API and transfer releases depend on it.
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from .config import CHARTS, Settings
from .database import Database
from .notify import Notifications
from .redis import Redis
from .s3 import S3Credentials


def database_values(settings: Settings, db: Database, pool_size: int) -> dict[str, Any]:
    """The charts' ``database`` values."""
    return {
        "env": settings.environment,
        "host": db.host,
        "port": db.port,
        "name": db.name,
        "user": db.user,
        "poolSize": pool_size,
        "passwordSecret": {"name": db.password_secret, "key": "password"},
    }


def _release(
    name: str,
    chart: str,
    namespace: pulumi.Input[str],
    values: dict[str, Any],
    parent: pulumi.Resource,
    depends_on: list[pulumi.Resource],
    wait_for_jobs: bool = False,
    timeout_s: int = 600,
) -> k8s.helm.v3.Release:
    return k8s.helm.v3.Release(
        name,
        name=name,
        chart=str(CHARTS / chart),
        namespace=namespace,
        values=values,
        atomic=True,
        cleanup_on_fail=True,
        wait_for_jobs=wait_for_jobs,
        timeout=timeout_s,
        opts=pulumi.ResourceOptions(parent=parent, depends_on=depends_on),
    )


def _network_peers(selector: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [{"podSelector": selector}] if selector else []


def _monitoring_peers(settings: Settings) -> list[dict[str, Any]]:
    """Prometheus' namespace, let in to the metrics ports (none without monitoringNamespace)."""
    if not settings.monitoring_namespace:
        return []
    return [
        {
            "namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": settings.monitoring_namespace}
            }
        }
    ]


class Migration(pulumi.ComponentResource):
    """charts/ccat-migrate: migrate the schema, seed the topology, check; before any rollout."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        namespace: pulumi.Input[str],
        db: Database,
        depends_on: list[pulumi.Resource],
        opts: pulumi.ResourceOptions | None = None,
    ):
        super().__init__("ccat:infra:Migration", name, None, opts)
        self.values: dict[str, Any] = {
            "image": settings.image.values(),
            "database": database_values(settings, db, 2),
            "topology": settings.topology_file.read_text(),
            "networkPolicy": {"enabled": True, "databaseTo": _network_peers(db.pod_selector)},
        }
        self.release = _release(
            "ccat-migrate",
            "ccat-migrate",
            namespace,
            self.values,
            self,
            depends_on,
            wait_for_jobs=True,
            timeout_s=1800,
        )
        self.register_outputs({"status": self.release.status})


class Api(pulumi.ComponentResource):
    """charts/ccat-api: the REST API, autoscaled, with its PDB; rolled out after the migration."""

    service_name = "ccat-api"

    def __init__(
        self,
        name: str,
        settings: Settings,
        namespace: pulumi.Input[str],
        db: Database,
        migration: Migration,
        opts: pulumi.ResourceOptions | None = None,
    ):
        super().__init__("ccat:infra:Api", name, None, opts)
        api = settings.api
        ingress_from = []
        if settings.ingress.enabled:
            ingress_from.append(
                {
                    "namespaceSelector": {
                        "matchLabels": {
                            "kubernetes.io/metadata.name": settings.ingress.controller_namespace
                        }
                    }
                }
            )
        self.values: dict[str, Any] = {
            "image": settings.image.values(),
            "replicaCount": api.min_replicas,
            "api": {"port": 8000, "workers": api.workers, "logLevel": "info", "rootPath": ""},
            "database": database_values(settings, db, settings.database.pool_size),
            "autoscaling": {
                "enabled": True,
                "minReplicas": api.min_replicas,
                "maxReplicas": api.max_replicas,
                "targetCPUUtilizationPercentage": 70,
            },
            "podDisruptionBudget": {"enabled": True, "minAvailable": api.pdb_min_available},
            "topologySpread": {
                "enabled": True,
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": api.spread,
            },
            "networkPolicy": {
                "enabled": True,
                "ingressFrom": ingress_from,
                # Prometheus scrapes /metrics on the API port
                "metricsFrom": _monitoring_peers(settings),
                "databaseTo": _network_peers(db.pod_selector),
            },
            # PrometheusRule and PodMonitor (ccat:monitoring)
            **settings.monitoring.values(),
        }
        # the migration release completes only once its Job succeeded: roll out after it
        self.release = _release(
            self.service_name, "ccat-api", namespace, self.values, self, [migration.release]
        )
        self.register_outputs({"status": self.release.status})


class Transfer(pulumi.ComponentResource):
    """charts/ccat-transfer: a worker Deployment per location set and the managers."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        namespace: pulumi.Input[str],
        db: Database,
        redis: Redis,
        s3: S3Credentials,
        notifications: Notifications,
        migration: Migration,
        opts: pulumi.ResourceOptions | None = None,
    ):
        super().__init__("ccat:infra:Transfer", name, None, opts)
        values: dict[str, Any] = {
            "image": settings.image.values(),
            "database": database_values(settings, db, 3),
            "broker": {"urlSecret": {"name": redis.url_secret, "key": "url"}, "port": redis.port},
            "transfer": settings.transfer_settings,
            "s3": {"endpointUrl": settings.s3_endpoint_url, "credentials": s3.credentials},
            # the managers' webhook and mail: the Secret's name and keys, and their egress
            "notifications": notifications.values,
            "workerDefaults": {
                "replicas": settings.worker_replicas,
                "concurrency": 2,
                "pool": "threads",
                "resources": {
                    "requests": {"cpu": "250m", "memory": "512Mi", "ephemeral-storage": "256Mi"},
                    "limits": {"cpu": "2", "memory": "2Gi", "ephemeral-storage": "2Gi"},
                },
            },
            "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
            "networkPolicy": {
                "enabled": True,
                "metricsFrom": _monitoring_peers(settings),
                "databaseTo": _network_peers(db.pod_selector),
                "brokerTo": _network_peers(redis.pod_selector),
            },
            # PrometheusRule and PodMonitors (ccat:monitoring)
            **settings.monitoring.values(),
        }
        if settings.workers is not None:
            values["workers"] = settings.workers
        if settings.transfer_egress is not None:
            values["networkPolicy"]["transferEgress"] = settings.transfer_egress
        self.values = values
        depends_on: list[pulumi.Resource] = [migration.release, redis.secret, s3.secret]
        if notifications.secret is not None:
            depends_on.append(notifications.secret)
        if notifications.ca_map is not None:
            depends_on.append(notifications.ca_map)
        self.release = _release(
            "ccat-transfer", "ccat-transfer", namespace, values, self, depends_on
        )
        self.register_outputs({"status": self.release.status})
