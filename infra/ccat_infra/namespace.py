"""The namespace of a stack, with a deny-by-default NetworkPolicy for every pod in it."""

from __future__ import annotations

import pulumi
import pulumi_kubernetes as k8s

from .config import Settings


class Namespace(pulumi.ComponentResource):
    """The stack's namespace; every pod in it is denied all traffic unless a policy allows it.

    The Pod Security admission labels enforce the ``restricted`` profile (non-root, no
    privilege escalation, seccomp, dropped capabilities) on every pod of the namespace.
    """

    def __init__(self, name: str, settings: Settings, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ccat:infra:Namespace", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.namespace = k8s.core.v1.Namespace(
            name,
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name=settings.namespace,
                labels={
                    **settings.labels,
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                },
            ),
            opts=child,
        )
        self.name: pulumi.Output[str] = self.namespace.metadata.apply(lambda m: m.name)
        self.default_deny = k8s.networking.v1.NetworkPolicy(
            f"{name}-default-deny",
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name="default-deny", namespace=self.name, labels=settings.labels
            ),
            spec=k8s.networking.v1.NetworkPolicySpecArgs(
                pod_selector=k8s.meta.v1.LabelSelectorArgs(),
                policy_types=["Ingress", "Egress"],
            ),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.namespace]),
        )
        self.register_outputs({"name": self.name})
