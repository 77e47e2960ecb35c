"""Observation planning: what we want to observe (programs, sources, modes, obs units)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Float, ForeignKey, String, Text, UniqueConstraint, true
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ..enums import SourceType
from .base import Base, TimestampMixin, enum_column

if TYPE_CHECKING:
    from .observatory import InstrumentModuleConfiguration


class ObservingProgram(TimestampMixin, Base):
    """A scientific or technical programme (a survey, GEco, Calibration, Engineering)."""

    __tablename__ = "observing_program"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    short_name: Mapped[str] = mapped_column(String(32), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    principal_investigator: Mapped[str | None] = mapped_column()

    sub_programs: Mapped[list[SubObservingProgram]] = relationship(
        back_populates="observing_program", cascade="all, delete-orphan", passive_deletes=True
    )
    obs_units: Mapped[list[ObsUnit]] = relationship(back_populates="observing_program")


class SubObservingProgram(TimestampMixin, Base):
    """A sub-project of a programme; optional for an obs unit."""

    __tablename__ = "sub_observing_program"
    __table_args__ = (UniqueConstraint("observing_program_id", "short_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    observing_program_id: Mapped[int] = mapped_column(
        ForeignKey("observing_program.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column()
    short_name: Mapped[str] = mapped_column(String(32))
    description: Mapped[str | None] = mapped_column(Text)

    observing_program: Mapped[ObservingProgram] = relationship(back_populates="sub_programs")


class Source(TimestampMixin, Base):
    """Something on the sky (polymorphic on ``source_type``)."""

    __tablename__ = "source"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    source_type: Mapped[SourceType] = mapped_column(enum_column(SourceType, "source_type"))
    description: Mapped[str | None] = mapped_column(Text)

    __mapper_args__ = {"polymorphic_on": "source_type"}


class FixedSource(Source):
    """An object with fixed celestial coordinates (stars, galaxies, nebulae)."""

    __tablename__ = "fixed_source"

    id: Mapped[int] = mapped_column(ForeignKey("source.id", ondelete="CASCADE"), primary_key=True)
    ra_deg: Mapped[float] = mapped_column(Float)
    dec_deg: Mapped[float] = mapped_column(Float)
    frame: Mapped[str] = mapped_column(String(16), default="icrs", server_default="icrs")
    velocity_kms: Mapped[float | None] = mapped_column(Float)

    __mapper_args__ = {"polymorphic_identity": SourceType.FIXED}


class SolarSystemObject(Source):
    """A planet, moon, asteroid or comet, positioned from an ephemeris."""

    __tablename__ = "solar_system_object"

    id: Mapped[int] = mapped_column(ForeignKey("source.id", ondelete="CASCADE"), primary_key=True)
    ephemeris_name: Mapped[str] = mapped_column(String(64))
    naif_id: Mapped[int | None] = mapped_column()

    __mapper_args__ = {"polymorphic_identity": SourceType.SOLAR_SYSTEM}


class ConstantElevationSource(Source):
    """A survey region observed at constant elevation (azimuth scans across a sky patch)."""

    __tablename__ = "constant_elevation_source"

    id: Mapped[int] = mapped_column(ForeignKey("source.id", ondelete="CASCADE"), primary_key=True)
    elevation_deg: Mapped[float] = mapped_column(Float)
    ra_min_deg: Mapped[float | None] = mapped_column(Float)
    ra_max_deg: Mapped[float | None] = mapped_column(Float)
    dec_min_deg: Mapped[float | None] = mapped_column(Float)
    dec_max_deg: Mapped[float | None] = mapped_column(Float)

    __mapper_args__ = {"polymorphic_identity": SourceType.CONSTANT_ELEVATION}


class ObsMode(TimestampMixin, Base):
    """An observing strategy (e.g. on-the-fly map, position switch, constant-elevation scan)."""

    __tablename__ = "obs_mode"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    description: Mapped[str | None] = mapped_column(Text)


class ObservationConfiguration(TimestampMixin, Base):
    """Instrument-independent observation set-up (polymorphic; CHAI adds its own fields)."""

    __tablename__ = "observation_configuration"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    config_type: Mapped[str] = mapped_column(String(32))
    parameters: Mapped[dict[str, Any] | None] = mapped_column()

    __mapper_args__ = {"polymorphic_on": "config_type", "polymorphic_identity": "generic"}


class ObsUnit(TimestampMixin, Base):
    """A schedulable observation: source + mode + configuration within a programme."""

    __tablename__ = "obs_unit"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    obs_unit_type: Mapped[str] = mapped_column(String(32), default="generic")
    observing_program_id: Mapped[int] = mapped_column(
        ForeignKey("observing_program.id", ondelete="RESTRICT"), index=True
    )
    sub_observing_program_id: Mapped[int | None] = mapped_column(
        ForeignKey("sub_observing_program.id", ondelete="SET NULL"), index=True
    )
    source_id: Mapped[int] = mapped_column(ForeignKey("source.id", ondelete="RESTRICT"), index=True)
    obs_mode_id: Mapped[int | None] = mapped_column(
        ForeignKey("obs_mode.id", ondelete="RESTRICT"), index=True
    )
    observation_configuration_id: Mapped[int | None] = mapped_column(
        ForeignKey("observation_configuration.id", ondelete="RESTRICT"), index=True
    )
    instrument_module_configuration_id: Mapped[int | None] = mapped_column(
        ForeignKey("instrument_module_configuration.id", ondelete="RESTRICT"), index=True
    )
    # Spectral line label for heterodyne units (e.g. "CO43"); free text.
    line_name: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[float | None] = mapped_column(Float)
    requested_duration_s: Mapped[float | None] = mapped_column(Float)
    min_elevation_deg: Mapped[float | None] = mapped_column(Float)
    max_pwv_mm: Mapped[float | None] = mapped_column(Float)
    active: Mapped[bool] = mapped_column(default=True, server_default=true())

    observing_program: Mapped[ObservingProgram] = relationship(back_populates="obs_units")
    sub_observing_program: Mapped[SubObservingProgram | None] = relationship()
    source: Mapped[Source] = relationship()
    obs_mode: Mapped[ObsMode | None] = relationship()
    observation_configuration: Mapped[ObservationConfiguration | None] = relationship()
    instrument_module_configuration: Mapped[InstrumentModuleConfiguration | None] = relationship()
