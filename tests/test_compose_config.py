"""The compose stack's files, checked without starting anything (fast; part of `make test`).

compose/docker-compose.yml: parses (and `docker-compose config` accepts it where installed),
every long-running service has a healthcheck, ports are published on 127.0.0.1 only, images
are variables with defaults, no secret is written in it and every secret is required, the
one-shots gate the services. compose/topology.yaml: valid, and every worker mounts what its
locations need. Prometheus (profile monitoring) loads every chart's alerting rules, and real
promtool accepts its configuration with those rules. Dockerfile: pinned base as a build arg,
non-root user. No container registry host is named anywhere. The whole stack runs in
`make e2e` (compose/e2e.py).
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_DIR = REPO / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
TOPOLOGY = COMPOSE_DIR / "topology.yaml"
SECRETS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY")
ONE_SHOTS = {"migrate", "create-buckets"}
PROMETHEUS_CONFIG = COMPOSE_DIR / "prometheus" / "prometheus.yml"
# every chart's alerting rules (the same files the charts render into PrometheusRules)
RULE_FILES = sorted((REPO / "charts").glob("*/files/alerts.yml"))
PROMTOOL_HINT = "promtool not found: apt-get install prometheus (Debian's package carries promtool)"
# An image reference whose first path component looks like a host (has a dot or a port) names
# a registry; images here must be plain names that resolve to whatever registry the user has.
IMAGE_REF = re.compile(r"(?:FROM\s+|image:\s*|_IMAGE:-|IMAGE=)([^\s\"'}]+)")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def long_running(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in services.items()
        if str(svc.get("restart", "no")) != "no" and "profiles" not in svc
    }


def test_compose_specification_format(compose: dict[str, Any]) -> None:
    # no `version:` key: the Compose Specification, which docker-compose 1.29 and v2 both read
    assert "version" not in compose
    assert {"postgres", "redis", "s3", "migrate", "create-buckets", "api", "managers"} <= set(
        compose["services"]
    )
    workers = {n for n in compose["services"] if n.startswith("worker-")}
    assert workers == {
        "worker-ccat-source",
        "worker-ccat-buffer",
        "worker-cologne-buffer",
        "worker-cologne-lta",
        "worker-cologne-processing",
        "worker-us-buffer",
        "worker-us-lta",
    }
    assert compose["services"]["demo-instrument"]["profiles"] == ["demo"]


def test_every_long_running_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    running = long_running(services)
    assert len(running) >= 11
    for name, svc in running.items():
        check = svc.get("healthcheck", {})
        assert check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), name


def test_api_healthcheck_is_readiness(services: dict[str, Any]) -> None:
    # devtools.py health api probes /readyz: database reachable and schema at head
    assert services["api"]["healthcheck"]["test"][-2:] == ["health", "api"]
    assert "/readyz" in (COMPOSE_DIR / "devtools.py").read_text()


def test_ports_are_published_on_loopback_only(services: dict[str, Any]) -> None:
    published = 0
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert isinstance(port, str), f"{name}: use the short syntax with 127.0.0.1"
            assert port.startswith("127.0.0.1:"), f"{name}: {port} is not on 127.0.0.1"
            published += 1
        assert svc.get("network_mode") != "host", name
    assert published >= 4


def test_images_are_variables_with_public_defaults(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        image = svc["image"]
        m = re.fullmatch(r"\$\{([A-Z0-9_]+_IMAGE):-([^}]+)\}", image)
        assert m, f"{name}: image {image!r} is not ${{X_IMAGE:-default}}"
        default = m.group(2)
        first = default.split("/")[0]
        assert "/" not in default or ("." not in first and ":" not in first), (
            f"{name}: the default {default!r} names a registry host"
        )


def test_ccat_image_tag_is_the_project_version(services: dict[str, Any]) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert services["api"]["image"] == f"${{CCAT_IMAGE:-ccat-data-center:{version}}}"


def _env_items(svc: dict[str, Any]) -> list[tuple[str, str]]:
    env = svc.get("environment", {})
    assert isinstance(env, dict), "use the mapping syntax for environment"
    return [(k, str(v)) for k, v in env.items()]


def test_no_secret_is_written_in_the_compose_file(services: dict[str, Any]) -> None:
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|AUTH", re.IGNORECASE)
    for name, svc in services.items():
        for key, value in _env_items(svc):
            if secretish.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]*|:-)?\}", value), (
                    f"{name}: {key} must come from the environment, not {value!r}"
                )
            for user_pass in re.findall(r"://([^@/\s]*)@", value):
                password = user_pass.split(":", 1)[-1]
                assert password.startswith("${") or not password, f"{name}: {key} has a password"
    text = COMPOSE_FILE.read_text()
    for secret in SECRETS:
        uses = re.findall(r"\$\{" + secret + r"([^}]*)\}", text)
        assert uses, secret
        for use in uses:
            assert use.startswith(":?"), f"${{{secret}{use}}}: a secret must be required"


def test_env_example_holds_placeholders_only() -> None:
    lines = (COMPOSE_DIR / ".env.example").read_text().splitlines()
    values = dict(ln.split("=", 1) for ln in lines if ln and not ln.startswith("#") and "=" in ln)
    for secret in SECRETS:
        assert re.fullmatch(r"<[a-z0-9-]+>", values[secret]), f"{secret}={values[secret]}"
    assert not (COMPOSE_DIR / ".env").exists() or ".env" in (REPO / ".gitignore").read_text()


def _depends(svc: dict[str, Any]) -> dict[str, str]:
    deps = svc.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {k: v.get("condition", "service_started") for k, v in deps.items()}


def test_one_shots_gate_the_services(services: dict[str, Any]) -> None:
    ccat = {n for n, s in services.items() if "CCAT_IMAGE" in s["image"]}
    assert _depends(services["migrate"]) == {"postgres": "service_healthy"}
    for name in ccat - {"migrate", "demo-instrument"}:
        assert _depends(services[name]).get("migrate") == "service_completed_successfully", name
    for name in (n for n in ccat if n.startswith("worker-")):
        assert _depends(services[name])["create-buckets"] == "service_completed_successfully"
        assert _depends(services[name])["redis"] == "service_healthy"
    assert _depends(services["demo-instrument"]) == {"api": "service_healthy"}
    for name in ONE_SHOTS:
        assert str(services[name]["restart"]) == "no"


def _mounts(svc: dict[str, Any]) -> dict[str, bool]:
    """Mount target -> writable."""
    out = {}
    for v in svc.get("volumes", []):
        parts = v.split(":")
        out[parts[1]] = not (len(parts) > 2 and "ro" in parts[2].split(","))
    return out


def test_workers_mount_what_their_locations_need(services: dict[str, Any]) -> None:
    topo = yaml.safe_load(TOPOLOGY.read_text())
    locs: dict[tuple[str, str], dict[str, Any]] = {
        (site["short_name"], loc["name"]): loc
        for site in topo["sites"]
        for loc in site["locations"]
    }

    def buffer(site: str) -> str:
        return next(
            loc["root_path"]
            for (s, _), loc in locs.items()
            if s == site and loc["location_type"] == "buffer"
        )

    served: set[tuple[str, str]] = set()
    for name, svc in services.items():
        cmd = svc.get("command", [])
        if not name.startswith("worker-"):
            continue
        assert cmd[0] == "worker", name
        site, names = cmd[1], cmd[2:]
        mounts = _mounts(svc)
        for loc_name in names:
            loc = locs[(site, loc_name)]
            served.add((site, loc_name))
            if loc["storage_type"] == "disk":
                assert mounts.get(loc["root_path"]) is True, f"{name}: {loc['root_path']} rw"
            if loc["location_type"] in ("source", "long_term_archive"):
                # packaging writes tars into the buffer; archiving writes the sidecar there
                assert mounts.get(buffer(site)) is True, f"{name}: {buffer(site)} rw"
            if loc["location_type"] == "buffer":
                # the destination buffer's worker pulls every route's origin buffer
                for route in topo["routes"]:
                    legs = [(route["origin"], route.get("relay") or route["destination"])]
                    if route.get("relay"):
                        legs.append((route["relay"], route["destination"]))
                    for origin, dest in legs:
                        if dest == site:
                            assert buffer(origin) in mounts, f"{name}: {buffer(origin)} missing"
    # every location of the topology is served by a worker
    assert served == set(locs), set(locs) - served


def _rule_mounts(services: dict[str, Any]) -> dict[Path, str]:
    """The prometheus service's bind mounts that rule_files loads: source file -> target."""
    globs = [PurePosixPath(g) for g in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["rule_files"]]
    out = {}
    for volume in services["prometheus"]["volumes"]:
        source, target, *mode = volume.split(":")
        t = PurePosixPath(target)
        # Prometheus globs the last path element only (filepath.Glob: * never crosses a /)
        if any(t.parent == g.parent and fnmatch.fnmatchcase(t.name, g.name) for g in globs):
            assert mode and "ro" in mode[0].split(","), f"{volume}: mount the rules read-only"
            out[(COMPOSE_DIR / source).resolve()] = target
    return out


def test_prometheus_loads_every_charts_rules(services: dict[str, Any]) -> None:
    """Each chart's files/alerts.yml is mounted where prometheus.yml's rule_files look, once,
    from a file that exists; the globs are absolute paths in the container."""
    globs = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["rule_files"]
    assert globs and all(g.startswith("/etc/prometheus/") for g in globs), globs
    assert len(RULE_FILES) >= 2, RULE_FILES
    mounts = _rule_mounts(services)
    for source in mounts:
        assert source.is_file(), f"{source} is mounted into Prometheus but does not exist"
    assert sorted(mounts) == RULE_FILES, "every chart's rules, and nothing else"
    assert len(set(mounts.values())) == len(mounts), "two rule files on one target"
    # a mount next to the rules that the globs miss would be a file Prometheus never loads
    rule_dirs = {str(PurePosixPath(t).parent) for t in mounts.values()}
    for volume in services["prometheus"]["volumes"]:
        target = volume.split(":")[1]
        if str(PurePosixPath(target).parent) in rule_dirs:
            assert target in mounts.values(), f"{volume}: not matched by rule_files {globs}"


def test_promtool_accepts_the_config_and_the_rules(
    services: dict[str, Any], tmp_path: Path
) -> None:
    """Real promtool on prometheus.yml, with rule_files pointing at the mounted files in this
    repository: the scrape configuration, and every rule's PromQL, durations and templates."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(PROMTOOL_HINT, pytrace=False)
    mounts = _rule_mounts(services)
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["rule_files"] = [str(source) for source in mounts]
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config, sort_keys=False))
    res = subprocess.run(
        [promtool, "check", "config", str(copy)], capture_output=True, text=True, check=False
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert f"SUCCESS: {len(mounts)} rule files found" in out, out
    for source in mounts:
        groups = yaml.safe_load(source.read_text())["groups"]
        rules = sum(len(g["rules"]) for g in groups)
        assert re.search(
            rf"Checking {re.escape(str(source))}\n\s*SUCCESS: {rules} rules found", out
        ), out


def test_prometheus_job_names_are_the_ones_the_rules_select() -> None:
    """The alerts on `up` select scrape jobs by name: each selector matches a job here."""
    jobs = {j["job_name"] for j in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    selectors = 0
    for rule_file in RULE_FILES:
        for group in yaml.safe_load(rule_file.read_text())["groups"]:
            for rule in group["rules"]:
                for matchers in re.findall(r"\bup\{([^}]*)\}", rule["expr"]):
                    for op, value in re.findall(r'\bjob\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers):
                        assert op in ("=", "=~"), (rule["alert"], op)
                        matched = {j for j in jobs if re.fullmatch(value, j)}
                        assert matched, f"{rule['alert']}: job{op}{value!r} matches none of {jobs}"
                        selectors += 1
    assert selectors >= 2


def test_topology_is_valid_and_local() -> None:
    from ccat_ops_db.seed import load_topology

    load_topology(TOPOLOGY)
    topo = yaml.safe_load(TOPOLOGY.read_text())
    for route in topo["routes"]:
        assert route["method"] == "local", route["name"]
    for site in topo["sites"]:
        for loc in site["locations"]:
            if loc["storage_type"] == "s3":
                # the endpoint comes from CCAT_S3_ENDPOINT_URL; credentials from the env
                assert "endpoint_url" not in loc
                assert loc["credentials_env_prefix"].startswith("CCAT_S3_")


def test_dockerfile_pinned_base_and_non_root_user() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.MULTILINE)
    froms = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert froms[0] == "${BASE_IMAGE}"
    assert len(froms) >= 3, "multi-stage: python, builder, runtime"
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0")
    assert re.search(r"^ARG CCAT_UID=(\d+)", text, re.MULTILINE).group(1) != "0"  # type: ignore[union-attr]
    assert not re.search(r"^(ENV|ARG)\s+\S*(PASSWORD|SECRET|TOKEN)", text, re.MULTILINE)
    ignore = [ln for ln in (REPO / ".dockerignore").read_text().splitlines() if ln[:1] not in "#"]
    assert ignore[0] == "*", ".dockerignore: an allow-list (ignore everything, then allow)"


def test_no_container_registry_host_is_named() -> None:
    files = [REPO / "Dockerfile", REPO / "docs" / "compose.md"]
    files += [p for p in COMPOSE_DIR.rglob("*") if p.is_file() and p.suffix != ".whl"]
    files += [p for p in (REPO / "scripts").rglob("*") if p.is_file()]
    seen = 0
    for path in files:
        if not path.exists():
            continue
        for ref in IMAGE_REF.findall(path.read_text(errors="replace")):
            seen += 1
            if ref.startswith("${"):
                ref = ref.split(":-", 1)[-1]  # the default of a ${VAR:-default}
            first = ref.split("/", 1)[0] if "/" in ref else ""
            assert "." not in first and ":" not in first, f"{path.relative_to(REPO)}: {ref}"
    assert seen, "no image references found: the pattern is out of date"


def test_entrypoint_and_scripts_parse() -> None:
    for script in (COMPOSE_DIR / "entrypoint.sh", REPO / "scripts" / "build-images.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run(
        ["bash", str(COMPOSE_DIR / "entrypoint.sh"), "help"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for role in ("api", "worker", "manager", "migrate", "demo-instrument", "health"):
        assert re.search(rf"^\s+{role}\b", out, re.MULTILINE), role


def _compose_cmd() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.skipif(_compose_cmd() is None, reason="no docker-compose / docker compose here")
def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    cmd = _compose_cmd()
    assert cmd is not None
    env_file = tmp_path / "empty.env"  # a developer's compose/.env must not count
    env_file.write_text("")
    base = [*cmd, "--env-file", str(env_file), "-f", str(COMPOSE_FILE)]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)}
    secrets = {s: f"x{i}" for i, s in enumerate(SECRETS)}
    ok = subprocess.run(
        [*base, "--profile", "demo", "config", "-q"],
        env={**env, **secrets},
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    # without the secrets it refuses to start, naming the missing one
    missing = subprocess.run(
        [*base, "config", "-q"], env=env, capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert missing.returncode != 0
    assert "PASSWORD" in missing.stderr or "S3_" in missing.stderr


NOTIFY_SECRETS = ("CCAT_TRANSFER_NOTIFY_WEBHOOK_URL", "CCAT_TRANSFER_NOTIFY_SMTP_PASSWORD")


def test_notification_settings_reach_the_managers_only_from_the_environment(
    services: dict[str, Any],
) -> None:
    """Operator notifications: the managers alone get every CCAT_TRANSFER_NOTIFY_* setting,
    each passed through as ${VAR:-} (optional; no value written here), and .env.example
    names the two secrets only as commented placeholders."""
    from data_transfer.settings import TransferSettings

    fields = TransferSettings.model_fields
    wanted = {f"CCAT_TRANSFER_{n.upper()}" for n in fields if n.startswith("notify_")}
    for name, svc in services.items():
        keys = {k for k, _ in _env_items(svc) if k.startswith("CCAT_TRANSFER_NOTIFY_")}
        assert keys == (wanted if name == "managers" else set()), name
    for key, value in _env_items(services["managers"]):
        if key in wanted:
            assert value == f"${{{key}:-}}", f"managers: {key} must be passed through: {value!r}"
    example = (COMPOSE_DIR / ".env.example").read_text()
    for key in NOTIFY_SECRETS:
        assert re.search(rf"^#{key}=<[a-z0-9-]+>$", example, re.MULTILINE), key
