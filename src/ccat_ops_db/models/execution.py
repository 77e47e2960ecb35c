"""Observation execution: what the telescope actually observed."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import TYPE_CHECKING, Any

from sqlalchemy import Float, ForeignKey, Index, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ..enums import ExecutionStatus
from .base import Base, TimestampMixin, enum_column, new_uuid

if TYPE_CHECKING:
    from .observatory import Instrument
    from .planning import ObsUnit
    from .raw_data import RawDataFile, RawDataPackage


class ExecutedObsUnit(TimestampMixin, Base):
    """One execution of an obs unit, with timing and conditions.

    The key is a UUID the instrument generates itself, so an execution can be recorded while the
    telescope is cut off from the main database and replayed later without collisions.
    """

    __tablename__ = "executed_obs_unit"
    __table_args__ = (Index(None, "status", "start_time"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_uuid)
    # The API token that created the row (the user is the token's owner).
    created_by_token_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_token.id", ondelete="SET NULL")
    )
    # Decision: nullable, so engineering and test runs without a planned unit can be filed.
    obs_unit_id: Mapped[int | None] = mapped_column(
        ForeignKey("obs_unit.id", ondelete="RESTRICT"), index=True
    )
    instrument_id: Mapped[int | None] = mapped_column(
        ForeignKey("instrument.id", ondelete="RESTRICT"), index=True
    )
    start_time: Mapped[dt.datetime] = mapped_column(index=True)
    end_time: Mapped[dt.datetime | None] = mapped_column()
    status: Mapped[ExecutionStatus] = mapped_column(
        enum_column(ExecutionStatus, "status"), default=ExecutionStatus.RUNNING
    )
    mean_pwv_mm: Mapped[float | None] = mapped_column(Float)
    mean_elevation_deg: Mapped[float | None] = mapped_column(Float)
    # Free-form weather and telescope conditions (ambient temperature, wind, tau, ...).
    conditions: Mapped[dict[str, Any] | None] = mapped_column()
    comment: Mapped[str | None] = mapped_column(Text)

    obs_unit: Mapped[ObsUnit | None] = relationship()
    instrument: Mapped[Instrument | None] = relationship()
    raw_data_files: Mapped[list[RawDataFile]] = relationship(
        back_populates="executed_obs_unit", passive_deletes=True
    )
    raw_data_packages: Mapped[list[RawDataPackage]] = relationship(
        back_populates="executed_obs_unit", passive_deletes=True
    )
