"""Prometheus collectors of the write buffer, read from the buffer database at scrape time."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .buffer import SiteBuffer

log = logging.getLogger("ops_db_api.site")


class BufferCollector(Collector):
    """Buffer depth, oldest pending write age, parked writes, replay totals and rate.

    Read from the database on every scrape, so the API and the replayer (separate processes)
    report the same figures.
    """

    def __init__(self, buffer: SiteBuffer) -> None:
        self.buffer = buffer

    def collect(self) -> Iterator[Metric]:
        """One scrape: a few aggregate queries on the buffer database."""
        up = GaugeMetricFamily(
            "ccat_api_buffer_up", "1 if the buffer database answered this scrape."
        )
        try:
            s = self.buffer.status()
        except Exception as exc:  # a scrape must not fail because the buffer is down
            log.error("buffer status failed", extra={"error": str(exc).splitlines()[0]})
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily(
            "ccat_api_buffer_depth", "Buffered writes not yet replayed to the main site.", s.depth
        )
        yield GaugeMetricFamily(
            "ccat_api_buffer_oldest_write_age_seconds",
            "Age of the oldest write not yet replayed (0 when the buffer is empty).",
            s.oldest_pending_age_s or 0.0,
        )
        yield GaugeMetricFamily(
            "ccat_api_buffer_parked",
            "Writes the main site refused, kept for an operator.",
            s.parked,
        )
        yield CounterMetricFamily(
            "ccat_api_buffer_replayed",
            "Writes replayed to the main site.",
            s.replayed_total,
        )
        yield CounterMetricFamily(
            "ccat_api_buffer_parked_writes",
            "Writes parked since the buffer was created.",
            s.parked_total,
        )
        yield GaugeMetricFamily(
            "ccat_api_buffer_replay_rate_per_second",
            "Writes replayed per second over the last minute.",
            s.replay_rate_per_s,
        )
        yield GaugeMetricFamily(
            "ccat_api_buffer_last_success_timestamp_seconds",
            "When the replayer last delivered a write (Unix time, 0: never).",
            s.last_success_at.timestamp() if s.last_success_at else 0.0,
        )
