"""Prometheus metrics of the transfer system.

Workers count what they do (tasks done and failed by exception class, bytes moved, task
durations). Managers serve the pipeline's state from the database at scrape time
(:class:`PipelineCollector`): per stage, how many records wait, run, finished and failed, and
failures by reason class — so a dashboard shows what is stuck without a log search.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from .state import KINDS

_TASKS = Counter(
    "ccat_transfer_tasks_total", "Transfer tasks finished, by stage and result", ["stage", "result"]
)
_FAILURES = Counter(
    "ccat_transfer_task_failures_total",
    "Transfer task failures, by stage and exception class",
    ["stage", "reason"],
)
_BYTES = Counter("ccat_transfer_bytes_total", "Bytes written, by stage", ["stage"])
_SECONDS = Histogram(
    "ccat_transfer_task_seconds",
    "Task duration, by stage",
    ["stage"],
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600),
)


class TaskMetrics:
    """Counters the workers update."""

    def done(self, stage: str, seconds: float) -> None:
        """A task of ``stage`` finished."""
        _TASKS.labels(stage, "done").inc()
        if seconds:
            _SECONDS.labels(stage).observe(seconds)

    def failed(self, stage: str, reason: str) -> None:
        """A task of ``stage`` failed with exception class ``reason``."""
        _TASKS.labels(stage, "failed").inc()
        _FAILURES.labels(stage, reason).inc()

    def bytes(self, stage: str, n: int) -> None:
        """``n`` bytes written by ``stage``."""
        _BYTES.labels(stage).inc(n)


TASK_METRICS = TaskMetrics()


def pipeline_counts(engine: Engine) -> dict[str, dict[str, int]]:
    """Records per stage and status, from the database."""
    out: dict[str, dict[str, int]] = {}
    with Session(engine) as s:
        for name, kind in KINDS.items():
            col = getattr(kind.model, kind.status)
            rows = s.execute(select(col, func.count()).group_by(col)).all()
            out[name] = {str(status): int(n) for status, n in rows}
    return out


def failure_reasons(engine: Engine) -> dict[tuple[str, str], int]:
    """FAILED records per stage and exception class (the text before the first colon)."""
    out: dict[tuple[str, str], int] = {}
    with Session(engine) as s:
        for name, kind in KINDS.items():
            col = getattr(kind.model, kind.status)
            reason_col = getattr(kind.model, kind.failure_reason)
            for (reason,) in s.execute(select(reason_col).where(col == "failed")).all():
                cls = (reason or "unknown").split(":", 1)[0][:64]
                out[(name, cls)] = out.get((name, cls), 0) + 1
    return out


class PipelineCollector:
    """Reads the pipeline state from the database at every scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Any:
        """Yield the gauges (a failing database yields nothing rather than an error)."""
        try:
            counts = pipeline_counts(self.engine)
            reasons = failure_reasons(self.engine)
        except Exception:
            return
        g = GaugeMetricFamily(
            "ccat_transfer_records",
            "Operation records by stage and status",
            labels=["stage", "status"],
        )
        for stage, by_status in counts.items():
            for status in ("pending", "scheduled", "in_progress", "completed", "failed"):
                g.add_metric([stage, status], by_status.get(status, 0))
        yield g
        f = GaugeMetricFamily(
            "ccat_transfer_failed_records",
            "Permanently failed records by stage and reason class",
            labels=["stage", "reason"],
        )
        for (stage, reason), n in reasons.items():
            f.add_metric([stage, reason], n)
        yield f


_served: set[int] = set()


def serve(port: int, host: str = "127.0.0.1", engine: Engine | None = None) -> None:
    """Serve /metrics on ``host:port`` (once per process); with ``engine``, pipeline gauges."""
    if port in _served:
        return
    if engine is not None:
        REGISTRY.register(PipelineCollector(engine))  # type: ignore[arg-type]
    start_http_server(port, addr=host)
    _served.add(port)
