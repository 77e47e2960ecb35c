"""CHAI-specific configuration models (heterodyne array receiver set-ups and mapping patterns)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Float, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .base import Base, TimestampMixin
from .observatory import InstrumentModuleConfiguration
from .planning import ObservationConfiguration


class ChaiModuleConfiguration(InstrumentModuleConfiguration):
    """Receiver set-up of a CHAI module (LFA/HFA): LO frequency, sideband, backend."""

    __tablename__ = "chai_module_configuration"

    id: Mapped[int] = mapped_column(
        ForeignKey("instrument_module_configuration.id", ondelete="CASCADE"), primary_key=True
    )
    lo_frequency_ghz: Mapped[float | None] = mapped_column(Float)
    sideband: Mapped[str | None] = mapped_column(String(8))  # usb, lsb
    backend: Mapped[str | None] = mapped_column(String(64))
    bandwidth_ghz: Mapped[float | None] = mapped_column(Float)

    __mapper_args__ = {"polymorphic_identity": "chai"}


class ChaiInparParameter(TimestampMixin, Base):
    """A named set of CHAI observing-script input parameters (the ``inpar`` files)."""

    __tablename__ = "chai_inpar_parameter"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ChaiTiling(TimestampMixin, Base):
    """A CHAI on-the-fly mapping tiling pattern."""

    __tablename__ = "chai_tiling"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    n_x: Mapped[int | None] = mapped_column()
    n_y: Mapped[int | None] = mapped_column()
    step_arcsec: Mapped[float | None] = mapped_column(Float)
    position_angle_deg: Mapped[float | None] = mapped_column(Float)
    parameters: Mapped[dict[str, Any] | None] = mapped_column()


class ChaiObservationConfiguration(ObservationConfiguration):
    """How a CHAI observation is set up: line, velocity, inpar parameters and tiling."""

    __tablename__ = "chai_observation_configuration"

    id: Mapped[int] = mapped_column(
        ForeignKey("observation_configuration.id", ondelete="CASCADE"), primary_key=True
    )
    line_name: Mapped[str | None] = mapped_column(String(64))
    rest_frequency_ghz: Mapped[float | None] = mapped_column(Float)
    velocity_kms: Mapped[float | None] = mapped_column(Float)
    inpar_parameter_id: Mapped[int | None] = mapped_column(
        ForeignKey("chai_inpar_parameter.id", ondelete="RESTRICT"), index=True
    )
    tiling_id: Mapped[int | None] = mapped_column(
        ForeignKey("chai_tiling.id", ondelete="RESTRICT"), index=True
    )

    inpar_parameter: Mapped[ChaiInparParameter | None] = relationship()
    tiling: Mapped[ChaiTiling | None] = relationship()

    __mapper_args__ = {"polymorphic_identity": "chai"}
