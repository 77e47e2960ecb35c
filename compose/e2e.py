"""The whole-stack test (``make e2e``): the compose stack from images to archived, verified data.

1. build the images (``scripts/build-images.sh``; ``--no-build`` skips it);
2. start PostgreSQL, Redis and S3, then the API alone on the *unmigrated* database: it must
   not turn healthy (``/readyz`` 503) - the API is healthy only after the migrations;
3. ``up`` the whole stack and wait until every service is healthy and the one-shots
   (migrate + seed, create-buckets) exited 0; check the CCAT containers run as non-root;
4. an operator creates the instrument's user and token with ``ccat-ops-db`` in the API
   container; the simulated instrument (``demo-instrument``) writes files to the SOURCE volumes
   and files them through the API;
5. while the archive stage runs, ``docker kill`` the LTA worker that holds an archive task,
   keep it down a while, start it again: the recovery manager must find the task whose
   heartbeat stopped and the pipeline must still finish;
6. wait until every filed file is ARCHIVED, both archives hold every package, and the SOURCE
   copies were deleted by the deletion rules;
7. check every object in S3: size, the checksum in its metadata, the sha256 of its bytes, every
   file inside the tar against the checksum the instrument computed when it wrote it, and the
   metadata sidecar;
8. ``down -v`` (also on failure; ``--keep`` leaves the stack up) and print a summary.
9. (during 5-7) Prometheus of the ``monitoring`` profile, started once the stack is healthy,
   scrapes it the whole run: afterwards every target of compose/prometheus/prometheus.yml is
   up, it loaded every alerting rule of charts/*/files/alerts.yml and evaluates each without
   error, its gauges show every package archived, and no alert fires.

Exit 0 only when every check passed. Secrets are random per run and live only in the
environment of the compose processes; ports are free ports on 127.0.0.1.

    .venv/bin/python compose/e2e.py [--no-build] [--files 120] [--size-mb 240] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stackctl import REPO, Stack, StackError, log, missing_images

from data_transfer.checksums import hash_bytes

API = "/api/v1"


@dataclass
class Report:
    """Checks and timings, printed as the summary."""

    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    timings: list[tuple[str, float]] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, ok, detail))
        log(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
        return ok

    def time(self, name: str, seconds: float) -> None:
        self.timings.append((name, seconds))

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)

    def print(self) -> None:
        width = max([len(n) for n, _, _ in self.checks] + [10])
        print("\n=== e2e summary " + "=" * 60)
        for name, ok, detail in self.checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}")
        print("  --- timings")
        for name, s in self.timings:
            print(f"  {name:<{width + 6}}  {s:7.1f} s")
        if self.facts:
            print("  --- figures")
            for name, value in self.facts:
                print(f"  {name:<{width + 6}}  {value}")
        print(f"=== e2e {'PASSED' if self.ok else 'FAILED'}")
        passed = sum(1 for _, ok, _ in self.checks if ok)
        # the plain closing line CI logs are read for
        print(f"e2e: {passed} passed, {len(self.checks) - passed} failed")


def pages(client: Any, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a paginated list."""
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        q = {**params, "limit": 1000, **({"cursor": cursor} if cursor else {})}
        r = client.get(path, params=q)
        r.raise_for_status()
        body = r.json()
        out.extend(body["items"])
        cursor = body.get("next_cursor")
        if not cursor:
            return out


def make_token(stack: Stack, user: str, role: str, scopes: list[str]) -> str:
    """An operator's two commands, run in the API container: a user and a token."""
    stack.compose(
        "exec", "-T", "api", "ccat-ops-db", "user", "add", user, "--role", role, capture=True
    )
    args = ["exec", "-T", "api", "ccat-ops-db", "token", "create", user, "--name", "e2e"]
    for s in scopes:
        args += ["--scope", s]
    out = stack.compose(*args, capture=True).stdout.strip().splitlines()
    if not out:
        raise StackError(f"no token printed for {user}")
    return out[-1].strip()


def api_not_ready_before_migrations(stack: Stack, report: Report) -> None:
    """The API on an empty database: running, /readyz 503, container not healthy."""
    import httpx

    stack.compose("up", "-d", "postgres", "redis", "s3", capture=True)
    stack.wait_healthy(["postgres", "redis", "s3"], timeout=120)
    stack.compose("up", "-d", "--no-deps", "api", capture=True)
    deadline = time.monotonic() + 60
    body, code = "", 0
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{stack.api_url}/readyz", timeout=3)
            code, body = r.status_code, r.text
            if code == 503:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    time.sleep(7)  # two healthcheck intervals (3 s) with the database still unmigrated
    health = stack.container_of("api").health
    report.check(
        "API not healthy before migrations",
        code == 503 and health != "healthy",
        f"/readyz {code} {json.loads(body).get('reason', '') if body else ''}; "
        f"container health: {health}",
    )


def non_root(stack: Stack, report: Report) -> None:
    """The CCAT image's user, and the uid the running API and workers have."""
    image = stack.env.get("CCAT_IMAGE") or "ccat-data-center:0.1.0"
    user = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Config.User}}", image],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    uids = {}
    for svc in ("api", "managers", "worker-cologne-lta"):
        p = stack.compose("exec", "-T", svc, "id", "-u", capture=True, check=False)
        uids[svc] = p.stdout.strip()
    ok = user not in ("", "0", "root") and all(u not in ("", "0") for u in uids.values())
    report.check("CCAT containers run as non-root", ok, f"image USER {user}; uids {uids}")


def run_instrument(stack: Stack, token: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The simulated instrument, once; returns what it filed (its own checksums)."""
    proc = stack.compose(
        "run",
        "-T",
        "--rm",
        "--no-deps",
        "-e",
        "CCAT_API_TOKEN",
        "demo-instrument",
        "demo-instrument",
        "--files",
        str(args.files),
        "--size-mb",
        str(args.size_mb),
        "--observations",
        str(args.observations),
        "--seed",
        str(args.seed),
        "--json",
        capture=True,
        extra_env={"CCAT_API_TOKEN": token},
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("["):
            return list(json.loads(line))
    raise StackError(f"the instrument printed no file list:\n{proc.stdout[-2000:]}")


def kill_worker_mid_task(stack: Stack, client: Any, report: Report, down_s: float) -> int | None:
    """Kill the LTA worker that runs an archive task right now; start it again later.

    Returns the id of the archive transfer that was running when the worker died."""
    deadline = time.monotonic() + 180
    victim = None
    while time.monotonic() < deadline and victim is None:
        running = pages(client, f"{API}/long_term_archive_transfers", status="in_progress")
        if running:
            victim = running[0]
            break
        time.sleep(0.1)
    if victim is None:
        report.check("a worker killed mid-task", False, "no archive task seen in progress")
        return None
    site = victim["destination_location"].split("/")[0]
    service = f"worker-{site}-lta"
    container = stack.container_of(service)
    subprocess.run(["docker", "kill", container.id], capture_output=True, check=True)
    t_kill = time.monotonic()
    log(f"killed {service} ({container.id}) while archive transfer {victim['id']} ran")
    time.sleep(down_s)
    r = client.get(f"{API}/long_term_archive_transfers/{victim['id']}")
    status_while_down = r.json()["status"] if r.status_code == 200 else "?"
    stack.compose("start", service, capture=True)
    stack.wait_healthy([service], timeout=120)
    report.time(f"{service} killed -> restarted healthy", time.monotonic() - t_kill)
    report.facts.append(
        (
            "killed mid-task",
            f"{service}: archive transfer {victim['id']} ({victim['raw_data_package_name']}) "
            f"was {victim['status']}; {status_while_down} while the worker was down",
        )
    )
    return int(victim["id"])


def wait_pipeline(
    client: Any, filed: list[dict[str, Any]], t_filed: float, timeout: float, report: Report
) -> dict[str, Any]:
    """Until every file is ARCHIVED, both archives hold every package and SOURCE is clean."""
    observations = sorted({f["observation"] for f in filed})
    sources = pages(client, f"{API}/data_locations", site="ccat", location_type="source")
    last_print = 0.0
    state: dict[str, Any] = {}
    while True:
        files = []
        for eou in observations:
            files += pages(client, f"{API}/raw_data_files", executed_obs_unit_id=eou)
        archived = sum(1 for f in files if f["state"] == "archived")
        packages = sorted({f["raw_data_package_id"] for f in files if f["raw_data_package_id"]})
        ltas = []
        for pid in packages:
            ltas += pages(client, f"{API}/long_term_archive_transfers", raw_data_package_id=pid)
        done = [a for a in ltas if a["status"] == "completed"]
        failed = [a for a in ltas if a["status"] == "failed"]
        at_source = 0
        mine = {f["id"] for f in filed}
        for loc in sources:
            live = pages(client, f"{API}/raw_data_files", location_id=loc["id"])
            at_source += sum(1 for f in live if f["id"] in mine)
        state = {
            "files": files,
            "packages": packages,
            "ltas": ltas,
            "archived": archived,
            "at_source": at_source,
        }
        complete = (
            len(files) == len(filed)
            and archived == len(filed)
            and packages
            and len(done) == 2 * len(packages)
        )
        if time.monotonic() - last_print > 10:
            last_print = time.monotonic()
            log(
                f"archived {archived}/{len(filed)} files; archive copies {len(done)}/"
                f"{2 * len(packages)} ({len(failed)} failed); {at_source} files left at SOURCE"
            )
        if complete and at_source == 0:
            break
        if failed or time.monotonic() - t_filed > timeout:
            break
        time.sleep(1)
    report.time(
        "filed -> all archived in both archives, SOURCE clean (kill included)",
        time.monotonic() - t_filed,
    )
    report.check(
        "every filed file ARCHIVED",
        state["archived"] == len(filed),
        f"{state['archived']}/{len(filed)} files in {len(state['packages'])} packages",
    )
    done = [a for a in state["ltas"] if a["status"] == "completed"]
    report.check(
        "every package in both archives",
        len(done) == 2 * len(state["packages"]),
        f"{len(done)} completed archive transfers for {len(state['packages'])} packages"
        + "".join(
            f"; FAILED {a['id']}: {a['failure_reason']}"
            for a in state["ltas"]
            if a["status"] == "failed"
        ),
    )
    report.check(
        "SOURCE copies deleted after archiving",
        state["at_source"] == 0,
        f"{state['at_source']} of {len(filed)} files still at SOURCE",
    )
    return state


def verify_s3(
    stack: Stack, client: Any, filed: list[dict[str, Any]], state: dict[str, Any], report: Report
) -> None:
    """Every archive object against the database and the instrument's own checksums."""
    import boto3
    from botocore.config import Config

    s3 = boto3.session.Session().client(
        "s3",
        endpoint_url=stack.s3_url,
        region_name="us-east-1",
        aws_access_key_id=stack.env["S3_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.env["S3_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}),
    )
    buckets = {
        f"{loc['site_short_name']}/{loc['name']}": loc["bucket"]
        for loc in pages(client, f"{API}/data_locations", storage_type="s3")
    }
    truth = {f["relative_path"]: f["checksum"] for f in filed}
    files_by_pkg: dict[int, list[str]] = defaultdict(list)
    for f in state["files"]:
        files_by_pkg[f["raw_data_package_id"]].append(f["relative_path"])
    problems: list[str] = []
    objects = files_checked = nbytes = 0
    for pid in state["packages"]:
        pkg = client.get(f"{API}/raw_data_packages/{pid}").json()
        for a in (x for x in state["ltas"] if x["raw_data_package_id"] == pid):
            if a["status"] != "completed":
                continue
            bucket = buckets[a["destination_location"]]
            where = f"s3://{bucket}/{a['object_key']}"
            head = s3.head_object(Bucket=bucket, Key=a["object_key"])
            meta = head["Metadata"].get("ccat-checksum", "")
            algorithm = pkg["checksum_algorithm"]
            if meta != f"{algorithm}:{pkg['checksum']}":
                problems.append(f"{where}: metadata checksum {meta!r} != package's")
            if head["ContentLength"] != pkg["size"]:
                problems.append(f"{where}: {head['ContentLength']} bytes, package {pkg['size']}")
            data = s3.get_object(Bucket=bucket, Key=a["object_key"])["Body"].read()
            nbytes += len(data)
            objects += 1
            if hash_bytes(data, algorithm) != pkg["checksum"]:
                problems.append(f"{where}: {algorithm} of the bytes differs from the package's")
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                manifest = json.load(tar.extractfile("MANIFEST.json"))  # type: ignore[arg-type]
                listed = {e["path"] for e in manifest["files"]}
                for rel in files_by_pkg[pid]:
                    member = tar.extractfile(rel)
                    if member is None:
                        problems.append(f"{where}: {rel} missing")
                        continue
                    if hashlib.sha256(member.read()).hexdigest() != truth.get(rel):
                        problems.append(f"{where}: {rel} differs from what the instrument wrote")
                    if rel not in listed:
                        problems.append(f"{where}: {rel} not in MANIFEST.json")
                    files_checked += 1
            sidecar = json.loads(s3.get_object(Bucket=bucket, Key=a["sidecar_key"])["Body"].read())
            if pkg["name"] not in json.dumps(sidecar):
                problems.append(f"s3://{bucket}/{a['sidecar_key']}: does not name the package")
    report.check(
        "S3 objects, checksums and sidecars",
        not problems and objects == 2 * len(state["packages"]),
        f"{objects} objects ({nbytes / 1e6:.1f} MB), {files_checked} files inside checked "
        f"against the instrument's sha256" + ("; " + "; ".join(problems[:5]) if problems else ""),
    )


def start_prometheus(stack: Stack, report: Report) -> bool:
    """Start the monitoring profile's Prometheus; True once it answers ``/-/ready``."""
    import httpx

    t0 = time.monotonic()
    stack.compose("--profile", "monitoring", "up", "-d", "--no-deps", "prometheus", capture=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{stack.prometheus_url}/-/ready", timeout=2).status_code == 200:
                report.time("prometheus up and ready", time.monotonic() - t0)
                return True
        except httpx.TransportError:
            pass
        time.sleep(1)
    report.check("prometheus ready", False, stack.logs("prometheus"))
    return False


def check_prometheus(stack: Stack, report: Report, timeout: float = 120.0) -> None:
    """Targets up, every rule loaded and evaluated without error, the pipeline's end seen in
    the managers' gauges (a scrape after the last package was archived), no alert firing."""
    import httpx
    import yaml

    base = f"{stack.prometheus_url}/api/v1"

    def query(expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{base}/query", params={"query": expr}, timeout=10)
        r.raise_for_status()
        return r.json()["data"]["result"]

    config = yaml.safe_load((REPO / "compose/prometheus/prometheus.yml").read_text())
    expected = {
        (job["job_name"], target)
        for job in config["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    rule_files = sorted(REPO.glob("charts/*/files/alerts.yml"))
    alerts = {
        rule["alert"]
        for path in rule_files
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    deadline = time.monotonic() + timeout
    while True:
        targets = httpx.get(f"{base}/targets", timeout=10).json()["data"]["activeTargets"]
        up = {(t["labels"]["job"], t["labels"]["instance"]) for t in targets if t["health"] == "up"}
        rules = [
            r
            for g in httpx.get(f"{base}/rules", timeout=10).json()["data"]["groups"]
            for r in g["rules"]
            if r["type"] == "alerting"
        ]
        # a rule not evaluated yet carries the zero time
        evaluated = bool(rules) and not [r for r in rules if r["lastEvaluation"][:4] == "0001"]
        archived = query("max(ccat_transfer_unarchived_packages) == 0")  # empty: not yet
        if (up >= expected and evaluated and archived) or time.monotonic() > deadline:
            break
        time.sleep(3)
    down = sorted(f"{job} {target}" for job, target in expected - up)
    report.check(
        "prometheus: every scrape target of prometheus.yml up",
        not down,
        f"{len(expected - set(down))}/{len(expected)} up" + (f"; down: {down}" if down else ""),
    )
    loaded = {r["name"] for r in rules}
    broken = [f"{r['name']}: {r.get('lastError')}" for r in rules if r.get("health") != "ok"]
    report.check(
        "prometheus: every alerting rule loaded and evaluated without error",
        loaded == alerts and not broken,
        f"{len(loaded)}/{len(alerts)} rules from {len(rule_files)} files"
        + (f"; missing {sorted(alerts - loaded)}" if alerts - loaded else "")
        + (f"; errors {broken}" if broken else ""),
    )
    workers = query('count(ccat_transfer_location_free_bytes{location_type="buffer"})')
    report.check(
        "prometheus: the managers' gauges show every package archived",
        bool(archived),
        "ccat_transfer_unarchived_packages 0 at every site; buffers watched: "
        + (workers[0]["value"][1] if workers else "none"),
    )
    firing = query('ALERTS{alertstate="firing"}')
    pending = sorted({a["metric"]["alertname"] for a in query('ALERTS{alertstate="pending"}')})
    report.check(
        "prometheus: no alert firing",
        not firing,
        ", ".join(sorted(a["metric"]["alertname"] for a in firing)) or "none",
    )
    report.facts.append(("alerts pending at the end", ", ".join(pending) or "none"))


def main(argv: list[str] | None = None) -> int:
    """Run the whole-stack test; 0 when every check passed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-build", action="store_true", help="use the images as they are")
    p.add_argument("--files", type=int, default=120)
    p.add_argument("--size-mb", type=float, default=240.0)
    p.add_argument("--observations", type=int, default=6)
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument(
        "--down-s", type=float, default=10.0, help="how long the killed worker stays down"
    )
    p.add_argument("--timeout", type=float, default=420.0, help="for the pipeline to finish")
    p.add_argument("--keep", action="store_true", help="leave the stack up (and its volumes)")
    args = p.parse_args(argv)

    import httpx

    report = Report()
    t_start = time.monotonic()
    if not args.no_build:
        t0 = time.monotonic()
        log("building the images (scripts/build-images.sh)")
        subprocess.run(["bash", str(REPO / "scripts" / "build-images.sh")], check=True, cwd=REPO)
        report.time("image builds", time.monotonic() - t0)
    stack = Stack()
    log(f"compose project {stack.project}; API {stack.api_url}; S3 {stack.s3_url}")
    try:
        missing = missing_images(stack)
        if missing:
            raise StackError(f"images missing: {missing} (run scripts/build-images.sh)")
        api_not_ready_before_migrations(stack, report)

        t0 = time.monotonic()
        stack.compose("up", "-d", capture=True)
        stack.wait_healthy(timeout=180)
        report.time("up -> every service healthy (servers already up)", time.monotonic() - t0)
        report.check(
            "stack healthy, one-shots exited 0", True, f"{len(stack.containers())} containers"
        )
        non_root(stack, report)
        prometheus = start_prometheus(stack, report)

        instrument_token = make_token(stack, "e2e-instrument", "instrument", ["read", "file"])
        reader_token = make_token(stack, "e2e-reader", "reader", ["read"])
        client = httpx.Client(
            base_url=stack.api_url,
            headers={"Authorization": f"Bearer {reader_token}"},
            timeout=30,
        )
        t0 = time.monotonic()
        filed = run_instrument(stack, instrument_token, args)
        report.time("instrument: write + file through the API", time.monotonic() - t0)
        report.facts.append(
            (
                "filed",
                f"{len(filed)} files, {sum(f['size'] for f in filed) / 1e6:.1f} MB, "
                f"{len({f['observation'] for f in filed})} observations",
            )
        )
        t_filed = time.monotonic()
        victim = kill_worker_mid_task(stack, client, report, args.down_s)
        state = wait_pipeline(client, filed, t_filed, args.timeout, report)
        if victim is not None:
            a = client.get(f"{API}/long_term_archive_transfers/{victim}").json()
            report.check(
                "pipeline finished after a worker was killed mid-task",
                a["status"] == "completed",
                f"the interrupted archive transfer {victim} is {a['status']} "
                f"(retries {a['retry_count']})",
            )
        t0 = time.monotonic()
        verify_s3(stack, client, filed, state, report)
        report.time("verify S3 objects", time.monotonic() - t0)
        if prometheus:
            t0 = time.monotonic()
            check_prometheus(stack, report)
            report.time("prometheus checks", time.monotonic() - t0)
        retries = sum(a["retry_count"] for a in state["ltas"])
        report.facts.append(("archive transfers", f"{len(state['ltas'])}, {retries} retries"))
        client.close()
    except Exception as exc:
        report.check("e2e ran to the end", False, f"{type(exc).__name__}: {exc}")
        for c in stack.containers():
            if c.health not in ("healthy", None) or (c.status == "exited" and c.exit_code):
                print(f"--- {c.service} ({c.status}, {c.health}):\n{stack.logs(c.service)}")
    finally:
        if args.keep:
            fd, name = tempfile.mkstemp(prefix=f"{stack.project}-", suffix=".env")
            keys = ("COMPOSE_", "CCAT_", "S3_", "POSTGRES_", "REDIS_")
            with os.fdopen(fd, "w") as out:
                out.writelines(
                    f"{k}={v}\n" for k, v in sorted(stack.env.items()) if k.startswith(keys)
                )
            env_file = name
            log(f"--keep: the stack stays up; its settings and secrets: {env_file} (mode 600)")
        else:
            t0 = time.monotonic()
            stack.down()
            report.time("down -v", time.monotonic() - t0)
    report.time("total", time.monotonic() - t_start)
    report.print()
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
