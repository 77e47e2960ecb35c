"""Where data can live: sites, their storage locations, and the routes between sites."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ..enums import LocationType, RouteType, StorageType, TransferMethod
from .base import Base, TimestampMixin, enum_column

# Portable approximation of "lower-case identifier" (queue names are built from these).
SHORT_NAME_CHECK = (
    "short_name <> '' AND short_name = lower(short_name) AND short_name NOT LIKE '% %'"
    " AND short_name NOT LIKE '%-%' AND short_name NOT LIKE '%.%'"
)


class Site(TimestampMixin, Base):
    """A group of storage locations at one physical or logical place (ccat, cologne, us)."""

    __tablename__ = "site"
    __table_args__ = (CheckConstraint(SHORT_NAME_CHECK, name="short_name_format"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    # Used in queue names: lower-case identifier.
    short_name: Mapped[str] = mapped_column(String(32), unique=True)
    location: Mapped[str | None] = mapped_column()  # geographic description
    description: Mapped[str | None] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(default=True, server_default=true())

    locations: Mapped[list[DataLocation]] = relationship(
        back_populates="site", order_by="DataLocation.priority", passive_deletes=True
    )


class DataLocation(TimestampMixin, Base):
    """One storage location of a site (polymorphic on ``storage_type``).

    ``name`` appears in queue names (``{site}_{location}_{operation}``); ``priority`` picks
    between several locations of the same type at a site (lower value is used first).
    """

    __tablename__ = "data_location"
    __table_args__ = (
        UniqueConstraint("site_id", "name"),
        CheckConstraint(
            "name <> '' AND name = lower(name) AND name NOT LIKE '% %'"
            " AND name NOT LIKE '%-%' AND name NOT LIKE '%.%'",
            name="name_format",
        ),
        CheckConstraint(
            "high_watermark_percent IS NULL OR "
            "(high_watermark_percent > 0 AND high_watermark_percent <= 100)",
            name="high_watermark_range",
        ),
        Index(None, "location_type", "active", "priority"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("site.id", ondelete="RESTRICT"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    location_type: Mapped[LocationType] = mapped_column(enum_column(LocationType, "location_type"))
    storage_type: Mapped[StorageType] = mapped_column(enum_column(StorageType, "storage_type"))
    priority: Mapped[int] = mapped_column(default=0, server_default="0")
    active: Mapped[bool] = mapped_column(default=True, server_default=true())
    description: Mapped[str | None] = mapped_column(Text)
    # Capacity management for temporary copies (BUFFER, PROCESSING): start deleting eligible
    # copies above this fill level, and keep copies at least this long.
    capacity_bytes: Mapped[int | None] = mapped_column(BigInteger)
    high_watermark_percent: Mapped[float | None] = mapped_column(Float)
    retention_hours: Mapped[float | None] = mapped_column(Float)

    site: Mapped[Site] = relationship(back_populates="locations")

    __mapper_args__ = {"polymorphic_on": "storage_type"}

    @property
    def queue_prefix(self) -> str:
        """``{site_short_name}_{location_name}``: the prefix of this location's queues."""
        return f"{self.site.short_name}_{self.name}"


class DiskDataLocation(DataLocation):
    """File-system storage, local or reached over ssh (``host`` set)."""

    __tablename__ = "disk_data_location"

    id: Mapped[int] = mapped_column(
        ForeignKey("data_location.id", ondelete="CASCADE"), primary_key=True
    )
    host: Mapped[str | None] = mapped_column()  # None: mounted on the worker itself
    root_path: Mapped[str] = mapped_column(String(1024))
    ssh_user: Mapped[str | None] = mapped_column(String(64))

    __mapper_args__ = {"polymorphic_identity": StorageType.DISK}


class S3DataLocation(DataLocation):
    """Object storage. Credentials never live in the database: they are read from environment
    variables named after ``credentials_env_prefix`` (``<PREFIX>_ACCESS_KEY_ID`` and
    ``<PREFIX>_SECRET_ACCESS_KEY``)."""

    __tablename__ = "s3_data_location"

    id: Mapped[int] = mapped_column(
        ForeignKey("data_location.id", ondelete="CASCADE"), primary_key=True
    )
    bucket: Mapped[str] = mapped_column(String(255))
    endpoint_url: Mapped[str | None] = mapped_column(String(1024))
    region: Mapped[str | None] = mapped_column(String(64))
    key_prefix: Mapped[str] = mapped_column(String(512), default="", server_default="")
    credentials_env_prefix: Mapped[str | None] = mapped_column(String(128))

    __mapper_args__ = {"polymorphic_identity": StorageType.S3}

    def get_s3_credentials(self, environ: dict[str, str] | None = None) -> tuple[str, str] | None:
        """Return ``(access_key_id, secret_access_key)`` from the environment, or None."""
        env = os.environ if environ is None else environ
        prefix = self.credentials_env_prefix or (
            f"CCAT_S3_{self.site.short_name}_{self.name}".upper()
        )
        key, secret = env.get(f"{prefix}_ACCESS_KEY_ID"), env.get(f"{prefix}_SECRET_ACCESS_KEY")
        return (key, secret) if key and secret else None


class TapeDataLocation(DataLocation):
    """A tape library, reached through a staging disk."""

    __tablename__ = "tape_data_location"

    id: Mapped[int] = mapped_column(
        ForeignKey("data_location.id", ondelete="CASCADE"), primary_key=True
    )
    library: Mapped[str] = mapped_column()
    staging_path: Mapped[str | None] = mapped_column(String(1024))

    __mapper_args__ = {"polymorphic_identity": StorageType.TAPE}


class DataTransferRoute(TimestampMixin, Base):
    """How data flows from one site to another, with optional location overrides.

    ``origin_location_id`` / ``destination_location_id`` pin a CUSTOM route to specific
    locations; ``relay_site_id`` names the intermediate site of a RELAY route.
    """

    __tablename__ = "data_transfer_route"
    __table_args__ = (
        CheckConstraint("origin_site_id <> destination_site_id", name="distinct_sites"),
        CheckConstraint(
            "route_type <> 'relay' OR relay_site_id IS NOT NULL", name="relay_needs_site"
        ),
        CheckConstraint(
            "route_type <> 'custom' OR "
            "(origin_location_id IS NOT NULL AND destination_location_id IS NOT NULL)",
            name="custom_needs_locations",
        ),
        Index(None, "origin_site_id", "destination_site_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    origin_site_id: Mapped[int] = mapped_column(ForeignKey("site.id", ondelete="RESTRICT"))
    destination_site_id: Mapped[int] = mapped_column(
        ForeignKey("site.id", ondelete="RESTRICT"), index=True
    )
    # RESTRICT: a site or location that a route names cannot disappear under it.
    origin_location_id: Mapped[int | None] = mapped_column(
        ForeignKey("data_location.id", ondelete="RESTRICT"), index=True
    )
    destination_location_id: Mapped[int | None] = mapped_column(
        ForeignKey("data_location.id", ondelete="RESTRICT"), index=True
    )
    relay_site_id: Mapped[int | None] = mapped_column(
        ForeignKey("site.id", ondelete="RESTRICT"), index=True
    )
    route_type: Mapped[RouteType] = mapped_column(
        enum_column(RouteType, "route_type"), default=RouteType.DIRECT
    )
    method: Mapped[TransferMethod] = mapped_column(enum_column(TransferMethod, "method"))
    active: Mapped[bool] = mapped_column(default=True, server_default=true())
    # Mover options (e.g. bbcp streams and window size, rsync bandwidth limit).
    options: Mapped[dict[str, Any] | None] = mapped_column()

    origin_site: Mapped[Site] = relationship(foreign_keys=[origin_site_id])
    destination_site: Mapped[Site] = relationship(foreign_keys=[destination_site_id])
    relay_site: Mapped[Site | None] = relationship(foreign_keys=[relay_site_id])
    origin_location: Mapped[DataLocation | None] = relationship(foreign_keys=[origin_location_id])
    destination_location: Mapped[DataLocation | None] = relationship(
        foreign_keys=[destination_location_id]
    )
