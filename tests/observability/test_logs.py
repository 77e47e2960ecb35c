"""Structured logs: every process writes JSON lines carrying the ids of what it works on."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest

from ccat_ops_db.logs import log_context, setup_logging
from tests.observability.conftest import ObservedStack

#: Celery's own default line format ("[2026-01-01 00:00:00,000: INFO/MainProcess] ...").
CELERY_TEXT_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+: [A-Z]+/")


def _records(path: Path) -> list[dict]:
    """The JSON log records of a process log (banners printed by Celery are not records)."""
    lines = path.read_text().splitlines()
    assert not [ln for ln in lines if CELERY_TEXT_LINE.match(ln)], f"text log lines in {path}"
    records = []
    for line in lines:
        if line.startswith("{"):
            doc = json.loads(line)  # every record line is a complete JSON object
            assert {"ts", "level", "logger", "msg", "pid"} <= doc.keys(), doc
            records.append(doc)
    return records


def test_workers_log_json_with_task_and_record_ids(observed: ObservedStack) -> None:
    cologne = _records(observed.logs["worker-cologne"])
    transfers = [r for r in cologne if r.get("kind") == "data_transfer" and "transfer_id" in r]
    assert transfers, cologne[-5:]
    assert all(r["task_id"] and r["service"] == "worker" for r in transfers)
    archive = [r for r in cologne if "archive_transfer_id" in r]
    assert archive
    ccat = _records(observed.logs["worker-ccat"])
    failed = [
        r
        for r in ccat
        if r.get("level") == "warning" and "raw_data_package_id" in r and "failed" in r["msg"]
    ]
    assert failed, "the failed packaging is logged with its package id"
    assert "(log: " in failed[0]["msg"]


def test_manager_logs_json_with_the_ids_it_submits(observed: ObservedStack) -> None:
    records = _records(observed.logs["manager"])
    submitted = [r for r in records if r["msg"].startswith("submitted ")]
    kinds = {r["kind"] for r in submitted}
    assert {"raw_data_package", "data_transfer", "unpack", "long_term_archive_transfer"} <= kinds
    assert all(r["manager"] == "all" and "record_id" in r for r in submitted)


def test_api_logs_json(observed: ObservedStack) -> None:
    records = _records(observed.logs["api"])
    assert any("startup complete" in r["msg"] for r in records), records[-5:]
    assert all(r["service"] == "api" for r in records)


def test_formatter_merges_context_and_extra_ids() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging("json", "INFO", service="unit", stream=out)
        log = logging.getLogger("unit.test")
        with log_context(task_id="t-1", package_id=7, ignored=None):
            log.info("moved %d bytes", 5, extra={"transfer_id": 3, "site": "cologne"})
        try:
            raise ValueError("bad")
        except ValueError:
            log.exception("boom")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["msg"] == "moved 5 bytes"
    assert (first["task_id"], first["package_id"], first["transfer_id"]) == ("t-1", 7, 3)
    assert first["site"] == "cologne" and first["service"] == "unit"
    assert "ignored" not in first and "task_id" not in second
    assert "ValueError: bad" in second["exc"]


def test_bad_log_settings_are_named() -> None:
    with pytest.raises(ValueError, match="log format"):
        setup_logging("xml")
    with pytest.raises(ValueError, match="CCAT_LOG_LEVEL"):
        setup_logging("json", "LOUD")


def test_api_log_records_name_their_request() -> None:
    """Over real HTTP: the app runs under uvicorn in a thread of this process on 127.0.0.1 (so
    its log records reach the stream set up here), and httpx sends the requests."""
    import httpx
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from ops_db_api.metrics import ApiMetrics, MetricsMiddleware
    from tests.api_server import free_port

    def handler(request):  # a route that logs, as the API's error handlers do
        logging.getLogger("ops_db_api").warning("database unavailable")
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/api/v1/things/{id}", handler)])
    app.add_middleware(MetricsMiddleware, metrics=ApiMetrics())
    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    try:
        setup_logging("json", "INFO", service="api", stream=out)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert client.get("/api/v1/things/42", headers={"X-Request-ID": "req-7"}).text == "ok"
            assert client.get("/api/v1/things/43").text == "ok"
        logging.getLogger("ops_db_api").warning("outside a request")
    finally:
        server.should_exit = True
        thread.join(30)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    first, second, outside = [r for r in records if r["logger"] == "ops_db_api"]
    assert first["request_id"] == "req-7" and first["http_path"] == "/api/v1/things/42"
    assert second["request_id"] and second["request_id"] != "req-7"
    assert second["http_method"] == "GET" and second["http_path"].endswith("/43")
    assert "request_id" not in outside
