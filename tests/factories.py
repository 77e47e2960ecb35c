"""Builds a small, fully connected object graph that puts at least one row in every table."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Collection
from typing import Any

from sqlalchemy.orm import Session

from ccat_ops_db import models as m

T0 = dt.datetime(2026, 5, 1, 3, 0, tzinfo=dt.UTC)


def populate_every_table(session: Session, without: Collection[str] = ()) -> dict[str, Any]:
    """Create one connected example of every model; returns the main objects by name.

    ``without``: tables to leave empty (a table a later revision adds, for a test that works
    at an earlier one)."""
    obs = m.Observatory(name="CCAT Observatory")
    tel = m.Telescope(name="FYST", short_name="fyst", observatory=obs, elevation_m=5600)
    chai = m.Instrument(name="CHAI", telescope=tel, instrument_type="heterodyne")
    lfa = m.InstrumentModule(name="LFA", instrument=chai, pixels=64)
    generic_cfg = m.InstrumentModuleConfiguration(
        name="default", instrument_module=lfa, parameters={"gain": 1}
    )
    chai_cfg = m.ChaiModuleConfiguration(
        name="CO43", instrument_module=lfa, lo_frequency_ghz=461.0, sideband="usb"
    )
    inpar = m.ChaiInparParameter(name="inpar-1", parameters={"t_on": 2.0})
    tiling = m.ChaiTiling(name="tile-3x3", n_x=3, n_y=3, step_arcsec=10)
    obs_cfg = m.ChaiObservationConfiguration(
        name="geco-co43", line_name="CO43", inpar_parameter=inpar, tiling=tiling
    )
    plain_obs_cfg = m.ObservationConfiguration(name="plain", parameters={})
    prog = m.ObservingProgram(name="Galactic Ecology", short_name="GEco")
    sub = m.SubObservingProgram(name="Orion", short_name="orion", observing_program=prog)
    fixed = m.FixedSource(name="Orion-KL", ra_deg=83.81, dec_deg=-5.37)
    planet = m.SolarSystemObject(name="Jupiter", ephemeris_name="jupiter", naif_id=599)
    cel = m.ConstantElevationSource(name="Deep56", elevation_deg=45.0)
    mode = m.ObsMode(name="otf_map")
    unit = m.ObsUnit(
        name="geco-orion-1",
        observing_program=prog,
        sub_observing_program=sub,
        source=fixed,
        obs_mode=mode,
        observation_configuration=obs_cfg,
        instrument_module_configuration=chai_cfg,
        line_name="CO43",
    )
    ccat = m.Site(name="CCAT", short_name="ccat", location="Chile")
    cologne = m.Site(name="Cologne", short_name="cologne", location="Germany")
    src = m.DiskDataLocation(
        name="chai_raw_data",
        site=ccat,
        location_type=m.LocationType.SOURCE,
        root_path="/data/chai",
    )
    buf = m.DiskDataLocation(
        name="buffer", site=ccat, location_type=m.LocationType.BUFFER, root_path="/data/buffer"
    )
    in_buf = m.DiskDataLocation(
        name="buffer", site=cologne, location_type=m.LocationType.BUFFER, root_path="/data/in"
    )
    lta = m.S3DataLocation(
        name="lta", site=cologne, location_type=m.LocationType.LONG_TERM_ARCHIVE, bucket="lta"
    )
    tape = m.TapeDataLocation(
        name="tape", site=cologne, location_type=m.LocationType.LONG_TERM_ARCHIVE, library="t1"
    )
    proc = m.DiskDataLocation(
        name="ramses",
        site=cologne,
        location_type=m.LocationType.PROCESSING,
        root_path="/scratch",
    )
    route = m.DataTransferRoute(
        name="ccat_to_cologne",
        origin_site=ccat,
        destination_site=cologne,
        method=m.TransferMethod.BBCP,
        options={"streams": 4},
    )
    eou = m.ExecutedObsUnit(
        id=uuid.uuid4(), obs_unit=unit, instrument=chai, start_time=T0, conditions={"pwv": 0.6}
    )
    dtp = m.DataTransferPackage(name="dtp-1", relative_path="dtp/dtp-1.tar", origin_location=buf)
    pkg = m.RawDataPackage(
        name="pkg-1",
        relative_path="pkg/pkg-1.tar",
        executed_obs_unit=eou,
        instrument_module=lfa,
        origin_location=src,
        data_transfer_package=dtp,
        package_metadata={"observation": {"frequency_ghz": 461.0}},
    )
    meta = m.RawDataPackageMetadata(raw_data_package=pkg, target_name="Orion-KL")
    f = m.RawDataFile(
        id=uuid.uuid4(),
        name="scan1.fits",
        relative_path="2026/05/01/scan1.fits",
        size=1024,
        checksum="ab" * 32,
        instrument_module=lfa,
        executed_obs_unit=eou,
        source_location=src,
        raw_data_package=pkg,
    )
    file_copy = m.RawDataFilePhysicalCopy(raw_data_file=f, data_location=src)
    pkg_copy = m.RawDataPackagePhysicalCopy(raw_data_package=pkg, data_location=buf)
    dtp_copy = m.DataTransferPackagePhysicalCopy(data_transfer_package=dtp, data_location=buf)
    transfer = m.DataTransfer(
        data_transfer_package=dtp,
        route=route,
        origin_location=buf,
        destination_location=in_buf,
        method=m.TransferMethod.BBCP,
    )
    lta_transfer = m.LongTermArchiveTransfer(
        raw_data_package=pkg, origin_location=in_buf, destination_location=lta
    )
    role = m.Role(name="instrument", scopes=["read", "file"])
    user = m.User(username="chai-daq", roles=[role])
    token, raw = m.ApiToken.issue(user, "daq", ["file"])
    job = m.StagingJob(
        name="reduce-1",
        destination_location=proc,
        origin_location=lta,
        requested_by=user,
        raw_data_packages=[pkg],
    )
    logs = [
        m.DataTransferLog(data_transfer=transfer, message="bbcp started", log_path="/l/1.log"),
        m.DataTransferLog(long_term_archive_transfer=lta_transfer, message="upload done"),
        m.DataTransferLog(staging_job=job, message="staging queued"),
    ]
    session.add_all([obs, generic_cfg, chai_cfg, plain_obs_cfg, planet, cel, tape, proc])
    audit = m.ApiAuditLog(
        method="POST", path="/api/v1/raw_data_files", status_code=201, item_count=1
    )
    session.add(audit)
    if "operator_notice" not in without:
        session.add(
            m.OperatorNotice(
                kind="failed",
                subject="data_transfer:1",
                site="ccat",
                summary="transfer failed for good",
                detail="NetworkError: connection refused (log: /l/1.log)",
                delivered={"webhook": "2026-12-07T19:00:00+00:00"},
            )
        )
    session.add_all([meta, f, file_copy, pkg_copy, dtp_copy, lta_transfer, token, job, *logs])
    session.flush()
    return {
        "raw_token": raw,
        "file": f,
        "package": pkg,
        "dtp": dtp,
        "transfer": transfer,
        "user": user,
        "eou": eou,
        "src": src,
        "buf": buf,
        "lta": lta,
        "ccat": ccat,
    }
