"""Prometheus metrics of the API (one registry per app).

With several worker processes (``ccat-api serve --workers N``) each process counts only the
requests it answered, and a scrape reaches one of them at random: counters would jump back and
forth and ``rate()`` would read resets. ``serve`` therefore gives the processes a shared
folder (``PROMETHEUS_MULTIPROC_DIR``, prometheus_client's multiprocess mode): every process
writes its values there, and ``/metrics`` serves their sum from whichever process answers.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ccat_ops_db.logs import pop_context, push_context


class ApiMetrics:
    """The API's metrics: request counts and latencies, filed files, process info."""

    def __init__(self) -> None:
        #: What ``/metrics`` serves; collectors read at scrape time (the observatory's buffer)
        #: are registered here.
        self.registry = CollectorRegistry()
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if folder:  # several processes: serve the sum of what they all wrote
            MultiProcessCollector(self.registry, path=folder)
            #: Where counters, gauges and histograms this process updates are registered:
            #: the served registry itself, or, with several processes, a private one (their
            #: values reach /metrics through the shared folder, summed, and only that way).
            self.local_registry = CollectorRegistry()
        else:
            self.local_registry = self.registry
        self.multiprocess = bool(folder)
        registry = self.local_registry
        self.requests = Counter(
            "ccat_api_requests_total",
            "HTTP requests handled, by method, route template and status code.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "ccat_api_request_duration_seconds",
            "Time to handle a request, by method and route template.",
            ["method", "route"],
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.files_filed = Counter(
            "ccat_api_raw_data_files_filed_total",
            "Raw data files newly recorded through the API.",
            registry=registry,
        )
        self.bytes_filed = Counter(
            "ccat_api_raw_data_bytes_filed_total",
            "Bytes of the raw data files newly recorded through the API.",
            registry=registry,
        )
        self.observations_started = Counter(
            "ccat_api_executed_obs_units_started_total",
            "Executed obs units started through the API.",
            registry=registry,
        )
        self.auth_failures = Counter(
            "ccat_api_auth_failures_total",
            "Requests refused for authentication (401) or authorization (403).",
            ["status"],
            registry=registry,
        )
        self.up = Gauge(
            "ccat_api_up",
            "1 while the API process serves.",
            registry=registry,
            multiprocess_mode="max",  # 1 if any process serves, not the number of processes
        )
        self.up.set(1)


class MetricsMiddleware:
    """Pure ASGI middleware: counts and times every HTTP request by its route template, and
    puts ``request_id`` (``X-Request-ID`` or a random one), method and path on every log record
    written while the request runs."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, prefix: str = "/api/v1") -> None:
        self.app = app
        self.metrics = metrics
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}
        # every log record written while this request runs names it (see ccat_ops_db.logs)
        request_id = None
        for name, value in scope.get("headers") or ():
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:64]
                break
        log_token = push_context(
            request_id=request_id or secrets.token_hex(6),
            http_method=scope.get("method"),
            http_path=scope.get("path"),
        )

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            pop_context(log_token)
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            # Routers included with a prefix report their own path: put the prefix back.
            path = scope.get("path", "")
            if (
                template != "unmatched"
                and path.startswith(self.prefix + "/")
                and not template.startswith(self.prefix + "/")
            ):
                template = self.prefix + template
            method = scope.get("method", "GET")
            code = status["code"]
            self.metrics.requests.labels(method, template, str(code)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
            if code in (401, 403):
                self.metrics.auth_failures.labels(str(code)).inc()
