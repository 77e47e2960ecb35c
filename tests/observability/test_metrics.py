"""Every process type serves its documented metrics, and they move when the pipeline runs.

The list below is the one in docs/observability.md; the stack is a real run (conftest.py).
"""

from __future__ import annotations

from tests.observability.conftest import GOOD_OBSERVATIONS, ObservedStack, total

#: Documented metric names per process type (docs/observability.md).
DOCUMENTED = {
    "api": [
        "ccat_api_requests_total",
        "ccat_api_request_duration_seconds",
        "ccat_api_raw_data_files_filed_total",
        "ccat_api_raw_data_bytes_filed_total",
        "ccat_api_executed_obs_units_started_total",
        "ccat_api_auth_failures_total",
        "ccat_api_up",
    ],
    "worker": [
        "ccat_transfer_tasks_total",
        "ccat_transfer_task_failures_total",
        "ccat_transfer_bytes_total",
        "ccat_transfer_route_bytes_total",
        "ccat_transfer_task_seconds",
        "ccat_transfer_location_free_bytes",
        "ccat_transfer_location_used_bytes",
        "ccat_transfer_location_size_bytes",
    ],
    "manager": [
        "ccat_transfer_records",
        "ccat_transfer_failed_records",
        "ccat_transfer_backlog_items",
        "ccat_transfer_backlog_oldest_age_seconds",
        "ccat_transfer_database_up",
        "ccat_transfer_unarchived_packages",
        "ccat_transfer_unarchived_oldest_age_seconds",
        "ccat_transfer_stranded_packages",
        "ccat_transfer_copies",
    ],
}


def _exists(scrape: dict, name: str) -> bool:
    # a counter's family is named without ``_total``; a histogram has _bucket/_count/_sum
    return name in scrape or name.removesuffix("_total") in scrape


def test_every_process_type_serves_its_documented_metrics(observed: ObservedStack) -> None:
    for process, url in observed.metrics_urls.items():
        kind = "worker" if process.startswith("worker") else process
        for when in ("before", "after"):
            scrape = getattr(observed, when)[process]
            missing = [n for n in DOCUMENTED[kind] if not _exists(scrape, n)]
            assert not missing, f"{process} ({url}) {when} the run lacks {missing}"


def test_api_metrics_move(observed: ObservedStack) -> None:
    before, after = observed.before["api"], observed.after["api"]
    assert total(after["ccat_api_requests_total"]) > total(before["ccat_api_requests_total"])
    summary = {"route": "/api/v1/pipeline/summary", "status": "200"}
    assert total(after["ccat_api_requests_total"], **summary) >= 1
    assert total(after["ccat_api_request_duration_seconds_count"]) > total(
        before.get("ccat_api_request_duration_seconds_count", {})
    )
    assert total(after["ccat_api_up"]) == 1


def test_worker_metrics_move(observed: ObservedStack) -> None:
    b = observed.before
    a = observed.after
    # the telescope's worker packaged (and failed one package for a missing file)
    ccat_before, ccat = b["worker-ccat"], a["worker-ccat"]
    # every stage's counts exist at 0 before any task ran, so the first task is an increase
    started = ccat_before["ccat_transfer_tasks_total"]
    for stage in ("raw_data_package", "data_transfer", "unpack", "deletion", "fixity"):
        for result in ("done", "failed"):
            assert started[(("result", result), ("site", "ccat"), ("stage", stage))] == 0, started
    done = total(
        ccat["ccat_transfer_tasks_total"], stage="raw_data_package", result="done", site="ccat"
    )
    assert done >= 2 > total(ccat_before.get("ccat_transfer_tasks_total", {}))
    assert total(ccat["ccat_transfer_task_failures_total"], stage="raw_data_package") == 1, ccat[
        "ccat_transfer_task_failures_total"
    ]
    assert total(ccat["ccat_transfer_bytes_total"], stage="raw_data_package") > 0
    assert total(ccat["ccat_transfer_task_seconds_count"], stage="raw_data_package") >= 2
    # Cologne pulled the transfer packages from the telescope: bytes on the route ccat->cologne
    cologne = a["worker-cologne"]
    route = total(
        cologne["ccat_transfer_route_bytes_total"], source_site="ccat", dest_site="cologne"
    )
    assert route > 0
    assert total(cologne["ccat_transfer_bytes_total"], stage="data_transfer") == route
    assert total(cologne["ccat_transfer_tasks_total"], stage="unpack", result="done") >= 1
    assert total(cologne["ccat_transfer_tasks_total"], stage="long_term_archive_transfer") >= 2
    # disk use of the buffer each worker reaches (all test sites share one file system)
    for site in ("ccat", "cologne"):
        free = a[f"worker-{site}"]["ccat_transfer_location_free_bytes"]
        size = a[f"worker-{site}"]["ccat_transfer_location_size_bytes"]
        assert total(free, site=site, location="buffer") > 0, free
        assert total(size, site=site, location="buffer") >= total(
            free, site=site, location="buffer"
        )


def test_manager_metrics_move(observed: ObservedStack) -> None:
    before, after = observed.before["manager"], observed.after["manager"]
    rec = "ccat_transfer_records"
    for stage in ("raw_data_package", "data_transfer", "unpack", "long_term_archive_transfer"):
        assert total(before[rec], stage=stage, status="completed") == 0
        assert total(after[rec], stage=stage, status="completed") >= 1, stage
    assert total(after[rec], stage="raw_data_package", status="failed") == 1
    failed = after["ccat_transfer_failed_records"]
    assert total(failed, stage="raw_data_package") == 1
    [labels] = [dict(k) for k, v in failed.items() if v]
    assert labels["reason"] and labels["reason"] != "unknown", labels
    # backlog per stage and site: every stage and site is reported, and work was seen waiting
    backlog = after["ccat_transfer_backlog_items"]
    stages = {dict(k)["stage"] for k in backlog}
    sites = {dict(k)["site"] for k in backlog}
    assert {"filing", "raw_data_package", "data_transfer", "unpack", "staging_job"} <= stages
    assert {"ccat", "cologne", "us"} <= sites
    assert observed.peak_backlog > 0
    assert observed.peak_backlog_age > 0
    assert total(backlog) == 0  # everything finished
    # what holds data back: the failed observation's package at the telescope, nothing else
    assert total(after["ccat_transfer_database_up"]) == 1
    assert total(after["ccat_transfer_unarchived_packages"], site="ccat") == 1
    assert total(after["ccat_transfer_unarchived_packages"]) == 1
    assert total(after["ccat_transfer_unarchived_oldest_age_seconds"], site="ccat") > 0
    assert total(after["ccat_transfer_stranded_packages"]) == 0
    assert {dict(k)["site"] for k in after["ccat_transfer_stranded_packages"]} >= {"ccat", "us"}
    copies = after["ccat_transfer_copies"]
    assert total(copies, site="cologne", status="present") >= GOOD_OBSERVATIONS, copies
    assert total(copies, status="deletion_failed") == 0
    assert total(after.get("ccat_transfer_unverified_package_copies", {})) == 0
