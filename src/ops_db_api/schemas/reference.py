"""Response models of the read-only reference routes: observatory, planning, sites.

Polymorphic tables answer with a discriminated union, so each item carries the fields of its
own subclass: sources on ``source_type``, storage locations on ``storage_type`` and instrument
module configurations on ``config_type``. No model here has a field for a secret: S3 locations
show only the *name prefix* of the environment variables that hold their credentials.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from ccat_ops_db.enums import LocationType, RouteType, SourceType, StorageType, TransferMethod

from .common import ORMModel, Page

# --- observatory hierarchy -------------------------------------------------------------------


class ObservatoryOut(ORMModel):
    """A facility or organisation that operates telescopes."""

    id: int = Field(examples=[1])
    name: str = Field(examples=["CCAT Observatory"])
    description: str | None = Field(
        None, examples=["Fred Young Submillimeter Telescope facility operated by CCAT."]
    )


class TelescopeOut(ORMModel):
    """A physical telescope at a specific place."""

    id: int = Field(examples=[1])
    observatory_id: int = Field(examples=[1])
    name: str = Field(examples=["Fred Young Submillimeter Telescope"])
    short_name: str | None = Field(None, examples=["fyst"])
    description: str | None = Field(None, examples=["6 m crossed-Dragone telescope."])
    latitude_deg: float | None = Field(None, examples=[-22.9856])
    longitude_deg: float | None = Field(None, examples=[-67.7405])
    elevation_m: float | None = Field(None, examples=[5600.0])


class ObservatoryDetail(ObservatoryOut):
    """An observatory with its telescopes."""

    telescopes: list[TelescopeOut]


class InstrumentOut(ORMModel):
    """A scientific instrument mounted on a telescope."""

    id: int = Field(examples=[2])
    telescope_id: int = Field(examples=[1])
    name: str = Field(examples=["CHAI"])
    full_name: str | None = Field(None, examples=["CCAT Heterodyne Array Instrument"])
    instrument_type: str | None = Field(None, examples=["heterodyne"])
    description: str | None = None
    available: bool = Field(
        examples=[True], description="Operational / installed now (false during maintenance)."
    )


class TelescopeDetail(TelescopeOut):
    """A telescope with its instruments."""

    instruments: list[InstrumentOut]


class InstrumentModuleOut(ORMModel):
    """The part of an instrument that produces data; every raw file belongs to one module."""

    id: int = Field(examples=[5])
    instrument_id: int = Field(examples=[2])
    name: str = Field(examples=["LFA"])
    description: str | None = None
    pixels: int | None = Field(None, examples=[64])
    frequency_min_ghz: float | None = Field(None, examples=[455.0])
    frequency_max_ghz: float | None = Field(None, examples=[495.0])
    available: bool = Field(examples=[True])


class InstrumentDetail(InstrumentOut):
    """An instrument with its modules."""

    modules: list[InstrumentModuleOut]


class GenericModuleConfigurationOut(ORMModel):
    """A named set-up of an instrument module (no instrument-specific fields)."""

    id: int = Field(examples=[3])
    instrument_module_id: int = Field(examples=[5])
    name: str = Field(examples=["default"])
    config_type: Literal["generic"] = Field(examples=["generic"])
    parameters: dict[str, Any] | None = Field(None, examples=[{"gain": 1.0}])


class ChaiModuleConfigurationOut(ORMModel):
    """Receiver set-up of a CHAI module (LFA/HFA): LO frequency, sideband, backend."""

    id: int = Field(examples=[4])
    instrument_module_id: int = Field(examples=[5])
    name: str = Field(examples=["CO43_usb"])
    config_type: Literal["chai"] = Field(examples=["chai"])
    parameters: dict[str, Any] | None = Field(None, examples=[{"channels": 16384}])
    lo_frequency_ghz: float | None = Field(None, examples=[461.04])
    sideband: str | None = Field(None, examples=["usb"])
    backend: str | None = Field(None, examples=["FFTS4G"])
    bandwidth_ghz: float | None = Field(None, examples=[4.0])


ModuleConfigurationOut = Annotated[
    GenericModuleConfigurationOut | ChaiModuleConfigurationOut,
    Field(discriminator="config_type"),
]


class InstrumentModuleDetail(InstrumentModuleOut):
    """An instrument module with its configurations (CHAI ones with their receiver fields)."""

    configurations: list[ModuleConfigurationOut]


# --- planning --------------------------------------------------------------------------------


class SubObservingProgramOut(ORMModel):
    """A sub-project of an observing programme."""

    id: int = Field(examples=[3])
    observing_program_id: int = Field(examples=[1])
    name: str = Field(examples=["Milky Way plane, CO(4-3)"])
    short_name: str = Field(examples=["GEco-MW"])
    description: str | None = None


class ObservingProgramOut(ORMModel):
    """A scientific or technical programme."""

    id: int = Field(examples=[1])
    name: str = Field(examples=["Galactic Ecology"])
    short_name: str = Field(examples=["GEco"])
    description: str | None = Field(None, examples=["CHAI Galactic Ecology survey"])
    principal_investigator: str | None = Field(None, examples=["J. Stutzki"])


class ObservingProgramDetail(ObservingProgramOut):
    """An observing programme with its sub-programmes."""

    sub_programs: list[SubObservingProgramOut]


class _SourceBase(ORMModel):
    id: int = Field(examples=[7])
    name: str = Field(examples=["Orion KL"])
    description: str | None = None


class FixedSourceOut(_SourceBase):
    """An object with fixed celestial coordinates."""

    source_type: Literal[SourceType.FIXED] = Field(examples=["fixed_source"])
    ra_deg: float = Field(examples=[83.8221])
    dec_deg: float = Field(examples=[-5.3911])
    frame: str = Field(examples=["icrs"])
    velocity_kms: float | None = Field(None, examples=[9.0])


class SolarSystemObjectOut(_SourceBase):
    """A planet, moon, asteroid or comet, positioned from an ephemeris."""

    source_type: Literal[SourceType.SOLAR_SYSTEM] = Field(examples=["solar_system_object"])
    ephemeris_name: str = Field(examples=["jupiter"])
    naif_id: int | None = Field(None, examples=[599])


class ConstantElevationSourceOut(_SourceBase):
    """A survey region observed at constant elevation."""

    source_type: Literal[SourceType.CONSTANT_ELEVATION] = Field(
        examples=["constant_elevation_source"]
    )
    elevation_deg: float = Field(examples=[45.0])
    ra_min_deg: float | None = Field(None, examples=[10.0])
    ra_max_deg: float | None = Field(None, examples=[50.0])
    dec_min_deg: float | None = Field(None, examples=[-40.0])
    dec_max_deg: float | None = Field(None, examples=[-20.0])


SourceOut = Annotated[
    FixedSourceOut | SolarSystemObjectOut | ConstantElevationSourceOut,
    Field(discriminator="source_type"),
]

SOURCE_MODELS: dict[SourceType, type[ORMModel]] = {
    SourceType.FIXED: FixedSourceOut,
    SourceType.SOLAR_SYSTEM: SolarSystemObjectOut,
    SourceType.CONSTANT_ELEVATION: ConstantElevationSourceOut,
}


class ObsModeOut(ORMModel):
    """An observing strategy."""

    id: int = Field(examples=[1])
    name: str = Field(examples=["otf_map"])
    description: str | None = Field(None, examples=["On-the-fly mapping"])


class ObsUnitOut(ORMModel):
    """A schedulable observation: source + mode + configuration within a programme.

    ``instrument_module_id`` and ``instrument_id`` are derived from the instrument module
    configuration (None without one).
    """

    id: int = Field(examples=[12])
    name: str = Field(examples=["geco_orion_co43_001"])
    obs_unit_type: str = Field(examples=["chai"])
    observing_program_id: int = Field(examples=[1])
    sub_observing_program_id: int | None = Field(None, examples=[3])
    source_id: int = Field(examples=[7])
    obs_mode_id: int | None = Field(None, examples=[1])
    observation_configuration_id: int | None = Field(None, examples=[2])
    instrument_module_configuration_id: int | None = Field(None, examples=[4])
    instrument_module_id: int | None = Field(None, examples=[5])
    instrument_id: int | None = Field(None, examples=[2])
    line_name: str | None = Field(None, examples=["CO43"])
    priority: float | None = Field(None, examples=[1.5])
    requested_duration_s: float | None = Field(None, examples=[1800.0])
    min_elevation_deg: float | None = Field(None, examples=[30.0])
    max_pwv_mm: float | None = Field(None, examples=[0.8])
    active: bool = Field(examples=[True])


# --- sites, locations, routes ----------------------------------------------------------------


class SiteOut(ORMModel):
    """A group of storage locations at one physical or logical place."""

    id: int = Field(examples=[2])
    name: str = Field(examples=["Cologne"])
    short_name: str = Field(examples=["cologne"], description="Used in queue names.")
    location: str | None = Field(None, examples=["University of Cologne, Germany"])
    description: str | None = None
    active: bool = Field(examples=[True])


class _LocationBase(ORMModel):
    id: int = Field(examples=[5])
    site_id: int = Field(examples=[2])
    site_short_name: str = Field(examples=["cologne"])
    name: str = Field(examples=["lta"])
    queue_prefix: str = Field(
        description="`{site_short_name}_{location_name}`: the prefix of this location's queues.",
        examples=["cologne_lta"],
    )
    location_type: LocationType = Field(examples=["long_term_archive"])
    priority: int = Field(
        examples=[0], description="Among locations of one type at a site, lower is used first."
    )
    active: bool = Field(examples=[True])
    description: str | None = None
    capacity_bytes: int | None = Field(None, examples=[300_000_000_000_000])
    high_watermark_percent: float | None = Field(None, examples=[85.0])
    retention_hours: float | None = Field(None, examples=[72.0])


class DiskLocationOut(_LocationBase):
    """File-system storage, local to the worker or reached over ssh (``host`` set)."""

    storage_type: Literal[StorageType.DISK] = Field(examples=["disk"])
    root_path: str = Field(examples=["/data/input"])
    host: str | None = Field(None, examples=["input1.ccat.uni-koeln.de"])


class S3LocationOut(_LocationBase):
    """Object storage. Credentials are never stored or shown: workers read them from the
    environment variables ``<credentials_env_prefix>_ACCESS_KEY_ID`` and
    ``<credentials_env_prefix>_SECRET_ACCESS_KEY``."""

    storage_type: Literal[StorageType.S3] = Field(examples=["s3"])
    bucket: str = Field(examples=["ccat-lta"])
    endpoint_url: str | None = Field(None, examples=["https://s3.example.org"])
    region: str | None = Field(None, examples=["eu-west-1"])
    key_prefix: str = Field(examples=["raw/"])
    credentials_env_prefix: str = Field(
        examples=["CCAT_S3_COLOGNE_LTA"],
        description="Prefix of the credential environment variables (the configured one, or "
        "the default `CCAT_S3_<SITE>_<LOCATION>`).",
    )


class TapeLocationOut(_LocationBase):
    """A tape library, reached through a staging disk."""

    storage_type: Literal[StorageType.TAPE] = Field(examples=["tape"])
    library: str = Field(examples=["cologne-tsm"])
    staging_path: str | None = Field(None, examples=["/data/tape-staging"])


DataLocationOut = Annotated[
    DiskLocationOut | S3LocationOut | TapeLocationOut, Field(discriminator="storage_type")
]

LOCATION_MODELS: dict[StorageType, type[_LocationBase]] = {
    StorageType.DISK: DiskLocationOut,
    StorageType.S3: S3LocationOut,
    StorageType.TAPE: TapeLocationOut,
}


class SiteDetail(SiteOut):
    """A site with its storage locations (in priority order)."""

    locations: list[DataLocationOut]


class RouteOut(ORMModel):
    """How data flows from one site to another.

    A RELAY route passes through ``relay_site``; a CUSTOM route pins its origin and destination
    locations (``site/location``).
    """

    id: int = Field(examples=[2])
    name: str = Field(examples=["ccat_to_us"])
    origin_site_id: int = Field(examples=[1])
    origin_site: str = Field(examples=["ccat"], description="Short name of the origin site.")
    destination_site_id: int = Field(examples=[3])
    destination_site: str = Field(examples=["us"], description="Short name of the destination.")
    relay_site_id: int | None = Field(None, examples=[2])
    relay_site: str | None = Field(None, examples=["cologne"], description="Short name.")
    origin_location_id: int | None = Field(None, examples=[None])
    origin_location: str | None = Field(None, examples=["ccat/buffer"])
    destination_location_id: int | None = Field(None, examples=[None])
    destination_location: str | None = Field(None, examples=["us/buffer"])
    route_type: RouteType = Field(examples=["relay"])
    method: TransferMethod = Field(examples=["bbcp"])
    active: bool = Field(examples=[True])
    options: dict[str, Any] | None = Field(None, examples=[{"streams": 8, "window": "8M"}])


# --- named pages of the unions (readable OpenAPI schema names) -------------------------------


class SourcePage(Page[SourceOut]):
    """One page of sources, each with the fields of its ``source_type``."""


class DataLocationPage(Page[DataLocationOut]):
    """One page of storage locations, each with the fields of its ``storage_type``."""
