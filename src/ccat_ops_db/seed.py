"""Reference topology: load and validate a topology YAML file, then seed it idempotently.

The topology (``data/topology.yaml`` in the package, or an operator's own copy) describes the
observatory and its instruments, the sites with their storage locations, the transfer routes,
the API roles and the standing observing programmes and modes. :func:`seed_file` loads it into
the operations database:

* the whole file is validated first (structure with pydantic, then cross references); any
  problem raises one :class:`TopologyError` naming ``file:line: field: problem`` for each
  problem found, and nothing is written;
* rows are matched by their natural keys (names, short names), never by database ids: a second
  run of the same file issues no UPDATE at all, and an edited value updates the row in place;
* the file is the reference for every field it defines: a field left out of an entry takes its
  default (``description`` None, ``active`` true, ``priority`` 0 ...);
* nothing is ever deleted: rows the file does not mention are listed in
  :attr:`SeedReport.not_in_file`;
* a location's ``storage_type`` cannot change in place (its subtype row holds data): that is
  refused with a :class:`SeedError`.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    StringConstraints,
    Tag,
    ValidationError,
)
from rich.table import Table
from sqlalchemy import Engine, select
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, with_polymorphic

from . import models as m
from .enums import LocationType, RouteType, StorageType, TransferMethod
from .models.access import KNOWN_SCOPES
from .models.base import utcnow
from .route_options import route_option_problems

#: A path into the YAML document: mapping keys and sequence indexes.
YamlPath = tuple[str | int, ...]

#: The kinds of rows a topology seeds, in seeding order.
KINDS: tuple[str, ...] = (
    "observatory",
    "telescope",
    "instrument",
    "instrument_module",
    "site",
    "data_location",
    "route",
    "role",
    "observing_program",
    "sub_observing_program",
    "obs_mode",
)

# --- errors ---------------------------------------------------------------------------------


def format_path(path: Iterable[str | int]) -> str:
    """``("sites", 1, "locations", 0, "name")`` → ``sites[1].locations[0].name``."""
    out = ""
    for step in path:
        if isinstance(step, int):
            out += f"[{step}]"
        else:
            out += f".{step}" if out else str(step)
    return out


class TopologyError(Exception):
    """A topology file is invalid: ``{file}:{line}: {field path}: {problem}``.

    When a file has several problems one exception carries them all in :attr:`errors` (in file
    order) and its message lists them one per line; ``path``, ``line``, ``field`` and
    ``problem`` are those of the first. A single problem has ``errors == [self]``.
    """

    def __init__(
        self,
        path: str | Path,
        line: int | None,
        field: str,
        problem: str,
        errors: Sequence[TopologyError] | None = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.problem = problem
        self.errors: list[TopologyError] = list(errors) if errors else [self]
        super().__init__("\n".join(e.one_line() for e in self.errors))

    def one_line(self) -> str:
        """This problem alone, as ``file:line: field: problem``."""
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return (
            f"{where}: {self.field}: {self.problem}" if self.field else f"{where}: {self.problem}"
        )

    @classmethod
    def collect(cls, errors: Sequence[TopologyError]) -> TopologyError:
        """One exception listing ``errors`` (at least one), sorted by line."""
        ordered = sorted(errors, key=lambda e: e.line if e.line is not None else 0)
        first = ordered[0]
        if len(ordered) == 1:
            return cls(first.path, first.line, first.field, first.problem)
        return cls(first.path, first.line, first.field, first.problem, errors=ordered)


class SeedError(TopologyError):
    """The file is valid but cannot be applied to this database (e.g. a location's
    ``storage_type`` changed); nothing was changed."""


# --- the file format ------------------------------------------------------------------------

_IDENT = r"^[a-z][a-z0-9_]*$"
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_PATTERN_PROBLEMS = {
    _IDENT: "must be lowercase letters, digits and underscores, starting with a letter "
    "(it is used in queue names)",
    _ENV_NAME: "must be letters, digits and underscores (an environment variable prefix)",
}


Name = Annotated[str, StringConstraints(min_length=1, max_length=255)]
Name64 = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Name32 = Annotated[str, StringConstraints(min_length=1, max_length=32)]
Path1024 = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
Identifier32 = Annotated[str, StringConstraints(max_length=32, pattern=_IDENT)]
Identifier64 = Annotated[str, StringConstraints(max_length=64, pattern=_IDENT)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModuleSpec(_Spec):
    """An instrument module (``observatories[].telescopes[].instruments[].modules[]``)."""

    name: Name64
    description: str | None = None
    pixels: int | None = Field(default=None, ge=0)
    frequency_min_ghz: float | None = Field(default=None, ge=0)
    frequency_max_ghz: float | None = Field(default=None, ge=0)
    available: bool = True


class InstrumentSpec(_Spec):
    """An instrument on a telescope."""

    name: Name64
    full_name: Name | None = None
    instrument_type: Name32 | None = None
    description: str | None = None
    available: bool = True
    modules: list[ModuleSpec] = []


class TelescopeSpec(_Spec):
    """A telescope of an observatory."""

    name: Name
    short_name: Name32 | None = None
    description: str | None = None
    latitude_deg: float | None = Field(default=None, ge=-90, le=90)
    longitude_deg: float | None = Field(default=None, ge=-180, le=360)
    elevation_m: float | None = None
    instruments: list[InstrumentSpec] = []


class ObservatorySpec(_Spec):
    """An observatory (``observatories[]``)."""

    name: Name
    description: str | None = None
    telescopes: list[TelescopeSpec] = []


class _LocationSpec(_Spec):
    name: Identifier64
    location_type: LocationType
    priority: int = 0
    active: bool = True
    description: str | None = None
    capacity_bytes: int | None = Field(default=None, ge=0)
    high_watermark_percent: float | None = Field(default=None, gt=0, le=100)
    retention_hours: float | None = Field(default=None, ge=0)


class DiskLocationSpec(_LocationSpec):
    """``storage_type: disk``: a file system, local or over ssh (``host``)."""

    storage_type: Literal["disk"]
    root_path: Path1024
    host: Name | None = None
    ssh_user: Name64 | None = None


class S3LocationSpec(_LocationSpec):
    """``storage_type: s3``: a bucket; credentials come from the environment only."""

    storage_type: Literal["s3"]
    bucket: Name
    endpoint_url: Path1024 | None = None
    region: Name64 | None = None
    key_prefix: Annotated[str, StringConstraints(max_length=512)] = ""
    credentials_env_prefix: (
        Annotated[str, StringConstraints(max_length=128, pattern=_ENV_NAME)] | None
    ) = None


class TapeLocationSpec(_LocationSpec):
    """``storage_type: tape``: a tape library behind a staging disk."""

    storage_type: Literal["tape"]
    library: Name
    staging_path: Path1024 | None = None


_TAG = "storage_type="  # prefix of the union tags in pydantic error locations
_LOCATION_SPECS: dict[str, type[_LocationSpec]] = {
    "disk": DiskLocationSpec,
    "s3": S3LocationSpec,
    "tape": TapeLocationSpec,
}


def _storage_tag(value: Any) -> str | None:
    raw = value.get("storage_type") if isinstance(value, dict) else None
    if raw is None and not isinstance(value, dict):
        raw = getattr(value, "storage_type", None)
    return None if raw is None else f"{_TAG}{raw}"


LocationSpec = Annotated[
    Annotated[DiskLocationSpec, Tag(f"{_TAG}disk")]
    | Annotated[S3LocationSpec, Tag(f"{_TAG}s3")]
    | Annotated[TapeLocationSpec, Tag(f"{_TAG}tape")],
    Discriminator(_storage_tag),
]


class SiteSpec(_Spec):
    """A site and its storage locations (``sites[]``)."""

    name: Name
    short_name: Identifier32
    location: Name | None = None
    description: str | None = None
    active: bool = True
    locations: list[LocationSpec] = []


class RouteSpec(_Spec):
    """A transfer route between two sites (``routes[]``), by site short names."""

    name: Name
    origin: str
    destination: str
    relay: str | None = None
    origin_location: str | None = None
    destination_location: str | None = None
    route_type: RouteType = RouteType.DIRECT
    method: TransferMethod
    active: bool = True
    options: dict[str, Any] | None = None


class RoleSpec(_Spec):
    """An API role: a named bundle of scopes (``roles[]``)."""

    name: Name64
    description: Name | None = None
    scopes: list[str] = []


class SubProgramSpec(_Spec):
    """A sub-programme of an observing programme."""

    name: Name
    short_name: Name32
    description: str | None = None


class ProgramSpec(_Spec):
    """An observing programme (``observing_programs[]``)."""

    name: Name
    short_name: Name32
    description: str | None = None
    principal_investigator: Name | None = None
    sub_programs: list[SubProgramSpec] = []


class ObsModeSpec(_Spec):
    """An observing mode (``obs_modes[]``)."""

    name: Name
    description: str | None = None


class Topology(_Spec):
    """A validated topology file. :func:`load_topology` also records where it came from and
    the line of every key and list item, so later errors can point into the file."""

    version: Literal[1]
    observatories: list[ObservatorySpec] = []
    sites: list[SiteSpec] = []
    routes: list[RouteSpec] = []
    roles: list[RoleSpec] = []
    observing_programs: list[ProgramSpec] = []
    obs_modes: list[ObsModeSpec] = []

    _source: str = PrivateAttr(default="<topology>")
    _lines: dict[YamlPath, int] = PrivateAttr(default_factory=dict)

    @property
    def source(self) -> str:
        """The file this topology was read from (``<topology>`` if built in code)."""
        return self._source

    def line_of(self, path: YamlPath) -> int | None:
        """Line of the deepest node of ``path`` present in the file (None if unknown)."""
        return _line_for(path, self._lines)

    def error(
        self, path: YamlPath, problem: str, cls: type[TopologyError] = TopologyError
    ) -> TopologyError:
        """A :class:`TopologyError` (or ``cls``) about ``path`` in this topology's file."""
        return cls(self._source, self.line_of(path), format_path(path), problem)

    def check(self) -> list[TopologyError]:
        """Cross-reference checks pydantic cannot make (duplicates, unknown sites ...)."""
        return [self.error(p, problem) for p, problem in _semantic_problems(self)]


# Which list fields hold which entry models (for "unknown key" hints).
_CHILDREN: dict[type[BaseModel], dict[str, type[BaseModel] | None]] = {
    Topology: {
        "observatories": ObservatorySpec,
        "sites": SiteSpec,
        "routes": RouteSpec,
        "roles": RoleSpec,
        "observing_programs": ProgramSpec,
        "obs_modes": ObsModeSpec,
    },
    ObservatorySpec: {"telescopes": TelescopeSpec},
    TelescopeSpec: {"instruments": InstrumentSpec},
    InstrumentSpec: {"modules": ModuleSpec},
    SiteSpec: {"locations": None},  # None: chosen by storage_type
    ProgramSpec: {"sub_programs": SubProgramSpec},
}


# --- YAML with line numbers -----------------------------------------------------------------


def _line_for(path: YamlPath, lines: dict[YamlPath, int]) -> int | None:
    for k in range(len(path), -1, -1):
        line = lines.get(path[:k])
        if line is not None:
            return line
    return None


def _record_lines(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    path: YamlPath,
    lines: dict[YamlPath, int],
    duplicates: list[tuple[YamlPath, str]],
    visited: set[int] | None = None,
) -> None:
    """Record the line of every mapping key and sequence item under ``node``.

    An aliased node is walked once only (at its anchor): recursive aliases and alias "bombs"
    cannot make this loop or explode.
    """
    visited = set() if visited is None else visited
    if id(node) in visited:
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                key_node, yaml.ScalarNode
            ):
                continue
            key = loader.construct_object(key_node)
            if not isinstance(key, str | int):
                key = str(key)
            child = (*path, key)
            if key in seen:
                lines[child] = key_node.start_mark.line + 1
                duplicates.append((child, f"duplicate key {key!r} (the last one would win)"))
            else:
                seen.add(key)
                lines.setdefault(child, key_node.start_mark.line + 1)
            _record_lines(loader, value_node, child, lines, duplicates, visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _record_lines(loader, item, (*path, i), lines, duplicates, visited)


def _path_at_error(text: str) -> YamlPath:
    """The path of the node the parser was in when it hit a syntax error in ``text``."""
    # frames: [is_mapping, key or index, expecting_key]
    stack: list[list[Any]] = []

    def path() -> YamlPath:
        out: list[str | int] = []
        for is_map, pos, expecting_key in stack:
            if is_map and expecting_key:
                break
            if pos is None or pos == -1:
                break
            out.append(pos if isinstance(pos, int | str) else str(pos))
        return tuple(out)

    def value_done() -> None:
        if stack and stack[-1][0]:
            stack[-1][2] = True

    loader = yaml.SafeLoader(text)
    try:
        while loader.check_event():
            event = loader.get_event()
            is_node = isinstance(
                event, yaml.ScalarEvent | yaml.AliasEvent | yaml.CollectionStartEvent
            )
            if is_node and stack:
                top = stack[-1]
                if not top[0]:
                    top[1] += 1
                elif top[2]:  # a key
                    top[1] = event.value if isinstance(event, yaml.ScalarEvent) else "?"
                    top[2] = False
                    if isinstance(event, yaml.CollectionStartEvent):
                        stack.append([isinstance(event, yaml.MappingStartEvent), -1, True])
                    continue
            if isinstance(event, yaml.MappingStartEvent):
                stack.append([True, None, True])
            elif isinstance(event, yaml.SequenceStartEvent):
                stack.append([False, -1, False])
            elif isinstance(event, yaml.CollectionEndEvent):
                if stack:
                    stack.pop()
                value_done()
            elif isinstance(event, yaml.ScalarEvent | yaml.AliasEvent):
                value_done()
    except yaml.YAMLError:
        return path()
    finally:
        loader.dispose()
    return ()


def _parse_yaml(text: str, name: str) -> tuple[Any, dict[YamlPath, int], list[TopologyError]]:
    """Parse ``text`` safely; returns (data, line of every path, duplicate-key errors)."""
    loader = yaml.SafeLoader(text)
    lines: dict[YamlPath, int] = {}
    try:
        root = loader.get_single_node()
        if root is None:
            return None, {(): 1}, []
        lines[()] = root.start_mark.line + 1
        duplicates: list[tuple[YamlPath, str]] = []
        _record_lines(loader, root, (), lines, duplicates)
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if exc.context_mark is not None and "simple key" in (exc.context or ""):
            mark = exc.context_mark  # "could not find ':'" is detected a line too late
        problem = exc.problem or "syntax error"
        if exc.context and exc.context_mark is not None and exc.context_mark is not mark:
            problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
        line = mark.line + 1 if mark else None
        on_line = [p for p, n in lines.items() if n == line]
        # composed fine (e.g. an unknown tag): the deepest node on that line; else the parser's
        where = format_path(max(on_line, key=len) if on_line else _path_at_error(text))
        raise TopologyError(name, line, where, f"invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise TopologyError(name, None, "", f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    errors = [
        TopologyError(name, _line_for(p, lines), format_path(p), problem)
        for p, problem in duplicates
    ]
    return data, lines, errors


# --- pydantic errors → file:line: field: problem --------------------------------------------


def _got(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _yaml_path(loc: tuple[Any, ...]) -> YamlPath:
    """A pydantic ``loc`` without union tags and dict-key markers."""
    return tuple(
        step
        for step in loc
        if not (isinstance(step, str) and (step.startswith(_TAG) or step == "[key]"))
    )


def _model_at(path: YamlPath, data: Any) -> type[BaseModel] | None:
    """The spec model of the mapping at ``path`` (which alternates list names and indexes)."""
    cls: type[BaseModel] = Topology
    cur = data
    if len(path) % 2:
        return None
    for name, index in zip(path[::2], path[1::2], strict=True):
        children = _CHILDREN.get(cls, {})
        if name not in children or not isinstance(index, int):
            return None
        cur = cur.get(name) if isinstance(cur, dict) else None
        cur = cur[index] if isinstance(cur, list) and 0 <= index < len(cur) else None
        child = children[name]
        if child is None:
            storage = cur.get("storage_type") if isinstance(cur, dict) else None
            child = _LOCATION_SPECS.get(str(storage), _LocationSpec)
        cls = child
    return cls


def _unknown_key_problem(path: YamlPath, data: Any) -> str:
    key = path[-1]
    problem = f"unknown key {key!r}"
    cls = _model_at(path[:-1], data)
    if cls is None:
        return problem
    allowed = [f for f in cls.model_fields if f != "storage_type"]
    if issubclass(cls, _LocationSpec):
        allowed.insert(2, "storage_type")
        others = [s for s, c in _LOCATION_SPECS.items() if c is not cls and key in c.model_fields]
        if others and cls is not _LocationSpec:
            storage = next(s for s, c in _LOCATION_SPECS.items() if c is cls)
            return f"{problem}: it belongs to storage_type {others[0]!r}, not {storage!r}"
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{problem}{hint} (allowed: {', '.join(allowed)})"


def _pydantic_problem(err: Any, data: Any) -> tuple[YamlPath, str]:
    kind = err["type"]
    path = _yaml_path(tuple(err["loc"]))
    value = err.get("input")
    ctx = err.get("ctx") or {}
    storage_choices = ", ".join(repr(s.value) for s in StorageType)
    if kind == "missing":
        return path, "required field is missing"
    if kind == "extra_forbidden":
        return path, _unknown_key_problem(path, data)
    if kind == "union_tag_invalid":
        got = value.get("storage_type") if isinstance(value, dict) else value
        return (*path, "storage_type"), f"must be one of {storage_choices} (got {_got(got)})"
    if kind == "union_tag_not_found":
        if isinstance(value, dict):
            return (*path, "storage_type"), (
                f"required field is missing (one of {storage_choices})"
            )
        return path, f"must be a mapping (got {_got(value)})"
    if kind == "enum":
        expected = str(ctx.get("expected", "")).replace(" or ", ", ")
        return path, f"must be one of {expected} (got {_got(value)})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return path, f"must be a mapping (got {_got(value)})"
    if kind == "list_type":
        return path, f"must be a list (got {_got(value)})"
    if kind == "string_type":
        hint = "; quote it" if isinstance(value, int | float | bool) else ""
        return path, f"must be a string (got {_got(value)}{hint})"
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern"))
        problem = _PATTERN_PROBLEMS.get(pattern, f"must match {pattern}")
        return path, f"{problem} (got {_got(value)})"
    if kind == "string_too_long":
        return path, f"must be at most {ctx.get('max_length')} characters (got {len(value)})"
    if kind == "string_too_short":
        return path, "must not be empty"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return path, f"must be an integer (got {_got(value)})"
    if kind in ("float_type", "float_parsing"):
        return path, f"must be a number (got {_got(value)})"
    if kind in ("bool_type", "bool_parsing"):
        return path, f"must be true or false (got {_got(value)})"
    if kind == "literal_error" and path == ("version",):
        return path, f"unsupported version {_got(value)} (this program reads version 1)"
    msg = str(err.get("msg", kind)).replace("Input should be", "must be")
    msg = msg.removeprefix("Value error, ")
    return path, f"{msg} (got {_got(value)})"


# --- cross-reference checks -----------------------------------------------------------------


def _semantic_problems(t: Topology) -> list[tuple[YamlPath, str]]:
    """(path, problem) for every duplicate name and dangling reference in ``t``."""
    problems: list[tuple[YamlPath, str]] = []
    add = problems.append

    def unique(what: str, entries: Iterable[tuple[YamlPath, Any]]) -> None:
        first: dict[Any, YamlPath] = {}
        for path, key in entries:
            if key is None:
                continue
            if key in first:
                line = t.line_of(first[key])
                where = f"line {line}" if line is not None else format_path(first[key])
                add((path, f"duplicate {what} {key!r} (first at {where})"))
            else:
                first[key] = path

    def each(prefix: YamlPath, items: Sequence[Any], key: str) -> Iterable[tuple[YamlPath, Any]]:
        return (((*prefix, i, key), getattr(x, key)) for i, x in enumerate(items))

    # observatories, telescopes, instruments, modules
    unique("observatory name", each(("observatories",), t.observatories, "name"))
    telescopes = [
        (("observatories", i, "telescopes", j), tel)
        for i, o in enumerate(t.observatories)
        for j, tel in enumerate(o.telescopes)
    ]
    unique("telescope name", (((*p, "name"), tel.name) for p, tel in telescopes))
    unique("telescope short_name", (((*p, "short_name"), tel.short_name) for p, tel in telescopes))
    for tp, tel in telescopes:
        instruments = [((*tp, "instruments", k), inst) for k, inst in enumerate(tel.instruments)]
        unique(
            f"instrument of telescope {tel.name!r}",
            (((*p, "name"), inst.name) for p, inst in instruments),
        )
        for ip, inst in instruments:
            modules = [((*ip, "modules", n), mod) for n, mod in enumerate(inst.modules)]
            unique(
                f"module of instrument {inst.name!r}",
                (((*p, "name"), mod.name) for p, mod in modules),
            )
            for mp, mod in modules:
                lo, hi = mod.frequency_min_ghz, mod.frequency_max_ghz
                if lo is not None and hi is not None and lo > hi:
                    add(((*mp, "frequency_min_ghz"), f"above frequency_max_ghz ({lo} > {hi})"))

    # sites and their locations
    unique("site short_name", each(("sites",), t.sites, "short_name"))
    unique("site name", each(("sites",), t.sites, "name"))
    sites: dict[str, SiteSpec] = {}
    for i, site in enumerate(t.sites):
        sites.setdefault(site.short_name, site)
        unique(
            f"location name at site {site.short_name!r}",
            each(("sites", i, "locations"), site.locations, "name"),
        )

    # routes
    unique("route name", each(("routes",), t.routes, "name"))
    known_sites = ", ".join(sites) or "none"
    for i, r in enumerate(t.routes):
        rp: YamlPath = ("routes", i)
        for key in ("origin", "destination", "relay"):
            short = getattr(r, key)
            if short is not None and short not in sites:
                add(((*rp, key), f"unknown site {short!r} (sites: {known_sites})"))
        for key, end in (("origin_location", r.origin), ("destination_location", r.destination)):
            name, site_spec = getattr(r, key), sites.get(end)
            names = [loc.name for loc in site_spec.locations] if site_spec else []
            if name is not None and site_spec is not None and name not in names:
                add(
                    (
                        (*rp, key),
                        f"site {end!r} has no location {name!r} "
                        f"(its locations: {', '.join(names) or 'none'})",
                    )
                )
        for name, problem in route_option_problems(r.method, r.options):
            add(((*rp, "options", name), problem))
        if r.origin == r.destination:
            add(((*rp, "destination"), f"same site as origin ({r.origin!r})"))
        if r.route_type == RouteType.RELAY:
            if r.relay is None:
                add(((*rp, "relay"), "required for route_type 'relay' (the site to relay through)"))
            elif r.relay in (r.origin, r.destination):
                add(((*rp, "relay"), f"relay site {r.relay!r} is an end of the route"))
        elif r.relay is not None:
            add(
                (
                    (*rp, "relay"),
                    f"only a relay route has one (route_type is {r.route_type.value!r})",
                )
            )
        if r.route_type == RouteType.CUSTOM:
            for key in ("origin_location", "destination_location"):
                if getattr(r, key) is None:
                    add(((*rp, key), "required for route_type 'custom'"))

    # roles, programmes, modes
    unique("role name", each(("roles",), t.roles, "name"))
    for i, role in enumerate(t.roles):
        for j, scope in enumerate(role.scopes):
            if scope not in KNOWN_SCOPES:
                known = ", ".join(KNOWN_SCOPES)
                add((("roles", i, "scopes", j), f"unknown scope {scope!r} (known: {known})"))
    unique(
        "observing program short_name",
        each(("observing_programs",), t.observing_programs, "short_name"),
    )
    unique("observing program name", each(("observing_programs",), t.observing_programs, "name"))
    for i, prog in enumerate(t.observing_programs):
        unique(
            f"sub-program short_name of {prog.short_name!r}",
            (
                (("observing_programs", i, "sub_programs", j, "short_name"), sp.short_name)
                for j, sp in enumerate(prog.sub_programs)
            ),
        )
    unique("obs_mode name", each(("obs_modes",), t.obs_modes, "name"))
    return problems


# --- loading --------------------------------------------------------------------------------


def load_topology(path: str | Path) -> Topology:
    """Read, parse and validate a topology file.

    Raises :class:`TopologyError` listing every problem found (``file:line: field: problem``):
    YAML syntax, unknown keys, missing or mistyped fields, bad enum values, duplicate names,
    routes to unknown sites or locations, unknown route options, unknown scopes. A missing
    file is a TopologyError too.
    """
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TopologyError(name, None, "", "file not found") from None
    except IsADirectoryError:
        raise TopologyError(name, None, "", "is a directory, not a topology file") from None
    except UnicodeDecodeError as exc:
        raise TopologyError(name, None, "", f"not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise TopologyError(name, None, "", f"cannot read: {exc.strerror or exc}") from None

    data, lines, errors = _parse_yaml(text, name)
    topology: Topology | None = None
    try:
        topology = Topology.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            p, problem = _pydantic_problem(err, data)
            errors.append(TopologyError(name, _line_for(p, lines), format_path(p), problem))
    if topology is not None:
        topology._source = name
        topology._lines = lines
        errors += topology.check()
    if errors:
        raise TopologyError.collect(errors)
    assert topology is not None
    return topology


def default_topology_path() -> Path:
    """The reference topology shipped in the package (``ccat_ops_db/data/topology.yaml``)."""
    return Path(str(resources.files("ccat_ops_db") / "data" / "topology.yaml"))


# --- seeding --------------------------------------------------------------------------------


@dataclass
class SeedReport:
    """What :func:`seed_topology` did (or, in a dry run, would do)."""

    created: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    updated: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    unchanged: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    #: One line per created row and per changed field, e.g.
    #: ``updated data location ccat/buffer: priority 0 -> 1``.
    changes: list[str] = field(default_factory=list)
    #: Rows in the database the file does not mention (kept, never deleted).
    not_in_file: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """True if anything was created or updated."""
        return any(self.created.values()) or any(self.updated.values())

    def totals(self) -> tuple[int, int, int]:
        """(created, updated, unchanged) over all kinds."""
        return (
            sum(self.created.values()),
            sum(self.updated.values()),
            sum(self.unchanged.values()),
        )


def _same(old: Any, new: Any) -> bool:
    """Whether a stored value equals the file's (rows by identity, 1 is not True)."""
    if isinstance(old, m.Base | bool) or isinstance(new, m.Base | bool):
        return old is new
    return bool(old == new)


def _show(value: Any) -> str:
    if isinstance(value, m.Base):
        return repr(_label(value))
    if isinstance(value, enum.Enum):
        return repr(value.value)
    return repr(value)


def _label(obj: Any) -> str:
    """The natural key of a row, for messages."""
    if isinstance(obj, m.Telescope | m.Observatory | m.DataTransferRoute | m.Role | m.ObsMode):
        return obj.name
    if isinstance(obj, m.Instrument):
        return f"{obj.telescope.short_name or obj.telescope.name}/{obj.name}"
    if isinstance(obj, m.InstrumentModule):
        return f"{_label(obj.instrument)}/{obj.name}"
    if isinstance(obj, m.Site | m.ObservingProgram):
        return obj.short_name
    if isinstance(obj, m.DataLocation):
        return f"{obj.site.short_name}/{obj.name}"
    if isinstance(obj, m.SubObservingProgram):
        return f"{obj.observing_program.short_name}/{obj.short_name}"
    return repr(obj)


_LOCATION_CLASSES: dict[str, type[m.DataLocation]] = {
    "disk": m.DiskDataLocation,
    "s3": m.S3DataLocation,
    "tape": m.TapeDataLocation,
}


class _Seeder:
    def __init__(self, session: Session, topology: Topology) -> None:
        self.s = session
        self.t = topology
        self.report = SeedReport()
        self.touched: set[int] = set()  # id() of every row the file mentions
        s = session
        self.observatories = list(s.scalars(select(m.Observatory).order_by(m.Observatory.id)))
        self.telescopes = list(s.scalars(select(m.Telescope).order_by(m.Telescope.id)))
        self.instruments = list(s.scalars(select(m.Instrument).order_by(m.Instrument.id)))
        self.modules = list(s.scalars(select(m.InstrumentModule).order_by(m.InstrumentModule.id)))
        self.sites = list(s.scalars(select(m.Site).order_by(m.Site.id)))
        any_location = with_polymorphic(m.DataLocation, "*")
        self.locations: list[m.DataLocation] = list(
            s.scalars(select(any_location).order_by(any_location.id))
        )
        self.routes = list(s.scalars(select(m.DataTransferRoute).order_by(m.DataTransferRoute.id)))
        self.roles = list(s.scalars(select(m.Role).order_by(m.Role.id)))
        self.programs = list(s.scalars(select(m.ObservingProgram).order_by(m.ObservingProgram.id)))
        self.sub_programs = list(
            s.scalars(select(m.SubObservingProgram).order_by(m.SubObservingProgram.id))
        )
        self.obs_modes = list(s.scalars(select(m.ObsMode).order_by(m.ObsMode.id)))

    # -- generic upsert --

    def upsert(
        self,
        kind: str,
        label: str,
        existing: Any,
        factory: Callable[..., Any],
        values: dict[str, Any],
    ) -> Any:
        """Create the row, or set the fields that differ (no UPDATE when nothing does)."""
        what = kind.replace("_", " ")
        if existing is None:
            obj = factory(**values)
            self.s.add(obj)
            self.report.created[kind] += 1
            self.report.changes.append(f"created {what} {label}")
        else:
            obj = existing
            diffs = []
            for key, new in values.items():
                old = getattr(obj, key)
                if not _same(old, new):
                    diffs.append(f"updated {what} {label}: {key} {_show(old)} -> {_show(new)}")
                    setattr(obj, key, new)
            if diffs:
                # explicit: a change in a subtype table alone would not touch the base row
                obj.updated_at = utcnow()
                self.report.updated[kind] += 1
                self.report.changes.extend(diffs)
            else:
                self.report.unchanged[kind] += 1
        self.touched.add(id(obj))
        return obj

    # -- checks that need the database --

    def conflicts(self) -> list[TopologyError]:
        t = self.t
        errors: list[TopologyError] = []
        file_sites = {s.short_name for s in t.sites}
        for i, site_spec in enumerate(t.sites):
            row = next((s for s in self.sites if s.short_name == site_spec.short_name), None)
            other = next(
                (
                    s
                    for s in self.sites
                    if s.name == site_spec.name and s.short_name not in file_sites
                ),
                None,
            )
            if other is not None:
                errors.append(
                    t.error(
                        ("sites", i, "name"),
                        f"{site_spec.name!r} is already the name of site {other.short_name!r}, "
                        "which the file does not mention (rename one of them)",
                        SeedError,
                    )
                )
            if row is None:
                continue
            for j, loc_spec in enumerate(site_spec.locations):
                loc = next(
                    (x for x in self.locations if x.site_id == row.id and x.name == loc_spec.name),
                    None,
                )
                if loc is not None and loc.storage_type.value != loc_spec.storage_type:
                    errors.append(
                        t.error(
                            ("sites", i, "locations", j, "storage_type"),
                            f"location {row.short_name}/{loc.name} has storage_type "
                            f"{loc.storage_type.value!r} in the database: it cannot change to "
                            f"{loc_spec.storage_type!r} in place (its {type(loc).__tablename__}"
                            " row holds data); give the new location another name",
                            SeedError,
                        )
                    )
        file_programs = {p.short_name for p in t.observing_programs}
        for i, prog in enumerate(t.observing_programs):
            other_prog = next(
                (
                    p
                    for p in self.programs
                    if p.name == prog.name and p.short_name not in file_programs
                ),
                None,
            )
            if other_prog is not None:
                errors.append(
                    t.error(
                        ("observing_programs", i, "name"),
                        f"{prog.name!r} is already the name of observing program "
                        f"{other_prog.short_name!r}, which the file does not mention",
                        SeedError,
                    )
                )
        file_tels = {tel.name for o in t.observatories for tel in o.telescopes}
        for i, obs in enumerate(t.observatories):
            for j, tel in enumerate(obs.telescopes):
                clash = next(
                    (
                        x
                        for x in self.telescopes
                        if tel.short_name is not None
                        and x.short_name == tel.short_name
                        and x.name not in file_tels
                    ),
                    None,
                )
                if clash is not None:
                    errors.append(
                        t.error(
                            ("observatories", i, "telescopes", j, "short_name"),
                            f"{tel.short_name!r} is already the short_name of telescope "
                            f"{clash.name!r}, which the file does not mention",
                            SeedError,
                        )
                    )
        return errors

    # -- the sections --

    def observatories_(self) -> None:
        by_name = {o.name: o for o in self.observatories}
        tel_by_name = {x.name: x for x in self.telescopes}
        inst_by_key = {(x.telescope_id, x.name): x for x in self.instruments}
        mod_by_key = {(x.instrument_id, x.name): x for x in self.modules}
        for o in self.t.observatories:
            obs = self.upsert(
                "observatory",
                o.name,
                by_name.get(o.name),
                m.Observatory,
                {"name": o.name, "description": o.description},
            )
            for tel_spec in o.telescopes:
                tel = self.upsert(
                    "telescope",
                    tel_spec.name,
                    tel_by_name.get(tel_spec.name),
                    m.Telescope,
                    {
                        "observatory": obs,
                        "name": tel_spec.name,
                        "short_name": tel_spec.short_name,
                        "description": tel_spec.description,
                        "latitude_deg": tel_spec.latitude_deg,
                        "longitude_deg": tel_spec.longitude_deg,
                        "elevation_m": tel_spec.elevation_m,
                    },
                )
                tel_label = tel_spec.short_name or tel_spec.name
                for inst_spec in tel_spec.instruments:
                    inst = self.upsert(
                        "instrument",
                        f"{tel_label}/{inst_spec.name}",
                        inst_by_key.get((tel.id, inst_spec.name)) if tel.id else None,
                        m.Instrument,
                        {
                            "telescope": tel,
                            "name": inst_spec.name,
                            "full_name": inst_spec.full_name,
                            "instrument_type": inst_spec.instrument_type,
                            "description": inst_spec.description,
                            "available": inst_spec.available,
                        },
                    )
                    for mod in inst_spec.modules:
                        self.upsert(
                            "instrument_module",
                            f"{tel_label}/{inst_spec.name}/{mod.name}",
                            mod_by_key.get((inst.id, mod.name)) if inst.id else None,
                            m.InstrumentModule,
                            {
                                "instrument": inst,
                                "name": mod.name,
                                "description": mod.description,
                                "pixels": mod.pixels,
                                "frequency_min_ghz": mod.frequency_min_ghz,
                                "frequency_max_ghz": mod.frequency_max_ghz,
                                "available": mod.available,
                            },
                        )

    def sites_(self) -> tuple[dict[str, m.Site], dict[tuple[str, str], m.DataLocation]]:
        by_short = {s.short_name: s for s in self.sites}
        loc_by_key = {(x.site_id, x.name): x for x in self.locations}
        sites: dict[str, m.Site] = {}
        locations: dict[tuple[str, str], m.DataLocation] = {}
        for s in self.t.sites:
            site = self.upsert(
                "site",
                s.short_name,
                by_short.get(s.short_name),
                m.Site,
                {
                    "name": s.name,
                    "short_name": s.short_name,
                    "location": s.location,
                    "description": s.description,
                    "active": s.active,
                },
            )
            sites[s.short_name] = site
            for loc in s.locations:
                values: dict[str, Any] = {"site": site}
                values.update(loc.model_dump(exclude={"storage_type"}))
                row = self.upsert(
                    "data_location",
                    f"{s.short_name}/{loc.name}",
                    loc_by_key.get((site.id, loc.name)) if site.id else None,
                    _LOCATION_CLASSES[loc.storage_type],
                    values,
                )
                locations[(s.short_name, loc.name)] = row
        return sites, locations

    def routes_(
        self, sites: dict[str, m.Site], locations: dict[tuple[str, str], m.DataLocation]
    ) -> None:
        by_name = {r.name: r for r in self.routes}
        for r in self.t.routes:
            self.upsert(
                "route",
                r.name,
                by_name.get(r.name),
                m.DataTransferRoute,
                {
                    "name": r.name,
                    "origin_site": sites[r.origin],
                    "destination_site": sites[r.destination],
                    "relay_site": sites[r.relay] if r.relay else None,
                    "origin_location": (
                        locations[(r.origin, r.origin_location)] if r.origin_location else None
                    ),
                    "destination_location": (
                        locations[(r.destination, r.destination_location)]
                        if r.destination_location
                        else None
                    ),
                    "route_type": r.route_type,
                    "method": r.method,
                    "active": r.active,
                    "options": r.options,
                },
            )

    def the_rest(self) -> None:
        roles = {r.name: r for r in self.roles}
        for role in self.t.roles:
            self.upsert(
                "role",
                role.name,
                roles.get(role.name),
                m.Role,
                {"name": role.name, "description": role.description, "scopes": list(role.scopes)},
            )
        programs = {p.short_name: p for p in self.programs}
        subs = {(x.observing_program_id, x.short_name): x for x in self.sub_programs}
        for p in self.t.observing_programs:
            prog = self.upsert(
                "observing_program",
                p.short_name,
                programs.get(p.short_name),
                m.ObservingProgram,
                {
                    "name": p.name,
                    "short_name": p.short_name,
                    "description": p.description,
                    "principal_investigator": p.principal_investigator,
                },
            )
            for sp in p.sub_programs:
                self.upsert(
                    "sub_observing_program",
                    f"{p.short_name}/{sp.short_name}",
                    subs.get((prog.id, sp.short_name)) if prog.id else None,
                    m.SubObservingProgram,
                    {
                        "observing_program": prog,
                        "name": sp.name,
                        "short_name": sp.short_name,
                        "description": sp.description,
                    },
                )
        modes = {o.name: o for o in self.obs_modes}
        for mode in self.t.obs_modes:
            self.upsert(
                "obs_mode",
                mode.name,
                modes.get(mode.name),
                m.ObsMode,
                {"name": mode.name, "description": mode.description},
            )

    def leftovers(self) -> list[str]:
        out: list[str] = []
        groups: list[tuple[str, Sequence[Any]]] = [
            ("observatory", self.observatories),
            ("telescope", self.telescopes),
            ("instrument", self.instruments),
            ("instrument module", self.modules),
            ("site", self.sites),
            ("data location", self.locations),
            ("route", self.routes),
            ("role", self.roles),
            ("observing program", self.programs),
            ("sub observing program", self.sub_programs),
            ("obs mode", self.obs_modes),
        ]
        for what, rows in groups:
            out += [f"{what} {_label(row)}" for row in rows if id(row) not in self.touched]
        return out

    def run(self) -> SeedReport:
        errors = self.t.check()
        if errors:
            raise TopologyError.collect(errors)
        conflicts = self.conflicts()
        if conflicts:
            raise SeedError.collect(conflicts)
        with self.s.no_autoflush:
            self.observatories_()
            sites, locations = self.sites_()
            self.routes_(sites, locations)
            self.the_rest()
        self.s.flush()
        self.report.not_in_file = self.leftovers()
        return self.report


def seed_topology(session: Session, topology: Topology) -> SeedReport:
    """Upsert ``topology`` into the database through ``session``; returns what changed.

    Rows are matched by natural keys; unchanged rows get no UPDATE. Raises
    :class:`TopologyError` if the topology fails its cross-reference checks and
    :class:`SeedError` if it cannot be applied to this database (a location's storage_type
    changed, a name taken by a row the file does not mention); both are raised before anything
    is changed. Flushes, but never commits: the caller owns the transaction.
    """
    return _Seeder(session, topology).run()


def seed_file(
    url_or_engine: str | URL | Engine, path: str | Path, *, dry_run: bool = False
) -> SeedReport:
    """Validate the topology file ``path``, then seed it in one transaction.

    Nothing is written if the file is invalid (:class:`TopologyError`) or any step fails (the
    transaction is rolled back). ``dry_run=True`` always rolls back: the report says what
    would change.
    """
    topology = load_topology(path)
    if isinstance(url_or_engine, Engine):
        engine, owned = url_or_engine, False
    else:
        from .db import make_engine

        engine, owned = make_engine(url_or_engine, null_pool=True), True
    try:
        with Session(engine, expire_on_commit=False) as session:
            try:
                report = seed_topology(session, topology)
                if dry_run:
                    session.rollback()
                else:
                    session.commit()
            except BaseException:
                session.rollback()
                raise
        return report
    finally:
        if owned:
            engine.dispose()


def render_report(report: SeedReport) -> Table:
    """A table of kinds by created / updated / unchanged (for the CLI)."""
    table = Table(title="Reference topology")
    table.add_column("kind")
    for col in ("created", "updated", "unchanged"):
        table.add_column(col, justify="right")
    for kind in KINDS:
        c, u, n = report.created[kind], report.updated[kind], report.unchanged[kind]
        table.add_row(
            kind.replace("_", " "),
            f"[green]{c}[/]" if c else "0",
            f"[yellow]{u}[/]" if u else "0",
            str(n),
        )
    c, u, n = report.totals()
    table.add_section()
    table.add_row("total", str(c), str(u), str(n))
    return table


__all__ = [
    "KINDS",
    "SeedError",
    "SeedReport",
    "Topology",
    "TopologyError",
    "default_topology_path",
    "format_path",
    "load_topology",
    "render_report",
    "seed_file",
    "seed_topology",
]
