"""The whole stack: every component, in order, from the stack config."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from . import config as config_mod
from .apps import Api, Migration, Transfer
from .database import Database
from .ingress import Ingress
from .namespace import Namespace
from .notify import Notifications
from .redis import Redis
from .s3 import S3Credentials


@dataclass
class DataCenter:
    """The components of one stack (the tests inspect them)."""

    settings: config_mod.Settings
    namespace: Namespace
    database: Database
    redis: Redis
    s3: S3Credentials
    notifications: Notifications
    migration: Migration
    api: Api
    transfer: Transfer
    ingress: Ingress | None


def deploy(settings: config_mod.Settings | None = None) -> DataCenter:
    """Create every resource of the stack and export what an operator needs."""
    settings = settings or config_mod.load()
    cfg = pulumi.Config("ccat")
    # secrets only as Pulumi secrets: `pulumi config set --secret ccat:<name> ...`
    db_password = cfg.require_secret("dbPassword")
    redis_password = cfg.require_secret("redisPassword")
    s3_key_id = cfg.require_secret("s3AccessKeyId")
    s3_secret = cfg.require_secret("s3SecretAccessKey")
    # optional: the managers' operator notifications (a webhook, e-mail through a login)
    notify_webhook_url = cfg.get_secret("notifyWebhookUrl")
    notify_smtp_password = cfg.get_secret("notifySmtpPassword")

    ns = Namespace("ccat", settings)
    after_ns = pulumi.ResourceOptions(depends_on=[ns])
    database = Database("ccat-db", settings, ns.name, db_password, opts=after_ns)
    redis = Redis("ccat-redis", settings, ns.name, redis_password, opts=after_ns)
    s3 = S3Credentials("ccat-s3", settings, ns.name, s3_key_id, s3_secret, opts=after_ns)
    notifications = Notifications(
        "ccat-notify", settings, ns.name, notify_webhook_url, notify_smtp_password, opts=after_ns
    )
    db_ready: list[pulumi.Resource] = [database.secret]
    if database.cluster is not None:
        db_ready.append(database.cluster)
    migration = Migration("ccat-migrate", settings, ns.name, database, db_ready)
    api = Api("ccat-api", settings, ns.name, database, migration)
    transfer = Transfer(
        "ccat-transfer", settings, ns.name, database, redis, s3, notifications, migration
    )
    ingress = None
    if settings.ingress.enabled:
        ingress = Ingress("ccat-api-ingress", settings, ns.name, Api.service_name, [api.release])

    pulumi.export("namespace", ns.name)
    pulumi.export("environment", settings.environment)
    pulumi.export("databaseHost", database.host)
    pulumi.export("apiService", f"{Api.service_name}:8000")
    pulumi.export("apiUrl", ingress.url if ingress else None)
    pulumi.export("releases", [migration.release.name, api.release.name, transfer.release.name])
    return DataCenter(
        settings, ns, database, redis, s3, notifications, migration, api, transfer, ingress
    )
