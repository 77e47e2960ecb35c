"""Raw data packages (pipeline stage 1): create them from filed files, finalize the built tar,
follow them through the pipeline, and let operators set their lifecycle state.

``status`` is the build operation (pending → completed when the tar is finalized); ``state`` is
the lifecycle operators see (waiting → transferring → archived, or failed).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from sqlalchemy import exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from ccat_ops_db.enums import LocationType, PackageState, PhysicalCopyStatus, Status
from ccat_ops_db.models import (
    DataLocation,
    DataTransfer,
    DataTransferPackage,
    ExecutedObsUnit,
    InstrumentModule,
    LongTermArchiveTransfer,
    PhysicalCopy,
    RawDataFile,
    RawDataPackage,
    RawDataPackagePhysicalCopy,
)

from ..deps import DB, Filer, Operator, Paging, Reader, audit, paginate
from ..errors import ERROR_RESPONSES, ApiError, ErrorBody, conflict, invalid, not_found
from ..filing import same_value
from ..schemas.common import Page
from ..schemas.packages import (
    MAX_FILE_SUMMARIES,
    PackageArchiveRef,
    PackageCopyOut,
    PackageFileSummary,
    PackageTransferRef,
    RawDataPackageCreate,
    RawDataPackageDetail,
    RawDataPackageFinalize,
    RawDataPackageMetadataOut,
    RawDataPackageOut,
    RawDataPackageStateChange,
    RawDataPackageStatusOut,
    TransferPackageRef,
)
from .transfers import location_label

router = APIRouter(prefix="/raw_data_packages", tags=["raw data packages"])

PackageId = Annotated[int, Path(ge=1, le=2**63 - 1, description="Raw data package id.")]
NOT_FOUND = {404: {"model": ErrorBody, "description": "No raw data package with this id"}}
CHUNK = 2000  # ids per IN (...) lookup
CREATE_FIELDS = ("executed_obs_unit_id", "instrument_module_id", "origin_location_id")


def _conflict_items(fields: list[str], msgs: dict[str, str] | None = None) -> list[dict[str, Any]]:
    msgs = msgs or {}
    return [
        {
            "loc": ["body", f],
            "msg": msgs.get(f, "differs from the recorded value"),
            "type": "conflict",
        }
        for f in fields
    ]


def _get(db: Session, package_id: int, *, lock: bool = False) -> RawDataPackage:
    pkg = db.get(RawDataPackage, package_id, with_for_update=lock)
    if pkg is None:
        raise not_found("raw data package", package_id)
    return pkg


# --- create ----------------------------------------------------------------------------------


def _check_references(db: Session, body: RawDataPackageCreate) -> None:
    """422 naming each unknown reference, or an origin location that is not a SOURCE."""
    errors: list[dict[str, Any]] = []
    if db.get(ExecutedObsUnit, body.executed_obs_unit_id) is None:
        errors.append(
            {
                "loc": ["body", "executed_obs_unit_id"],
                "msg": f"executed obs unit {body.executed_obs_unit_id} does not exist",
            }
        )
    if db.get(InstrumentModule, body.instrument_module_id) is None:
        errors.append(
            {
                "loc": ["body", "instrument_module_id"],
                "msg": f"instrument module {body.instrument_module_id} does not exist",
            }
        )
    loc = db.get(DataLocation, body.origin_location_id)
    if loc is None:
        errors.append(
            {
                "loc": ["body", "origin_location_id"],
                "msg": f"data location {body.origin_location_id} does not exist",
            }
        )
    elif loc.location_type != LocationType.SOURCE:
        errors.append(
            {
                "loc": ["body", "origin_location_id"],
                "msg": f"data location {body.origin_location_id} is a "
                f"{loc.location_type.value} location, not a source",
            }
        )
    if errors:
        raise invalid("unknown or unsuitable references", errors)


def _check_duplicates(body: RawDataPackageCreate) -> None:
    seen: dict[uuid.UUID, int] = {}
    errors = []
    for i, fid in enumerate(body.file_ids):
        j = seen.setdefault(fid, i)
        if j != i:
            errors.append(
                {"loc": ["body", "file_ids", i], "msg": f"file {fid} is listed twice (item {j})"}
            )
    if errors:
        raise invalid(f"{len(errors)} duplicate file id(s)", errors)


def _check_files(db: Session, body: RawDataPackageCreate) -> None:
    """Every bad file listed once with its index, id and reasons: 422 when any file does not
    exist or belongs elsewhere, 409 when the only problem is files already packaged."""
    ids = body.file_ids
    rows: dict[uuid.UUID, Any] = {}
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        for row in db.execute(
            select(
                RawDataFile.id,
                RawDataFile.executed_obs_unit_id,
                RawDataFile.instrument_module_id,
                RawDataFile.source_location_id,
                RawDataFile.raw_data_package_id,
            ).where(RawDataFile.id.in_(chunk))
        ):
            rows[row.id] = row
    errors: list[dict[str, Any]] = []
    unacceptable = False
    for i, fid in enumerate(ids):
        row = rows.get(fid)
        loc: list[str | int] = ["body", "file_ids", i]
        if row is None:
            errors.append({"loc": loc, "msg": f"file {fid} does not exist", "file_id": str(fid)})
            unacceptable = True
            continue
        reasons = []
        if row.executed_obs_unit_id != body.executed_obs_unit_id:
            reasons.append(f"belongs to executed obs unit {row.executed_obs_unit_id}")
        if row.instrument_module_id != body.instrument_module_id:
            reasons.append(f"belongs to instrument module {row.instrument_module_id}")
        if row.source_location_id != body.origin_location_id:
            reasons.append(f"was filed at data location {row.source_location_id}")
        unacceptable = unacceptable or bool(reasons)
        kind = "value_error" if reasons else "conflict"
        if row.raw_data_package_id is not None:
            reasons.append(f"is already in raw data package {row.raw_data_package_id}")
        if reasons:
            errors.append(
                {
                    "loc": loc,
                    "msg": f"file {fid} " + "; ".join(reasons),
                    "type": kind,
                    "file_id": str(fid),
                }
            )
    if errors and unacceptable:
        raise invalid(f"{len(errors)} file(s) cannot be packaged", errors)
    if errors:
        raise conflict(f"{len(errors)} file(s) are already packaged", errors)


def _differences(db: Session, pkg: RawDataPackage, body: RawDataPackageCreate) -> None:
    """409 naming each field in which ``body`` differs from the existing package."""
    wanted = body.model_dump()
    diff = [f for f in CREATE_FIELDS if not same_value(getattr(pkg, f), wanted[f])]
    msgs: dict[str, str] = {}
    if body.relative_path is not None and pkg.relative_path != body.relative_path:
        diff.append("relative_path")
    stored = set(
        db.scalars(select(RawDataFile.id).where(RawDataFile.raw_data_package_id == pkg.id))
    )
    asked = set(body.file_ids)
    if stored != asked:
        diff.append("file_ids")
        msgs["file_ids"] = (
            f"{len(asked - stored)} requested file(s) are not in the package and "
            f"{len(stored - asked)} packaged file(s) were not requested"
        )
    if diff:
        raise conflict(
            f"raw data package {pkg.name!r} exists with other values: {', '.join(diff)}",
            _conflict_items(diff, msgs),
        )


@router.post(
    "",
    status_code=201,
    response_model=RawDataPackageOut,
    summary="Create a raw data package from filed files (idempotent on its name)",
    responses={
        **ERROR_RESPONSES,
        200: {"model": RawDataPackageOut, "description": "Exists already with this content"},
        409: {
            "model": ErrorBody,
            "description": "The name exists with other content, or files are already packaged",
        },
    },
)
def create(
    body: RawDataPackageCreate, request: Request, response: Response, db: DB, who: Filer
) -> RawDataPackage:
    """Create a package (state waiting, status pending) and put the files in it.

    Every file must be filed already, be in no package, and belong to the package's executed
    obs unit, instrument module and SOURCE origin location; otherwise the answer lists every
    bad file (422 for unknown or foreign files, 409 for files packaged already). The files are
    assigned with one set-based UPDATE. The same name with the same content again answers 200.
    """
    _check_duplicates(body)
    for attempt in (1, 2):
        existing = db.scalar(select(RawDataPackage).where(RawDataPackage.name == body.name))
        if existing is not None:
            _differences(db, existing, body)
            response.status_code = 200
            return existing
        _check_references(db, body)
        try:
            _check_files(db, body)
        except ApiError as exc:
            if exc.status_code == 409 and attempt == 1:
                db.rollback()
                continue  # perhaps a concurrent create of this very package: look again
            raise
        pkg = RawDataPackage(
            name=body.name,
            relative_path=body.relative_path or body.name,
            executed_obs_unit_id=body.executed_obs_unit_id,
            instrument_module_id=body.instrument_module_id,
            origin_location_id=body.origin_location_id,
            file_count=len(body.file_ids),
            state=PackageState.WAITING,
            status=Status.PENDING,
            created_by_token_id=who.token_id,
        )
        try:
            db.add(pkg)
            db.flush()
            assigned = db.execute(
                update(RawDataFile)
                .where(
                    RawDataFile.id.in_(body.file_ids),
                    RawDataFile.raw_data_package_id.is_(None),
                )
                .values(raw_data_package_id=pkg.id, updated_at=dt.datetime.now(dt.UTC))
                .execution_options(synchronize_session=False)
            ).rowcount
            if assigned != len(body.file_ids):  # another request packaged some meanwhile
                db.rollback()
                if attempt == 2:
                    raise conflict("files were packaged by a concurrent request; try again")
                continue
            audit(
                db,
                who,
                request,
                201,
                "raw_data_package",
                [pkg.id],
                detail=f"{body.name}: {len(body.file_ids)} files",
            )
            db.commit()
        except IntegrityError:  # a concurrent create of the same name: answer as a re-create
            db.rollback()
            if attempt == 2:
                raise
            continue
        return pkg
    raise AssertionError("unreachable")


# --- read ------------------------------------------------------------------------------------


@router.get("", response_model=Page[RawDataPackageOut], responses=ERROR_RESPONSES)
def list_all(
    db: DB,
    _: Reader,
    page: Paging,
    state: PackageState | None = None,
    status: Status | None = None,
    executed_obs_unit_id: uuid.UUID | None = None,
    instrument_module_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    data_transfer_package_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
) -> Page[RawDataPackageOut]:
    """Raw data packages in creation (id) order, filtered."""
    q = select(RawDataPackage)
    if state is not None:
        q = q.where(RawDataPackage.state == state)
    if status is not None:
        q = q.where(RawDataPackage.status == status)
    if executed_obs_unit_id is not None:
        q = q.where(RawDataPackage.executed_obs_unit_id == executed_obs_unit_id)
    if instrument_module_id is not None:
        q = q.where(RawDataPackage.instrument_module_id == instrument_module_id)
    if data_transfer_package_id is not None:
        q = q.where(RawDataPackage.data_transfer_package_id == data_transfer_package_id)
    rows, nxt = paginate(db, q, [RawDataPackage.id], page)
    return Page(
        items=[RawDataPackageOut.model_validate(r) for r in rows],
        next_cursor=nxt,
        limit=page.limit,
    )


@router.get(
    "/{package_id}",
    response_model=RawDataPackageDetail,
    responses={**ERROR_RESPONSES, **NOT_FOUND},
)
def get_one(
    package_id: PackageId,
    db: DB,
    _: Reader,
    file_limit: Annotated[
        int,
        Query(ge=0, le=MAX_FILE_SUMMARIES, description="How many file summaries to include."),
    ] = 100,
) -> RawDataPackageDetail:
    """One package with its first files (by relative path) and its IVOA metadata."""
    pkg = db.scalar(
        select(RawDataPackage)
        .options(selectinload(RawDataPackage.ivoa_metadata))
        .where(RawDataPackage.id == package_id)
    )
    if pkg is None:
        raise not_found("raw data package", package_id)
    files = list(
        db.scalars(
            select(RawDataFile)
            .where(RawDataFile.raw_data_package_id == package_id)
            .order_by(RawDataFile.relative_path, RawDataFile.id)
            .limit(file_limit)
        )
    )
    meta = pkg.ivoa_metadata
    return RawDataPackageDetail.model_validate(
        {
            **RawDataPackageOut.model_validate(pkg).model_dump(),
            "files": [PackageFileSummary.model_validate(f) for f in files],
            "files_truncated": len(files) < pkg.file_count,
            "ivoa_metadata": RawDataPackageMetadataOut.model_validate(meta) if meta else None,
        }
    )


@router.get(
    "/{package_id}/status",
    response_model=RawDataPackageStatusOut,
    responses={**ERROR_RESPONSES, **NOT_FOUND},
)
def package_status(package_id: PackageId, db: DB, _: Reader) -> RawDataPackageStatusOut:
    """Where the package is: state, build status, retries and failure reason, its transfer
    package with that package's transfers, and its long-term archive transfers."""
    pkg = _get(db, package_id)
    dtp_ref = None
    transfers: list[PackageTransferRef] = []
    if pkg.data_transfer_package_id is not None:
        dtp = db.get(DataTransferPackage, pkg.data_transfer_package_id)
        if dtp is not None:
            dtp_ref = TransferPackageRef(id=dtp.id, name=dtp.name, status=dtp.status)
        for t in db.scalars(
            select(DataTransfer)
            .options(
                selectinload(DataTransfer.destination_location).selectinload(DataLocation.site)
            )
            .where(DataTransfer.data_transfer_package_id == pkg.data_transfer_package_id)
            .order_by(DataTransfer.id)
        ):
            transfers.append(
                PackageTransferRef(
                    id=t.id,
                    destination_location=location_label(t.destination_location),
                    status=t.status,
                    unpack_status=t.unpack_status,
                    retry_count=t.retry_count,
                    failure_reason=t.failure_reason,
                    unpack_failure_reason=t.unpack_failure_reason,
                )
            )
    archive = [
        PackageArchiveRef(
            id=a.id,
            destination_location=location_label(a.destination_location),
            status=a.status,
            retry_count=a.retry_count,
            failure_reason=a.failure_reason,
            checksum_verified_at=a.checksum_verified_at,
        )
        for a in db.scalars(
            select(LongTermArchiveTransfer)
            .options(
                selectinload(LongTermArchiveTransfer.destination_location).selectinload(
                    DataLocation.site
                )
            )
            .where(LongTermArchiveTransfer.raw_data_package_id == package_id)
            .order_by(LongTermArchiveTransfer.id)
        )
    ]
    return RawDataPackageStatusOut(
        id=pkg.id,
        name=pkg.name,
        state=pkg.state,
        status=pkg.status,
        retry_count=pkg.retry_count,
        failure_reason=pkg.failure_reason,
        last_failure_at=pkg.last_failure_at,
        next_attempt_at=pkg.next_attempt_at,
        archived_at=pkg.archived_at,
        data_transfer_package=dtp_ref,
        transfers=transfers,
        archive_transfers=archive,
    )


def _copy_out(c: PhysicalCopy) -> PackageCopyOut:
    loc = c.data_location
    return PackageCopyOut(
        id=c.id,
        location_id=loc.id,
        site=loc.site.short_name,
        location=loc.name,
        location_type=loc.location_type,
        status=c.status,
        relative_path=c.relative_path,
        size=c.size,
        checksum=c.checksum,
        checksum_verified_at=c.checksum_verified_at,
        deleted_at=c.deleted_at,
        created_at=c.created_at,
        updated_at=c.updated_at,
    )


@router.get(
    "/{package_id}/physical_copies",
    response_model=Page[PackageCopyOut],
    responses={**ERROR_RESPONSES, **NOT_FOUND},
)
def physical_copies(package_id: PackageId, db: DB, _: Reader, page: Paging) -> Page[PackageCopyOut]:
    """Every copy of the package's tar, deleted ones included, with its location, status and
    when its checksum was last verified there."""
    _get(db, package_id)
    q = (
        select(RawDataPackagePhysicalCopy)
        .options(selectinload(PhysicalCopy.data_location).selectinload(DataLocation.site))
        .where(RawDataPackagePhysicalCopy.raw_data_package_id == package_id)
    )
    rows, nxt = paginate(db, q, [RawDataPackagePhysicalCopy.id], page)
    return Page(items=[_copy_out(c) for c in rows], next_cursor=nxt, limit=page.limit)


# --- finalize --------------------------------------------------------------------------------


@router.put(
    "/{package_id}/finalize",
    response_model=RawDataPackageOut,
    summary="Record the built tar (idempotent)",
    responses={
        **ERROR_RESPONSES,
        **NOT_FOUND,
        409: {"model": ErrorBody, "description": "Finalized before with other values"},
    },
)
def finalize(
    package_id: PackageId,
    body: RawDataPackageFinalize,
    request: Request,
    db: DB,
    who: Filer,
) -> RawDataPackage:
    """Record the tar's size and checksum and where it now is (a SOURCE or BUFFER location of
    the origin's site): status becomes completed and a PRESENT copy is recorded there, with the
    checksum measured while it was written. Finalizing again with the same values answers 200;
    other values answer 409 naming the fields."""
    pkg = _get(db, package_id, lock=True)
    loc = db.get(DataLocation, body.location_id)
    if loc is None:
        raise invalid(
            "unknown location",
            [
                {
                    "loc": ["body", "location_id"],
                    "msg": f"data location {body.location_id} does not exist",
                }
            ],
        )
    if loc.location_type not in (LocationType.SOURCE, LocationType.BUFFER):
        raise invalid(
            "a package is finalized at a SOURCE or BUFFER location",
            [
                {
                    "loc": ["body", "location_id"],
                    "msg": f"data location {body.location_id} is a {loc.location_type.value} "
                    "location, not a source or buffer",
                }
            ],
        )
    origin = db.get(DataLocation, pkg.origin_location_id) if pkg.origin_location_id else None
    if origin is not None and origin.site_id != loc.site_id:
        raise invalid(
            "the tar is built at the origin's site",
            [
                {
                    "loc": ["body", "location_id"],
                    "msg": f"data location {body.location_id} is not at the site of the "
                    f"origin location {origin.id}",
                }
            ],
        )
    first_copy = db.scalar(
        select(RawDataPackagePhysicalCopy)
        .where(RawDataPackagePhysicalCopy.raw_data_package_id == package_id)
        .order_by(RawDataPackagePhysicalCopy.id)
        .limit(1)
    )
    if pkg.status == Status.COMPLETED:
        recorded = {
            "size": pkg.size,
            "checksum": pkg.checksum,
            "checksum_algorithm": pkg.checksum_algorithm,
            "location_id": first_copy.data_location_id if first_copy else None,
            "relative_path": first_copy.relative_path if first_copy else None,
        }
        wanted = body.model_dump()
        diff = [k for k, v in recorded.items() if not same_value(v, wanted[k])]
        if diff:
            raise conflict(
                f"raw data package {package_id} was finalized with other values: {', '.join(diff)}",
                _conflict_items(diff),
            )
        return pkg
    now = dt.datetime.now(dt.UTC)
    copy = db.scalar(
        select(RawDataPackagePhysicalCopy).where(
            RawDataPackagePhysicalCopy.raw_data_package_id == package_id,
            RawDataPackagePhysicalCopy.data_location_id == body.location_id,
        )
    )
    if copy is None:
        copy = RawDataPackagePhysicalCopy(
            raw_data_package_id=package_id, data_location_id=body.location_id
        )
        db.add(copy)
    copy.status = PhysicalCopyStatus.PRESENT
    copy.relative_path = body.relative_path
    copy.size = body.size
    copy.checksum = body.checksum
    copy.checksum_verified_at = now
    copy.deleted_at = None
    pkg.size = body.size
    pkg.checksum = body.checksum
    pkg.checksum_algorithm = body.checksum_algorithm
    pkg.status = Status.COMPLETED
    pkg.next_attempt_at = None
    audit(
        db,
        who,
        request,
        200,
        "raw_data_package",
        [package_id],
        detail=f"finalize at location {body.location_id}",
    )
    db.commit()
    return pkg


# --- lifecycle state -------------------------------------------------------------------------


def _has_verified_lta_copy(db: Session, package_id: int) -> bool:
    return bool(
        db.scalar(
            select(
                exists().where(
                    PhysicalCopy.raw_data_package_id == package_id,
                    PhysicalCopy.status == PhysicalCopyStatus.PRESENT,
                    PhysicalCopy.checksum_verified_at.is_not(None),
                    PhysicalCopy.data_location_id.in_(
                        select(DataLocation.id).where(
                            DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE
                        )
                    ),
                )
            )
        )
    )


def _transition_error(db: Session, pkg: RawDataPackage, new: PackageState) -> str | None:
    """Why ``pkg`` may not go to ``new`` (the rule broken), or None if it may."""
    old = pkg.state
    dtp = pkg.data_transfer_package_id
    if old == PackageState.ARCHIVED:
        return "an archived package stays archived (its verified archive copy is the record)"
    if new == PackageState.ARCHIVED:
        if not _has_verified_lta_copy(db, pkg.id):
            return (
                "a package is archived only with a verified long-term archive copy "
                "(a PRESENT copy at a LONG_TERM_ARCHIVE location with checksum_verified_at "
                "set), and this package has none"
            )
        return None
    if new == PackageState.TRANSFERRING and dtp is None:
        return (
            "a package is transferring only as part of a data transfer package, and this "
            "package is in none"
        )
    if new == PackageState.WAITING and dtp is not None:
        return (
            f"a package in data transfer package {dtp} cannot be waiting "
            "(set it to transferring to retry it)"
        )
    return None


@router.patch(
    "/{package_id}/state",
    response_model=RawDataPackageOut,
    summary="Set a package's lifecycle state (operators)",
    responses={
        **ERROR_RESPONSES,
        **NOT_FOUND,
        409: {"model": ErrorBody, "description": "The transition is not allowed; says which rule"},
    },
)
def set_state(
    package_id: PackageId,
    body: RawDataPackageStateChange,
    request: Request,
    db: DB,
    who: Operator,
) -> RawDataPackage:
    """Move a package to another lifecycle state, with a reason (kept in the audit log).

    Allowed: waiting/transferring → failed (the reason becomes the failure reason); failed →
    waiting or transferring to retry (retry count and failure reason cleared, a failed build
    goes back to pending); transferring → waiting and waiting → transferring when membership
    of a data transfer package agrees (waiting: in none; transferring: in one); any → archived
    only with a verified long-term archive copy. Archived is final. The current state again is
    a no-op (200). Anything else answers 409 naming the rule.
    """
    pkg = _get(db, package_id, lock=True)
    old = pkg.state
    new = body.state
    if old == new:
        return pkg
    why = _transition_error(db, pkg, new)
    if why is not None:
        raise conflict(
            f"raw data package {package_id} cannot go from {old} to {new}: {why}",
            [{"loc": ["body", "state"], "msg": why, "type": "conflict"}],
        )
    now = dt.datetime.now(dt.UTC)
    pkg.state = new
    if new == PackageState.FAILED:
        pkg.failure_reason = body.reason
        pkg.last_failure_at = now
        pkg.next_attempt_at = None
    elif new == PackageState.ARCHIVED:
        pkg.archived_at = pkg.archived_at or now
    elif old == PackageState.FAILED:  # a retry
        pkg.retry_count = 0
        pkg.failure_reason = None
        pkg.next_attempt_at = None
        if new == PackageState.WAITING and pkg.status == Status.FAILED:
            pkg.status = Status.PENDING
    audit(
        db,
        who,
        request,
        200,
        "raw_data_package",
        [package_id],
        detail=f"state {old} -> {new}: {body.reason}"[:2000],
    )
    db.commit()
    return pkg
