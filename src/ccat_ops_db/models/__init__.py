"""The ops-db models: one module per concept, all importable from here."""

from __future__ import annotations

from ..enums import (
    ChecksumAlgorithm,
    CopyType,
    ExecutionStatus,
    LocationType,
    PackageState,
    PhysicalCopyStatus,
    RouteType,
    SourceType,
    Status,
    StorageType,
    TransferMethod,
)
from .access import ApiAuditLog, ApiToken, Role, User, hash_token, scope_allows, user_role
from .archive import LongTermArchiveTransfer, StagingJob, staging_job_raw_data_package
from .base import Base
from .chai import (
    ChaiInparParameter,
    ChaiModuleConfiguration,
    ChaiObservationConfiguration,
    ChaiTiling,
)
from .execution import ExecutedObsUnit
from .location import (
    DataLocation,
    DataTransferRoute,
    DiskDataLocation,
    S3DataLocation,
    Site,
    TapeDataLocation,
)
from .observatory import (
    Instrument,
    InstrumentModule,
    InstrumentModuleConfiguration,
    Observatory,
    Telescope,
)
from .physical_copy import (
    DataTransferPackagePhysicalCopy,
    PhysicalCopy,
    RawDataFilePhysicalCopy,
    RawDataPackagePhysicalCopy,
)
from .planning import (
    ConstantElevationSource,
    FixedSource,
    ObservationConfiguration,
    ObservingProgram,
    ObsMode,
    ObsUnit,
    SolarSystemObject,
    Source,
    SubObservingProgram,
)
from .raw_data import RawDataFile, RawDataPackage, RawDataPackageMetadata
from .transfer import DataTransfer, DataTransferLog, OperatorNotice
from .transfer_package import DataTransferPackage

__all__ = [
    "ApiAuditLog",
    "ApiToken",
    "Base",
    "ChaiInparParameter",
    "ChaiModuleConfiguration",
    "ChaiObservationConfiguration",
    "ChaiTiling",
    "ChecksumAlgorithm",
    "ConstantElevationSource",
    "CopyType",
    "DataLocation",
    "DataTransfer",
    "DataTransferLog",
    "DataTransferPackage",
    "DataTransferPackagePhysicalCopy",
    "DataTransferRoute",
    "DiskDataLocation",
    "ExecutedObsUnit",
    "ExecutionStatus",
    "FixedSource",
    "Instrument",
    "InstrumentModule",
    "InstrumentModuleConfiguration",
    "LocationType",
    "LongTermArchiveTransfer",
    "ObsMode",
    "ObsUnit",
    "ObservationConfiguration",
    "Observatory",
    "ObservingProgram",
    "OperatorNotice",
    "PackageState",
    "PhysicalCopy",
    "PhysicalCopyStatus",
    "RawDataFile",
    "RawDataFilePhysicalCopy",
    "RawDataPackage",
    "RawDataPackageMetadata",
    "RawDataPackagePhysicalCopy",
    "Role",
    "RouteType",
    "S3DataLocation",
    "Site",
    "SolarSystemObject",
    "Source",
    "SourceType",
    "StagingJob",
    "Status",
    "StorageType",
    "SubObservingProgram",
    "TapeDataLocation",
    "Telescope",
    "TransferMethod",
    "User",
    "hash_token",
    "scope_allows",
    "staging_job_raw_data_package",
    "user_role",
]
