"""A plain description of a storage location, detached from the database session.

Movers and packaging code take :class:`LocationRef` objects, never ORM rows, so they can run in
a worker without a database session and are unit-testable on their own.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigurationError


@dataclass(frozen=True)
class LocationRef:
    """Everything a mover needs to reach one location.

    ``storage_type`` is ``"disk"``, ``"s3"`` or ``"tape"``. Disk locations have ``root_path``
    (and ``host``/``ssh_user`` when reached over ssh); S3 locations have ``bucket``,
    ``endpoint_url``, ``region``, ``key_prefix`` and credentials read from the environment.
    """

    id: int
    site: str
    name: str
    location_type: str
    storage_type: str
    root_path: str | None = None
    host: str | None = None
    ssh_user: str | None = None
    ssh_port: int | None = None
    bucket: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    key_prefix: str = ""
    credentials: tuple[str, str] | None = field(default=None, repr=False)
    capacity_bytes: int | None = None

    @property
    def label(self) -> str:
        """``site/location``: how logs and errors name this location."""
        return f"{self.site}/{self.name}"

    @property
    def queue_prefix(self) -> str:
        """``{site}_{location}``: the prefix of this location's queues."""
        return f"{self.site}_{self.name}"

    @property
    def is_remote(self) -> bool:
        """True for a disk location reached over ssh."""
        return self.storage_type == "disk" and bool(self.host)

    def path(self, relative_path: str) -> Path:
        """Absolute path of ``relative_path`` on a disk location (refuses ``..`` escapes)."""
        if self.storage_type != "disk" or not self.root_path:
            raise ConfigurationError(f"location {self.label} has no root_path (not a disk)")
        rel = _clean_relative(relative_path, self.label)
        return Path(self.root_path) / rel

    def key(self, relative_path: str) -> str:
        """Object key of ``relative_path`` in an S3 location (``key_prefix`` + path)."""
        if self.storage_type != "s3" or not self.bucket:
            raise ConfigurationError(f"location {self.label} has no bucket (not S3)")
        return self.key_prefix + _clean_relative(relative_path, self.label)

    @classmethod
    def from_orm(cls, loc: Any, environ: dict[str, str] | None = None) -> LocationRef:
        """Build from a :class:`ccat_ops_db.models.DataLocation` (any subtype)."""
        storage = str(loc.storage_type)
        kwargs: dict[str, Any] = {}
        if storage == "disk":
            # a worker on the host that mounts the disk reads it directly, not over ssh
            local = (environ or os.environ).get("CCAT_TRANSFER_LOCAL_HOSTS", "")
            here = {h.strip() for h in local.split(",") if h.strip()}
            kwargs = {
                "root_path": loc.root_path,
                "host": None if loc.host in here else loc.host,
                "ssh_user": loc.ssh_user,
            }
        elif storage == "s3":
            kwargs = {
                "bucket": loc.bucket,
                "endpoint_url": loc.endpoint_url
                or (environ or os.environ).get("CCAT_S3_ENDPOINT_URL"),
                "region": loc.region,
                "key_prefix": loc.key_prefix or "",
                "credentials": loc.get_s3_credentials(environ),
            }
        return cls(
            id=loc.id,
            site=loc.site.short_name,
            name=loc.name,
            location_type=str(loc.location_type),
            storage_type=storage,
            capacity_bytes=loc.capacity_bytes,
            **kwargs,
        )


def _clean_relative(relative_path: str, label: str) -> str:
    norm = posixpath.normpath(relative_path.replace("\\", "/"))
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or norm in ("", "."):
        raise ConfigurationError(f"path {relative_path!r} at {label} is not a relative path")
    return norm
