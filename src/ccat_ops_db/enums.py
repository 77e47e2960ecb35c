"""Enumerations shared by the whole data center.

String values are lower snake case and are what the database stores (the columns are
``VARCHAR`` with a ``CHECK`` constraint, not native PostgreSQL enums, so adding a member is a
one-line migration on both PostgreSQL and SQLite).
"""

from __future__ import annotations

import enum


class _StrEnum(enum.StrEnum):
    """A string enum whose ``str()`` is its value."""

    def __str__(self) -> str:
        return self.value


class LocationType(_StrEnum):
    """The role of a storage location in the data transfer system."""

    SOURCE = "source"  # telescope instrument computers: raw files are written here
    BUFFER = "buffer"  # input/transit buffers: aggregation point before/after a site-to-site hop
    LONG_TERM_ARCHIVE = "long_term_archive"  # permanent storage
    PROCESSING = "processing"  # temporary processing areas (e.g. the RAMSES cluster)


class StorageType(_StrEnum):
    """The physical storage medium of a location."""

    DISK = "disk"
    S3 = "s3"
    TAPE = "tape"


class RouteType(_StrEnum):
    """How a transfer route travels between sites."""

    DIRECT = "direct"  # straight to the destination, skipping the destination buffer
    RELAY = "relay"  # through an intermediate site
    CUSTOM = "custom"  # a location-to-location override


class Status(_StrEnum):
    """Uniform processing status of every operation record (packages, transfers, jobs)."""

    PENDING = "pending"  # waiting to be scheduled by a manager
    SCHEDULED = "scheduled"  # a manager submitted a task for it
    IN_PROGRESS = "in_progress"  # a worker is working on it
    COMPLETED = "completed"
    FAILED = "failed"
    # An operator gave the record up (used for data transfers whose destination is gone for
    # good): never scheduled, retried or revived again.
    CANCELLED = "cancelled"


class PackageState(_StrEnum):
    """Lifecycle of a raw data package, as operators see it."""

    WAITING = "waiting"  # exists only in its primary location
    TRANSFERRING = "transferring"  # part of an active data transfer package
    ARCHIVED = "archived"  # stored in a long-term archive with a verified checksum
    FAILED = "failed"  # transfer or archive failed permanently


class PhysicalCopyStatus(_StrEnum):
    """State of one copy of a file or package at one location."""

    PRESENT = "present"
    STAGED = "staged"  # unpacked in a PROCESSING location; the archive itself removed
    DELETION_SCHEDULED = "deletion_scheduled"
    DELETION_IN_PROGRESS = "deletion_in_progress"
    DELETION_POSSIBLE = "deletion_possible"  # raw data files only: parent package copy deleted
    DELETED = "deleted"
    DELETION_FAILED = "deletion_failed"


class TransferMethod(_StrEnum):
    """The mover a route uses. Decision: rsync/ssh and local copies added beside bbcp and S3."""

    BBCP = "bbcp"
    RSYNC = "rsync"
    S3 = "s3"
    LOCAL = "local"


class ExecutionStatus(_StrEnum):
    """Status of an executed observation unit (decision: the docs name none)."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    ABORTED = "aborted"


class SourceType(_StrEnum):
    """Discriminator of the polymorphic :class:`Source`."""

    FIXED = "fixed_source"
    SOLAR_SYSTEM = "solar_system_object"
    CONSTANT_ELEVATION = "constant_elevation_source"


class CopyType(_StrEnum):
    """Discriminator of the polymorphic :class:`PhysicalCopy`."""

    RAW_DATA_FILE = "raw_data_file"
    RAW_DATA_PACKAGE = "raw_data_package"
    DATA_TRANSFER_PACKAGE = "data_transfer_package"


class ChecksumAlgorithm(_StrEnum):
    """Checksum algorithms the data center accepts (all streamable with hashlib/zlib)."""

    SHA256 = "sha256"
    BLAKE2B = "blake2b"
    MD5 = "md5"
    ADLER32 = "adler32"
    #: XXH3, 128-bit (xxHash): a non-cryptographic checksum that hashes at memory speed; the
    #: default for package tars, whose checksums guard transport and storage, not identity.
    XXH3_128 = "xxh3_128"
