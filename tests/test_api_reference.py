"""Read-only reference routes over real HTTP against a real PostgreSQL.

The observatory hierarchy, sites, locations and routes come from the seeded topology; sources,
sub-programmes, module configurations and obs units are not in the topology, so the fixture
inserts a few directly in the database.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.db import make_engine

from .api_server import ApiServer, running_api
from .conftest import PgServer

V1 = "/api/v1"
MISSING = 2_000_000_000  # a valid id that no row has


@pytest.fixture(scope="module")
def api(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    name = pg_server.create_database("ref")
    with running_api(pg_server.url(name), tmp_path_factory.mktemp("ref")) as server:
        yield server
    pg_server.drop_database(name)


@pytest.fixture(scope="module")
def extra(api: ApiServer) -> dict[str, int]:
    """Rows the topology lacks: sources, a sub-programme, configurations, obs units and two
    more storage locations (a tape library and an S3 location without a credentials prefix)."""
    engine = make_engine(api.db_url)
    ids: dict[str, int] = {}
    with Session(engine) as s, s.begin():
        programs = {p.short_name: p for p in s.scalars(select(m.ObservingProgram))}
        modes = {o.name: o for o in s.scalars(select(m.ObsMode))}
        us = s.scalars(select(m.Site).where(m.Site.short_name == "us")).one()
        orion = m.FixedSource(
            name="Orion KL", ra_deg=83.8221, dec_deg=-5.3911, frame="icrs", velocity_kms=9.0
        )
        jupiter = m.SolarSystemObject(name="Jupiter", ephemeris_name="jupiter", naif_id=599)
        field = m.ConstantElevationSource(
            name="WFS field 1",
            elevation_deg=45.0,
            ra_min_deg=10.0,
            ra_max_deg=50.0,
            dec_min_deg=-40.0,
            dec_max_deg=-20.0,
        )
        sub = m.SubObservingProgram(
            observing_program=programs["GEco"], name="Milky Way plane", short_name="GEco-MW"
        )
        chai_cfg = m.ChaiModuleConfiguration(
            instrument_module_id=api.ids["CHAI/LFA"],
            name="CO43_usb",
            parameters={"channels": 16384},
            lo_frequency_ghz=461.04,
            sideband="usb",
            backend="FFTS4G",
            bandwidth_ghz=4.0,
        )
        pc_cfg = m.InstrumentModuleConfiguration(
            instrument_module_id=api.ids["Prime-Cam/280GHz"], name="default", parameters=None
        )
        s.add_all([orion, jupiter, field, sub, chai_cfg, pc_cfg])
        s.flush()
        geco_unit = m.ObsUnit(
            name="geco_orion_co43",
            obs_unit_type="chai",
            observing_program=programs["GEco"],
            sub_observing_program=sub,
            source=orion,
            obs_mode=modes["otf_map"],
            instrument_module_configuration=chai_cfg,
            line_name="CO43",
            priority=1.5,
            requested_duration_s=1800.0,
        )
        wfs_unit = m.ObsUnit(
            name="wfs_field1",
            observing_program=programs["WFS"],
            source=field,
            obs_mode=modes["constant_elevation_scan"],
            instrument_module_configuration=pc_cfg,
            active=False,
        )
        cal_unit = m.ObsUnit(
            name="cal_jupiter",
            observing_program=programs["Cal"],
            source=jupiter,
            obs_mode=modes["calibration"],
        )
        tape = m.TapeDataLocation(
            site=us,
            name="tape",
            location_type=m.LocationType.LONG_TERM_ARCHIVE,
            priority=5,
            active=False,
            library="cornell-tsm",
            staging_path="/data/tape-staging",
        )
        scratch = m.S3DataLocation(
            site=us,
            name="scratch_s3",
            location_type=m.LocationType.PROCESSING,
            priority=-1,
            bucket="ccat-scratch",
            endpoint_url="https://s3.cornell.example",
        )
        s.add_all([geco_unit, wfs_unit, cal_unit, tape, scratch])
        s.flush()
        for key, row in {
            "orion": orion,
            "jupiter": jupiter,
            "field": field,
            "sub": sub,
            "chai_cfg": chai_cfg,
            "pc_cfg": pc_cfg,
            "geco_unit": geco_unit,
            "wfs_unit": wfs_unit,
            "cal_unit": cal_unit,
            "us/tape": tape,
            "us/scratch_s3": scratch,
        }.items():
            ids[key] = row.id
        for key, row in {**programs, **modes}.items():
            ids[key] = row.id
        for site in s.scalars(select(m.Site)):
            ids[f"site:{site.short_name}"] = site.id
        for route in s.scalars(select(m.DataTransferRoute)):
            ids[f"route:{route.name}"] = route.id
        ids["observatory"] = s.scalars(select(m.Observatory.id)).one()
        ids["fyst"] = s.scalars(select(m.Telescope.id)).one()
    engine.dispose()
    return ids


def get(api: ApiServer, path: str, role: str | None = "reader", **params: Any) -> Any:
    """GET ``/api/v1{path}`` and return the parsed JSON of a 200 answer."""
    with api.client(role) as c:
        r = c.get(V1 + path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def items(api: ApiServer, path: str, **params: Any) -> list[dict[str, Any]]:
    """All items of a list route (one large page)."""
    page = get(api, path, limit=1000, **params)
    assert page["next_cursor"] is None
    return page["items"]


def names(api: ApiServer, path: str, key: str = "name", **params: Any) -> list[str]:
    return [x[key] for x in items(api, path, **params)]


LIST_ROUTES = [
    "/observatories",
    "/telescopes",
    "/instruments",
    "/instrument_modules",
    "/observing_programs",
    "/sources",
    "/obs_modes",
    "/obs_units",
    "/sites",
    "/data_locations",
    "/routes",
]


def detail_routes(api: ApiServer, extra: dict[str, int]) -> list[str]:
    return [
        f"/observatories/{extra['observatory']}",
        f"/telescopes/{extra['fyst']}",
        f"/instruments/{api.ids['CHAI']}",
        f"/instrument_modules/{api.ids['CHAI/LFA']}",
        f"/observing_programs/{extra['GEco']}",
        f"/sources/{extra['orion']}",
        f"/obs_modes/{extra['otf_map']}",
        f"/obs_units/{extra['geco_unit']}",
        f"/sites/{extra['site:cologne']}",
        f"/data_locations/{api.ids['cologne/lta']}",
        f"/routes/{extra['route:ccat_to_us']}",
    ]


# --- authentication --------------------------------------------------------------------------


def test_every_route_needs_a_valid_token_and_read_suffices(
    api: ApiServer, extra: dict[str, int]
) -> None:
    paths = LIST_ROUTES + detail_routes(api, extra)
    with api.client(None) as c:
        for path in paths:
            r = c.get(V1 + path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
            assert "detail" in r.json()
            bad = c.get(V1 + path, headers={"Authorization": "Bearer ccat_not-a-real-token"})
            assert bad.status_code == 401, path
    for role, detail in (("expired", "token expired"), ("revoked", "token revoked")):
        with api.client(role) as c:
            for path in paths:
                r = c.get(V1 + path)
                assert r.status_code == 401, (role, path)
                assert r.json()["detail"] == detail
    for role in ("reader", "instrument", "operator", "admin"):
        with api.client(role) as c:
            for path in paths:
                assert c.get(V1 + path).status_code == 200, (role, path)


# --- observatory hierarchy -------------------------------------------------------------------


def test_observatories_and_telescopes(api: ApiServer, extra: dict[str, int]) -> None:
    obs = items(api, "/observatories")
    assert [o["name"] for o in obs] == ["CCAT Observatory"]
    detail = get(api, f"/observatories/{extra['observatory']}")
    assert detail["name"] == "CCAT Observatory"
    assert [t["short_name"] for t in detail["telescopes"]] == ["fyst"]

    tels = items(api, "/telescopes")
    assert len(tels) == 1
    fyst = tels[0]
    assert fyst["name"] == "Fred Young Submillimeter Telescope"
    assert fyst["latitude_deg"] == pytest.approx(-22.9856)
    assert fyst["elevation_m"] == pytest.approx(5600)
    assert fyst["observatory_id"] == extra["observatory"]
    assert items(api, "/telescopes", observatory_id=extra["observatory"]) == tels
    assert items(api, "/telescopes", observatory_id=MISSING) == []
    detail = get(api, f"/telescopes/{extra['fyst']}")
    assert [i["name"] for i in detail["instruments"]] == ["Prime-Cam", "CHAI"]


def test_instruments(api: ApiServer, extra: dict[str, int]) -> None:
    insts = items(api, "/instruments")
    assert [i["name"] for i in insts] == ["Prime-Cam", "CHAI"]
    chai = insts[1]
    assert chai["id"] == api.ids["CHAI"]
    assert chai["full_name"] == "CCAT Heterodyne Array Instrument"
    assert chai["instrument_type"] == "heterodyne"
    assert chai["available"] is True
    assert names(api, "/instruments", available="true") == ["Prime-Cam", "CHAI"]
    assert names(api, "/instruments", available="false") == []
    assert names(api, "/instruments", telescope_id=extra["fyst"]) == ["Prime-Cam", "CHAI"]
    assert names(api, "/instruments", telescope_id=MISSING) == []

    detail = get(api, f"/instruments/{api.ids['CHAI']}")
    assert [(x["name"], x["pixels"]) for x in detail["modules"]] == [("LFA", 64), ("HFA", 64)]
    detail = get(api, f"/instruments/{api.ids['Prime-Cam']}")
    assert [x["name"] for x in detail["modules"]] == ["280GHz", "350GHz", "850GHz", "EoR-Spec"]


def test_instrument_modules(api: ApiServer, extra: dict[str, int]) -> None:
    mods = items(api, "/instrument_modules")
    assert len(mods) == 6
    assert names(api, "/instrument_modules", instrument_id=api.ids["CHAI"]) == ["LFA", "HFA"]
    assert names(api, "/instrument_modules", instrument_id=MISSING) == []
    lfa = next(x for x in mods if x["id"] == api.ids["CHAI/LFA"])
    assert (lfa["frequency_min_ghz"], lfa["frequency_max_ghz"]) == (455, 495)

    detail = get(api, f"/instrument_modules/{api.ids['CHAI/LFA']}")
    assert detail["name"] == "LFA"
    assert detail["instrument_id"] == api.ids["CHAI"]
    [cfg] = detail["configurations"]
    assert cfg == {
        "id": extra["chai_cfg"],
        "instrument_module_id": api.ids["CHAI/LFA"],
        "name": "CO43_usb",
        "config_type": "chai",
        "parameters": {"channels": 16384},
        "lo_frequency_ghz": 461.04,
        "sideband": "usb",
        "backend": "FFTS4G",
        "bandwidth_ghz": 4.0,
    }
    detail = get(api, f"/instrument_modules/{api.ids['Prime-Cam/280GHz']}")
    [cfg] = detail["configurations"]
    assert cfg["config_type"] == "generic"
    assert cfg["name"] == "default"
    assert "lo_frequency_ghz" not in cfg
    assert get(api, f"/instrument_modules/{api.ids['CHAI/HFA']}")["configurations"] == []


# --- planning --------------------------------------------------------------------------------


def test_observing_programs_and_modes(api: ApiServer, extra: dict[str, int]) -> None:
    progs = items(api, "/observing_programs")
    assert [p["short_name"] for p in progs] == ["GEco", "DSS", "WFS", "Cal", "ENG"]
    assert progs[0]["name"] == "Galactic Ecology"
    detail = get(api, f"/observing_programs/{extra['GEco']}")
    assert detail["short_name"] == "GEco"
    assert detail["sub_programs"] == [
        {
            "id": extra["sub"],
            "observing_program_id": extra["GEco"],
            "name": "Milky Way plane",
            "short_name": "GEco-MW",
            "description": None,
        }
    ]
    assert get(api, f"/observing_programs/{extra['ENG']}")["sub_programs"] == []

    modes = names(api, "/obs_modes")
    assert modes == ["otf_map", "constant_elevation_scan", "position_switch", "calibration"]
    mode = get(api, f"/obs_modes/{extra['otf_map']}")
    assert mode == {"id": extra["otf_map"], "name": "otf_map", "description": "On-the-fly mapping"}


def test_sources_are_polymorphic(api: ApiServer, extra: dict[str, int]) -> None:
    srcs = items(api, "/sources")
    assert [s["name"] for s in srcs] == ["Orion KL", "Jupiter", "WFS field 1"]
    orion = get(api, f"/sources/{extra['orion']}")
    assert orion == srcs[0]
    assert orion == {
        "id": extra["orion"],
        "name": "Orion KL",
        "description": None,
        "source_type": "fixed_source",
        "ra_deg": 83.8221,
        "dec_deg": -5.3911,
        "frame": "icrs",
        "velocity_kms": 9.0,
    }
    jupiter = get(api, f"/sources/{extra['jupiter']}")
    assert jupiter["source_type"] == "solar_system_object"
    assert (jupiter["ephemeris_name"], jupiter["naif_id"]) == ("jupiter", 599)
    assert "ra_deg" not in jupiter
    field = get(api, f"/sources/{extra['field']}")
    assert field["source_type"] == "constant_elevation_source"
    assert field["elevation_deg"] == 45.0
    assert (field["ra_min_deg"], field["ra_max_deg"]) == (10.0, 50.0)
    assert (field["dec_min_deg"], field["dec_max_deg"]) == (-40.0, -20.0)

    assert names(api, "/sources", source_type="fixed_source") == ["Orion KL"]
    assert names(api, "/sources", source_type="solar_system_object") == ["Jupiter"]
    assert names(api, "/sources", name="ORION") == ["Orion KL"]
    assert names(api, "/sources", name="i") == ["Orion KL", "Jupiter", "WFS field 1"]
    assert names(api, "/sources", name="i", source_type="constant_elevation_source") == [
        "WFS field 1"
    ]
    assert names(api, "/sources", name="%") == []  # LIKE wildcards are taken literally
    assert names(api, "/sources", name="_") == []


def test_obs_units(api: ApiServer, extra: dict[str, int]) -> None:
    units = items(api, "/obs_units")
    assert [u["name"] for u in units] == ["geco_orion_co43", "wfs_field1", "cal_jupiter"]
    geco = get(api, f"/obs_units/{extra['geco_unit']}")
    assert geco == units[0]
    assert geco == {
        "id": extra["geco_unit"],
        "name": "geco_orion_co43",
        "obs_unit_type": "chai",
        "observing_program_id": extra["GEco"],
        "sub_observing_program_id": extra["sub"],
        "source_id": extra["orion"],
        "obs_mode_id": extra["otf_map"],
        "observation_configuration_id": None,
        "instrument_module_configuration_id": extra["chai_cfg"],
        "instrument_module_id": api.ids["CHAI/LFA"],
        "instrument_id": api.ids["CHAI"],
        "line_name": "CO43",
        "priority": 1.5,
        "requested_duration_s": 1800.0,
        "min_elevation_deg": None,
        "max_pwv_mm": None,
        "active": True,
    }
    cal = get(api, f"/obs_units/{extra['cal_unit']}")
    assert cal["instrument_module_configuration_id"] is None
    assert cal["instrument_id"] is None and cal["instrument_module_id"] is None

    def unit_names(**params: Any) -> list[str]:
        return names(api, "/obs_units", **params)

    assert unit_names(instrument_id=api.ids["CHAI"]) == ["geco_orion_co43"]
    assert unit_names(instrument_id=api.ids["Prime-Cam"]) == ["wfs_field1"]
    assert unit_names(instrument_id=MISSING) == []
    assert unit_names(instrument_module_id=api.ids["CHAI/LFA"]) == ["geco_orion_co43"]
    assert unit_names(instrument_module_id=api.ids["CHAI/HFA"]) == []
    assert unit_names(observing_program_id=extra["Cal"]) == ["cal_jupiter"]
    assert unit_names(source_id=extra["field"]) == ["wfs_field1"]
    assert unit_names(obs_mode_id=extra["otf_map"]) == ["geco_orion_co43"]
    assert unit_names(active="false") == ["wfs_field1"]
    assert unit_names(active="true") == ["geco_orion_co43", "cal_jupiter"]
    assert unit_names(active="true", observing_program_id=extra["WFS"]) == []


# --- sites, locations, routes ----------------------------------------------------------------

SECRET_WORDS = ("secret", "access_key", "password", "token", "credential_value")


def test_sites(api: ApiServer, extra: dict[str, int]) -> None:
    sites = items(api, "/sites")
    assert [(s["short_name"], s["name"]) for s in sites] == [
        ("ccat", "CCAT"),
        ("cologne", "Cologne"),
        ("us", "Cornell"),
    ]
    assert names(api, "/sites", key="short_name", active="true") == ["ccat", "cologne", "us"]
    assert names(api, "/sites", active="false") == []
    cologne = get(api, f"/sites/{extra['site:cologne']}")
    assert cologne["location"] == "University of Cologne, Germany"
    locs = [(x["name"], x["storage_type"], x["queue_prefix"]) for x in cologne["locations"]]
    assert locs == [
        ("buffer", "disk", "cologne_buffer"),
        ("lta", "s3", "cologne_lta"),
        ("ramses", "disk", "cologne_ramses"),
    ]
    us = get(api, f"/sites/{extra['site:us']}")  # lowest priority first
    assert [x["name"] for x in us["locations"]] == ["scratch_s3", "buffer", "lta", "tape"]


def test_data_locations_show_type_fields_and_no_secrets(
    api: ApiServer, extra: dict[str, int]
) -> None:
    locs = items(api, "/data_locations")
    assert len(locs) == 10  # 8 seeded + 2 added by the fixture
    assert [x["id"] for x in locs] == sorted(x["id"] for x in locs)
    for loc in locs:
        assert loc["queue_prefix"] == f"{loc['site_short_name']}_{loc['name']}"
        for key in loc:
            assert not any(word in key for word in SECRET_WORDS), key

    lta = get(api, f"/data_locations/{api.ids['cologne/lta']}")
    assert lta == {
        "id": api.ids["cologne/lta"],
        "site_id": extra["site:cologne"],
        "site_short_name": "cologne",
        "name": "lta",
        "queue_prefix": "cologne_lta",
        "location_type": "long_term_archive",
        "storage_type": "s3",
        "priority": 0,
        "active": True,
        "description": "Long-term archive on S3-compatible object storage",
        "capacity_bytes": None,
        "high_watermark_percent": None,
        "retention_hours": None,
        "bucket": "ccat-lta",
        "endpoint_url": None,
        "region": "eu-west-1",
        "key_prefix": "raw/",
        "credentials_env_prefix": "CCAT_S3_COLOGNE_LTA",
    }
    scratch = get(api, f"/data_locations/{extra['us/scratch_s3']}")
    assert scratch["credentials_env_prefix"] == "CCAT_S3_US_SCRATCH_S3"  # the default
    assert scratch["endpoint_url"] == "https://s3.cornell.example"
    assert scratch["key_prefix"] == ""

    buffer = get(api, f"/data_locations/{api.ids['ccat/buffer']}")
    assert buffer["storage_type"] == "disk"
    assert (buffer["root_path"], buffer["host"]) == ("/data/buffer", None)
    assert buffer["capacity_bytes"] == 200_000_000_000_000
    assert buffer["high_watermark_percent"] == 80
    assert buffer["retention_hours"] == 24
    assert "bucket" not in buffer and "ssh_user" not in buffer

    tape = get(api, f"/data_locations/{extra['us/tape']}")
    assert tape["storage_type"] == "tape"
    assert (tape["library"], tape["staging_path"]) == ("cornell-tsm", "/data/tape-staging")
    assert tape["active"] is False


def test_data_location_filters(api: ApiServer, extra: dict[str, int]) -> None:
    def labels(**params: Any) -> list[str]:
        return [x["queue_prefix"] for x in items(api, "/data_locations", **params)]

    assert labels(site="cologne") == ["cologne_buffer", "cologne_lta", "cologne_ramses"]
    assert labels(site_id=extra["site:cologne"]) == labels(site="cologne")
    assert labels(site="nowhere") == []
    assert labels(site_id=MISSING) == []
    assert labels(location_type="long_term_archive", active="true") == ["cologne_lta", "us_lta"]
    assert labels(location_type="long_term_archive") == ["cologne_lta", "us_lta", "us_tape"]
    assert labels(location_type="source") == ["ccat_primecam_raw_data", "ccat_chai_raw_data"]
    assert labels(storage_type="s3") == ["cologne_lta", "us_lta", "us_scratch_s3"]
    assert labels(storage_type="tape") == ["us_tape"]
    assert len(labels(storage_type="disk")) == 6
    assert labels(active="false") == ["us_tape"]
    assert labels(site="us", storage_type="s3", location_type="processing") == ["us_scratch_s3"]
    assert labels(site="ccat", storage_type="s3") == []


def test_routes(api: ApiServer, extra: dict[str, int]) -> None:
    routes = items(api, "/routes")
    assert [r["name"] for r in routes] == [
        "ccat_to_cologne",
        "ccat_to_us",
        "cologne_to_us",
        "us_to_cologne",
    ]
    relay = get(api, f"/routes/{extra['route:ccat_to_us']}")
    assert relay == routes[1]
    assert relay == {
        "id": extra["route:ccat_to_us"],
        "name": "ccat_to_us",
        "origin_site_id": extra["site:ccat"],
        "origin_site": "ccat",
        "destination_site_id": extra["site:us"],
        "destination_site": "us",
        "relay_site_id": extra["site:cologne"],
        "relay_site": "cologne",
        "origin_location_id": None,
        "origin_location": None,
        "destination_location_id": None,
        "destination_location": None,
        "route_type": "relay",
        "method": "bbcp",
        "active": True,
        "options": {"streams": 8, "window": "8M"},
    }
    direct = get(api, f"/routes/{extra['route:cologne_to_us']}")
    assert (direct["route_type"], direct["method"]) == ("direct", "rsync")
    assert direct["relay_site"] is None and direct["options"] is None

    assert names(api, "/routes", origin="ccat") == ["ccat_to_cologne", "ccat_to_us"]
    assert names(api, "/routes", destination="cologne") == ["ccat_to_cologne", "us_to_cologne"]
    assert names(api, "/routes", origin="ccat", destination="us") == ["ccat_to_us"]
    assert names(api, "/routes", origin_site_id=extra["site:us"]) == ["us_to_cologne"]
    assert names(api, "/routes", destination_site_id=extra["site:us"]) == [
        "ccat_to_us",
        "cologne_to_us",
    ]
    assert names(api, "/routes", route_type="relay") == ["ccat_to_us"]
    assert names(api, "/routes", active="false") == []
    assert names(api, "/routes", origin="nowhere") == []


# --- paging, 404 and 422 ---------------------------------------------------------------------


@pytest.mark.parametrize("path", LIST_ROUTES)
def test_paging_walks_every_item_once(api: ApiServer, path: str) -> None:
    everything = [x["id"] for x in items(api, path)]
    assert everything, path
    seen: list[int] = []
    cursor = None
    with api.client("reader") as c:
        for _ in range(len(everything) + 1):
            params: dict[str, Any] = {"limit": 1}
            if cursor:
                params["cursor"] = cursor
            r = c.get(V1 + path, params=params)
            assert r.status_code == 200, r.text
            page = r.json()
            assert page["limit"] == 1
            assert len(page["items"]) <= 1
            seen += [x["id"] for x in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    assert seen == everything  # every item, once, in id order
    assert seen == sorted(set(seen))


def cursor_of(value: Any) -> str:
    """A cursor in the API's encoding holding ``value``."""
    return base64.urlsafe_b64encode(json.dumps([value]).encode()).decode().rstrip("=")


@pytest.mark.parametrize("path", LIST_ROUTES)
def test_unknown_ids_are_404_and_bad_ids_422(api: ApiServer, path: str) -> None:
    with api.client("reader") as c:
        r = c.get(f"{V1}{path}/{MISSING}")
        assert r.status_code == 404, r.text
        assert str(MISSING) in r.json()["detail"]
        assert r.json()["errors"] == []
        for bad in ("abc", "0", "-1", str(2**31), "1.5", "9" * 40):
            r = c.get(f"{V1}{path}/{bad}")
            assert r.status_code == 422, (path, bad, r.text)
            assert r.json()["errors"][0]["loc"][0] == "path"
        for params in ({"limit": 0}, {"limit": "x"}, {"cursor": "not-a-cursor"}):
            r = c.get(V1 + path, params=params)
            assert r.status_code == 422, (path, params, r.text)
        # well-formed cursors holding something other than an id never reach the database
        for value in ("abc", {"t": "2026-01-01T00:00:00+00:00"}, 1.5, 10**30, -1):
            r = c.get(V1 + path, params={"cursor": cursor_of(value)})
            assert r.status_code == 422, (path, value, r.text)
            assert r.json()["errors"][0]["loc"] == ["query", "cursor"]


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/sites", {"active": "maybe"}),
        ("/telescopes", {"observatory_id": 0}),
        ("/instruments", {"available": "perhaps"}),
        ("/instruments", {"telescope_id": "abc"}),
        ("/instrument_modules", {"instrument_id": 2**31}),
        ("/sources", {"source_type": "nope"}),
        ("/sources", {"name": "x" * 256}),
        ("/sources", {"name": ""}),
        ("/sources", {"name": "a\x00b"}),
        ("/obs_units", {"instrument_id": -3}),
        ("/obs_units", {"observing_program_id": "1e3"}),
        ("/obs_units", {"active": "2"}),
        ("/data_locations", {"location_type": "nope"}),
        ("/data_locations", {"storage_type": "floppy"}),
        ("/data_locations", {"site": "x" * 33}),
        ("/data_locations", {"site_id": 99999999999}),
        ("/routes", {"route_type": "teleport"}),
        ("/routes", {"origin": ""}),
        ("/routes", {"destination_site_id": 0}),
    ],
)
def test_bad_filters_are_422(api: ApiServer, path: str, params: dict[str, Any]) -> None:
    with api.client("reader") as c:
        r = c.get(V1 + path, params=params)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["detail"] == "invalid input"
    assert body["errors"][0]["loc"][:2] == ["query", next(iter(params))]


def test_openapi_documents_the_reference_routes(api: ApiServer) -> None:
    with api.client(None) as c:
        spec = c.get("/openapi.json").json()
    for path in LIST_ROUTES:
        op = spec["paths"][V1 + path]["get"]
        assert op["description"], path
        assert {"401", "403", "422"} <= set(op["responses"]), path
        detail = spec["paths"][f"{V1}{path}/{{{_param(spec, V1 + path)}}}"]["get"]
        assert "404" in detail["responses"], path
    schemas = spec["components"]["schemas"]
    assert "SourcePage" in schemas and "DataLocationPage" in schemas
    s3 = schemas["S3LocationOut"]["properties"]
    assert "credentials_env_prefix" in s3
    assert not any(word in key for key in s3 for word in SECRET_WORDS)


def _param(spec: dict[str, Any], list_path: str) -> str:
    """The name of the id parameter of the detail route under ``list_path``."""
    for path in spec["paths"]:
        if path.startswith(list_path + "/{") and path.endswith("}") and path.count("/") == 4:
            return path[len(list_path) + 2 : -1]
    raise AssertionError(f"no detail route under {list_path}")
