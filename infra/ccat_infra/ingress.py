"""The API's Ingress (TLS when a certificate Secret is named)."""

from __future__ import annotations

import pulumi
import pulumi_kubernetes as k8s

from .config import Settings


class Ingress(pulumi.ComponentResource):
    """An Ingress for the API Service on ``ccat:ingress.host`` (class ``ingress.className``)."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        namespace: pulumi.Input[str],
        service_name: str,
        depends_on: list[pulumi.Resource],
        opts: pulumi.ResourceOptions | None = None,
    ):
        super().__init__("ccat:infra:Ingress", name, None, opts)
        cfg = settings.ingress
        tls = (
            [k8s.networking.v1.IngressTLSArgs(hosts=[cfg.host], secret_name=cfg.tls_secret)]
            if cfg.tls_secret
            else None
        )
        self.ingress = k8s.networking.v1.Ingress(
            name,
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name="ccat-api",
                namespace=namespace,
                labels=settings.labels,
                annotations=cfg.annotations or None,
            ),
            spec=k8s.networking.v1.IngressSpecArgs(
                ingress_class_name=cfg.class_name,
                tls=tls,
                rules=[
                    k8s.networking.v1.IngressRuleArgs(
                        host=cfg.host,
                        http=k8s.networking.v1.HTTPIngressRuleValueArgs(
                            paths=[
                                k8s.networking.v1.HTTPIngressPathArgs(
                                    path=cfg.path,
                                    path_type="Prefix",
                                    backend=k8s.networking.v1.IngressBackendArgs(
                                        service=k8s.networking.v1.IngressServiceBackendArgs(
                                            name=service_name,
                                            port=k8s.networking.v1.ServiceBackendPortArgs(
                                                name="http"
                                            ),
                                        )
                                    ),
                                )
                            ]
                        ),
                    )
                ],
            ),
            opts=pulumi.ResourceOptions(parent=self, depends_on=depends_on),
        )
        self.url = (
            f"https://{cfg.host}{cfg.path}" if cfg.tls_secret else f"http://{cfg.host}{cfg.path}"
        )
        self.register_outputs({"url": self.url})
