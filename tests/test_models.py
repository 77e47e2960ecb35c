"""Every model can be created, related and queried; polymorphism and constraints hold."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.db import make_engine

from .factories import populate_every_table


@pytest.fixture
def session(migrated_url: str):
    engine = make_engine(migrated_url)
    with Session(engine) as s:
        yield s
    engine.dispose()


def test_graph_round_trips_through_the_database(session: Session) -> None:
    objs = populate_every_table(session)
    session.commit()
    file_id = objs["file"].id
    session.expunge_all()

    f = session.get(m.RawDataFile, file_id)
    assert f is not None
    assert isinstance(f.id, uuid.UUID)
    assert f.instrument_module.instrument.telescope.observatory.name == "CCAT Observatory"
    assert f.raw_data_package.name == "pkg-1"
    assert f.raw_data_package.data_transfer_package.name == "dtp-1"
    assert f.executed_obs_unit.obs_unit.source.name == "Orion-KL"
    assert f.executed_obs_unit.conditions == {"pwv": 0.6}
    assert f.source_location.site.short_name == "ccat"
    assert f.checksum_algorithm is m.ChecksumAlgorithm.SHA256

    pkg = f.raw_data_package
    assert pkg.state is m.PackageState.WAITING and pkg.status is m.Status.PENDING
    assert pkg.package_metadata == {"observation": {"frequency_ghz": 461.0}}
    assert pkg.ivoa_metadata.target_name == "Orion-KL"
    assert [x.name for x in pkg.files] == ["scan1.fits"]
    assert pkg.created_at is not None and pkg.retry_count == 0

    dtp = pkg.data_transfer_package
    (transfer,) = dtp.transfers
    assert transfer.unpack_status is m.Status.PENDING
    assert transfer.route.origin_site.short_name == "ccat"
    assert [log.message for log in transfer.logs] == ["bbcp started"]
    assert transfer.logs[0].log_path == "/l/1.log"

    job = session.scalars(select(m.StagingJob)).one()
    assert [p.name for p in job.raw_data_packages] == ["pkg-1"]
    assert job.requested_by.username == "chai-daq"
    assert job.destination_location.location_type is m.LocationType.PROCESSING

    user = session.scalars(select(m.User)).one()
    assert user.scopes == ["file", "read"]
    (token,) = user.tokens
    assert token.matches(objs["raw_token"]) and token.is_valid()
    assert objs["raw_token"] not in (token.token_hash, token.token_prefix)
    assert objs["raw_token"].startswith(token.token_prefix)


def test_polymorphic_queries_return_subclasses(session: Session) -> None:
    populate_every_table(session)
    session.commit()
    session.expunge_all()

    sources = {s.name: type(s) for s in session.scalars(select(m.Source))}
    assert sources == {
        "Orion-KL": m.FixedSource,
        "Jupiter": m.SolarSystemObject,
        "Deep56": m.ConstantElevationSource,
    }
    locs = {
        (loc.site.short_name, loc.name): type(loc)
        for loc in session.scalars(select(m.DataLocation))
    }
    assert locs[("ccat", "chai_raw_data")] is m.DiskDataLocation
    assert locs[("cologne", "lta")] is m.S3DataLocation
    assert locs[("cologne", "tape")] is m.TapeDataLocation
    copies = sorted(type(c).__name__ for c in session.scalars(select(m.PhysicalCopy)))
    assert copies == [
        "DataTransferPackagePhysicalCopy",
        "RawDataFilePhysicalCopy",
        "RawDataPackagePhysicalCopy",
    ]
    cfgs = {type(c) for c in session.scalars(select(m.InstrumentModuleConfiguration))}
    assert cfgs == {m.InstrumentModuleConfiguration, m.ChaiModuleConfiguration}
    ocfgs = {type(c) for c in session.scalars(select(m.ObservationConfiguration))}
    assert ocfgs == {m.ObservationConfiguration, m.ChaiObservationConfiguration}
    # querying a subclass filters by the discriminator
    assert [c.data_location.name for c in session.scalars(select(m.RawDataFilePhysicalCopy))] == [
        "chai_raw_data"
    ]
    lta = session.scalars(select(m.S3DataLocation)).one()
    assert lta.get_s3_credentials({}) is None
    env = {"CCAT_S3_COLOGNE_LTA_ACCESS_KEY_ID": "k", "CCAT_S3_COLOGNE_LTA_SECRET_ACCESS_KEY": "s"}
    assert lta.get_s3_credentials(env) == ("k", "s")
    assert lta.queue_prefix == "cologne_lta"


def test_enums_are_stored_as_lower_snake_case_values(session: Session) -> None:
    objs = populate_every_table(session)
    objs["package"].state = m.PackageState.ARCHIVED
    objs["transfer"].status = m.Status.IN_PROGRESS
    session.commit()
    row = session.execute(text("SELECT state, status FROM raw_data_package")).one()
    assert tuple(row) == ("archived", "pending")
    assert session.execute(text("SELECT status FROM data_transfer")).scalar() == "in_progress"
    assert (
        session.execute(text("SELECT location_type FROM data_location WHERE name='lta'")).scalar()
        == "long_term_archive"
    )
    for enum_cls in (
        m.LocationType,
        m.StorageType,
        m.RouteType,
        m.Status,
        m.PackageState,
        m.PhysicalCopyStatus,
    ):
        for member in enum_cls:
            assert member.value == member.name.lower()


def test_check_constraint_rejects_unknown_enum_value(session: Session) -> None:
    populate_every_table(session)
    session.commit()
    with pytest.raises(IntegrityError):
        session.execute(text("UPDATE raw_data_package SET state = 'lost'"))
    session.rollback()
    with pytest.raises((StatementError, LookupError)):
        session.execute(
            m.RawDataPackage.__table__.update().values(state="lost")  # type: ignore[attr-defined]
        )


def test_every_operation_status_column_stores_cancelled(session: Session) -> None:
    """Status.CANCELLED (migration 0004) round-trips through every column of the Status enum."""
    populate_every_table(session)
    session.commit()
    columns = [
        (m.DataTransferPackage, "status"),
        (m.DataTransfer, "status"),
        (m.DataTransfer, "unpack_status"),
        (m.RawDataPackage, "status"),
        (m.LongTermArchiveTransfer, "status"),
        (m.StagingJob, "status"),
    ]
    for model, column in columns:
        for obj in session.scalars(select(model)):
            setattr(obj, column, m.Status.CANCELLED)
    session.commit()
    session.expunge_all()
    for model, column in columns:
        table = model.__tablename__
        assert session.execute(text(f"SELECT DISTINCT {column} FROM {table}")).scalars().all() == [
            "cancelled"
        ]
        values = {getattr(obj, column) for obj in session.scalars(select(model))}
        assert values == {m.Status.CANCELLED}, (table, column)


def test_new_operation_records_start_with_claim_count_0(session: Session) -> None:
    """Every operation record (migration 0005) starts unclaimed: claim_count 0, and the transfer's
    unpack_claim_count 0, in the object after a flush and in the database."""
    populate_every_table(session)
    session.flush()
    columns = [
        (m.RawDataPackage, "claim_count"),
        (m.DataTransferPackage, "claim_count"),
        (m.DataTransfer, "claim_count"),
        (m.DataTransfer, "unpack_claim_count"),
        (m.LongTermArchiveTransfer, "claim_count"),
        (m.StagingJob, "claim_count"),
    ]
    for model, column in columns:
        objs = session.scalars(select(model)).all()
        assert objs, model
        assert {getattr(obj, column) for obj in objs} == {0}, (model, column)
        table = model.__tablename__
        stored = session.execute(text(f"SELECT DISTINCT {column} FROM {table}")).scalars().all()
        assert stored == [0], (table, column)


def test_one_copy_of_an_item_per_location(session: Session) -> None:
    objs = populate_every_table(session)
    session.commit()
    session.add(m.RawDataFilePhysicalCopy(raw_data_file=objs["file"], data_location=objs["src"]))
    with pytest.raises(IntegrityError):
        session.flush()
    session.rollback()
    # the same file at another location is fine
    session.add(m.RawDataFilePhysicalCopy(raw_data_file=objs["file"], data_location=objs["buf"]))
    session.commit()


def test_physical_copy_must_reference_exactly_its_item(session: Session) -> None:
    objs = populate_every_table(session)
    session.commit()
    with pytest.raises(IntegrityError):
        session.execute(
            text(
                "INSERT INTO physical_copy (copy_type, data_location_id, status, retry_count,"
                " created_at, updated_at) VALUES ('raw_data_file', :loc, 'present', 0,"
                " CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            ),
            {"loc": objs["buf"].id},
        )


def test_on_delete_rules(session: Session) -> None:
    objs = populate_every_table(session)
    session.commit()
    pkg_id, transfer_id, user_id = objs["package"].id, objs["transfer"].id, objs["user"].id
    site_id = objs["ccat"].id

    # a package that still has files cannot be deleted (RESTRICT)
    with pytest.raises(IntegrityError):
        session.execute(text("DELETE FROM raw_data_package WHERE id = :i"), {"i": pkg_id})
    session.rollback()
    # a site with locations cannot be deleted
    with pytest.raises(IntegrityError):
        session.execute(text("DELETE FROM site WHERE id = :i"), {"i": site_id})
    session.rollback()
    # deleting a transfer deletes its log lines (CASCADE)
    session.execute(text("DELETE FROM data_transfer_log WHERE data_transfer_id = :i"), {"i": 0})
    session.execute(text("DELETE FROM data_transfer WHERE id = :i"), {"i": transfer_id})
    n_logs = session.scalar(
        select(func.count())
        .select_from(m.DataTransferLog)
        .where(m.DataTransferLog.data_transfer_id == transfer_id)
    )
    assert n_logs == 0
    # deleting a user deletes their tokens, and unlinks their staging jobs (SET NULL)
    session.execute(text('DELETE FROM "user" WHERE id = :i'), {"i": user_id})
    assert session.scalar(select(func.count()).select_from(m.ApiToken)) == 0
    assert session.scalar(select(m.StagingJob.requested_by_user_id)) is None
    session.commit()


def test_route_and_location_rules(session: Session) -> None:
    objs = populate_every_table(session)
    session.commit()
    ccat = objs["ccat"]
    session.add(
        m.DataTransferRoute(
            name="bad-relay",
            origin_site=ccat,
            destination_site=session.scalars(
                select(m.Site).where(m.Site.short_name == "cologne")
            ).one(),
            route_type=m.RouteType.RELAY,
            method=m.TransferMethod.BBCP,
        )
    )
    with pytest.raises(IntegrityError):
        session.flush()
    session.rollback()
    session.add(
        m.DataTransferRoute(
            name="loop", origin_site=ccat, destination_site=ccat, method=m.TransferMethod.LOCAL
        )
    )
    with pytest.raises(IntegrityError):
        session.flush()
    session.rollback()
    session.add(
        m.DiskDataLocation(
            name="buffer", site=ccat, location_type=m.LocationType.BUFFER, root_path="/x"
        )
    )
    with pytest.raises(IntegrityError):  # (site, name) is unique
        session.flush()


def test_token_validity_rules(session: Session) -> None:
    objs = populate_every_table(session)
    session.commit()
    token = objs["user"].tokens[0]
    now = dt.datetime.now(dt.UTC)
    assert token.is_valid(now)
    token.expires_at = now - dt.timedelta(seconds=1)
    session.commit()
    session.expire_all()
    assert not token.is_valid()  # works with naive datetimes from SQLite too
    token.expires_at = None
    token.revoked_at = now
    assert not token.is_valid()
    token.revoked_at = None
    objs["user"].active = False
    assert not token.is_valid()
    assert m.scope_allows(["file"], "file")
    assert m.scope_allows(["admin"], "operate")
    assert m.scope_allows(["*"], "file")
    assert not m.scope_allows(["read"], "file")
    assert not m.scope_allows(["read", "file"], "operate")


def test_sessions_run_in_utc_whatever_the_database_default(pg_url: str) -> None:
    """Naive UTC datetimes compared with timestamptz columns are read in the session's time
    zone: a database whose default is Chile's would shift every staleness test by hours."""
    with make_engine(pg_url).connect() as c:
        name = c.execute(text("select current_database()")).scalar()
    admin = make_engine(pg_url, null_pool=True)
    with admin.connect() as c:
        c.execute(text(f"ALTER DATABASE \"{name}\" SET timezone TO 'America/Santiago'"))
        c.commit()
    admin.dispose()
    engine = make_engine(pg_url)
    with engine.connect() as c:
        assert c.execute(text("show timezone")).scalar() == "UTC"
        now = dt.datetime.now(dt.UTC)
        thirty_minutes_ago = now - dt.timedelta(minutes=30)
        five_minutes_ago = (now - dt.timedelta(minutes=5)).replace(tzinfo=None)
        older = c.execute(
            text("select CAST(:t AS timestamptz) < :cutoff"),
            {"t": thirty_minutes_ago, "cutoff": five_minutes_ago},
        ).scalar()
    engine.dispose()
    assert older is True
