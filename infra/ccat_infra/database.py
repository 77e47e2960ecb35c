"""PostgreSQL for the operations database: a CloudNativePG cluster, or an external server."""

from __future__ import annotations

import pulumi
import pulumi_kubernetes as k8s

from .config import Settings
from .workload import DNS_EGRESS, secret

CNPG_CLUSTER_NAME = "ccat-db"


class Database(pulumi.ComponentResource):
    """The database and the Secret holding its password.

    ``cnpg``: a ``postgresql.cnpg.io/v1`` Cluster (the CloudNativePG operator must be installed
    in the cluster), bootstrapped with the owner and password from the Secret; production runs
    several instances spread over nodes (the operator adds the PodDisruptionBudgets).
    ``external``: only the Secret; the charts point at ``database.host``.

    Attributes for the charts: ``host``, ``port``, ``name``, ``user``, ``password_secret``
    (the Secret's name; the key is ``password``) and ``pod_selector`` (for egress policies).
    """

    def __init__(
        self,
        name: str,
        settings: Settings,
        namespace: pulumi.Input[str],
        password: pulumi.Output[str],
        opts: pulumi.ResourceOptions | None = None,
    ):
        super().__init__("ccat:infra:Database", name, None, opts)
        db = settings.database
        self.port = db.port
        self.name = db.name
        self.user = db.user
        # basic-auth: the type CloudNativePG expects for the bootstrap owner's credentials
        self.secret = secret(
            f"{name}-credentials",
            "ccat-db-credentials",
            namespace,
            settings.labels,
            {"username": db.user, "password": password},
            self,
            kind="kubernetes.io/basic-auth",
        )
        self.password_secret: pulumi.Output[str] = self.secret.metadata.apply(lambda m: m.name)
        self.cluster: k8s.apiextensions.CustomResource | None = None
        self.pod_selector: dict[str, dict[str, str]] | None = None
        if db.mode == "external":
            self.host = db.host
            self.register_outputs({"host": self.host})
            return

        self.host = f"{CNPG_CLUSTER_NAME}-rw"
        self.pod_selector = {"matchLabels": {"cnpg.io/cluster": CNPG_CLUSTER_NAME}}
        storage: dict[str, str] = {"size": db.storage_size}
        if db.storage_class:
            storage["storageClass"] = db.storage_class
        spec: dict[str, object] = {
            "instances": db.instances,
            "primaryUpdateStrategy": "unsupervised",
            "storage": storage,
            "bootstrap": {
                "initdb": {
                    "database": db.name,
                    "owner": db.user,
                    "secret": {"name": self.password_secret},
                }
            },
            "resources": {
                "requests": {
                    "cpu": "500m" if settings.production else "100m",
                    "memory": "1Gi" if settings.production else "256Mi",
                },
                "limits": {
                    "cpu": "4" if settings.production else "1",
                    "memory": "4Gi" if settings.production else "1Gi",
                },
            },
            "affinity": {
                "enablePodAntiAffinity": True,
                "topologyKey": "kubernetes.io/hostname",
                "podAntiAffinityType": "required" if settings.production else "preferred",
            },
            "enablePDB": True,
        }
        if db.image:
            spec["imageName"] = db.image
        self.cluster = k8s.apiextensions.CustomResource(
            f"{name}-cluster",
            api_version="postgresql.cnpg.io/v1",
            kind="Cluster",
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name=CNPG_CLUSTER_NAME, namespace=namespace, labels=settings.labels
            ),
            spec=spec,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.secret]),
        )
        # The namespace denies everything by default: the instances talk to each other
        # (replication), to the operator and the Kubernetes API, and serve the data center.
        pg = k8s.networking.v1.NetworkPolicyPortArgs(port=db.port, protocol="TCP")
        instances = k8s.networking.v1.NetworkPolicyPeerArgs(
            pod_selector=k8s.meta.v1.LabelSelectorArgs(
                match_labels={"cnpg.io/cluster": CNPG_CLUSTER_NAME}
            )
        )
        self.network_policy = k8s.networking.v1.NetworkPolicy(
            f"{name}-netpol",
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name=f"{CNPG_CLUSTER_NAME}-allow", namespace=namespace, labels=settings.labels
            ),
            spec=k8s.networking.v1.NetworkPolicySpecArgs(
                pod_selector=k8s.meta.v1.LabelSelectorArgs(
                    match_labels={"cnpg.io/cluster": CNPG_CLUSTER_NAME}
                ),
                policy_types=["Ingress", "Egress"],
                ingress=[
                    k8s.networking.v1.NetworkPolicyIngressRuleArgs(
                        ports=[pg],
                        from_=[
                            k8s.networking.v1.NetworkPolicyPeerArgs(
                                pod_selector=k8s.meta.v1.LabelSelectorArgs(
                                    match_labels={"app.kubernetes.io/part-of": "ccat-data-center"}
                                )
                            ),
                            instances,
                        ],
                    ),
                    # the operator's status and control port (in its own namespace)
                    k8s.networking.v1.NetworkPolicyIngressRuleArgs(
                        ports=[k8s.networking.v1.NetworkPolicyPortArgs(port=8000, protocol="TCP")],
                        from_=[
                            k8s.networking.v1.NetworkPolicyPeerArgs(
                                namespace_selector=k8s.meta.v1.LabelSelectorArgs(
                                    match_labels={"kubernetes.io/metadata.name": "cnpg-system"}
                                )
                            )
                        ],
                    ),
                ],
                egress=[
                    DNS_EGRESS,
                    k8s.networking.v1.NetworkPolicyEgressRuleArgs(ports=[pg], to=[instances]),
                    # the instance manager watches its Cluster through the Kubernetes API
                    k8s.networking.v1.NetworkPolicyEgressRuleArgs(
                        ports=[
                            k8s.networking.v1.NetworkPolicyPortArgs(port=443, protocol="TCP"),
                            k8s.networking.v1.NetworkPolicyPortArgs(port=6443, protocol="TCP"),
                        ]
                    ),
                ],
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.register_outputs({"host": self.host, "cluster": self.cluster.metadata})
