"""Pieces every workload the program writes itself shares (the charts have their own)."""

from __future__ import annotations

from collections.abc import Mapping

import pulumi
import pulumi_kubernetes as k8s


def pod_security(uid: int) -> k8s.core.v1.PodSecurityContextArgs:
    """Non-root pod security context with the runtime's default seccomp profile."""
    return k8s.core.v1.PodSecurityContextArgs(
        run_as_non_root=True,
        run_as_user=uid,
        run_as_group=uid,
        fs_group=uid,
        seccomp_profile=k8s.core.v1.SeccompProfileArgs(type="RuntimeDefault"),
    )


def container_security(uid: int) -> k8s.core.v1.SecurityContextArgs:
    """Read-only root file system, no privilege escalation, every capability dropped."""
    return k8s.core.v1.SecurityContextArgs(
        run_as_non_root=True,
        run_as_user=uid,
        run_as_group=uid,
        allow_privilege_escalation=False,
        privileged=False,
        read_only_root_filesystem=True,
        capabilities=k8s.core.v1.CapabilitiesArgs(drop=["ALL"]),
        seccomp_profile=k8s.core.v1.SeccompProfileArgs(type="RuntimeDefault"),
    )


DNS_EGRESS = k8s.networking.v1.NetworkPolicyEgressRuleArgs(
    ports=[
        k8s.networking.v1.NetworkPolicyPortArgs(port=53, protocol="UDP"),
        k8s.networking.v1.NetworkPolicyPortArgs(port=53, protocol="TCP"),
    ]
)

# Every pod of the data center's own charts carries this label (ccat.labels in the charts).
CCAT_PODS = k8s.meta.v1.LabelSelectorArgs(
    match_labels={"app.kubernetes.io/part-of": "ccat-data-center"}
)


def secret(
    resource_name: str,
    name: str,
    namespace: pulumi.Input[str],
    labels: Mapping[str, str],
    data: Mapping[str, pulumi.Input[str]],
    parent: pulumi.Resource,
    kind: str = "Opaque",
) -> k8s.core.v1.Secret:
    """A Secret holding ``data``; its values stay secret in the state, also once encoded."""
    return k8s.core.v1.Secret(
        resource_name,
        metadata=k8s.meta.v1.ObjectMetaArgs(name=name, namespace=namespace, labels=dict(labels)),
        type=kind,
        string_data=dict(data),
        opts=pulumi.ResourceOptions(
            parent=parent, additional_secret_outputs=["stringData", "data"]
        ),
    )
