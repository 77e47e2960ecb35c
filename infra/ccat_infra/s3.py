"""The S3 archives' credentials, as one Kubernetes Secret."""

from __future__ import annotations

import pulumi

from .config import Settings
from .workload import secret


def _key(prefix: str, what: str) -> str:
    """Secret key of an archive's credential: CCAT_S3_COLOGNE_LTA -> cologne-lta-<what>."""
    short = prefix.removeprefix("CCAT_S3_").lower().replace("_", "-")
    return f"{short}-{what}"


class S3Credentials(pulumi.ComponentResource):
    """The keys of every archive in ``ccat:s3.archives`` (credentials_env_prefix names).

    The key pair comes from the Pulumi secrets ``ccat:s3AccessKeyId`` and
    ``ccat:s3SecretAccessKey``; one pair serves every archive of the stack (both archives are
    buckets of one S3 service); ``credentials`` is the chart's ``s3.credentials`` list.
    """

    def __init__(
        self,
        name: str,
        settings: Settings,
        namespace: pulumi.Input[str],
        access_key_id: pulumi.Output[str],
        secret_access_key: pulumi.Output[str],
        opts: pulumi.ResourceOptions | None = None,
    ):
        super().__init__("ccat:infra:S3Credentials", name, None, opts)
        data: dict[str, pulumi.Input[str]] = {}
        self.credentials: list[dict[str, str]] = []
        for prefix in settings.s3_archives:
            data[_key(prefix, "access-key-id")] = access_key_id
            data[_key(prefix, "secret-access-key")] = secret_access_key
            self.credentials.append(
                {
                    "envPrefix": prefix,
                    "secretName": "ccat-s3-credentials",
                    "accessKeyIdKey": _key(prefix, "access-key-id"),
                    "secretAccessKeyKey": _key(prefix, "secret-access-key"),
                }
            )
        self.secret = secret(
            f"{name}-secret",
            "ccat-s3-credentials",
            namespace,
            settings.labels,
            data,
            self,
        )
        self.register_outputs({})
