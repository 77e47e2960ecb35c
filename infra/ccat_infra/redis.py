"""Redis, the Celery broker: a small Deployment of its own, or an external server."""

from __future__ import annotations

import pulumi
import pulumi_kubernetes as k8s

from .config import Settings
from .workload import CCAT_PODS, DNS_EGRESS, container_security, pod_security, secret

REDIS_NAME = "ccat-redis"
REDIS_UID = 999  # the redis user of the Redis images


class Redis(pulumi.ComponentResource):
    """The broker and the Secret holding its URL (it carries the password).

    The broker keeps nothing on disk: the database is the source of truth and the managers
    re-send whatever was scheduled but never started, so one replica that Kubernetes restarts
    is enough, in production too (``ccat:redis.mode: external`` points at a managed Redis).

    Attributes for the charts: ``url_secret`` (the Secret's name; the key is ``url``),
    ``port`` and ``pod_selector``.
    """

    def __init__(
        self,
        name: str,
        settings: Settings,
        namespace: pulumi.Input[str],
        password: pulumi.Output[str],
        opts: pulumi.ResourceOptions | None = None,
    ):
        super().__init__("ccat:infra:Redis", name, None, opts)
        cfg = settings.redis
        self.port = cfg.port
        host = cfg.host if cfg.mode == "external" else REDIS_NAME
        url = pulumi.Output.secret(password).apply(lambda pw: f"redis://:{pw}@{host}:{cfg.port}/0")
        self.secret = secret(
            f"{name}-broker",
            "ccat-broker",
            namespace,
            settings.labels,
            {"url": url, "password": password},
            self,
        )
        self.url_secret: pulumi.Output[str] = self.secret.metadata.apply(lambda m: m.name)
        self.pod_selector: dict[str, dict[str, str]] | None = None
        self.deployment: k8s.apps.v1.Deployment | None = None
        if cfg.mode == "external":
            self.register_outputs({"host": host})
            return

        labels = {"app.kubernetes.io/name": REDIS_NAME, **settings.labels}
        selector = {"app.kubernetes.io/name": REDIS_NAME}
        self.pod_selector = {"matchLabels": selector}
        password_env = k8s.core.v1.EnvVarSourceArgs(
            secret_key_ref=k8s.core.v1.SecretKeySelectorArgs(name=self.url_secret, key="password")
        )
        ping = k8s.core.v1.ExecActionArgs(command=["sh", "-c", "redis-cli ping | grep -q PONG"])
        self.deployment = k8s.apps.v1.Deployment(
            f"{name}-deployment",
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name=REDIS_NAME, namespace=namespace, labels=labels
            ),
            spec=k8s.apps.v1.DeploymentSpecArgs(
                replicas=1,
                strategy=k8s.apps.v1.DeploymentStrategyArgs(type="Recreate"),
                selector=k8s.meta.v1.LabelSelectorArgs(match_labels=selector),
                template=k8s.core.v1.PodTemplateSpecArgs(
                    metadata=k8s.meta.v1.ObjectMetaArgs(labels=labels),
                    spec=k8s.core.v1.PodSpecArgs(
                        automount_service_account_token=False,
                        security_context=pod_security(REDIS_UID),
                        containers=[
                            k8s.core.v1.ContainerArgs(
                                name="redis",
                                image=cfg.image,
                                command=["sh", "-c"],
                                args=[
                                    'exec redis-server --requirepass "$REDIS_PASSWORD" '
                                    "--save '' --appendonly no --protected-mode no"
                                ],
                                env=[
                                    k8s.core.v1.EnvVarArgs(
                                        name="REDIS_PASSWORD", value_from=password_env
                                    ),
                                    k8s.core.v1.EnvVarArgs(
                                        name="REDISCLI_AUTH", value_from=password_env
                                    ),
                                ],
                                ports=[
                                    k8s.core.v1.ContainerPortArgs(
                                        name="redis", container_port=cfg.port
                                    )
                                ],
                                liveness_probe=k8s.core.v1.ProbeArgs(
                                    exec_=ping,
                                    period_seconds=10,
                                    timeout_seconds=5,
                                    failure_threshold=3,
                                ),
                                readiness_probe=k8s.core.v1.ProbeArgs(
                                    exec_=ping,
                                    period_seconds=5,
                                    timeout_seconds=5,
                                    failure_threshold=2,
                                ),
                                resources=k8s.core.v1.ResourceRequirementsArgs(
                                    requests={"cpu": "100m", "memory": "128Mi"},
                                    limits={"cpu": "1", "memory": cfg.memory_limit},
                                ),
                                security_context=container_security(REDIS_UID),
                                volume_mounts=[
                                    k8s.core.v1.VolumeMountArgs(name="data", mount_path="/data"),
                                    k8s.core.v1.VolumeMountArgs(name="tmp", mount_path="/tmp"),  # noqa: S108 - an emptyDir
                                ],
                            )
                        ],
                        volumes=[
                            k8s.core.v1.VolumeArgs(
                                name="data",
                                empty_dir=k8s.core.v1.EmptyDirVolumeSourceArgs(size_limit="64Mi"),
                            ),
                            k8s.core.v1.VolumeArgs(
                                name="tmp",
                                empty_dir=k8s.core.v1.EmptyDirVolumeSourceArgs(size_limit="16Mi"),
                            ),
                        ],
                    ),
                ),
            ),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.secret]),
        )
        self.service = k8s.core.v1.Service(
            f"{name}-service",
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name=REDIS_NAME, namespace=namespace, labels=labels
            ),
            spec=k8s.core.v1.ServiceSpecArgs(
                selector=selector,
                ports=[
                    k8s.core.v1.ServicePortArgs(name="redis", port=cfg.port, target_port="redis")
                ],
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
        # only the data center's own pods may talk to the broker; it talks to nobody
        self.network_policy = k8s.networking.v1.NetworkPolicy(
            f"{name}-netpol",
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name=REDIS_NAME, namespace=namespace, labels=labels
            ),
            spec=k8s.networking.v1.NetworkPolicySpecArgs(
                pod_selector=k8s.meta.v1.LabelSelectorArgs(match_labels=selector),
                policy_types=["Ingress", "Egress"],
                ingress=[
                    k8s.networking.v1.NetworkPolicyIngressRuleArgs(
                        ports=[
                            k8s.networking.v1.NetworkPolicyPortArgs(port=cfg.port, protocol="TCP")
                        ],
                        from_=[k8s.networking.v1.NetworkPolicyPeerArgs(pod_selector=CCAT_PODS)],
                    )
                ],
                egress=[DNS_EGRESS],
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.register_outputs({"host": host})
