"""Observatory hierarchy: Observatory → Telescope → Instrument → InstrumentModule → configuration.

This part changes rarely; it is loaded from the reference topology (``ccat-ops-db seed``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Float, ForeignKey, String, Text, UniqueConstraint, true
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .base import Base, TimestampMixin

if TYPE_CHECKING:
    from .chai import ChaiModuleConfiguration  # noqa: F401


class Observatory(TimestampMixin, Base):
    """A facility or organisation that operates telescopes (e.g. the CCAT Observatory)."""

    __tablename__ = "observatory"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    description: Mapped[str | None] = mapped_column(Text)

    telescopes: Mapped[list[Telescope]] = relationship(
        back_populates="observatory", cascade="all, delete-orphan", passive_deletes=True
    )


class Telescope(TimestampMixin, Base):
    """A physical telescope at a specific place (e.g. FYST on Cerro Chajnantor)."""

    __tablename__ = "telescope"

    id: Mapped[int] = mapped_column(primary_key=True)
    observatory_id: Mapped[int] = mapped_column(
        ForeignKey("observatory.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(unique=True)
    short_name: Mapped[str | None] = mapped_column(String(32), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    latitude_deg: Mapped[float | None] = mapped_column(Float)
    longitude_deg: Mapped[float | None] = mapped_column(Float)
    elevation_m: Mapped[float | None] = mapped_column(Float)

    observatory: Mapped[Observatory] = relationship(back_populates="telescopes")
    instruments: Mapped[list[Instrument]] = relationship(
        back_populates="telescope", cascade="all, delete-orphan", passive_deletes=True
    )


class Instrument(TimestampMixin, Base):
    """A scientific instrument mounted on a telescope (Prime-Cam, CHAI)."""

    __tablename__ = "instrument"
    __table_args__ = (UniqueConstraint("telescope_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    telescope_id: Mapped[int] = mapped_column(
        ForeignKey("telescope.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(64))
    full_name: Mapped[str | None] = mapped_column()
    instrument_type: Mapped[str | None] = mapped_column(String(32))  # continuum, heterodyne
    description: Mapped[str | None] = mapped_column(Text)
    # Operational / installed now; tracks commissioning and maintenance periods.
    available: Mapped[bool] = mapped_column(default=True, server_default=true())

    telescope: Mapped[Telescope] = relationship(back_populates="instruments")
    modules: Mapped[list[InstrumentModule]] = relationship(
        back_populates="instrument", cascade="all, delete-orphan", passive_deletes=True
    )


class InstrumentModule(TimestampMixin, Base):
    """The part of an instrument that produces data; every raw file belongs to one module."""

    __tablename__ = "instrument_module"
    __table_args__ = (UniqueConstraint("instrument_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    instrument_id: Mapped[int] = mapped_column(
        ForeignKey("instrument.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(Text)
    pixels: Mapped[int | None] = mapped_column()
    frequency_min_ghz: Mapped[float | None] = mapped_column(Float)
    frequency_max_ghz: Mapped[float | None] = mapped_column(Float)
    available: Mapped[bool] = mapped_column(default=True, server_default=true())

    instrument: Mapped[Instrument] = relationship(back_populates="modules")
    configurations: Mapped[list[InstrumentModuleConfiguration]] = relationship(
        back_populates="instrument_module", cascade="all, delete-orphan", passive_deletes=True
    )


class InstrumentModuleConfiguration(TimestampMixin, Base):
    """A named set-up of a module (polymorphic on ``config_type``; CHAI has its own subclass)."""

    __tablename__ = "instrument_module_configuration"
    __table_args__ = (UniqueConstraint("instrument_module_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    instrument_module_id: Mapped[int] = mapped_column(
        ForeignKey("instrument_module.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column()
    config_type: Mapped[str] = mapped_column(String(32))
    parameters: Mapped[dict[str, Any] | None] = mapped_column()

    instrument_module: Mapped[InstrumentModule] = relationship(back_populates="configurations")

    __mapper_args__ = {
        "polymorphic_on": "config_type",
        "polymorphic_identity": "generic",
    }
