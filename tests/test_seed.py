"""The reference topology: validation with file:line errors, and idempotent seeding."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.db import make_engine
from ccat_ops_db.seed import (
    KINDS,
    SeedError,
    SeedReport,
    TopologyError,
    default_topology_path,
    load_topology,
    render_report,
    seed_file,
    seed_topology,
)

DATA = Path(__file__).parent / "data" / "topology"
PACKAGED = default_topology_path()
TABLES = list(m.Base.metadata.sorted_tables)


# --- helpers --------------------------------------------------------------------------------


@pytest.fixture
def engine(migrated_url: str) -> Iterator[Engine]:
    """An engine on a migrated, empty database (PostgreSQL and SQLite)."""
    eng = make_engine(migrated_url)
    yield eng
    eng.dispose()


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    """An engine on a migrated, empty SQLite database (for the cheaper tests)."""
    from ccat_ops_db.migrate import upgrade

    upgrade(sqlite_url)
    eng = make_engine(sqlite_url)
    yield eng
    eng.dispose()


def row_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            t.name: conn.execute(select(func.count()).select_from(t)).scalar_one() for t in TABLES
        }


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (timestamps included), in primary-key order."""
    with engine.connect() as conn:
        return {
            t.name: [tuple(r) for r in conn.execute(select(t).order_by(*t.primary_key.columns))]
            for t in TABLES
        }


class WriteCounter:
    """Counts INSERT / UPDATE / DELETE statements sent to the database."""

    def __init__(self, engine: Engine) -> None:
        self.statements: list[str] = []
        self.engine = engine

    def __enter__(self) -> WriteCounter:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)

    def _record(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper()
        if verb in ("INSERT", "UPDATE", "DELETE"):
            self.statements.append(statement)


def edited_copy(tmp_path: Path, replacements: list[tuple[str, str]], name: str) -> Path:
    """A copy of the packaged topology with each ``old`` (which must occur once) replaced."""
    source = PACKAGED.read_text(encoding="utf-8")
    for old, new in replacements:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    target = tmp_path / name
    target.write_text(source, encoding="utf-8")
    return target


def line_of(path: Path, needle: str, *, exact: bool = False) -> int:
    """1-based number of the only line of ``path`` containing (or, exact, being) ``needle``."""
    hits = [
        i
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if (line.strip() == needle if exact else needle in line)
    ]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


# --- the packaged reference topology ---------------------------------------------------------


def test_packaged_topology_is_valid() -> None:
    assert PACKAGED.name == "topology.yaml"
    assert PACKAGED.parent.name == "data"
    topo = load_topology(PACKAGED)
    assert [s.short_name for s in topo.sites] == ["ccat", "cologne", "us"]
    assert [r.name for r in topo.routes] == [
        "ccat_to_cologne",
        "ccat_to_us",
        "cologne_to_us",
        "us_to_cologne",
    ]
    assert topo.source == str(PACKAGED)
    # line numbers are kept for later errors
    assert topo.line_of(("sites", 1, "locations", 1, "bucket")) == line_of(
        PACKAGED, "bucket: ccat-lta", exact=True
    )


def test_seed_packaged_topology(engine: Engine) -> None:
    report = seed_file(engine, PACKAGED)
    assert report.created == {
        "observatory": 1,
        "telescope": 1,
        "instrument": 2,
        "instrument_module": 6,
        "site": 3,
        "data_location": 8,
        "route": 4,
        "role": 5,
        "observing_program": 5,
        "sub_observing_program": 0,
        "obs_mode": 4,
    }
    assert sum(report.updated.values()) == 0
    assert sum(report.unchanged.values()) == 0
    assert report.changed
    assert report.not_in_file == []
    assert "created site cologne" in report.changes
    assert "created data location cologne/lta" in report.changes

    with Session(engine) as s:
        sites = {x.short_name: x for x in s.scalars(select(m.Site))}
        assert sorted(sites) == ["ccat", "cologne", "us"]
        assert sites["us"].name == "Cornell"
        locs = {(x.site.short_name, x.name): x for x in s.scalars(select(m.DataLocation))}
        assert len(locs) == 8
        lta = locs[("cologne", "lta")]
        assert type(lta) is m.S3DataLocation
        assert (lta.bucket, lta.region, lta.key_prefix) == ("ccat-lta", "eu-west-1", "raw/")
        assert lta.credentials_env_prefix == "CCAT_S3_COLOGNE_LTA"
        assert lta.location_type == m.LocationType.LONG_TERM_ARCHIVE
        buf = locs[("ccat", "buffer")]
        assert type(buf) is m.DiskDataLocation
        assert buf.root_path == "/data/buffer"
        assert buf.capacity_bytes == 200_000_000_000_000
        assert buf.high_watermark_percent == 80
        assert type(locs[("cologne", "ramses")]) is m.DiskDataLocation
        assert locs[("cologne", "ramses")].location_type == m.LocationType.PROCESSING
        assert type(locs[("us", "lta")]) is m.S3DataLocation

        routes = {r.name: r for r in s.scalars(select(m.DataTransferRoute))}
        assert sorted(routes) == ["ccat_to_cologne", "ccat_to_us", "cologne_to_us", "us_to_cologne"]
        relay = routes["ccat_to_us"]
        assert relay.route_type == m.RouteType.RELAY
        assert relay.relay_site is sites["cologne"]
        assert relay.origin_site is sites["ccat"]
        assert relay.destination_site is sites["us"]
        assert relay.method == m.TransferMethod.BBCP
        assert relay.options == {"streams": 8, "window": "8M"}
        assert routes["cologne_to_us"].method == m.TransferMethod.RSYNC
        assert routes["cologne_to_us"].relay_site is None

        instruments = {i.name: i for i in s.scalars(select(m.Instrument))}
        assert sorted(instruments) == ["CHAI", "Prime-Cam"]
        assert instruments["CHAI"].telescope.short_name == "fyst"
        assert instruments["CHAI"].telescope.observatory.name == "CCAT Observatory"
        assert sorted(x.name for x in instruments["CHAI"].modules) == ["HFA", "LFA"]
        assert sorted(x.name for x in instruments["Prime-Cam"].modules) == [
            "280GHz",
            "350GHz",
            "850GHz",
            "EoR-Spec",
        ]
        roles = {r.name: r.scopes for r in s.scalars(select(m.Role))}
        assert roles == {
            "admin": ["admin"],
            "instrument": ["read", "file"],
            "operator": ["read", "file", "operate"],
            "scientist": ["read", "operate"],
            "reader": ["read"],
        }
        assert sorted(p.short_name for p in s.scalars(select(m.ObservingProgram))) == [
            "Cal",
            "DSS",
            "ENG",
            "GEco",
            "WFS",
        ]
        assert s.scalar(select(func.count()).select_from(m.ObsMode)) == 4


def test_seeding_twice_changes_nothing(engine: Engine) -> None:
    seed_file(engine, PACKAGED)
    before = snapshot(engine)
    with WriteCounter(engine) as writes:
        report = seed_file(engine, PACKAGED)
    assert writes.statements == []
    assert sum(report.created.values()) == 0
    assert sum(report.updated.values()) == 0
    assert report.unchanged["data_location"] == 8
    assert report.unchanged["instrument_module"] == 6
    assert report.totals() == (0, 0, 39)
    assert report.changes == []
    assert not report.changed
    after = snapshot(engine)
    assert after == before  # same rows, same ids, every updated_at unchanged
    assert len(after["data_location"]) == 8


def test_changed_file_updates_in_place(engine: Engine, tmp_path: Path) -> None:
    seed_file(engine, PACKAGED)
    with Session(engine) as s:
        ids = {(x.site.short_name, x.name): x.id for x in s.scalars(select(m.DataLocation))}
        route_ids = {r.name: r.id for r in s.scalars(select(m.DataTransferRoute))}
        stamps = {x.id: x.updated_at for x in s.scalars(select(m.DataLocation))}
    edited = edited_copy(
        tmp_path,
        [
            # cologne/buffer: priority 0 -> 5
            (
                "        priority: 0\n        root_path: /data/input",
                "        priority: 5\n        root_path: /data/input",
            ),
            # cologne_to_us: rsync -> bbcp
            (
                "destination: us\n    route_type: direct\n    method: rsync",
                "destination: us\n    route_type: direct\n    method: bbcp",
            ),
            # us/lta: a new bucket (a column of the s3 subtype table only)
            ("bucket: ccat-lta-us", "bucket: ccat-archive-us"),
        ],
        "topology.yaml",
    )
    report = seed_file(engine, edited)
    assert report.updated == {**dict.fromkeys(KINDS, 0), "data_location": 2, "route": 1}
    assert sum(report.created.values()) == 0
    assert report.unchanged["data_location"] == 6
    assert sorted(report.changes) == [
        "updated data location cologne/buffer: priority 0 -> 5",
        "updated data location us/lta: bucket 'ccat-lta-us' -> 'ccat-archive-us'",
        "updated route cologne_to_us: method 'rsync' -> 'bbcp'",
    ]
    with Session(engine) as s:
        now = {(x.site.short_name, x.name): x for x in s.scalars(select(m.DataLocation))}
        assert {k: v.id for k, v in now.items()} == ids  # same rows, updated in place
        assert now[("cologne", "buffer")].priority == 5
        assert now[("us", "lta")].bucket == "ccat-archive-us"
        assert now[("ccat", "buffer")].priority == 0
        route = s.scalars(select(m.DataTransferRoute).filter_by(name="cologne_to_us")).one()
        assert route.id == route_ids["cologne_to_us"]
        assert route.method == m.TransferMethod.BBCP
        # only the changed rows got a new updated_at
        changed = {ids[("cologne", "buffer")], ids[("us", "lta")]}
        for loc in now.values():
            if loc.id in changed:
                assert loc.updated_at > stamps[loc.id]
            else:
                assert loc.updated_at == stamps[loc.id]
    # and the edited file is now idempotent in turn
    assert not seed_file(engine, edited).changed


def test_rows_not_in_file_are_reported_and_kept(sqlite_engine: Engine) -> None:
    seed_file(sqlite_engine, PACKAGED)
    with Session(sqlite_engine) as s, s.begin():
        site = m.Site(name="Old Site", short_name="old")
        s.add(site)
        s.add(m.DiskDataLocation(site=site, name="disk", location_type="buffer", root_path="/x"))
        s.add(m.Role(name="legacy", scopes=["read"]))
    report = seed_file(sqlite_engine, PACKAGED)
    assert not report.changed
    assert report.not_in_file == ["site old", "data location old/disk", "role legacy"]
    assert row_counts(sqlite_engine)["site"] == 4


def test_dry_run_writes_nothing(sqlite_engine: Engine) -> None:
    report = seed_file(sqlite_engine, PACKAGED, dry_run=True)
    assert report.created["site"] == 3
    assert report.changed
    assert set(row_counts(sqlite_engine).values()) == {0}


def test_seed_topology_leaves_the_transaction_to_the_caller(sqlite_engine: Engine) -> None:
    topo = load_topology(DATA / "minimal.yaml")
    with Session(sqlite_engine) as s:
        report = seed_topology(s, topo)
        assert report.created["site"] == 2
        assert s.scalar(select(func.count()).select_from(m.Site)) == 2  # flushed
        s.rollback()
    assert row_counts(sqlite_engine)["site"] == 0


def test_render_report() -> None:
    report = SeedReport()
    report.created["data_location"] = 2
    report.updated["route"] = 1
    report.unchanged["site"] = 3
    console = Console(width=120, record=True)
    console.print(render_report(report))
    rows = {
        cells[0]: cells[1:]
        for line in console.export_text().splitlines()
        if len(cells := [c.strip() for c in re.split("[│┃]", line)[1:-1]]) == 4
    }
    assert rows["kind"] == ["created", "updated", "unchanged"]
    assert rows["data location"] == ["2", "0", "0"]
    assert rows["route"] == ["0", "1", "0"]
    assert rows["site"] == ["0", "0", "3"]
    assert rows["total"] == ["2", "1", "3"]
    assert len(rows) == len(KINDS) + 2


# --- invalid files: file:line: field: problem, and nothing written -------------------------

BAD_FILES = [
    (
        "bad_enum.yaml",
        16,
        "sites[1].locations[0].storage_type",
        "must be one of 'disk', 's3', 'tape' (got 'nfs')",
    ),
    ("bad_unknown_key.yaml", 22, "routes[0].methd", "unknown key 'methd'; did you mean 'method'?"),
    ("bad_missing_root_path.yaml", 7, "sites[0].locations[0].root_path", "required field"),
    ("bad_unknown_site.yaml", 21, "routes[0].destination", "unknown site 'cologne'"),
    (
        "bad_duplicate_site.yaml",
        12,
        "sites[1].short_name",
        "duplicate site short_name 'tel' (first at line 5)",
    ),
    ("bad_syntax.yaml", 10, "sites[0].locations[0]", "invalid YAML: mapping values"),
    ("bad_scope_midway.yaml", 32, "roles[1].scopes[0]", "unknown scope 'write'"),
    (
        "bad_route_option.yaml",
        23,
        "routes[0].options.stream",
        "unknown option 'stream' for bbcp routes; did you mean 'streams'?",
    ),
    (
        "bad_route_option_value.yaml",
        23,
        "routes[0].options.streams",
        "must be a whole number >= 1 (got 'eight')",
    ),
]


@pytest.mark.parametrize(("name", "line", "field", "problem"), BAD_FILES)
def test_invalid_file_names_file_line_and_field(
    name: str, line: int, field: str, problem: str
) -> None:
    path = DATA / name
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), line, field)
    assert problem in err.problem
    assert str(err).startswith(f"{path}:{line}: {field}: ")
    assert len(err.errors) == 1


def test_invalid_files_write_nothing(engine: Engine) -> None:
    for name, line, _, _ in BAD_FILES:
        with pytest.raises(TopologyError, match=rf"{name}:{line}: "):
            seed_file(engine, DATA / name)
    assert set(row_counts(engine).values()) == {0}
    # the fixtures differ from a valid file only in their mistake
    assert seed_file(engine, DATA / "minimal.yaml").created["site"] == 2


def test_several_problems_are_listed_in_file_order() -> None:
    path = DATA / "bad_many.yaml"
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    err = info.value
    assert [(e.line, e.field) for e in err.errors] == [
        (7, "routes[0].method"),
        (11, "sites[0].colour"),
        (13, "sites[0].locations[0].root_path"),
    ]
    assert (err.line, err.field) == (7, "routes[0].method")
    lines = str(err).splitlines()
    assert len(lines) == 3
    assert lines[0] == (
        f"{path}:7: routes[0].method: must be one of 'bbcp', 'rsync', 's3', 'local' (got 'ftp')"
    )
    assert lines[1].startswith(f"{path}:11: sites[0].colour: unknown key 'colour'")
    assert lines[2] == f"{path}:13: sites[0].locations[0].root_path: required field is missing"


def test_missing_file() -> None:
    path = DATA / "no_such_topology.yaml"
    with pytest.raises(TopologyError, match=r"no_such_topology\.yaml: file not found$") as info:
        load_topology(path)
    assert info.value.line is None


MINIMAL = (DATA / "minimal.yaml").read_text()
ROUTES = MINIMAL[MINIMAL.index("routes:") : MINIMAL.index("roles:")]


@pytest.mark.parametrize(
    ("old", "new", "marker", "field", "problem"),
    [
        (
            ROUTES,
            "routes:\n"
            "  - {name: r, origin: tel, destination: arc, method: s3, route_type: relay}\n",
            "route_type: relay",
            "routes[0].relay",
            "required for route_type 'relay'",
        ),
        (
            ROUTES,
            "routes:\n  - {name: r, origin: tel, destination: arc, method: bbcp, relay: tel}\n",
            "relay: tel",
            "routes[0].relay",
            "only a relay route has one",
        ),
        (
            ROUTES,
            "routes:\n  - name: r\n    origin: tel\n    destination: arc\n    method: local\n"
            "    route_type: custom\n    origin_location: buffer\n",
            "  - name: r",
            "routes[0].destination_location",
            "required for route_type 'custom'",
        ),
        (
            ROUTES,
            "routes:\n  - name: r\n    origin: tel\n    destination: arc\n    method: local\n"
            "    route_type: custom\n    origin_location: buffer\n    destination_location: tape\n",
            "destination_location: tape",
            "routes[0].destination_location",
            "site 'arc' has no location 'tape' (its locations: lta)",
        ),
        (
            ROUTES,
            "routes:\n  - {name: r, origin: tel, destination: tel, method: rsync}\n",
            "destination: tel",
            "routes[0].destination",
            "same site as origin",
        ),
        (
            "        bucket: lta\n",
            "        bucket: lta\n      - name: lta  # again\n        location_type: buffer\n"
            "        storage_type: tape\n        library: t1\n",
            "name: lta  # again",
            "sites[1].locations[1].name",
            "duplicate location name at site 'arc' 'lta'",
        ),
        (
            "        bucket: lta\n",
            "        bucket: lta\n      - name: Tape Robot\n        location_type: buffer\n"
            "        storage_type: tape\n        library: t1\n",
            "Tape Robot",
            "sites[1].locations[1].name",
            "must be lowercase letters, digits and underscores",
        ),
        (
            "        bucket: lta\n",
            "        bucket: lta\n        root_path: /lta\n",
            "root_path: /lta",
            "sites[1].locations[0].root_path",
            "it belongs to storage_type 'disk', not 's3'",
        ),
        (
            "        root_path: /data/buffer\n",
            "        root_path: /data/buffer\n        high_watermark_percent: 120\n",
            "high_watermark_percent",
            "sites[0].locations[0].high_watermark_percent",
            "less than or equal to 100",
        ),
        (
            "version: 1\n",
            "version: 2\n",
            "version: 2",
            "version",
            "unsupported version 2",
        ),
    ],
)
def test_cross_reference_checks(
    tmp_path: Path, old: str, new: str, marker: str, field: str, problem: str
) -> None:
    assert MINIMAL.count(old) == 1
    path = tmp_path / "t.yaml"
    path.write_text(MINIMAL.replace(old, new))
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    err = info.value
    assert (err.line, err.field) == (line_of(path, marker), field)
    assert problem in err.problem


# --- changes the database refuses -------------------------------------------------------------


def test_storage_type_change_is_refused(engine: Engine, tmp_path: Path) -> None:
    seed_file(engine, PACKAGED)
    before = snapshot(engine)
    edited = edited_copy(
        tmp_path,
        [
            # an earlier, acceptable change: must not be applied either
            (
                "        priority: 0\n        root_path: /data/input",
                "        priority: 5\n        root_path: /data/input",
            ),
            # a new role: must not be created
            ("  - {name: reader,", "  - {name: auditor, scopes: [read]}\n  - {name: reader,"),
            # cologne/lta: s3 -> disk
            (
                "        storage_type: s3\n        bucket: ccat-lta\n        region: eu-west-1\n"
                "        key_prefix: raw/\n        credentials_env_prefix: CCAT_S3_COLOGNE_LTA\n",
                "        storage_type: disk  # was s3\n        root_path: /archive\n",
            ),
        ],
        "changed.yaml",
    )
    with pytest.raises(SeedError) as info:
        seed_file(engine, edited)
    err = info.value
    assert isinstance(err, TopologyError)
    assert err.line == line_of(edited, "storage_type: disk  # was s3")
    assert err.field == "sites[1].locations[1].storage_type"
    assert "cologne/lta" in err.problem
    assert "'s3'" in err.problem and "'disk'" in err.problem
    assert str(err).startswith(f"{edited}:{err.line}: sites[1].locations[1].storage_type: ")
    assert snapshot(engine) == before


def test_name_taken_by_a_row_not_in_the_file_is_refused(sqlite_engine: Engine) -> None:
    with Session(sqlite_engine) as s, s.begin():
        s.add(m.Site(name="Telescope", short_name="old_tel"))
    before = snapshot(sqlite_engine)
    path = DATA / "minimal.yaml"
    with pytest.raises(
        SeedError, match=r"minimal.yaml:4: sites\[0\]\.name: 'Telescope' is already"
    ):
        seed_file(sqlite_engine, path)
    assert snapshot(sqlite_engine) == before


def test_a_database_error_rolls_everything_back(sqlite_engine: Engine) -> None:
    # A trigger makes the last insert fail: everything before it must be rolled back.
    with sqlite_engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TRIGGER no_modes BEFORE INSERT ON obs_mode "
                "BEGIN SELECT RAISE(ABORT, 'obs modes are frozen'); END"
            )
        )
    with pytest.raises(Exception, match="obs modes are frozen"):
        seed_file(sqlite_engine, DATA / "minimal.yaml")
    assert set(row_counts(sqlite_engine).values()) == {0}


def test_copy_of_packaged_file_seeds_identically(sqlite_engine: Engine, tmp_path: Path) -> None:
    copy = tmp_path / "mine.yaml"
    shutil.copy(PACKAGED, copy)
    seed_file(sqlite_engine, PACKAGED)
    report = seed_file(sqlite_engine, copy)
    assert report.totals() == (0, 0, 39)
