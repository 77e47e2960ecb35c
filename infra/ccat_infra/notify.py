"""Operator notifications of the transfer managers: the Secret of their two secrets, if any.

The ``notify`` manager (part of ``manager all``) sends what needs a person to a webhook and/or
by e-mail (docs/data-transfer.md, "Operator notifications"). Two of its settings are secrets:
the webhook URL (Slack/Mattermost URLs carry a token) and the SMTP password. They come only
from Pulumi secrets (``pulumi config set --secret ccat:notifyWebhookUrl ...``,
``ccat:notifySmtpPassword``) into the Kubernetes Secret ``ccat-notifications``, made only when
one of them is set; the chart gets its name and keys and hands them to the managers alone. The
plain settings (mail server, recipients, timings) are ``ccat:transfer.settings``
(``CCAT_TRANSFER_NOTIFY_*``). A mail relay whose certificate an internal CA signed: its CA
bundle, ``ccat:transfer.notifySmtpCa``, becomes the ConfigMap ``ccat-notify-ca`` that the chart
mounts into the managers (``notifications.caConfigMap``).
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from .config import ConfigError, Settings
from .workload import secret

# keys of the Secret ccat-notifications
WEBHOOK_KEY = "webhook-url"
SMTP_KEY = "smtp-password"
# key of the CA bundle in the ConfigMap ccat-notify-ca
CA_KEY = "ca.crt"
# the notification settings' defaults (src/data_transfer/settings.py)
DEFAULT_SMTP_PORT = 587
HTTPS = 443


def smtp_port(settings: Settings) -> int:
    """The mail server's port: CCAT_TRANSFER_NOTIFY_SMTP_PORT, else the settings' default."""
    raw = settings.transfer_settings.get("CCAT_TRANSFER_NOTIFY_SMTP_PORT", str(DEFAULT_SMTP_PORT))
    try:
        port = int(raw)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ConfigError(
            "ccat:transfer.settings: CCAT_TRANSFER_NOTIFY_SMTP_PORT must be a port number, "
            f"got {raw!r}"
        )
    return port


class Notifications(pulumi.ComponentResource):
    """The Secret ``ccat-notifications`` (only when a secret is set) and ``values``, the
    transfer chart's ``notifications`` values.

    Notifications are on when the webhook URL is set or the settings name a mail server
    (``CCAT_TRANSFER_NOTIFY_SMTP_HOST``; a relay may need no password). The managers' egress
    is then HTTPS for the webhook and the mail server's port, to any destination, unless
    ``ccat:transfer.notifyEgress`` gives the rules.
    """

    def __init__(
        self,
        name: str,
        settings: Settings,
        namespace: pulumi.Input[str],
        webhook_url: pulumi.Output[str] | None,
        smtp_password: pulumi.Output[str] | None,
        opts: pulumi.ResourceOptions | None = None,
    ):
        super().__init__("ccat:infra:Notifications", name, None, opts)
        plain = settings.transfer_settings
        smtp_host = plain.get("CCAT_TRANSFER_NOTIFY_SMTP_HOST", "")
        if smtp_password is not None and not smtp_host:
            raise ConfigError(
                "ccat:notifySmtpPassword is set but ccat:transfer.settings has no "
                "CCAT_TRANSFER_NOTIFY_SMTP_HOST (the mail server it logs in to)"
            )
        if smtp_password is not None and not plain.get("CCAT_TRANSFER_NOTIFY_SMTP_USER"):
            raise ConfigError(
                "ccat:notifySmtpPassword is set but ccat:transfer.settings has no "
                "CCAT_TRANSFER_NOTIFY_SMTP_USER (the managers would refuse to start)"
            )
        data: dict[str, pulumi.Input[str]] = {}
        if webhook_url is not None:
            data[WEBHOOK_KEY] = webhook_url
        if smtp_password is not None:
            data[SMTP_KEY] = smtp_password

        self.secret: k8s.core.v1.Secret | None = None
        secret_name: pulumi.Input[str] = ""
        if data:
            self.secret = secret(
                f"{name}-secret",
                "ccat-notifications",
                namespace,
                settings.labels,
                data,
                self,
            )
            secret_name = self.secret.metadata.apply(lambda m: m.name)

        self.enabled = bool(data) or bool(smtp_host)
        self.ca_map: k8s.core.v1.ConfigMap | None = None
        ca_map_name: pulumi.Input[str] | None = None
        if settings.transfer_notify_smtp_ca is not None:
            if not smtp_host:
                raise ConfigError(
                    "ccat:transfer.notifySmtpCa is set but ccat:transfer.settings has no "
                    "CCAT_TRANSFER_NOTIFY_SMTP_HOST (the mail server it is the CA of)"
                )
            self.ca_map = k8s.core.v1.ConfigMap(
                f"{name}-ca",
                metadata=k8s.meta.v1.ObjectMetaArgs(
                    name="ccat-notify-ca", namespace=namespace, labels=dict(settings.labels)
                ),
                data={CA_KEY: settings.transfer_notify_smtp_ca},
                opts=pulumi.ResourceOptions(parent=self),
            )
            ca_map_name = self.ca_map.metadata.apply(lambda m: m.name)
        egress = settings.transfer_notify_egress
        if egress is None:
            ports = []
            if webhook_url is not None:
                ports.append({"port": HTTPS, "protocol": "TCP"})
            if smtp_host:
                port = smtp_port(settings)
                if port != HTTPS or webhook_url is None:
                    ports.append({"port": port, "protocol": "TCP"})
            egress = [{"ports": ports}] if ports else []
        self.values: dict[str, Any] = {"enabled": self.enabled}
        if self.enabled:
            self.values |= {
                "secretName": secret_name,
                "webhookUrlKey": WEBHOOK_KEY if webhook_url is not None else "",
                "smtpPasswordKey": SMTP_KEY if smtp_password is not None else "",
                "egress": egress,
            }
            if self.ca_map is not None:
                self.values |= {"caConfigMap": ca_map_name, "caKey": CA_KEY}
        self.register_outputs({"enabled": self.enabled})
